"""Packed training shards: per successful image, the encoded image, its caption and tags, and its ROI arrays,
as a WebDataset tar (``OUT/packed/<shard>.tar``) that training streams sequentially.

One sample has three members: ``.jpg`` (the encoded image as stored in the source), ``.json`` (key, caption,
tags, image size, detector, box count, format version) and ``.roi.npy.zst`` (one zstd-compressed .npy of a
structured array, a record per box: ``roi`` float16 [D], ``geometry`` float32 [6], ``score`` float32). The
Parquet feature shard (:mod:`pipeline.shards`) keeps everything else (boxes, labels, class and attribute
names, error rows). The extraction job writes these from the same rows as its Parquet shards; the oracle
annotation features (:mod:`pipeline.annotation_features`) write them too.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from softclip.pipeline.io import HashingWriter, atomic_path
from softclip.pipeline.shards import (
    GEOMETRY_DIM,
    CorruptShardError,
    SchemaVersionError,
    load_npy,
    ragged_column,
)

__all__ = ["PACKED_DIR", "PACKED_VERSION", "ROI_MEMBER", "PackedSample", "PackedShardWriter", "packed_members",
           "packed_samples", "read_packed_sample", "write_packed_shard"]

PACKED_DIR = "packed"
PACKED_VERSION = 2
ROI_MEMBER = "roi.npy.zst"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PackedSample:
    """One training sample of a packed shard."""

    key: str
    caption: str
    tags: str
    roi_features: np.ndarray  # [n, D] float16
    geometry: np.ndarray  # [n, 6] float32
    scores: np.ndarray  # [n] float32
    image: bytes | None


def _roi_dtype(feature_dim: int) -> np.dtype:
    return np.dtype([("roi", "<f2", (feature_dim,)), ("geometry", "<f4", (GEOMETRY_DIM,)), ("score", "<f4")])


def _zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as stream:
        stream.write(data)
    return sink.getvalue().to_pybytes()


def _unzstd(data: bytes) -> bytes:
    with pa.CompressedInputStream(pa.BufferReader(data), "zstd") as stream:
        return stream.read()


def packed_members(key: str, *, caption: str, tags: str, width: int, height: int, detector: str,
                   roi_features: np.ndarray, geometry: np.ndarray, scores: np.ndarray,
                   image: bytes) -> dict[str, bytes | str]:
    """The WebDataset sample (``__key__`` plus members, see :data:`PACKED_DIR`) of one successful image."""
    rois = np.zeros(len(scores), _roi_dtype(roi_features.shape[1]))
    rois["roi"], rois["geometry"], rois["score"] = roi_features, geometry, scores
    buffer = io.BytesIO()
    np.save(buffer, rois, allow_pickle=False)
    meta = {"key": key, "caption": caption, "tags": tags, "width": width, "height": height, "detector": detector,
            "num_boxes": len(rois), "packed_version": PACKED_VERSION}
    return {"__key__": key, "jpg": image, "json": json.dumps(meta).encode(), ROI_MEMBER: _zstd(buffer.getvalue())}


class PackedShardWriter:
    """Appends samples (:func:`packed_members`) to a packed shard at ``path`` through webdataset's
    ``TarWriter`` (fixed mtime, so the bytes depend only on the samples); the caller makes it atomic.
    webdataset is imported here, not with this module: importing it imports torch."""

    def __init__(self, path: str | Path):
        from webdataset import TarWriter

        self.samples = 0
        self.file = HashingWriter(path)  # its size and SHA-256 once closed, without reading the file again
        self._tar = TarWriter(self.file, encoder=False, mtime=0)

    def write(self, members: dict[str, bytes | str]) -> None:
        self._tar.write(members)
        self.samples += 1

    def close(self) -> None:
        self._tar.close()
        self.file.close()


def packed_samples(table: pa.Table) -> Iterator[dict[str, bytes | str]]:
    """The packed samples (:func:`packed_members`) of the successful rows of ``table``, a feature table with an
    extra binary column ``image`` (the encoded image of each row), in row order."""
    plain = table.select(["key", "status", "caption", "tags", "width", "height", "detector", "image"]).to_pydict()
    arrays = {name: ragged_column(table, name) for name in ("roi_features", "geometry", "scores")}
    for i, status in enumerate(plain["status"]):
        if status == "success":
            yield packed_members(plain["key"][i], caption=plain["caption"][i] or "", tags=plain["tags"][i] or "",
                                 width=plain["width"][i], height=plain["height"][i], detector=plain["detector"][i],
                                 image=plain["image"][i], **{name: arrays[name].row(i) for name in arrays})


def write_packed_shard(path: str | Path, samples: Iterable[dict[str, bytes | str]]) -> Path:
    """Write ``samples`` (from :func:`packed_members`) as the packed shard ``path``, atomically."""
    with atomic_path(path) as tmp:
        writer = PackedShardWriter(tmp)
        try:
            for members in samples:
                writer.write(members)
        finally:
            writer.close()
    return Path(path)


def read_packed_sample(sample: dict[str, bytes], source: str = "<sample>") -> PackedSample:
    """One WebDataset sample of a packed shard (suffix -> bytes, as webdataset's iterators yield it).

    Raises:
        SchemaVersionError: another packed format (re-extract with ``--pack``).
        CorruptShardError: a member is missing or does not parse.
    """
    if "json" not in sample or ROI_MEMBER not in sample:
        raise CorruptShardError(f"{source}: sample {sample.get('__key__')} lacks its json or {ROI_MEMBER} member")
    try:
        meta = json.loads(sample["json"])
        version = meta.get("packed_version")
        if version != PACKED_VERSION:
            raise SchemaVersionError(f"{source}: sample {meta.get('key')} is packed format {version}, this softclip "
                                     f"reads format {PACKED_VERSION}; re-extract with --pack")
        rois = load_npy(_unzstd(sample[ROI_MEMBER]))
        if rois.dtype.names != ("roi", "geometry", "score"):
            raise ValueError(f"{ROI_MEMBER} has fields {rois.dtype.names}, expected roi, geometry, score")
    except SchemaVersionError:
        raise
    except (ValueError, OSError, pa.ArrowException) as err:  # bad json, truncated zstd stream, bad .npy
        raise CorruptShardError(f"{source}: sample {sample.get('__key__')}: {err}") from err
    return PackedSample(key=meta["key"], caption=meta["caption"], tags=meta["tags"],
                        roi_features=np.ascontiguousarray(rois["roi"]),
                        geometry=np.ascontiguousarray(rois["geometry"]), scores=np.ascontiguousarray(rois["score"]),
                        image=sample.get("jpg"))
