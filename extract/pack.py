"""Pack feature shards into WebDataset training shards: per key the image, caption, ROI arrays and tags.

Training then streams one sequential tar per shard (``packed/<shard>.tar``) instead of joining a Parquet
feature file with an image tar. Each packed shard follows its source shard's order; samples that failed
extraction are left out (they have no features to learn from). Packing is shard-granular and resumable
like extraction: a packed shard is written atomically and recorded in ``manifest.json`` (under its
shard's ``"packed"`` entry) with its checksum and the checksum of the feature file it came from, so a
rerun repacks only what is missing or stale.

Memory: a pack task holds one feature shard as an Arrow table and one image at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from softclip.extract.manifest import Manifest
from softclip.pipeline.io import file_sha256
from softclip.pipeline.shards import (
    FeatureRecord,
    read_feature_table,
    table_to_records,
    write_webdataset_shard,
)
from softclip.pipeline.sources import open_source

__all__ = ["PACKED_DIR", "pack_directory", "pack_shard"]

PACKED_DIR = "packed"


def _records_in_source_order(feature_file: Path, spec: str, shard: str, images: dict[str, bytes],
                             limits: dict[str, int]) -> Iterator[FeatureRecord]:
    """Successful records in source order; before yielding one, ``images`` holds exactly its image."""
    table = read_feature_table(feature_file)
    rows = {key: i for i, (key, status) in enumerate(zip(table.column("key").to_pylist(),
                                                         table.column("status").to_pylist())) if status == "success"}
    source = open_source(spec, **limits)
    source_shard = next((s for s in source.shards if s.name == shard), None)
    if source_shard is None:
        raise FileNotFoundError(f"{spec}: source shard {shard} is gone; packing needs the images it holds")
    for sample in source.iter_shard(source_shard):
        if sample.key not in rows or sample.image is None:
            continue
        images.clear()
        images[sample.key] = sample.image
        yield table_to_records(table.slice(rows[sample.key], 1))[0]


def pack_shard(feature_file: str | Path, spec: str, shard: str, out: str | Path,
               limits: dict[str, int] | None = None) -> dict[str, Any]:
    """Write ``out`` (a WebDataset tar, atomically) from one feature shard and its source shard, read with
    the extraction's source ``limits`` (``open_source`` keywords); returns the manifest entry ``{"file",
    "samples", "bytes", "sha256", "feature_sha256", "seconds"}``."""
    start = time.perf_counter()
    feature_file, out = Path(feature_file), Path(out)
    images: dict[str, bytes] = {}
    count = 0

    def counted() -> Iterator[FeatureRecord]:
        nonlocal count
        for record in _records_in_source_order(feature_file, spec, shard, images, limits or {}):
            count += 1
            yield record

    write_webdataset_shard(out, counted(), images)
    return {"file": f"{PACKED_DIR}/{out.name}", "samples": count, "bytes": out.stat().st_size,
            "sha256": file_sha256(out), "feature_sha256": file_sha256(feature_file),
            "seconds": round(time.perf_counter() - start, 3)}


def _packed_ok(out_dir: Path, entry: dict[str, Any]) -> bool:
    packed = entry.get("packed")
    if not packed or packed["feature_sha256"] != entry["sha256"]:
        return False
    path = out_dir / packed["file"]
    return path.is_file() and path.stat().st_size == packed["bytes"] and file_sha256(path) == packed["sha256"]


def pack_directory(out_dir: str | Path, *, progress: bool = True, manifest: Manifest | None = None) -> int:
    """Pack every complete feature shard of ``out_dir`` not packed yet (in Ray tasks when Ray is up, else
    in this process); returns the number of shards packed now.

    ``manifest`` is the caller's open manifest of ``out_dir`` (read from disk when not given): the
    ``"packed"`` entries are recorded in it, so a caller that saves it later keeps them.
    """
    out_dir = Path(out_dir)
    manifest = Manifest.load(out_dir) if manifest is None else manifest
    spec = manifest.data["fingerprint"]["dataset"]
    settings = manifest.data["fingerprint"].get("settings", {})
    limits = {k: settings[k] for k in ("max_member_bytes", "max_caption_chars") if k in settings}
    todo = [name for name, e in manifest.shards.items() if e.get("status") == "complete" and not _packed_ok(out_dir, e)]
    jobs = [(out_dir / manifest.shards[n]["file"], spec, n, out_dir / PACKED_DIR / f"{n}.tar", limits) for n in todo]
    with tqdm(total=len(jobs), unit="shard", desc="pack", disable=not progress) as bar:
        for name, entry in zip(todo, _run(jobs)):
            manifest.shards[name]["packed"] = entry
            manifest.save()
            bar.update(1)
    return len(jobs)


def _run(jobs: list[tuple]) -> Iterator[dict[str, Any]]:
    """Results of :func:`pack_shard` over ``jobs``, in order."""
    import ray

    if not ray.is_initialized():
        for job in jobs:
            yield pack_shard(*job)
        return
    remote = ray.remote(num_cpus=1)(pack_shard)
    refs = [remote.remote(*job) for job in jobs]
    for ref in refs:
        yield ray.get(ref)
