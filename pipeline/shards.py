"""The feature shard format: one row per image, written as Parquet (packed training shards: ``pipeline.packed``).

This module owns the schema, the column names and the shard naming; nothing else spells them out.

A row holds the detector's output for one image: ``num_boxes`` boxes with their ROI features, 6-d
geometry, class labels and names, attributes, and the image's ``tags`` text. Per-box arrays are stored
as Arrow ``list<fixed_size_list<...>>`` columns, so a whole column comes back as one numpy array
``[total_boxes, k]`` plus row offsets, without copying.

Parquet file metadata carries ``softclip.schema_version``; files of another version are refused with a
message saying which version the reader expects.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from softclip.pipeline.io import atomic_path, disk_full_names

__all__ = [
    "GEOMETRY_DIM",
    "SCHEMA_VERSION",
    "CorruptShardError",
    "FeatureRecord",
    "RaggedColumn",
    "SchemaVersionError",
    "box_geometry",
    "error_record",
    "feature_schema",
    "load_npy",
    "ragged_column",
    "read_feature_table",
    "records_to_table",
    "shard_name",
    "write_parquet_shard",
]

SCHEMA_VERSION = 1
METADATA_VERSION_KEY = b"softclip.schema_version"
METADATA_FEATURE_DIM_KEY = b"softclip.feature_dim"
GEOMETRY_DIM = 6


class SchemaVersionError(ValueError):
    """A shard was written with a schema version this reader does not understand."""


class CorruptShardError(ValueError):
    """A feature shard (Parquet file or WebDataset sample) is damaged or incomplete."""


def shard_name(index: int) -> str:
    """The name of shard ``index`` without extension, as img2dataset writes it: ``00042``."""
    return f"{index:05d}"


def box_geometry(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Oscar/VinVL 6-d position feature: ``[x1/W, y1/H, x2/W, y2/H, (x2-x1)/W, (y2-y1)/H]``, float32.

    Args:
        boxes: ``[n, 4]`` boxes ``(x1, y1, x2, y2)`` in original-image pixels.
        width, height: the original image size ``W``, ``H``.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float32)
    norm = boxes / scale
    return np.concatenate([norm, norm[:, 2:4] - norm[:, 0:2]], axis=1).astype(np.float32)


@dataclasses.dataclass(kw_only=True)
class FeatureRecord:
    """One image's row. Per-box arrays have ``num_boxes`` rows; zero boxes is valid."""

    key: str
    shard: str
    width: int
    height: int
    status: str = "success"  # "success" or "error"
    error: str | None = None
    caption: str | None = None
    boxes: np.ndarray  # [n, 4] float32, original pixels
    geometry: np.ndarray  # [n, 6] float32, see box_geometry
    roi_features: np.ndarray  # [n, D] float16
    labels: np.ndarray  # [n] int32
    scores: np.ndarray  # [n] float32
    class_names: list[str]
    attr_labels: list[list[int]]  # per box, the kept attributes (may be empty)
    attr_names: list[list[str]]
    attr_scores: list[list[float]]
    tags: str = ""  # "attribute class" per box, descending confidence
    detector: str = ""

    @property
    def num_boxes(self) -> int:
        return int(len(self.boxes))


def error_record(key: str, shard: str, error: str, *, feature_dim: int, detector: str = "",
                 caption: str | None = None, width: int = 0, height: int = 0) -> FeatureRecord:
    """A row for an image that could not be processed: ``status="error"`` and zero boxes."""
    return FeatureRecord(
        key=key, shard=shard, width=width, height=height, status="error", error=error, caption=caption,
        boxes=np.zeros((0, 4), np.float32), geometry=np.zeros((0, GEOMETRY_DIM), np.float32),
        roi_features=np.zeros((0, feature_dim), np.float16), labels=np.zeros(0, np.int32),
        scores=np.zeros(0, np.float32), class_names=[], attr_labels=[], attr_names=[], attr_scores=[],
        tags="", detector=detector,
    )


