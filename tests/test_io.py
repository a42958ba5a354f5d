"""Atomic writes: all or nothing, and files as readable as a plain ``open`` makes them."""

from __future__ import annotations

import os
import stat

import pytest

from softclip.pipeline.io import atomic_path, atomic_write_bytes, temporary_file_beside


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
