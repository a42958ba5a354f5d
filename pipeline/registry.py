"""The dataset registry: one YAML file per dataset (``pipeline/datasets/<name>.yaml``) saying where it
lives under ``DATA_ROOT``.

Example::

    spec = load_dataset_spec("cc3m")
    path = resolve_dataset("cc3m")   # DATA_ROOT/cc3m, or a DatasetNotFoundError saying how to get it
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from softclip.pipeline.config import load_config

__all__ = ["DatasetNotFoundError", "DatasetSpec", "data_root", "list_datasets", "load_dataset_spec",
           "resolve_dataset"]

REGISTRY_DIR = Path(__file__).parent / "datasets"


class DatasetNotFoundError(FileNotFoundError):
    """A registered dataset is not where the registry says; the message says how to get it."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DatasetSpec:
    """Where a dataset lives (relative to ``DATA_ROOT``) and how to get it."""

    name: str
    kind: Literal["image-text", "retrieval", "classification"]
    path: str
    description: str
    how_to_get: str


def data_root() -> Path:
    """``$DATA_ROOT``, or ``./data`` when it is unset."""
    return Path(os.environ.get("DATA_ROOT", "data"))


def list_datasets() -> list[str]:
    """Names of the registered datasets."""
    return sorted(p.stem for p in REGISTRY_DIR.glob("*.yaml"))


def load_dataset_spec(name: str) -> DatasetSpec:
    """The registry entry ``name``; a ValueError lists the known names when there is none."""
    path = REGISTRY_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown dataset '{name}'; registered datasets: {', '.join(list_datasets())} "
                         f"(or give a path)")
    return load_config(DatasetSpec, path)


def resolve_dataset(name: str, root: str | Path | None = None) -> Path:
    """The on-disk location of the registered dataset ``name`` under ``root`` (default ``DATA_ROOT``).

    Raises:
        DatasetNotFoundError: the location does not exist; the message says how to get the data.
    """
    spec = load_dataset_spec(name)
    root = Path(root if root is not None else data_root())
    location = root / spec.path
    if not location.exists():
        how = spec.how_to_get.replace("$DATA_ROOT", str(root))
        raise DatasetNotFoundError(f"dataset '{name}' not found at {location} (set DATA_ROOT or pass a path). "
                                   f"How to get it: {how}")
    return location
