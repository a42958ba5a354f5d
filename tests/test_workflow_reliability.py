"""Workflow failures (issue 14, rows 6, 7, 14): unreadable shards keep the extraction incomplete, gc keeps
artifacts in use, and every stage's inputs are checked before the first stage runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from softclip.extract.job import run as job_module
from softclip.extract.job.manifest import Manifest
from softclip.pipeline.img2dataset import ShardWriter
from softclip.pipeline.shards import write_parquet_shard
from softclip.pipeline.sources import SourceError, open_source
from softclip.workflows.cache import ArtifactCache
from softclip.workflows.config import load_workflow
from softclip.workflows.runner import UnreadableShardsError, WorkflowRunner

ROOT = Path(__file__).resolve().parents[1]


def _dataset(folder: Path) -> Path:
    folder.mkdir(parents=True)
    with ShardWriter(folder, 0) as shard:
        shard.write(b"not decoded here", caption="a red square", width=8, height=8)
    (folder / "00001.tar").write_bytes(b"")  # a 0-byte shard (a failed copy)
    return folder


def _workflow(tmp_path: Path, **changes) -> Path:
    (tmp_path / "w.pth").write_bytes(b"weights")
    (tmp_path / "labels.json").write_text("{}")
    spec = {"name": "given", "dataset": {"path": str(tmp_path / "data")},
            "detector": {"weights": str(tmp_path / "w.pth"), "labelmap": str(tmp_path / "labels.json")},
            "extract": {"config": "extract/configs/extract-shapes.yaml"},
            "train": [{"name": "clip", "config": "train/configs/shapes-clip.yaml"}]} | changes
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _fake_extraction(calls: list, during=None):
    """``run_extraction`` as the job records shards (complete, or unreadable with the reader's error)."""

    def run(cfg):
        calls.append(cfg.out)
        if during:
            during(cfg)
        manifest = Manifest.open(cfg.out, {"dataset": cfg.dataset})
        source = open_source(cfg.dataset)
        for shard in source.shards:
            try:
                rows = len(list(source.iter_shard(shard)))
            except SourceError as err:
                manifest.record(shard.name, {"status": "unreadable", "error": str(err)})
                continue
            path = write_parquet_shard(cfg.out / f"{shard.name}.parquet", [], feature_dim=4)
            manifest.record(shard.name, {"status": "complete", "file": path.name, "rows": rows, "ok": rows,
                                         "errors": {}, "boxes": 0, "bytes": path.stat().st_size, "sha256": "-"})

    return run


def test_an_unreadable_shard_keeps_the_extraction_incomplete_and_a_rerun_retries_it(tmp_path, monkeypatch):
    _dataset(tmp_path / "data")
    calls: list = []
    monkeypatch.setattr(job_module, "run_extraction", _fake_extraction(calls))
    runner = WorkflowRunner(load_workflow(_workflow(tmp_path)), cache=ArtifactCache(tmp_path / "cache"),
                            until="extract", log=lambda _: None)
    with pytest.raises(UnreadableShardsError, match=r"1 of 2 dataset shards could not be read \(00001: .*00001\.tar"):
        runner.run()
    (extract,) = ArtifactCache(tmp_path / "cache").list()
    assert not extract.complete
    with pytest.raises(UnreadableShardsError, match="00001"):  # not "[cached]": the rerun tries the shard again
        runner.run()
    assert calls == [extract.path, extract.path] and not extract.complete


def test_gc_keeps_and_names_an_artifact_a_running_workflow_uses(tmp_path, monkeypatch):
    _dataset(tmp_path / "data")
    ((tmp_path / "data") / "00001.tar").unlink()
    seen = {}

    def collect(cfg):  # `softclip cache gc` in another shell while the extraction runs
        seen["gc"] = ArtifactCache(tmp_path / "cache").gc()

    monkeypatch.setattr(job_module, "run_extraction", _fake_extraction([], during=collect))
    runner = WorkflowRunner(load_workflow(_workflow(tmp_path)), cache=ArtifactCache(tmp_path / "cache"),
                            until="extract", log=lambda _: None)
    runner.run()
    removed, in_use = seen["gc"]
    assert removed == [] and [a.kind for a in in_use] == ["extract"]
    assert all(a.complete for a in ArtifactCache(tmp_path / "cache").list())


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    cache = ArtifactCache(tmp_path)
    artifact = cache.artifact("extract", "a" * 16)
    artifact.path.mkdir(parents=True)  # an interrupted extraction: incomplete, what a plain gc deletes
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from softclip.workflows.cache import ArtifactCache; "
        f"c = ArtifactCache({str(tmp_path)!r}); c.hold(c.artifact('extract', 'a' * 16)); "
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cache.gc() == ([], [artifact])
        assert artifact.path.is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert cache.gc() == ([artifact], []) and not artifact.path.exists()
    assert list(tmp_path.rglob("*")) == [tmp_path / "extract"]  # no lock file left either


def test_every_stage_input_is_checked_before_the_first_stage_runs(tmp_path):
    lines: list[str] = []
    spec = {"name": "missing-train", "dataset": {"shapes": {"num_train": 48, "samples_per_shard": 24}},
            "detector": {"train": "extract/configs/shapes.yaml"},
            "extract": {"config": "extract/configs/extract-shapes.yaml"},
            "train": [{"name": "clip", "config": "train/configs/shapes-clip.yaml"},
                      {"name": "gone", "config": str(tmp_path / "no-such-train.yaml")}]}
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump(spec))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="no-such-train.yaml"):
        WorkflowRunner(load_workflow(path), cache=ArtifactCache(tmp_path / "cache"), log=lines.append).run()
    assert not [line for line in lines if line.startswith("[run]")], lines
    assert not (tmp_path / "cache").exists() or not ArtifactCache(tmp_path / "cache").list()
    assert time.perf_counter() - start < 20


def test_a_missing_dataset_path_is_reported_before_any_stage(tmp_path):
    path = _workflow(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"dataset not found: .*data"):
        WorkflowRunner(load_workflow(path), cache=ArtifactCache(tmp_path / "cache"), log=lambda _: None).run()