def feature_schema(feature_dim: int) -> pa.Schema:
    """The Arrow schema of a feature shard whose ROI features have ``feature_dim`` channels."""
    return pa.schema(
        [
            ("key", pa.string()),
            ("shard", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("caption", pa.string()),
            ("num_boxes", pa.int32()),
            ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
            ("geometry", pa.list_(pa.list_(pa.float32(), GEOMETRY_DIM))),
            ("roi_features", pa.list_(pa.list_(pa.float16(), feature_dim))),
            ("labels", pa.list_(pa.int32())),
            ("scores", pa.list_(pa.float32())),
            ("class_names", pa.list_(pa.string())),
            ("attr_labels", pa.list_(pa.list_(pa.int32()))),
            ("attr_names", pa.list_(pa.list_(pa.string()))),
            ("attr_scores", pa.list_(pa.list_(pa.float32()))),
            ("tags", pa.string()),
            ("detector", pa.string()),
        ],
        metadata={METADATA_VERSION_KEY: str(SCHEMA_VERSION).encode(),
                  METADATA_FEATURE_DIM_KEY: str(feature_dim).encode()},
    )


def _nested(rows: list[np.ndarray], width: int, dtype: np.dtype, item_type: pa.DataType) -> pa.Array:
    """Build ``list<fixed_size_list<item, width>>`` from per-row ``[n_i, width]`` arrays."""
    counts = np.array([len(r) for r in rows], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat = np.concatenate([np.asarray(r, dtype=dtype).reshape(-1, width) for r in rows]) if rows else (
        np.zeros((0, width), dtype))
    values = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=item_type), width)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def records_to_table(records: list[FeatureRecord], feature_dim: int) -> pa.Table:
    """Arrow table of ``records`` in the feature schema (the order of ``records`` is kept)."""
    for r in records:
        if r.roi_features.shape[1:] != (feature_dim,) or len(r.roi_features) != r.num_boxes:
            raise ValueError(f"record {r.key}: roi_features shape {r.roi_features.shape} does not match "
                             f"{r.num_boxes} boxes x feature_dim {feature_dim}")
    schema = feature_schema(feature_dim)
    columns = {
        "key": [r.key for r in records],
        "shard": [r.shard for r in records],
        "width": [r.width for r in records],
        "height": [r.height for r in records],
        "status": [r.status for r in records],
        "error": [r.error for r in records],
        "caption": [r.caption for r in records],
        "num_boxes": [r.num_boxes for r in records],
        "boxes": _nested([r.boxes for r in records], 4, np.float32, pa.float32()),
        "geometry": _nested([r.geometry for r in records], GEOMETRY_DIM, np.float32, pa.float32()),
        "roi_features": _nested([r.roi_features for r in records], feature_dim, np.float16, pa.float16()),
        "labels": [np.asarray(r.labels, np.int32).tolist() for r in records],
        "scores": [np.asarray(r.scores, np.float32).tolist() for r in records],
        "class_names": [list(r.class_names) for r in records],
        "attr_labels": [[list(map(int, a)) for a in r.attr_labels] for r in records],
        "attr_names": [[list(a) for a in r.attr_names] for r in records],
        "attr_scores": [[list(map(float, a)) for a in r.attr_scores] for r in records],
        "tags": [r.tags for r in records],
        "detector": [r.detector for r in records],
    }
    arrays = [columns[f.name] if isinstance(columns[f.name], pa.Array) else pa.array(columns[f.name], f.type)
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def write_parquet_shard(path: str | Path, records: list[FeatureRecord], *, feature_dim: int) -> Path:
    """Write ``records`` to ``path`` as one zstd-compressed Parquet file, atomically."""
    table = records_to_table(records, feature_dim)
    with disk_full_names(path), atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", compression_level=3)
    return Path(path)


def _check_version(metadata: dict | None, path: str | Path) -> None:
    found = (metadata or {}).get(METADATA_VERSION_KEY)
    if found is None:
        raise SchemaVersionError(f"{path}: not a softclip feature shard (no {METADATA_VERSION_KEY.decode()} "
                                 "in its metadata)")
    if int(found) != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path}: feature shard schema version {int(found)}, this softclip reads version "
            f"{SCHEMA_VERSION}; re-extract it with this version or use the softclip that wrote it")


def read_feature_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet feature shard as an Arrow table, checking its schema version."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"feature shard not found: {path}")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise CorruptShardError(f"{path}: not a readable Parquet feature shard ({err}); re-extract it") from err
    _check_version(schema.metadata, path)
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise CorruptShardError(f"{path}: feature shard is damaged ({err}); re-extract it") from err


@dataclasses.dataclass(frozen=True)
class RaggedColumn:
    """A per-box column as one array: row ``i`` is ``values[offsets[i]:offsets[i + 1]]``."""

    values: np.ndarray  # [total_boxes, k] (or [total_boxes] for scalar per-box columns)
    offsets: np.ndarray  # [num_rows + 1] int

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]


def ragged_column(table: pa.Table, name: str) -> RaggedColumn:
    """The per-box column ``name`` of ``table`` as numpy, without copying where Arrow allows."""
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    inner = column.values
    if pa.types.is_fixed_size_list(inner.type):
        width = inner.type.list_size
        values = inner.values.to_numpy(zero_copy_only=False).reshape(-1, width)
    else:
        values = inner.to_numpy(zero_copy_only=False)
    # Slice offsets are absolute into `values` when the column is a slice of a larger buffer.
    return RaggedColumn(values=values, offsets=offsets)


@functools.lru_cache(maxsize=4096)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """numpy's own parse of an .npy header (magic, version, length, dict), memoised: per-sample members of
    one field share a handful of headers (they differ only in the number of boxes), and parsing the header
    dict is most of ``np.load``'s time on small arrays."""
    header = io.BytesIO(prefix[8:])
    shape, fortran_order, dtype = (np.lib.format.read_array_header_1_0(header) if prefix[6] == 1
                                   else np.lib.format.read_array_header_2_0(header))
    if dtype.hasobject:
        raise ValueError("the .npy member holds Python objects, which are never unpickled")
    return shape, fortran_order, dtype


def load_npy(data: bytes) -> np.ndarray:
    """``np.load(io.BytesIO(data), allow_pickle=False)`` for one .npy member, faster on small arrays (see
    :func:`_npy_header`). Raises ``ValueError`` for anything that is not a complete .npy array."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10 or data[6] not in (1, 2):
        raise ValueError("not an .npy array (bad magic or version)")
    length_bytes = 2 if data[6] == 1 else 4
    start = 8 + length_bytes + int.from_bytes(data[8 : 8 + length_bytes], "little")
    shape, fortran_order, dtype = _npy_header(data[:start])
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - start != count * dtype.itemsize:
        raise ValueError(f".npy array of shape {shape} {dtype} needs {count * dtype.itemsize} bytes, "
                         f"the member has {len(data) - start}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return array.reshape(shape, order="F" if fortran_order else "C").copy(order="K")
