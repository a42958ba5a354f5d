"""The driver side of the extraction job: feature rows arrive in any order; one Parquet file per shard.

:class:`ShardAssembler` keeps, per input shard in flight, an open ``pyarrow.parquet.ParquetWriter`` on a
temporary file beside the final name (``.tmp-00042.parquet.*``), appends a row group every
``row_group_size`` rows (so memory holds at most one row group per open shard, never a whole shard),
drops rows it has already seen (a retried Ray task may deliver a row twice, even after its shard was
committed), and when the shard's
end-of-shard marker has arrived and every index ``0..n-1`` is in, closes the file, renames it into place
(``os.replace``, atomic) and records it in the manifest. Files are kept open across batches, which is why
this module renames by hand rather than through ``pipeline.io.atomic_path``; the naming is the same, so
a crashed run's leftovers (here and under ``packed/``) are removed by :func:`remove_stale_temporaries`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from softclip.extract.actor import batch_to_records
from softclip.extract.manifest import Manifest
from softclip.extract.pack import PACKED_DIR
from softclip.extract.stages import error_reason
from softclip.pipeline.io import disk_full_names, file_sha256, temporary_file_beside
from softclip.pipeline.shards import FeatureRecord, feature_schema, records_to_table

__all__ = ["IncompleteShardsError", "ShardAssembler", "feature_path", "remove_stale_temporaries",
           "stale_temporaries"]

log = logging.getLogger(__name__)


class IncompleteShardsError(RuntimeError):
    """The Ray dataset ended while some shards still missed rows (rows were lost on the way)."""


def feature_path(out_dir: Path, shard: str) -> Path:
    """Where the feature shard of input shard ``shard`` goes: ``out_dir/<shard>.parquet``."""
    return out_dir / f"{shard}.parquet"


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
    writer: pq.ParquetWriter | None = None
    buffer: list[FeatureRecord] = field(default_factory=list)
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
    """Turns detector-stage batches into committed feature shards (see the module docstring)."""

    def __init__(self, out_dir: Path, manifest: Manifest, *, row_group_size: int):
        self.out_dir = out_dir
        self.manifest = manifest
        self.row_group_size = row_group_size
        self.feature_dim: int | None = None
        self.duplicates = 0
        self._open: dict[str, _OpenShard] = {}
        self._failed: set[str] = set()
        self._committed: set[str] = set()

    def _shard(self, name: str) -> _OpenShard:
        if name not in self._open:
            self._open[name] = _OpenShard(name=name, tmp=temporary_file_beside(feature_path(self.out_dir, name)))
        return self._open[name]

    def add(self, batch: dict[str, np.ndarray]) -> tuple[int, list[str]]:
        """Take one batch; returns ``(new sample rows, names of the shards it completed)``."""
        if self.feature_dim is None and len(batch["key"]):
            self.feature_dim = int(batch["feature_dim"][0])
            self.manifest.set_detector(str(batch["detector"][0]), self.feature_dim)
        for i in np.flatnonzero(np.asarray(batch["index"]) < 0):  # end-of-shard markers
            if str(batch["shard"][i]) in self._committed:
                self.duplicates += 1
                continue
            shard = self._shard(str(batch["shard"][i]))
            if batch["shard_error"][i]:
                self._fail(shard, str(batch["shard_error"][i]))
            else:
                shard.expected = int(batch["shard_total"][i])
        added = 0
        for record, index in zip(batch_to_records(batch, self.feature_dim or 0),
                                 np.asarray(batch["index"])[np.asarray(batch["index"]) >= 0]):
            if record.shard in self._failed:
                continue
            if record.shard in self._committed:
                self.duplicates += 1
                continue
            shard = self._shard(record.shard)
            if int(index) in shard.seen:
                self.duplicates += 1
                continue
            shard.seen.add(int(index))
            self._count(shard, record)
            shard.buffer.append(record)
            added += 1
            if len(shard.buffer) >= self.row_group_size:
                self._flush(shard)
        done = [name for name, shard in self._open.items() if shard.complete]
        for name in done:
            self._commit(self._open[name])  # still open while committing: abort() removes its file on error
            del self._open[name]
            self._committed.add(name)
        return added, done

    @staticmethod
    def _count(shard: _OpenShard, record: FeatureRecord) -> None:
        if record.status == "success":
            shard.ok += 1
            shard.boxes += record.num_boxes
        else:
            shard.errors[error_reason(record.error or "unknown")] += 1

    def _flush(self, shard: _OpenShard) -> None:
        with disk_full_names(feature_path(self.out_dir, shard.name)):
            if shard.writer is None:
                shard.writer = pq.ParquetWriter(shard.tmp, feature_schema(self.feature_dim), compression="zstd",
                                                compression_level=3)
            if shard.buffer:
                shard.writer.write_table(records_to_table(shard.buffer, self.feature_dim))
                shard.buffer = []

    def _commit(self, shard: _OpenShard) -> None:
        self._flush(shard)  # opens the writer even for a shard without samples: an empty, valid file
        final = feature_path(self.out_dir, shard.name)
        with disk_full_names(final):
            shard.writer.close()
        shard.writer = None
        os.replace(shard.tmp, final)
        self.manifest.record(shard.name, {
            "status": "complete", "file": final.name, "rows": shard.expected, "ok": shard.ok,
            "errors": dict(sorted(shard.errors.items())), "boxes": shard.boxes, "bytes": final.stat().st_size,
            "sha256": file_sha256(final), "seconds": round(time.perf_counter() - shard.started, 3),
        })

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
        finally:
            shard.tmp.unlink(missing_ok=True)  # ... the file goes all the same

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
