"""Extraction failures (issue 14): a full disk (row 15) is one error naming the file and "disk full", with
no temporary file left; temporaries that appear while a run packs (a killed, retried packing task; row 17)
are gone when the run ends."""

from __future__ import annotations

import errno

import pyarrow.parquet as pq
import pytest
from test_extract_job_actor import _rows_batch, extract_without_ray, tiny_config, write_bad_source

from softclip.extract.job import writer as writer_module
from softclip.extract.job.actor import DetectorActor
from softclip.extract.job.manifest import Manifest
from softclip.extract.job.stages import read_shard_rows
from softclip.extract.job.writer import ShardAssembler
from softclip.pipeline.io import DiskFullError


class _FullDiskWriter(pq.ParquetWriter):
    """A ParquetWriter whose file system fills up at the first row group."""

    def write_table(self, table, row_group_size=None):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")


@pytest.mark.parametrize("row_group_size", [1, 1000])  # full at a row group / at the commit of the shard
def test_disk_full_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch, row_group_size):
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


def test_packing_temporaries_left_during_a_run_are_gone_when_it_ends(tmp_path, monkeypatch):
    from softclip.extract.job import run as job_module
    from softclip.extract.job.run import run_extraction

    source = write_bad_source(tmp_path / "source")
    (source / "00002.tar").unlink()  # the unreadable shard: this test is about packing
    cfg = tiny_config(tmp_path, source, pack=True)
    extract_without_ray(cfg, ["00000", "00001"])

    def killed_packing_worker(cfg, spec, pending, manifest, start, total):  # a retried task's temporary stayed
        assert pending == ["00003"]
        (cfg.out / "packed").mkdir(exist_ok=True)
        (cfg.out / "packed" / ".tmp-00003.tar.k1ll3d").write_bytes(b"\0" * 4096)
        return {"images_this_run": 0, "detector_seconds": 0.0, "actor_seconds": 0.0, "actors": 0,
                "startup_seconds": 0.0}

    monkeypatch.setattr(job_module, "_init_ray", lambda cfg: False)
    monkeypatch.setattr(job_module, "_run_pending", killed_packing_worker)
    run_extraction(cfg)
    assert not list(cfg.out.rglob(".tmp-*"))


def test_the_cli_reports_a_full_disk_in_one_line(monkeypatch, capsys):
    from softclip.pipeline import cli

    def app():
        with writer_module.disk_full_names("/data/features/00001.parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "build_app", lambda: app)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("softclip: error: disk full writing /data/features/00001.parquet (No space left")
