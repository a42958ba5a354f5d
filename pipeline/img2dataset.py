"""img2dataset's layout: write image-text shards as img2dataset lays them out, and read its per-shard
record of failures (the ``_stats.json`` side files).

A shard ``NNNNN`` is three files: ``NNNNN.tar`` (per sample ``<key>.jpg``, ``<key>.txt``, ``<key>.json``),
``NNNNN.parquet`` (one row per sample with the json fields) and ``NNNNN_stats.json``. Keys have 9 digits:
5 for the shard and 4 for the index inside it. The shapes world and the tests write through this module,
so every reader in the project is exercised on the real layout.

Two departures, both only reachable from tests: ``write(None, ...)`` (a failed download) still puts the
sample's ``.json`` in the tar, where img2dataset writes it to the parquet only, so readers can be tested on
a sample without an image; and ``caption=None`` writes no ``.txt``, where img2dataset writes an empty one.
The shapes world never uses either.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from softclip.pipeline.io import atomic_path, atomic_write_json
from softclip.pipeline.samples import SourceError
from softclip.pipeline.shards import shard_name
from softclip.pipeline.sources import Source

__all__ = ["ShardWriter", "img2dataset_stats", "sample_key"]


def sample_key(shard_index: int, index_in_shard: int) -> str:
    """img2dataset's 9-digit key: 5 shard digits then 4 index digits."""
    if not 0 <= index_in_shard < 10_000:
        raise ValueError(f"index_in_shard must be in [0, 9999], got {index_in_shard}")
    return f"{shard_name(shard_index)}{index_in_shard:04d}"


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # same content, same bytes
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Write one img2dataset shard; files appear (atomically) when the writer closes without error.

    Example::

        with ShardWriter(out_dir, 0) as shard:
            shard.write(image_bytes, caption="a red circle", extra={"objects": [...]}, width=64, height=64)
    """

    def __init__(self, out_dir: str | Path, shard_index: int, image_ext: str = "jpg"):
        self.out_dir = Path(out_dir)
        self.shard_index = shard_index
        self.image_ext = image_ext
        self.name = shard_name(shard_index)
        self._rows: list[dict[str, Any]] = []
        self._tar_buffer = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._tar_buffer, mode="w", format=tarfile.USTAR_FORMAT)
        self._start = time.time()

    def write(self, image: bytes | None, *, caption: str | None, width: int, height: int,
              extra: dict[str, Any] | None = None, status: str = "success",
              error_message: str | None = None) -> str:
        """Add one sample and return its key. ``image=None`` writes only the json (a failed download)."""
        key = sample_key(self.shard_index, len(self._rows))
        meta: dict[str, Any] = {
            "url": f"synthetic://{key}", "key": key, "status": status, "error_message": error_message,
            "width": width, "height": height, "original_width": width, "original_height": height,
            "exif": None, "sha256": hashlib.sha256(image).hexdigest() if image is not None else None,
            "caption": caption,
        }
        meta.update(extra or {})
        if image is not None:
            _tar_add(self._tar, f"{key}.{self.image_ext}", image)
        if caption is not None:
            _tar_add(self._tar, f"{key}.txt", caption.encode("utf-8"))
        _tar_add(self._tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
        self._rows.append(meta)
        return key

    def close(self) -> None:
        self._tar.close()
        with atomic_path(self.out_dir / f"{self.name}.tar") as tmp:
            tmp.write_bytes(self._tar_buffer.getvalue())
        # Nested fields (like the shapes world's `objects`) go to the parquet side file as JSON strings.
        rows = [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()}
                for r in self._rows]
        with atomic_path(self.out_dir / f"{self.name}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(rows), tmp)
        successes = sum(r["status"] == "success" for r in self._rows)
        end = time.time()
        atomic_write_json(self.out_dir / f"{self.name}_stats.json", {
            "count": len(self._rows), "successes": successes, "failed_to_download": len(self._rows) - successes,
            "failed_to_resize": 0, "duration": end - self._start, "start_time": self._start,
            "end_time": end, "status_dict": {"success": successes} if successes else {},
        })

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._tar.close()


def img2dataset_stats(source: Source) -> dict[str, dict]:
    """img2dataset's per-shard record (``NNNNN_stats.json`` beside the shards), by shard name, for every
    stats file there, including shards whose every sample failed (they have no data to read).

    Each value holds ``count``, ``successes``, ``failed_to_download``, ``failed_to_resize`` and
    ``status_dict`` (reason -> count) as img2dataset writes them. Empty for sources without side files.
    """
    whole_folder = Path(source.spec).is_dir()  # else a pattern or one file: only its own shards count
    names = {shard.name for shard in source.shards}
    stats = {}
    for folder in sorted({shard.path.parent for shard in source.shards} | ({Path(source.spec)} if whole_folder else set())):
        for path in sorted(folder.glob("*_stats.json")):
            if not whole_folder and path.name.removesuffix("_stats.json") not in names:
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise SourceError(f"{path}: unreadable img2dataset stats ({err})") from err
            if not isinstance(data, dict) or not isinstance(data.get("count"), int):
                raise SourceError(f"{path}: not an img2dataset stats file (no integer 'count')")
            stats[path.name.removesuffix("_stats.json")] = data
    return stats
