"""``softclip inspect DIR``: what a feature directory holds, computed with polars.

Rows, ok and errors by reason, boxes per image, the most frequent object classes, attributes and tags,
bytes per image, the detector(s) that wrote the rows, and the samples img2dataset failed to download or
resize (from the manifest's ``source_failures``; they never reached the shards). Works on any folder of feature shards
(``*.parquet``). When the folder has a ``manifest.json``, only its complete shards are read: files it
does not list are reported and left out, and so are listed shards whose file is missing or differs from
the recorded size (``verify="size"``, the default: cheap) or SHA-256 (``verify="checksum"``: reads every
byte); its unreadable shards are listed too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import polars as pl

from softclip.extract.job.manifest import MANIFEST_NAME, Manifest
from softclip.pipeline.io import file_sha256
from softclip.pipeline.shards import read_feature_table

__all__ = ["FeatureDirReport", "inspect_features"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class FeatureDirReport:
    """Summary of a feature directory (see :func:`inspect_features`)."""

    path: str
    shards: int
    rows: int
    ok: int
    errors: dict[str, int]
    boxes_per_image: dict[str, float]  # mean, median, min, max over successful rows
    top_classes: list[tuple[str, int]]
    top_attributes: list[tuple[str, int]]
    top_tags: list[tuple[str, int]]  # "attributes class" phrases, one per box
    bytes_per_image: float
    detectors: list[str]
    unreadable_shards: dict[str, str]
    unlisted_files: list[str] = dataclasses.field(default_factory=list)  # *.parquet not in the manifest
    damaged_shards: dict[str, str] = dataclasses.field(default_factory=dict)  # shard -> what differs
    source_failures: dict = dataclasses.field(default_factory=dict)  # img2dataset's record (manifest.py)

    def render(self) -> str:
        """Human-readable multi-line text."""
        def top(items: list[tuple[str, int]]) -> str:
            return ", ".join(f"{name} ({count})" for name, count in items) or "-"

        errors = ", ".join(f"{k}={v}" for k, v in self.errors.items()) or "none"
        b = self.boxes_per_image
        lines = [
            f"{self.path}: {self.shards} shards, {self.rows} rows, {self.ok} ok, errors: {errors}",
            f"boxes/image: mean {b['mean']:.1f}, median {b['median']:.0f}, min {b['min']:.0f}, max {b['max']:.0f}",
            f"bytes/image: {self.bytes_per_image:,.0f} ({self.bytes_per_image / 1024:.1f} KiB)",
            f"detector: {', '.join(self.detectors) or '-'}",
            f"top classes: {top(self.top_classes)}",
            f"top attributes: {top(self.top_attributes)}",
            f"top tags: {top(self.top_tags)}",
        ]
        f = self.source_failures
        if f:
            reasons = ", ".join(f"{reason} ({n})" for reason, n in f["reasons"].items()) or "-"
            lines.append(f"img2dataset: {f['samples']} samples, {f['downloaded']} downloaded, "
                         f"{f['failed_to_download']} failed to download, {f['failed_to_resize']} failed to resize: "
                         f"{reasons}")
        lines += [f"unreadable shard {name}: {error}" for name, error in self.unreadable_shards.items()]
        lines += [f"damaged shard {name}: {problem} (left out; rerun softclip extract to redo it)"
                  for name, problem in self.damaged_shards.items()]
        lines += [f"not in the manifest (left out): {name}" for name in self.unlisted_files]
        return "\n".join(lines)


def _counts(frame: pl.LazyFrame, column: str, top: int, depth: int) -> list[tuple[str, int]]:
    expr = pl.col(column)
    for _ in range(depth):
        expr = expr.explode()
    counted = (frame.select(expr.alias("name")).drop_nulls().group_by("name").len()
               .sort(["len", "name"], descending=[True, False]).head(top).collect())
    return [(str(n), int(c)) for n, c in counted.iter_rows()]


def _shard_problem(directory: Path, entry: dict, verify: str) -> str | None:
    """How a complete shard's file differs from its manifest entry, or None."""
    path = directory / entry["file"]
    if not path.is_file():
        return f"{entry['file']} is missing"
    if path.stat().st_size != entry["bytes"]:
        return f"{entry['file']} has {path.stat().st_size} bytes, the manifest records {entry['bytes']}"
    if verify == "checksum" and file_sha256(path) != entry["sha256"]:
        return f"{entry['file']} has another SHA-256 than the manifest records"
    return None


