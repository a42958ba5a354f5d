"""The driver side of the extraction job: feature rows arrive in any order; per shard one Parquet file and,
when packing, one packed training tar, both written in a single pass from the same rows.

Rows arrive as Arrow tables in one form (:func:`softclip.extract.job.actor.feature_batch`: the feature shard's columns
plus routing columns), and stay Arrow here: no per-row Python objects, and this module imports neither
torch nor the detector. :class:`ShardAssembler` keeps, per input shard in flight, an open
``pyarrow.parquet.ParquetWriter`` on a temporary file beside the final name (``.tmp-00042.parquet.*``) and,
when packing, a :class:`pipeline.shards.PackedShardWriter` on ``packed/.tmp-00042.tar.*`` to which each
arriving successful row is appended (its encoded image came with it); it appends a row group every
``row_group_size`` rows (so memory holds at most one row group per open shard, never a whole shard), drops
rows it has already seen (a retried Ray task may deliver a row twice, even after its shard was committed),
and when the shard's end-of-shard marker has arrived and every index ``0..n-1`` is in, closes both files,
renames them into place (``os.replace``, atomic) and records them in the manifest (the packed tar under the
shard's ``"packed"`` entry). Both files follow the rows' arrival order. Files are kept open across
batches, which is why this module renames by hand rather than through ``pipeline.io.atomic_path``; the
naming is the same, so a crashed run's leftovers are removed by :func:`remove_stale_temporaries`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from softclip.extract.job.manifest import Manifest
from softclip.extract.job.stages import error_reason
from softclip.pipeline.io import HashingWriter, disk_full_names, file_sha256, temporary_file_beside
from softclip.pipeline.packed import PACKED_DIR, PACKED_VERSION, PackedShardWriter, packed_samples
from softclip.pipeline.shards import feature_schema

__all__ = ["IncompleteShardsError", "ShardAssembler", "feature_path", "packed_ok", "packed_path",
           "remove_stale_temporaries", "stale_temporaries"]

log = logging.getLogger(__name__)


class IncompleteShardsError(RuntimeError):
    """The Ray dataset ended while some shards still missed rows (rows were lost on the way)."""


def feature_path(out_dir: Path, shard: str) -> Path:
    """Where the feature shard of input shard ``shard`` goes: ``out_dir/<shard>.parquet``."""
    return out_dir / f"{shard}.parquet"


def packed_path(out_dir: Path, shard: str) -> Path:
    """Where the packed training shard of input shard ``shard`` goes: ``out_dir/packed/<shard>.tar``."""
    return out_dir / PACKED_DIR / f"{shard}.tar"


def packed_ok(out_dir: Path, entry: dict[str, Any], verify: str) -> bool:
    """Whether a manifest entry's packed shard exists in this softclip's packed format, was packed with its
    feature file, and still matches the recorded size (and, with ``verify="checksum"``, checksum)."""
    packed = entry.get("packed")
    if not packed or packed["feature_sha256"] != entry.get("sha256") or packed.get("format") != PACKED_VERSION:
        return False
    path = out_dir / packed["file"]
    if not path.is_file() or path.stat().st_size != packed["bytes"]:
        return False
    return verify == "size" or file_sha256(path) == packed["sha256"]


# The temporaries the job writes (``pipeline.io`` names them ``.tmp-<final name>.<random>``): feature
# shards, manifest.json and extract.yaml at the top level; packed tars under packed/.
_STALE_PATTERNS = (".tmp-*.parquet.*", ".tmp-manifest.json.*", ".tmp-extract.yaml.*", f"{PACKED_DIR}/.tmp-*.tar.*")


def stale_temporaries(out_dir: Path) -> list[Path]:
    """The job's ``.tmp-*`` files in ``out_dir`` and ``out_dir/packed`` (left by a killed run)."""
    return sorted(p for pattern in _STALE_PATTERNS for p in out_dir.glob(pattern) if p.is_file())


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete :func:`stale_temporaries` (other files, even named ``.tmp-*``, stay); returns how many."""
    stale = stale_temporaries(out_dir)
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


@dataclass
class _OpenShard:
    name: str
    tmp: Path
    file: HashingWriter | None = None
    writer: pq.ParquetWriter | None = None
    packed_tmp: Path | None = None
    packed: PackedShardWriter | None = None
    buffer: list[pa.Table] = field(default_factory=list)
    buffered: int = 0
    seen: set[int] = field(default_factory=set)
    expected: int | None = None
    ok: int = 0
    boxes: int = 0
    errors: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.perf_counter)

    @property
    def complete(self) -> bool:
        return self.expected is not None and len(self.seen) == self.expected


class ShardAssembler:
    """Turns detector-stage tables into committed feature (and packed) shards (see the module docstring)."""

    def __init__(self, out_dir: Path, manifest: Manifest, *, row_group_size: int, pack: bool = False):
        self.out_dir = out_dir
        self.manifest = manifest
        self.row_group_size = row_group_size
        self.pack = pack
        self.feature_dim: int | None = None
        self.duplicates = 0
        self._open: dict[str, _OpenShard] = {}
        self._failed: set[str] = set()
        self._committed: set[str] = set()

    def _shard(self, name: str) -> _OpenShard:
        if name not in self._open:
            shard = _OpenShard(name=name, tmp=temporary_file_beside(feature_path(self.out_dir, name)))
            if self.pack:
                (self.out_dir / PACKED_DIR).mkdir(exist_ok=True)
                shard.packed_tmp = temporary_file_beside(packed_path(self.out_dir, name))
                shard.packed = PackedShardWriter(shard.packed_tmp)
            self._open[name] = shard
        return self._open[name]

    def add(self, table: pa.Table) -> tuple[int, list[str]]:
        """Take one table; returns ``(new sample rows, names of the shards it completed)``."""
        columns = table.select(["shard", "index", "shard_total", "shard_error", "status", "error",
                                "num_boxes"]).to_pydict()
        if self.feature_dim is None and table.num_rows:
            self.feature_dim = table.schema.field("roi_features").type.value_type.list_size
            self.manifest.set_detector(str(table.column("detector")[0]), self.feature_dim)
        keep: dict[str, list[int]] = {}
        for row, (name, index) in enumerate(zip(columns["shard"], columns["index"])):
            if name in self._failed:
                continue
            if name in self._committed:
                self.duplicates += 1
                continue
            if index < 0:  # end-of-shard marker
                if columns["shard_error"][row]:
                    self._fail(self._shard(name), columns["shard_error"][row])
                else:
                    self._shard(name).expected = columns["shard_total"][row]
                continue
            shard = self._shard(name)
            if index in shard.seen:
                self.duplicates += 1
                continue
            shard.seen.add(index)
            self._count(shard, columns["status"][row], columns["error"][row], columns["num_boxes"][row])
            keep.setdefault(name, []).append(row)
        for name, rows in keep.items():
            if name in self._open:  # not failed by a later marker of this table
                self._append(self._open[name], table.take(pa.array(rows, pa.int64())))
        done = [name for name, shard in self._open.items() if shard.complete]
        for name in done:
            self._commit(self._open[name])  # still open while committing: abort() removes its file on error
            del self._open[name]
            self._committed.add(name)
        return sum(map(len, keep.values())), done

    @staticmethod
    def _count(shard: _OpenShard, status: str, error: str | None, boxes: int) -> None:
        if status == "success":
            shard.ok += 1
            shard.boxes += boxes
        else:
            shard.errors[error_reason(error or "unknown")] += 1

    def _append(self, shard: _OpenShard, rows: pa.Table) -> None:
        if shard.packed is not None:
            for members in packed_samples(rows):
                shard.packed.write(members)
        shard.buffer.append(rows)
        shard.buffered += rows.num_rows
        if shard.buffered >= self.row_group_size:
            self._flush(shard)

    def _flush(self, shard: _OpenShard) -> None:
        schema = feature_schema(self.feature_dim or 0)
        with disk_full_names(feature_path(self.out_dir, shard.name)):
            if shard.writer is None:
                shard.file = HashingWriter(shard.tmp)
                shard.writer = pq.ParquetWriter(shard.file, schema, compression="zstd", compression_level=3)
            if shard.buffer:
                rows = pa.concat_tables(shard.buffer).select(schema.names)
                shard.writer.write_table(rows.cast(schema), row_group_size=max(rows.num_rows, 1))
                shard.buffer, shard.buffered = [], 0

    def _commit(self, shard: _OpenShard) -> None:
        self._flush(shard)  # opens the writer even for a shard without samples: an empty, valid file
        final = feature_path(self.out_dir, shard.name)
        with disk_full_names(final):
            shard.writer.close()
            shard.file.close()
        shard.writer = None
        packed = None
        if shard.packed is not None:  # sizes and checksums come from the bytes as written (no second read)
            packed_final = packed_path(self.out_dir, shard.name)
            with disk_full_names(packed_final):
                shard.packed.close()
            os.replace(shard.packed_tmp, packed_final)
            packed = {"file": f"{PACKED_DIR}/{packed_final.name}", "format": PACKED_VERSION,
                      "samples": shard.packed.samples, "bytes": shard.packed.file.size,
                      "sha256": shard.packed.file.hexdigest()}
            shard.packed = None
        os.replace(shard.tmp, final)
        entry = {"status": "complete", "file": final.name, "rows": shard.expected, "ok": shard.ok,
                 "errors": dict(sorted(shard.errors.items())), "boxes": shard.boxes, "bytes": shard.file.size,
                 "sha256": shard.file.hexdigest(), "seconds": round(time.perf_counter() - shard.started, 3)}
        if packed is not None:
            entry["packed"] = {**packed, "feature_sha256": entry["sha256"]}
        self.manifest.record(shard.name, entry)

    def _fail(self, shard: _OpenShard, error: str) -> None:
        self._discard(shard)
        del self._open[shard.name]
        self._failed.add(shard.name)
        self.manifest.record(shard.name, {"status": "unreadable", "error": error})

    @staticmethod
    def _discard(shard: _OpenShard) -> None:
        try:
            if shard.writer is not None:
                shard.writer.close()  # after a failed write (a full disk) closing can fail the same way ...
                shard.file.close()
        finally:
            shard.tmp.unlink(missing_ok=True)  # ... the files go all the same
            if shard.packed is not None:
                try:
                    shard.packed.close()
                finally:
                    shard.packed_tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        """Drop the shards still open: their temporary files are removed, nothing is recorded. Called while
        another error propagates, so a shard whose writer cannot even be closed (the disk that failed the
        run is still full) is logged and its file removed; the error being raised is the one to report."""
        for shard in self._open.values():
            try:
                self._discard(shard)
            except OSError as err:
                log.warning("could not close %s while aborting (%s); removed it", shard.tmp, err)
        self._open.clear()

    def close(self) -> None:
        """End of the dataset: every shard must have been committed; raise (after aborting) otherwise."""
        left = {name: (len(s.seen), s.expected) for name, s in self._open.items()}
        self.abort()
        if left:
            raise IncompleteShardsError(
                f"the dataset ended with incomplete shards (rows seen, expected): {left}; nothing of them was "
                "written; rerun to redo them")
