import dataclasses
from typing import Literal

import pytest

from softclip.pipeline.config import (
    ConfigError,
    apply_overrides,
    config_hash,
    from_dict,
    load_config,
    read_yaml,
    save_config,
    to_yaml,
)
from softclip.pipeline.shapes import ShapesConfig


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    name: str
    steps: int = 10
    optim: OptimConfig = OptimConfig()
    tags: tuple[str, ...] = ()
    note: str | None = None


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig(name="a", optim=OptimConfig(lr=1e-3, schedule="constant"), tags=("x", "y"))
    path = tmp_path / "run.yaml"
    save_config(cfg, path)
    assert load_config(RunConfig, path) == cfg
    assert load_config(ShapesConfig, save_config(ShapesConfig(seed=3), tmp_path / "s.yaml")) == ShapesConfig(seed=3)


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: a\noptim:\n  lr: 0.1\n  bettas: [0.9, 0.99]\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    assert "optim.bettas" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("text, where", [
    ("name: a\nsteps: ten\n", "steps"),
    ("name: a\noptim: {lr: fast}\n", "optim.lr"),
    ("name: a\noptim: {schedule: linear}\n", "optim.schedule"),
    ("name: a\noptim: {betas: [0.9]}\n", "optim.betas"),
    ("steps: 3\n", "name"),
])
def test_mistyped_or_missing_value_is_an_error(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"'{where}'"):
        load_config(RunConfig, path)


def test_int_is_accepted_for_float_and_lists_become_tuples():
    cfg = from_dict(RunConfig, {"name": "a", "optim": {"lr": 1, "betas": [0.5, 0.6]}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.betas == (0.5, 0.6)


def test_post_init_validation_becomes_config_error(tmp_path):
    path = tmp_path / "shapes.yaml"
    path.write_text("caption_noise: 1.5\n")
    with pytest.raises(ConfigError, match="caption_noise"):
        load_config(ShapesConfig, path)


def test_overrides():
    cfg = apply_overrides(RunConfig(name="a"), ["optim.lr=1e-4", "steps=5", "note=hello"])
    assert cfg.optim.lr == 1e-4 and cfg.steps == 5 and cfg.note == "hello"
    with pytest.raises(ConfigError, match="optim.lrr"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(cfg, ["steps"])


def test_config_hash_is_stable_and_sensitive():
    a, b = RunConfig(name="a"), RunConfig(name="a", steps=11)
    assert config_hash(a) == config_hash(RunConfig(name="a"))
    assert config_hash(a) != config_hash(b)
    assert "name: a" in to_yaml(a)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class JobConfig:
    optim: OptimConfig | None = None


def test_optional_section_errors_name_the_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("optim: {lrr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr' for OptimConfig \(known keys: betas, lr, schedule\)"):
        load_config(JobConfig, path)
    path.write_text("optim: {lr: 0.1}\n")
    assert load_config(JobConfig, path) == JobConfig(optim=OptimConfig(lr=0.1))
    path.write_text("optim: null\n")
    assert load_config(JobConfig, path) == JobConfig()
    path.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match="'optim' = 3 is not a"):
        load_config(JobConfig, path)


@pytest.mark.parametrize("text, problem", [("a: [1\n", "not valid YAML"), ("- a\n- b\n", "expected a mapping")])
def test_read_yaml_errors_name_the_file(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem) as err:
        read_yaml(path)
    assert str(path) in str(err.value)
    path.write_text("")
    assert read_yaml(path) == {}


# -- hostile config files (issue 14, rows 11-13) -------------------------------------------------------------


def test_a_config_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml.*not UTF-8.*byte 9 is 0xe9"):
        read_yaml(path)


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    import time

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb\.yaml.*alias"):
        load_config(RunConfig, path)
    assert time.perf_counter() - start < 0.5


def test_an_anchor_alone_is_harmless_but_its_alias_is_refused(tmp_path):
    path = tmp_path / "anchor.yaml"
    path.write_text("name: &n x\nsteps: 3\n")
    assert load_config(RunConfig, path).name == "x"
    with pytest.raises(ConfigError, match="alias"):
        apply_overrides(RunConfig(name="x"), ["name=*n"])


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan"])
def test_a_non_finite_number_names_key_and_file(tmp_path, value):
    path = tmp_path / "nan.yaml"
    path.write_text(f"name: x\noptim:\n  lr: {value}\n")
    with pytest.raises(ConfigError, match=r"nan\.yaml: 'optim\.lr' must be a finite number"):
        load_config(RunConfig, path)


@pytest.mark.parametrize("text, key", [("name: x\nsteps: 1\nsteps: 2\n", "steps"),
                                       ("name: x\noptim:\n  lr: 0.1\n  lr: 0.2\n", "lr")])
def test_a_duplicated_key_is_refused_naming_key_and_file(tmp_path, text, key):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"dup\.yaml.*duplicate key '{key}'"):
        load_config(RunConfig, path)


def test_the_strict_loader_is_still_a_safe_loader(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(path)