def _manifest_files(directory: Path, verify: str) -> tuple[list[Path], list[str], dict[str, str], dict[str, str]]:
    """``(files to read, unlisted *.parquet names, damaged shards, unreadable shards)`` per the manifest."""
    shards = Manifest.load(directory).shards
    complete = {name: e for name, e in shards.items() if e["status"] == "complete"}
    damaged = {name: problem for name, e in complete.items() if (problem := _shard_problem(directory, e, verify))}
    listed = {e["file"] for e in complete.values()}
    unlisted = sorted(p.name for p in directory.glob("*.parquet") if not p.name.startswith(".") and p.name not in listed)
    files = [directory / e["file"] for name, e in complete.items() if name not in damaged]
    unreadable = {name: e["error"] for name, e in shards.items() if e["status"] == "unreadable"}
    return files, unlisted, damaged, unreadable


def inspect_features(directory: str | Path, *, top: int = 10,
                     verify: Literal["size", "checksum"] = "size") -> FeatureDirReport:
    """Summarise the feature shards of ``directory`` (see the module docstring for the manifest's role).

    Raises:
        FileNotFoundError: no feature shards to read in ``directory``.
        SchemaVersionError: a shard of another schema version.
        ManifestFormatError: a malformed ``manifest.json``.
    """
    directory = Path(directory)
    if verify not in ("size", "checksum"):
        raise ValueError(f"verify must be 'size' or 'checksum', got {verify!r}")
    unlisted: list[str] = []
    damaged: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    failures: dict = {}
    if (directory / MANIFEST_NAME).is_file():
        files, unlisted, damaged, unreadable = _manifest_files(directory, verify)
        failures = Manifest.load(directory).data.get("source_failures") or {}
        if not files:
            raise FileNotFoundError(
                f"{directory}: {MANIFEST_NAME} lists no complete shard whose file matches it "
                f"({len(damaged)} damaged: {', '.join(damaged.values()) or '-'}); rerun softclip extract")
    else:
        files = sorted(p for p in directory.glob("*.parquet") if not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"{directory}: no feature shards (*.parquet); give an extraction output folder")
    for path in files:
        read_feature_table(path, columns=["status"])  # checks the schema version
    frame = pl.scan_parquet(files)
    stats = frame.select(
        pl.len().alias("rows"), (pl.col("status") == "success").sum().alias("ok"),
        pl.col("num_boxes").filter(pl.col("status") == "success").mean().alias("mean"),
        pl.col("num_boxes").filter(pl.col("status") == "success").median().alias("median"),
        pl.col("num_boxes").filter(pl.col("status") == "success").min().alias("min"),
        pl.col("num_boxes").filter(pl.col("status") == "success").max().alias("max"),
    ).collect().row(0, named=True)
    errors = (frame.filter(pl.col("status") != "success")
              .select(pl.col("error").str.split(":").list.first().str.strip_chars().alias("reason"))
              .group_by("reason").len().sort("reason").collect())
    tags = frame.select(pl.col("tags").str.split(", ").alias("phrases"))
    detectors = frame.select(pl.col("detector").unique()).collect().to_series().drop_nulls().sort().to_list()
    rows = int(stats["rows"])
    return FeatureDirReport(
        path=str(directory), shards=len(files), rows=rows, ok=int(stats["ok"]),
        errors={str(r): int(n) for r, n in errors.iter_rows()},
        boxes_per_image={k: float(stats[k] or 0.0) for k in ("mean", "median", "min", "max")},
        top_classes=_counts(frame, "class_names", top, 1), top_attributes=_counts(frame, "attr_names", top, 2),
        top_tags=[(t, c) for t, c in _counts(tags, "phrases", top, 1) if t],
        bytes_per_image=sum(p.stat().st_size for p in files) / rows if rows else 0.0,
        detectors=[d for d in detectors if d], unreadable_shards=unreadable, unlisted_files=unlisted,
        damaged_shards=damaged, source_failures=failures,
    )
