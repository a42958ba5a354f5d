"""Atomic writes: all or nothing, and files as readable as a plain ``open`` makes them."""

from __future__ import annotations

import os
import stat

import pytest

from softclip.pipeline.io import (
    HashingWriter,
    atomic_path,
    atomic_write_bytes,
    file_sha256,
    temporary_file_beside,
)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_get_the_mode_a_plain_open_gives(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    written = atomic_write_bytes(tmp_path / "sub" / "atomic", b"x")
    assert _mode(written) == _mode(plain)  # 0o644 under the usual umask 022, not mkstemp's 0o600
    assert _mode(temporary_file_beside(tmp_path / "shard.parquet")) == _mode(plain)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_bytes(tmp_path / "file", b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["file"]


def test_hashing_writer_knows_the_checksum_of_what_parquet_and_tar_wrote(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from webdataset import TarWriter

    table = pa.table({"a": list(range(5000)), "b": ["x" * 7] * 5000})
    with HashingWriter(tmp_path / "t.parquet") as f:
        writer = pq.ParquetWriter(f, table.schema, compression="zstd")
        writer.write_table(table)
        writer.write_table(table)
        writer.close()
    assert f.hexdigest() == file_sha256(tmp_path / "t.parquet") and f.size == (tmp_path / "t.parquet").stat().st_size
    assert pq.read_table(tmp_path / "t.parquet").num_rows == 10000
    with HashingWriter(tmp_path / "t.tar") as f:
        tar = TarWriter(f, encoder=False, mtime=0)
        tar.write({"__key__": "k", "jpg": b"\xff" * 3000})
        tar.close()
    assert f.hexdigest() == file_sha256(tmp_path / "t.tar") and f.size == (tmp_path / "t.tar").stat().st_size
