"""Disk full during extraction (issue 14, row 15): one error naming the file and "disk full", no temporary
file left, and a rerun redoes the shard."""

from __future__ import annotations

import errno

import pyarrow.parquet as pq
import pytest
from test_extract_job_actor import _rows_batch, tiny_config

from softclip.extract import writer as writer_module
from softclip.extract.actor import DetectorActor
from softclip.extract.manifest import Manifest
from softclip.extract.stages import read_shard_rows
from softclip.extract.writer import ShardAssembler
from softclip.pipeline.io import DiskFullError


class _FullDiskWriter(pq.ParquetWriter):
    """A ParquetWriter whose file system fills up at the first row group."""

    def write_table(self, table, row_group_size=None):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")


@pytest.mark.parametrize("row_group_size", [1, 1000])  # full at a row group / at the commit of the shard
def test_disk_full_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch, row_group_size):
    from test_extract_job_actor import write_bad_source

    source = write_bad_source(tmp_path / "source")
    cfg = tiny_config(tmp_path, source)
    rows = list(read_shard_rows({"spec": str(source), "shard": "00003"}, max_pixels=cfg.max_pixels,
                                require_caption=True))
    batch = DetectorActor(cfg)(_rows_batch(rows))
    cfg.out.mkdir(parents=True)
    assembler = ShardAssembler(cfg.out, Manifest.open(cfg.out, {"dataset": "x"}), row_group_size=row_group_size)
    monkeypatch.setattr(writer_module.pq, "ParquetWriter", _FullDiskWriter)
    with pytest.raises(DiskFullError) as info:
        try:
            assembler.add(batch)
        except BaseException:
            assembler.abort()  # what the job does on any error
            raise
    message = str(info.value)
    assert message.startswith(f"disk full writing {cfg.out / '00003.parquet'}") and "\n" not in message
    assert not list(cfg.out.glob(".tmp-*")), "a temporary file was left behind"
    monkeypatch.undo()
    assembler = ShardAssembler(cfg.out, Manifest.open(cfg.out, {"dataset": "x"}), row_group_size=row_group_size)
    assert assembler.add(batch)[1] == ["00003"]  # a rerun with space writes the shard
