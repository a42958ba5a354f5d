"""``softclip inspect``: a feature directory summarised with polars."""

from __future__ import annotations

import shutil

import pytest
from test_extract_job_actor import BAD_SHARD_EXPECTED, extract_without_ray, tiny_config, write_bad_source
from typer.testing import CliRunner

from softclip.extract.job.cli import register
from softclip.extract.job.inspect import inspect_features
from softclip.pipeline.shards import read_feature_table


def test_inspect_counts_rows_errors_boxes_and_tags(tmp_path):
    import typer

    cfg = tiny_config(tmp_path, write_bad_source(tmp_path / "source"), max_boxes=6)
    extract_without_ray(cfg, ["00000", "00001", "00002", "00003"])
    report = inspect_features(cfg.out, top=3)
    frames = [read_feature_table(p) for p in sorted(cfg.out.glob("*.parquet"))]
    assert report.rows == sum(f.num_rows for f in frames) == 13 + 3 + 4
    assert report.ok == BAD_SHARD_EXPECTED.count("success") + 2 + 4
    assert report.errors["corrupt"] == 1 and report.errors["read_error"] == 1 and report.errors["too_large"] == 1
    assert 0 < report.boxes_per_image["mean"] <= report.boxes_per_image["max"] <= 6
    assert 1 <= len(report.top_classes) <= 3
    assert [c for _, c in report.top_classes] == sorted((c for _, c in report.top_classes), reverse=True)
    assert all(name.startswith("class") for name, _ in report.top_classes)
    assert report.top_tags and report.top_attributes and report.bytes_per_image > 0
    assert "00002" in report.unreadable_shards and len(report.detectors) == 1
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["inspect", str(cfg.out), "--top", "3"])
    assert result.exit_code == 0 and "20 rows" in result.output and "top tags:" in result.output


def test_inspect_an_empty_folder_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="no feature shards"):
        inspect_features(tmp_path)


def test_inspect_reads_only_the_manifests_intact_shards_and_reports_the_rest(tmp_path):
    import typer

    cfg = tiny_config(tmp_path, write_bad_source(tmp_path / "source"), max_boxes=6)
    extract_without_ray(cfg, ["00001", "00003"])
    shutil.copy(cfg.out / "00003.parquet", cfg.out / "stray.parquet")
    assert inspect_features(cfg.out).rows == 3 + 4 and inspect_features(cfg.out).unlisted_files == ["stray.parquet"]
    data = bytearray((cfg.out / "00003.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    (cfg.out / "00003.parquet").write_bytes(bytes(data))
    by_size = inspect_features(cfg.out)  # the default check compares sizes only
    assert by_size.rows == 3 + 4 and by_size.damaged_shards == {}
    by_checksum = inspect_features(cfg.out, verify="checksum")
    assert by_checksum.rows == 3 and by_checksum.shards == 1
    assert by_checksum.damaged_shards == {"00003": "00003.parquet has another SHA-256 than the manifest records"}
    (cfg.out / "00003.parquet").write_bytes(b"short")
    assert "has 5 bytes" in inspect_features(cfg.out).damaged_shards["00003"]
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["inspect", str(cfg.out), "--verify", "checksum"])
    assert result.exit_code == 0 and "3 rows" in result.output
    assert "damaged shard 00003" in result.output and "not in the manifest (left out): stray.parquet" in result.output
    (cfg.out / "00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="00001.parquet is missing"):
        inspect_features(cfg.out)
