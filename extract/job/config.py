"""The extraction job's settings: what to read, which detector, what to keep, and how to spread the work.

Two groups of fields. *Output-defining* fields (dataset, detector files and overrides, ``max_boxes``,
``max_pixels``, ``require_caption``, the source limits ``max_member_bytes`` and ``max_caption_chars``) go into the manifest fingerprint: a rerun into the same directory
with different values is refused. *Execution* fields (actors, batch sizes, Ray address, threads) only
change speed and may differ between runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from softclip.pipeline.config import to_dict
from softclip.pipeline.images import DEFAULT_MAX_PIXELS
from softclip.pipeline.sources import DEFAULT_MAX_CAPTION_CHARS, DEFAULT_MAX_MEMBER_BYTES

__all__ = ["DEFAULT_LOADER", "ExtractConfig"]

DEFAULT_LOADER = "softclip.extract.detector.vinvl:VinVLDetector.from_checkpoint"
_FINGERPRINT_FIELDS = ("max_boxes", "max_pixels", "require_caption", "detector_overrides", "loader",
                       "max_member_bytes", "max_caption_chars")


@dataclass(frozen=True, kw_only=True, slots=True)
class ExtractConfig:
    """Settings of ``softclip extract`` (see ``extract/configs/extract-default.yaml``).

    ``actors`` 0 means one actor per GPU when the cluster has GPUs (each with ``gpus_per_actor``), else
    one CPU actor. ``loader`` is ``module:callable`` called as ``loader(weights, labelmap,
    **detector_overrides)``; it must return an object with ``detect(images) -> list[dict]``,
    ``detector_id`` and ``feature_dim`` (the VinVL detector by default).
    """

    dataset: str
    weights: Path
    labelmap: Path
    out: Path
    max_boxes: int = 50
    max_pixels: int = DEFAULT_MAX_PIXELS
    require_caption: bool = True
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # a larger tar member is an error row, never read
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS  # a longer caption is an error row
    detector_overrides: dict[str, Any] = field(default_factory=dict)
    loader: str = DEFAULT_LOADER
    actors: int = 0
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = 0  # 0 = torch's default; on a CPU pool, cores / actors is a good value
    batch_size: int = 8  # images per detector call
    row_group_size: int = 256
    verify: Literal["checksum", "size"] = "checksum"
    ray_address: str = ""  # "" starts a local Ray; "auto" or host:port joins a cluster
    num_cpus: int = 0  # CPUs of a local Ray (0 = all)
    ray_retries: int = 3  # a reader task or detector actor whose process dies is retried this often, then the run fails
    pack: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError("dataset must be a path, a brace pattern or a registered dataset name")
        if self.max_boxes < 1:
            raise ValueError(f"max_boxes must be at least 1, got {self.max_boxes}")
        if min(self.max_pixels, self.max_member_bytes, self.max_caption_chars) < 1:
            raise ValueError(f"max_pixels, max_member_bytes and max_caption_chars must be positive, got "
                             f"{self.max_pixels}, {self.max_member_bytes} and {self.max_caption_chars}")
        if self.actors < 0 or self.num_cpus < 0 or self.torch_threads < 0:
            raise ValueError("actors, num_cpus and torch_threads must be non-negative (0 = automatic)")
        if self.ray_retries < 0:
            raise ValueError(f"ray_retries must be 0 or more, got {self.ray_retries}")
        if self.gpus_per_actor <= 0 or self.cpus_per_actor <= 0:
            raise ValueError("gpus_per_actor and cpus_per_actor must be positive")
        if min(self.batch_size, self.row_group_size) < 1:
            raise ValueError("batch_size and row_group_size must be positive")
        if ":" not in self.loader:
            raise ValueError(f"loader must look like 'module:callable', got {self.loader!r}")

    def replace(self, **changes: Any) -> ExtractConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict[str, Any]:
        """The output-defining settings besides dataset and detector files (part of the fingerprint)."""
        return {name: to_dict(getattr(self, name)) for name in _FINGERPRINT_FIELDS}
