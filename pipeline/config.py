"""Typed dataclass configs stored as YAML.

Every stage describes its settings with a frozen dataclass; this module turns YAML (or a dict) into one,
checking every key and value type, and back. A wrong key is an error that names the key and the file,
so a typo never silently falls back to a default.

Example::

    @dataclass(frozen=True, kw_only=True, slots=True)
    class OptimConfig:
        lr: float = 5e-4
        betas: tuple[float, float] = (0.9, 0.98)

    cfg = load_config(OptimConfig, "optim.yaml")
    cfg = apply_overrides(cfg, ["lr=1e-4"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from softclip.pipeline.io import atomic_write_text

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_hash",
    "from_dict",
    "load_config",
    "parse_overrides",
    "parse_yaml",
    "read_yaml",
    "save_config",
    "to_dict",
    "to_yaml",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or dict does not match its dataclass (unknown key, wrong type, bad value)."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only) that also refuses aliases and duplicate keys.

    Aliases are refused because a few hundred bytes of nested aliases expand to billions of items (a
    "billion laughs" file); no softclip config needs them. A duplicated key would silently let the last
    value win.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is not allowed in a softclip "
                                              "config (write the value out)", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """Parse config YAML safely (plain data only; aliases and duplicate keys refused).

    Raises:
        ConfigError: the text is not valid YAML for a config; the message names ``source``.
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from err


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert_union(value: Any, tp: Any, where: str, source: str) -> Any:
    options = get_args(tp)
    if value is None and type(None) in options:
        return None
    members = [option for option in options if option is not type(None)]
    if len(members) == 1 and dataclasses.is_dataclass(members[0]) and isinstance(value, dict):
        return _convert(value, members[0], where, source)  # an optional section: its own error names the key
    for option in options:
        if option is type(None):
            continue
        try:
            return _convert(value, option, where, source)
        except ConfigError:
            continue  # try the next member of the union; the error below names them all
    raise ConfigError(f"{source}: '{where}' = {value!r} is not a {_type_name(tp)}")


def _convert_sequence(value: Any, tp: Any, where: str, source: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{source}: '{where}' must be a list, got {value!r}")
    origin, args = get_origin(tp), get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(f"{source}: '{where}' must have {len(args)} items, got {len(value)}")
        items = [_convert(v, a, f"{where}[{i}]", source) for i, (v, a) in enumerate(zip(value, args))]
    else:
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{where}[{i}]", source) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _convert_mapping(value: Any, tp: Any, where: str, source: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {value!r}")
    key_tp, val_tp = get_args(tp) or (Any, Any)
    return {_convert(k, key_tp, where, source): _convert(v, val_tp, f"{where}.{k}", source)
            for k, v in value.items()}


def _convert_scalar(value: Any, tp: Any, where: str, source: str) -> Any:
    if tp is float and isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass  # reported below as not a number
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: '{where}' must be a finite number, got {value!r}")
    expected = {float: ((int, float), "a number"), int: ((int,), "an integer"), bool: ((bool,), "true or false"),
                str: ((str,), "a string"), Path: ((str, Path), "a path")}
    if tp not in expected:
        raise TypeError(f"config field '{where}' has an unsupported annotation {tp!r}")
    kinds, words = expected[tp]
    if not isinstance(value, kinds) or (isinstance(value, bool) and tp is not bool):
        raise ConfigError(f"{source}: '{where}' must be {words}, got {value!r}")
    return tp(value) if tp in (float, Path) else value


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (lists to tuples, ints to floats)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, where, source)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(c) for c in get_args(tp))
            raise ConfigError(f"{source}: '{where}' = {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{where}' must be a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, prefix=f"{where}.", source=source)
    if origin in (tuple, list):
        return _convert_sequence(value, tp, where, source)
    if origin is dict:
        return _convert_mapping(value, tp, where, source)
    return _convert_scalar(value, tp, where, source)


def _build(cls: type[T], data: dict, *, prefix: str, source: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' for {cls.__name__} (known keys: {known})"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}", source)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: required key '{prefix}{name}' for {cls.__name__} is missing")
    try:
        return cls(**kwargs)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{source}: {cls.__name__}: {err}") from err


def from_dict(cls: type[T], data: dict | None, *, source: str = "<dict>") -> T:
    """Build the dataclass ``cls`` from a plain dict, checking keys and types recursively."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    return _build(cls, data, prefix="", source=source)


def read_yaml(path: str | Path) -> dict:
    """A config file's YAML as a dict (an empty file is ``{}``).

    Raises:
        FileNotFoundError: there is no such file.
        ConfigError: the file is not valid YAML, or not a mapping at the top level; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start} is 0x{raw[err.start]:02x}); save the "
                          "file as UTF-8") from err
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path) -> T:
    """Read a YAML file into the dataclass ``cls``; errors name the file and the key."""
    return from_dict(cls, read_yaml(path), source=str(path))


def to_dict(cfg: Any) -> Any:
    """Plain-data view of a config: dicts, lists, strings and numbers only."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def to_yaml(cfg: Any) -> str:
    """The config as YAML text; ``from_dict(type(cfg), yaml.safe_load(to_yaml(cfg))) == cfg``."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config next to an output, atomically."""
    return atomic_write_text(Path(path), to_yaml(cfg))


def config_hash(cfg: Any, length: int = 16) -> str:
    """A stable content hash of a config or plain data (SHA-256 of canonical JSON: sorted keys, no spaces),
    the one fingerprint behind detector ids and the workflow cache's keys."""
    canonical = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def parse_overrides(overrides: list[str] | tuple[str, ...], *, source: str = "command line") -> dict[str, Any]:
    """``key.sub=value`` overrides as ``{"key.sub": value}`` in order (values parsed as YAML): the one parser
    of the ``--set`` syntax, for :func:`apply_overrides` and flat settings such as the detector's."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override '{item}' must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        parsed[dotted.strip()] = parse_yaml(raw, f"{source}: override '{item}'")
    return parsed


def apply_overrides(cfg: T, overrides: list[str] | tuple[str, ...], *, source: str = "command line") -> T:
    """Return a copy of ``cfg`` with ``key.sub=value`` overrides applied (values parsed as YAML)."""
    data = to_dict(cfg)
    for dotted, value in parse_overrides(overrides, source=source).items():
        keys = dotted.split(".")
        node = data
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"{source}: unknown key '{where}' in override '{dotted}=...'")
            node = node[key]
        if keys[-1] not in node:
            raise ConfigError(f"{source}: unknown key '{dotted}' in override '{dotted}=...'")
        node[keys[-1]] = value
    return from_dict(type(cfg), data, source=source)
