"""``softclip inspect DIR``: what a feature directory holds, computed with polars.

Rows, ok and errors by reason, boxes per image, the most frequent object classes, attributes and tags,
bytes per image, and the detector(s) that wrote the rows. Works on any folder of feature shards; the
manifest, when there is one, adds its unreadable shards and recorded timings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import polars as pl

from extract.manifest import MANIFEST_NAME, Manifest
from pipeline.shards import read_feature_table

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
        lines += [f"unreadable shard {name}: {error}" for name, error in self.unreadable_shards.items()]
        return "\n".join(lines)


def _counts(frame: pl.LazyFrame, column: str, top: int, depth: int) -> list[tuple[str, int]]:
    expr = pl.col(column)
    for _ in range(depth):
        expr = expr.explode()
    counted = (frame.select(expr.alias("name")).drop_nulls().group_by("name").len()
               .sort(["len", "name"], descending=[True, False]).head(top).collect())
    return [(str(n), int(c)) for n, c in counted.iter_rows()]


def inspect_features(directory: str | Path, *, top: int = 10) -> FeatureDirReport:
    """Summarise the feature shards (``*.parquet``) of ``directory``.

    Raises:
        FileNotFoundError: no feature shards in ``directory``.
        SchemaVersionError: a shard of another schema version.
    """
    directory = Path(directory)
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
    unreadable = {}
    if (directory / MANIFEST_NAME).is_file():
        unreadable = {name: e["error"] for name, e in Manifest.load(directory).shards.items()
                      if e.get("status") == "unreadable"}
    rows = int(stats["rows"])
    return FeatureDirReport(
        path=str(directory), shards=len(files), rows=rows, ok=int(stats["ok"]),
        errors={str(r): int(n) for r, n in errors.iter_rows()},
        boxes_per_image={k: float(stats[k] or 0.0) for k in ("mean", "median", "min", "max")},
        top_classes=_counts(frame, "class_names", top, 1), top_attributes=_counts(frame, "attr_names", top, 2),
        top_tags=[(t, c) for t, c in _counts(tags, "phrases", top, 1) if t],
        bytes_per_image=sum(p.stat().st_size for p in files) / rows if rows else 0.0,
        detectors=[d for d in detectors if d], unreadable_shards=unreadable,
    )
