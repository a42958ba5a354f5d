"""Workflow files: a dataset, a detector, the extraction settings, training configs and evaluation tasks.

Example (``workflows/configs/shapes.yaml``, but training a detector instead of loading the shipped one)::

    name: shapes-own-detector
    dataset:
      shapes: {num_train: 5000, caption_noise: 0.2}
    detector:
      train: extract/configs/shapes.yaml
    extract:
      config: extract/configs/extract-shapes.yaml
    train:
      - {name: clip, config: train/configs/shapes-clip.yaml}
      - {name: softclip, config: train/configs/shapes-softclip.yaml}
    eval:
      tasks: [shapes]

Stage config files are the stages' own YAML files; the runner fills in the paths that connect them
(dataset, detector files, shard folders, run folders, checkpoints), so those fields may be left out
(:func:`stage_config`). Paths in a workflow are taken relative to the working directory, else to the
softclip checkout (:func:`project_file`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from softclip.pipeline.config import ConfigError, apply_overrides, from_dict, load_config, read_yaml, to_dict
from softclip.pipeline.registry import data_root
from softclip.pipeline.shapes import ShapesConfig

__all__ = ["DatasetStep", "DetectorStep", "EvalStep", "ExtractStep", "TrainStep", "WorkflowConfig", "load_workflow",
           "project_file", "stage_config", "user_file"]

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DatasetStep:
    """Exactly one of: a registered dataset ``name``, an explicit ``path``, or ``shapes`` settings."""

    name: str = ""
    path: str = ""
    shapes: ShapesConfig | None = None

    def __post_init__(self):
        given = [bool(self.name), bool(self.path), self.shapes is not None]
        if sum(given) != 1:
            raise ValueError("dataset: give exactly one of name (registered), path, or shapes (generate)")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DetectorStep:
    """Given weights (``weights`` + ``labelmap``, and the detector ``config`` YAML for variants whose input
    size and test settings the weights do not carry), a detector trained on the dataset (``train``: a
    detector config YAML, with ``overrides``), or ``annotations: true``: the shapes world's own box
    annotations stand in for a detector (the oracle of :mod:`pipeline.annotation_features`; the extract
    step's config is then unused)."""

    weights: str = ""
    labelmap: str = ""
    config: str = ""
    train: str = ""
    overrides: tuple[str, ...] = ()
    annotations: bool = False

    def __post_init__(self):
        if self.annotations:
            if self.weights or self.labelmap or self.config or self.train or self.overrides:
                raise ValueError("detector: annotations replaces the detector; give no weights, labelmap, config, "
                                 "train or overrides with it")
            return
        if bool(self.train) == bool(self.weights or self.labelmap):
            raise ValueError("detector: give either weights and labelmap, or train (a detector config), "
                             "or annotations: true")
        if not self.train and not (self.weights and self.labelmap):
            raise ValueError("detector: weights and labelmap go together")
        if self.train and self.config:
            raise ValueError("detector: config goes with weights; a trained detector's config is `train`")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ExtractStep:
    """An extraction config YAML (``dataset``, ``weights``, ``labelmap``, ``out`` are filled in).

    ``tags: annotations`` keeps the detector's shards but replaces their tags with the shapes world's annotated
    objects (:func:`pipeline.annotation_features.write_annotation_tag_shards`): soft targets from the truth,
    everything else the detector's (the study's positive control). ``tags: detector`` (default) keeps them.
    """

    config: str = "extract/configs/extract-default.yaml"
    overrides: tuple[str, ...] = ()
    tags: str = "detector"

    def __post_init__(self):
        if self.tags not in ("detector", "annotations"):
            raise ValueError(f"extract: tags must be 'detector' or 'annotations', not {self.tags!r}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrainStep:
    """A training run: its report label ``name``, a training config YAML and overrides."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EvalStep:
    """Evaluation tasks over every training run, side by side, with config overrides."""

    tasks: tuple[str, ...] = ("shapes",)
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class WorkflowConfig:
    """extract -> (pack) -> train -> eval, each stage's output cached by content."""

    name: str
    dataset: DatasetStep
    detector: DetectorStep
    extract: ExtractStep = dataclasses.field(default_factory=ExtractStep)
    train: tuple[TrainStep, ...] = ()
    eval: EvalStep | None = None

    def __post_init__(self):
        names = [t.name for t in self.train]
        if len(set(names)) != len(names):
            raise ValueError(f"train: run names must be distinct, got {names}")
        if self.eval is not None and not self.train:
            raise ValueError("eval needs at least one train step")


def load_workflow(path: str | Path) -> WorkflowConfig:
    """Read a workflow YAML file (errors name the key and the file)."""
    return load_config(WorkflowConfig, path)


def project_file(path: str) -> Path:
    """A stage config path as written in a workflow: relative to the working directory, else to the
    softclip checkout (so workflows run from any folder); returned absolute, so what records it (the
    extraction manifest) does not depend on the working directory."""
    candidate = Path(os.path.expandvars(path))
    if candidate.is_file() or candidate.is_absolute():
        return candidate.resolve()
    return (REPO_ROOT / candidate).resolve()


def user_file(path: str, what: str) -> Path:
    """A file the user provides (``$DATA_ROOT`` and other variables expanded; relative paths as in
    :func:`project_file`); missing is an error."""
    os.environ.setdefault("DATA_ROOT", str(data_root()))
    resolved = project_file(path)
    if not resolved.is_file():
        raise FileNotFoundError(f"{what} not found: {resolved} (from '{path}'); see README, 'On a GPU pool'")
    return resolved


def stage_config(cls: type, path: str | Path, managed: dict[str, Any], overrides: tuple[str, ...]):
    """Load a stage's YAML, set the runner-managed (dotted) keys, apply overrides.

    Returns ``(config, settings)`` where ``settings`` is the config as plain data without the managed
    keys: what the artifact key hashes."""
    data = read_yaml(path)
    for dotted, value in managed.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: '{part}' must be a mapping, got {node!r}")
        node[leaf] = value
    cfg = apply_overrides(from_dict(cls, data, source=str(path)), overrides, source=f"{path} overrides")
    settings = to_dict(cfg)
    for dotted in managed:
        node = settings
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    return cfg, settings
