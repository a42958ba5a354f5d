"""Reading and writing VinVL checkpoints and label maps.

A VinVL checkpoint (``vinvl_vg_x152c4.pth``) is a flat state dict whose keys start with ``module.``;
``{"model": state_dict}`` and unprefixed keys are accepted too. ``attribute.feature_extractor.*`` is an
alias of ``roi_heads.box.feature_extractor.*`` (one shared module) and must hold equal tensors.
The label map is scene_graph_benchmark's JSON: ``label_to_idx`` / ``idx_to_label`` (1-based classes) and
``attribute_to_idx`` / ``idx_to_attribute`` (1-based attributes); index 0 (background, no attribute) is
not stored and is added on reading.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch
from torch import Tensor

from softclip.extract.detector.config import DetectorArch
from softclip.pipeline.io import atomic_write_bytes, atomic_write_json
from softclip.pipeline.torchio import load_weights_only

__all__ = [
    "ALIAS_PREFIX",
    "BACKGROUND",
    "BOX_EXTRACTOR_PREFIX",
    "NO_ATTRIBUTE",
    "CheckpointError",
    "check_state_dict",
    "infer_arch",
    "names_path",
    "read_labelmap",
    "read_labelmap_for",
    "read_state_dict",
    "write_checkpoint",
    "write_labelmap",
]

BACKGROUND = "__background__"
NO_ATTRIBUTE = "__no_attribute__"
ALIAS_PREFIX = "attribute.feature_extractor."
BOX_EXTRACTOR_PREFIX = "roi_heads.box.feature_extractor."
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint or label map does not match the VinVL layout; the message names the file and keys."""


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load a checkpoint (:func:`pipeline.torchio.load_weights_only`: a damaged or pickled file is a
    ``CorruptCheckpointError``) and strip the ``module.`` prefix (when every key has it)."""
    loaded = load_weights_only(path, hint="give a plain state dict saved with torch.save")
    if isinstance(loaded, dict) and "model" in loaded and isinstance(loaded["model"], dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors (or {{'model': ...}})")
    if loaded and all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module."):]: v for k, v in loaded.items()}
    return dict(loaded)


def _require(state: dict[str, Tensor], keys: list[str], source: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{source}: missing key(s) needed to read the architecture: {_listing(missing)}")


def _count_blocks(state: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _infer_anchors(cell: Tensor, source: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    widths = cell[:, 2] - cell[:, 0] + 1
    heights = cell[:, 3] - cell[:, 1] + 1
    sizes = tuple(sorted(int(w) for w, h in zip(widths.tolist(), heights.tolist()) if w == h))
    ratios_by_count = {1: (1.0,), 3: (0.5, 1.0, 2.0)}
    if not sizes or cell.shape[0] % len(sizes) or cell.shape[0] // len(sizes) not in ratios_by_count:
        raise CheckpointError(
            f"{source}: rpn.anchor_generator.cell_anchors.0 {tuple(cell.shape)} is not a legacy anchor set "
            "with aspect ratios (1,) or (0.5, 1, 2)"
        )
    return sizes, ratios_by_count[cell.shape[0] // len(sizes)]


def infer_arch(state: dict[str, Tensor], source: str = "<state dict>") -> DetectorArch:
    """Read :class:`DetectorArch` back from the tensor shapes of an unprefixed VinVL state dict."""
    body = "backbone.body."
    needed = [f"{body}stem.conv1.weight", f"{body}layer1.0.conv2.weight", f"{body}layer1.0.conv3.weight",
              "roi_heads.box.predictor.cls_score.weight", "attribute.predictor.attr_score.weight",
              "attribute.predictor.cls_embedding.weight", "attribute.predictor.fc_attr.weight",
              "rpn.anchor_generator.cell_anchors.0"]
    _require(state, needed, source)
    conv2 = state[f"{body}layer1.0.conv2.weight"]
    res2 = state[f"{body}layer1.0.conv3.weight"].shape[0]
    groups = conv2.shape[0] // conv2.shape[1]
    sizes, ratios = _infer_anchors(state["rpn.anchor_generator.cell_anchors.0"], source)
    blocks = tuple(_count_blocks(state, f"{body}layer{k}.") for k in (1, 2, 3)) + (
        _count_blocks(state, f"{BOX_EXTRACTOR_PREFIX}head.layer4."),
    )
    try:
        return DetectorArch(
            blocks=blocks,
            groups=groups,
            width_per_group=conv2.shape[1] * 64 // (res2 // 4),
            stem_channels=state[f"{body}stem.conv1.weight"].shape[0],
            res2_channels=res2,
            num_classes=state["roi_heads.box.predictor.cls_score.weight"].shape[0],
            num_attributes=state["attribute.predictor.attr_score.weight"].shape[0],
            cls_embed_dim=state["attribute.predictor.cls_embedding.weight"].shape[1],
            attr_embed_dim=state["attribute.predictor.fc_attr.weight"].shape[0],
            anchor_sizes=sizes,
            aspect_ratios=ratios,
        )
    except ValueError as err:
        raise CheckpointError(f"{source}: tensor shapes do not describe a VinVL detector: {err}") from err


def check_state_dict(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Every expected key present with its shape, nothing else, and the attribute alias equal to the box head.

    Raises:
        CheckpointError: listing missing, unexpected and mis-shaped keys, or alias keys that differ.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k])
    )
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            problems.append(f"{len(keys)} {label} key(s): {_listing(keys)}")
    if problems:
        raise CheckpointError(f"{source}: does not match the VinVL layout: " + "; ".join(problems))
    differing = [
        k for k in state if k.startswith(ALIAS_PREFIX)
        and not torch.equal(state[k], state[BOX_EXTRACTOR_PREFIX + k[len(ALIAS_PREFIX):]])
    ]
    if differing:
        raise CheckpointError(
            f"{source}: {ALIAS_PREFIX}* must equal {BOX_EXTRACTOR_PREFIX}* (one shared module) but "
            f"{_listing(differing)} differ"
        )


def _indexed_names(data: dict, name_to_idx: str, idx_to_name: str, zero_name: str, source: str) -> list[str]:
    if name_to_idx not in data and idx_to_name not in data:
        raise CheckpointError(f"{source}: label map has neither '{name_to_idx}' nor '{idx_to_name}'")
    try:
        by_name = {int(v): str(k) for k, v in data[name_to_idx].items()} if name_to_idx in data else None
        by_index = {int(k): str(v) for k, v in data[idx_to_name].items()} if idx_to_name in data else None
    except (AttributeError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: '{name_to_idx}' / '{idx_to_name}' must map names to integer indices "
                              f"({err})") from err
    if by_name is not None and by_index is not None and by_name != by_index:
        index = min(i for i in set(by_name) | set(by_index) if by_name.get(i) != by_index.get(i))
        raise CheckpointError(f"{source}: '{idx_to_name}' and '{name_to_idx}' disagree at index {index} "
                              f"({by_index.get(index)!r} vs {by_name.get(index)!r}); the label map is damaged or "
                              "edited by hand, use the one that came with the weights")
    pairs = by_name if by_name is not None else by_index
    expected = set(range(1, len(pairs) + 1))
    if set(pairs) != expected:
        raise CheckpointError(f"{source}: '{name_to_idx}' indices must be exactly 1..{len(pairs)} (1-based)")
    return [zero_name] + [pairs[i] for i in range(1, len(pairs) + 1)]


def read_labelmap(path: str | Path) -> tuple[list[str], list[str]]:
    """Class names (index 0 ``__background__``) and attribute names (index 0 ``__no_attribute__``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: label map is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: label map must be a JSON object")
    classes = _indexed_names(data, "label_to_idx", "idx_to_label", BACKGROUND, str(path))
    attributes = _indexed_names(data, "attribute_to_idx", "idx_to_attribute", NO_ATTRIBUTE, str(path))
    return classes, attributes


def names_path(weights: str | Path) -> Path:
    """Where the class and attribute names a detector was trained with are kept: ``<weights>.names.json``."""
    weights = Path(weights)
    return weights.with_name(f"{weights.name}.names.json")


def read_labelmap_for(weights: str | Path, labelmap: str | Path) -> tuple[list[str], list[str]]:
    """:func:`read_labelmap`, checked against the names stored with ``weights`` (see :func:`names_path`)
    when there are any: a permuted or swapped label map would silently relabel every box.

    Raises:
        CheckpointError: the label map's names differ from the weights'; the message names both files.
    """
    classes, attributes = read_labelmap(labelmap)
    stored = names_path(weights)
    if not stored.is_file():
        return classes, attributes
    try:
        names = json.loads(stored.read_text())
        expected = (list(names["class_names"]), list(names["attribute_names"]))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{stored}: not a names file of detector weights ({err}); restore it or delete it "
                              "to skip the check") from err
    for kind, found, wanted in (("class", classes, expected[0]), ("attribute", attributes, expected[1])):
        if found != wanted:
            first = next((i for i, (a, b) in enumerate(zip(found, wanted)) if a != b), min(len(found), len(wanted)))
            shown = f"index {first}: {found[first] if first < len(found) else None!r} here, " \
                    f"{wanted[first] if first < len(wanted) else None!r} in training"
            raise CheckpointError(f"{labelmap}: {kind} names differ from those {weights} was trained with "
                                  f"({shown}; see {stored.name}); give the label map that belongs to these weights")
    return classes, attributes


def write_labelmap(path: str | Path, class_names: list[str], attribute_names: list[str], *,
                   weights: str | Path | None = None) -> Path:
    """Write names (index 0 included, not stored) as a VinVL label map JSON, atomically; with ``weights``,
    also record the names beside them (:func:`names_path`), which :func:`read_labelmap_for` checks."""
    if weights is not None:
        atomic_write_json(names_path(weights), {"class_names": list(class_names),
                                                "attribute_names": list(attribute_names)})
    return atomic_write_json(path, {
        "label_to_idx": {name: i for i, name in enumerate(class_names) if i > 0},
        "idx_to_label": {str(i): name for i, name in enumerate(class_names) if i > 0},
        "attribute_to_idx": {name: i for i, name in enumerate(attribute_names) if i > 0},
        "idx_to_attribute": {str(i): name for i, name in enumerate(attribute_names) if i > 0},
    })


def write_checkpoint(path: str | Path, state: dict[str, Tensor]) -> Path:
    """Save ``state`` (unprefixed VinVL names) as a flat ``module.``-prefixed state dict, atomically."""
    buffer = io.BytesIO()
    torch.save({f"module.{k}": v.detach().cpu() for k, v in state.items()}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())
