"""Extraction of all three img2dataset output formats written by the real img2dataset (tests/fixtures/img2dataset):
each successful key once, the failed downloads counted in the manifest and shown by softclip inspect
(issue 12, gaps 4 and 5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from test_extract_job_actor import tiny_config

from softclip.extract.job.inspect import inspect_features
from softclip.extract.job.manifest import Manifest
from softclip.extract.job.run import run_extraction
from softclip.pipeline.shards import read_feature_table

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "img2dataset"
SUCCESS_KEYS = ["000000", "000001", "000002", "000003", "000010", "000011", "000012", "000013"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_every_img2dataset_format_extracts_each_key_once_and_counts_failures(tmp_path, monkeypatch):
    from softclip.extract.job import run as job

    totals = []
    real_tqdm = job.tqdm
    monkeypatch.setattr(job, "tqdm", lambda *a, **kw: totals.append(kw.get("total")) or real_tqdm(*a, **kw))
    for fmt in ("webdataset", "parquet", "files"):
        cfg = tiny_config(tmp_path / fmt, FIXTURES / fmt, actors=1, require_caption=False)
        summary = run_extraction(cfg)
        keys = [k for p in sorted(cfg.out.glob("*.parquet")) for k in read_feature_table(p).column("key").to_pylist()]
        assert sorted(keys) == SUCCESS_KEYS, fmt
        assert summary.images_this_run == len(SUCCESS_KEYS)
        failures = Manifest.load(cfg.out).data["source_failures"]
        assert failures == {"samples": 10, "downloaded": 8, "failed_to_download": 1, "failed_to_resize": 1,
                            "reasons": {"HTTP Error 404: File not found": 1, "Image decoding error": 1}}, fmt
        line = next(x for x in inspect_features(cfg.out).render().splitlines() if x.startswith("img2dataset"))
        assert "10 samples, 8 downloaded, 1 failed to download, 1 failed to resize" in line, line
        assert run_extraction(cfg).images_this_run == 0  # a rerun skips every shard
    # The progress bar knew its total from the side files (files: shard 00002 has no folder, so no shard).
    assert totals == [8, 8, 8]
