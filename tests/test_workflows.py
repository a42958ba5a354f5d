"""The workflow runner: a small shapes workflow end to end, cached, re-keyed and resumed after a kill."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from softclip.pipeline.config import ConfigError, load_config
from softclip.workflows.cache import ArtifactCache, CorruptArtifactError, artifact_key, tree_fingerprint
from softclip.workflows.config import WorkflowConfig, load_workflow, project_file
from softclip.workflows.runner import WorkflowRunner

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FAST = ["optim.max_steps=4", "optim.warmup_steps=1", "data.batch_size=16", "data.num_workers=0",
              "log.every_n_steps=1", "log.checkpoint_every_n_steps=2", "log.tensorboard=false",
              "log.progress=false"]


def _workflow(tmp_path: Path, train_overrides: list[str] = ()) -> Path:
    spec = {
        "name": "tiny",
        "dataset": {"shapes": {"num_train": 48, "num_retrieval": 8, "num_classification_per_class": 1,
                               "samples_per_shard": 24, "seed": 1}},
        "detector": {"train": "extract/configs/shapes.yaml", "overrides": ["train.steps=3"]},
        "extract": {"config": "extract/configs/extract-shapes.yaml",
                    "overrides": ["actors=1", "num_cpus=2", "progress=false"]},
        "train": [{"name": "clip", "config": "train/configs/shapes-clip.yaml",
                   "overrides": TRAIN_FAST + list(train_overrides)},
                  {"name": "softclip", "config": "train/configs/shapes-softclip.yaml", "overrides": TRAIN_FAST}],
        "eval": {"tasks": ["shapes"], "overrides": ["num_workers=0", "batch_size=32"]},
    }
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(path: Path, cache: Path, **kwargs):
    lines = []
    result = WorkflowRunner(load_workflow(path), cache=ArtifactCache(cache), log=lines.append, **kwargs).run()
    return result, lines


def _markers(cache: Path) -> dict[str, float]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("artifact.json")}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workflow")
    path, cache = _workflow(tmp), tmp / "cache"
    result, _ = _run(path, cache)
    return tmp, path, cache, result


def test_first_run_computes_every_stage(first_run):
    _, _, cache, result = first_run
    assert [r.stage for r in result.records] == ["dataset", "detector", "extract", "train", "train", "eval"]
    assert not any(r.cached for r in result.records)
    report = result.report
    assert (report / "results.md").is_file() and (report / "results.png").is_file()
    assert "clip" in (report / "results.md").read_text() and "softclip" in (report / "results.md").read_text()


def test_second_run_computes_nothing(first_run):
    _, path, cache, _ = first_run
    before = _markers(cache)
    result, lines = _run(path, cache)
    assert all(r.cached for r in result.records), lines
    assert _markers(cache) == before


def test_changing_a_training_setting_reruns_only_training_and_eval(first_run, tmp_path):
    _, _, cache, first = first_run
    path = _workflow(tmp_path, ["optim.lr=2.0e-3"])
    result, _ = _run(path, cache)
    ran = {(r.stage, r.name) for r in result.records if not r.cached}
    assert ran == {("train", "clip"), ("eval", "report")}
    keys = {(r.stage, r.name): r.key for r in first.records}
    assert {(r.stage, r.name): r.key for r in result.records}[("train", "softclip")] == keys[("train", "softclip")]


def test_forcing_training_reruns_training_and_eval_only_and_until_stops_early(first_run, tmp_path):
    _, path, cache, first = first_run
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    result, _ = _run(path, copy, force=("train",))
    assert [(r.stage, r.cached) for r in result.records] == [
        ("dataset", True), ("detector", True), ("extract", True), ("train", False), ("train", False),
        ("eval", False)]
    assert [r.key for r in result.records] == [r.key for r in first.records]
    extract_only, _ = _run(path, copy, until="extract")
    assert [r.stage for r in extract_only.records] == ["dataset", "detector", "extract"]


def test_execution_settings_do_not_change_keys(first_run, tmp_path):
    _, path, cache, first = first_run
    spec = yaml.safe_load(path.read_text())
    spec["extract"]["overrides"] = ["actors=1", "num_cpus=2", "batch_size=4", "progress=false"]
    spec["train"][1]["overrides"] = TRAIN_FAST + ["data.num_workers=1"]
    other = tmp_path / "w.yaml"
    other.write_text(yaml.safe_dump(spec))
    planned = WorkflowRunner(load_workflow(other), cache=ArtifactCache(cache), log=lambda _: None).plan()
    assert [r.key for r in planned] == [r.key for r in first.records]
    assert all(r.cached for r in planned)


def test_cache_ls_and_gc(first_run, tmp_path):
    _, path, cache, _ = first_run
    from typer.testing import CliRunner

    from softclip.pipeline.cli import build_app

    runner = CliRunner()
    listing = runner.invoke(build_app(), ["cache", "ls", "--cache-dir", str(cache)])
    assert listing.exit_code == 0 and "workflow tiny" in listing.output and "complete" in listing.output
    stray = ArtifactCache(cache).artifact("train", "0" * 16)
    stray.path.mkdir(parents=True)
    result = runner.invoke(build_app(), ["cache", "gc", "--cache-dir", str(cache), str(path)])
    assert result.exit_code == 0 and f"removed train {'0' * 16}" in result.output
    assert not stray.path.exists() and all(a.complete for a in ArtifactCache(cache).list())


def test_artifact_size_counts_hard_links_once(tmp_path):
    artifact = ArtifactCache(tmp_path).artifact("train", "1" * 16)
    (artifact.path / "checkpoints").mkdir(parents=True)
    (artifact.path / "checkpoints" / "step_0000001.pt").write_bytes(b"x" * 1000)
    os.link(artifact.path / "checkpoints" / "step_0000001.pt", artifact.path / "checkpoints" / "latest.pt")
    (artifact.path / "metrics.jsonl").write_bytes(b"y" * 10)
    assert artifact.size_bytes() == 1010


def test_a_killed_run_resumes(first_run, tmp_path):
    _, _, cache, _ = first_run
    path = _workflow(tmp_path, ["optim.max_steps=0", "optim.epochs=10", "optim.lr=3.0e-3"])  # 30 steps
    command = [sys.executable, "-m", "softclip", "run", str(path), "--cache-dir", str(cache)]
    log = tmp_path / "killed-run.log"  # what the child printed, for a failure on a slow machine
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    checkpoints = []
    while time.time() < deadline and process.poll() is None and not checkpoints:
        checkpoints = [p for p in (cache / "train").glob("*/checkpoints/step_*.pt")
                       if not (p.parents[1] / "artifact.json").exists()]
        time.sleep(0.2)
    assert checkpoints and process.poll() is None, (
        f"the run ended before a mid-training checkpoint appeared; its output ends:\n{log.read_text()[-3000:]}")
    process.send_signal(signal.SIGKILL)
    process.wait()
    result, lines = _run(path, cache)
    resumed = [line for line in lines if line.startswith("[resume]")]
    assert resumed and "train" in resumed[0]
    assert all(a.complete for a in ArtifactCache(cache).list())
    steps = [json.loads(line)["step"] for line in
             (checkpoints[0].parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert set(steps) == set(range(1, 31))  # the resumed process went on to the end, no step skipped


def test_workflow_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndataset: {name: cc3m}\ndetector: {weights: a, labelmap: b}\ntrian: []\n")
    with pytest.raises(ConfigError, match="trian"):
        load_config(WorkflowConfig, bad)
    bad.write_text("name: x\ndataset: {name: cc3m, path: /data}\ndetector: {weights: a, labelmap: b}\n")
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(WorkflowConfig, bad)
    bad.write_text("name: x\ndataset: {name: cc3m}\ndetector: {weights: a, labelmap: b}\n"
                   "train: [{name: a, config: c}]\neval: {taks: [shapes]}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'eval\.taks' for EvalStep"):
        load_config(WorkflowConfig, bad)
    bad.write_text("name: x\ndataset: {shapes: {num_trian: 3}}\ndetector: {weights: a, labelmap: b}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'dataset\.shapes\.num_trian'"):
        load_config(WorkflowConfig, bad)


def test_missing_released_weights_say_where_they_are_expected(tmp_path, monkeypatch):
    (tmp_path / "cc3m").mkdir()
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    workflow = load_workflow(ROOT / "workflows/configs/cc3m.yaml")
    with pytest.raises(FileNotFoundError, match=r"detector weights not found: .*vinvl_vg_x152c4\.pth.*On a GPU pool"):
        WorkflowRunner(workflow, cache=ArtifactCache(tmp_path / "cache"), log=lambda _: None).plan()


def test_keys_depend_on_settings_and_inputs():
    assert artifact_key("train", {"lr": 1, "wd": 0}, {"extract": "a"}) == artifact_key(
        "train", {"wd": 0, "lr": 1}, {"extract": "a"})  # key order does not matter
    assert artifact_key("train", {"lr": 1}, {"extract": "a"}) != artifact_key("train", {"lr": 2}, {"extract": "a"})
    assert artifact_key("train", {"lr": 1}, {"extract": "a"}) != artifact_key("train", {"lr": 1}, {"extract": "b"})
    # one fingerprint function (pipeline.config.config_hash), and keys that refactors do not move: a cache
    # made by an earlier softclip stays valid
    settings = {"a": 1, "b": [1, 2], "p": "x", "n": {"z": 0.1, "y": None}}
    assert artifact_key("train", settings, {"extract": "abc"}) == "4030859607cf918f"
    assert artifact_key("x", {"p": Path("/a/b"), "t": (1, 2)}, {}) == "c709e54e67a1831b"


def test_every_shipped_workflow_loads():
    for path in sorted((ROOT / "workflows/configs").glob("*.yaml")):
        workflow = load_workflow(path)
        for step in workflow.train:
            assert (ROOT / step.config).is_file(), f"{path.name}: {step.config} does not exist"
        assert (ROOT / workflow.extract.config).is_file(), f"{path.name}: {workflow.extract.config} does not exist"


def _keys(workflow: WorkflowConfig, cache: Path) -> list[str]:
    return [r.key for r in WorkflowRunner(workflow, cache=ArtifactCache(cache), log=lambda _: None).plan()]


def test_keys_do_not_depend_on_how_data_root_is_spelled(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "cc3m").mkdir(parents=True)
    (data / "cc3m" / "00000.tar").write_bytes(b"tar")
    (data / "models" / "vinvl").mkdir(parents=True)
    for name in ("vinvl_vg_x152c4.pth", "VG-SGG-dicts-vgoi6-clipped.json"):
        (data / "models" / "vinvl" / name).write_bytes(name.encode())
    workflow = load_workflow(ROOT / "workflows/configs/cc3m.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA_ROOT", "data")
    relative = _keys(workflow, tmp_path / "cache")
    monkeypatch.setenv("DATA_ROOT", str(data))
    absolute = _keys(workflow, tmp_path / "cache")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert relative == absolute == _keys(workflow, tmp_path / "cache")
    images = data / "imagenet" / "val" / "n01440764"
    images.mkdir(parents=True)
    with_imagenet = _keys(workflow, tmp_path / "cache")
    assert with_imagenet[:-1] == absolute[:-1] and with_imagenet[-1] != absolute[-1]  # only eval is re-keyed
    (images / "ILSVRC2012_val_00000293.JPEG").write_bytes(b"jpeg")  # the copy went on: evaluate again
    os.utime(images, ns=(images.stat().st_atime_ns, images.stat().st_mtime_ns + 10**9))  # coarse clocks
    assert _keys(workflow, tmp_path / "cache")[-1] != with_imagenet[-1]
    assert _keys(workflow, tmp_path / "cache") == _keys(workflow, tmp_path / "cache")


def test_a_shallow_tree_fingerprint_reads_only_the_top_levels(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "deep.txt").write_text("x")
    shallow, deep = tree_fingerprint(tmp_path, max_depth=1), tree_fingerprint(tmp_path, max_depth=3)
    os.utime(tmp_path / "a" / "b" / "deep.txt", ns=(1, 1))  # three levels down: seen at depth 3, not 1
    assert tree_fingerprint(tmp_path, max_depth=1) == shallow and tree_fingerprint(tmp_path, max_depth=3) != deep
    (tmp_path / "a" / "new.txt").write_text("y")
    a = tmp_path / "a"  # adding an entry moves a's modification time; set it so clock granularity cannot hide it
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))
    assert tree_fingerprint(tmp_path, max_depth=1) != shallow


def test_shipped_demo_keys_and_files_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "unset")
    monkeypatch.delenv("DATA_ROOT")  # the runner sets a default; teardown unsets it again
    workflow = load_workflow(ROOT / "workflows/configs/shapes.yaml")
    monkeypatch.chdir(ROOT)
    keys, config = _keys(workflow, tmp_path / "cache"), project_file("extract/weights/shapes/detector.yaml")
    monkeypatch.chdir(tmp_path)
    assert _keys(workflow, tmp_path / "cache") == keys
    assert project_file("extract/weights/shapes/detector.yaml") == config and config.is_absolute()


def test_a_moved_cache_is_used_where_it_is_now(first_run, tmp_path):
    from typer.testing import CliRunner

    from softclip.pipeline.cli import build_app

    _, path, cache, _ = first_run
    moved = tmp_path / "moved"
    shutil.move(cache, moved)
    try:  # eval reruns from the cached checkpoints and shapes world, which must be found in `moved`
        result = CliRunner().invoke(build_app(), ["run", str(path), "--cache-dir", str(moved), "--force", "eval"])
        assert result.exit_code == 0, result.output
        assert "6 stages, 5 cached, 1 ran" in result.output
        again, lines = _run(path, moved)
        assert all(r.cached for r in again.records), lines
        paths = [v for r in again.records for v in r.outputs.values() if isinstance(v, str)]
        assert paths and all(p.startswith(str(moved)) for p in paths)
    finally:
        shutil.move(moved, cache)


def test_a_plan_does_not_use_up_force(first_run):
    _, path, cache, _ = first_run
    lines = []
    runner = WorkflowRunner(load_workflow(path), cache=ArtifactCache(cache), force=("eval",), log=lines.append)
    assert all(r.cached for r in runner.plan())
    result = runner.run()
    assert [r.stage for r in result.records if not r.cached] == ["eval"], lines


def test_gc_keeps_incomplete_artifacts_a_workflow_needs(tmp_path):
    from typer.testing import CliRunner

    from softclip.pipeline.cli import build_app

    path, cache = _workflow(tmp_path), ArtifactCache(tmp_path / "cache")
    planned = WorkflowRunner(load_workflow(path), cache=cache, log=lambda _: None).plan()
    needed = cache.artifact("train", next(r.key for r in planned if r.stage == "train"))
    (needed.path / "checkpoints").mkdir(parents=True)  # an interrupted training run: resumable, no marker
    stray = cache.artifact("train", "0" * 16)
    stray.path.mkdir(parents=True)
    result = CliRunner().invoke(build_app(), ["cache", "gc", "--cache-dir", str(cache.root), str(path)])
    assert result.exit_code == 0, result.output
    assert needed.path.is_dir() and not stray.path.exists()
    result = CliRunner().invoke(build_app(), ["cache", "gc", "--cache-dir", str(cache.root)])
    assert result.exit_code == 0 and not needed.path.exists()


def test_a_corrupt_marker_is_listed_and_collected(tmp_path):
    from typer.testing import CliRunner

    from softclip.pipeline.cli import build_app

    cache = ArtifactCache(tmp_path / "cache")
    broken = cache.artifact("extract", "2" * 16)
    broken.path.mkdir(parents=True)
    marker = broken.path / "artifact.json"
    marker.write_text("")
    with pytest.raises(CorruptArtifactError, match=re.escape(str(marker))):
        broken.record()
    assert broken.state == "corrupt" and not broken.complete
    listing = CliRunner().invoke(build_app(), ["cache", "ls", "--cache-dir", str(cache.root)])
    assert listing.exit_code == 0, listing.output
    assert "corrupt" in listing.output and str(marker) in listing.output.replace("\n", "")
    rows = json.loads(CliRunner().invoke(build_app(), ["cache", "ls", "--cache-dir", str(cache.root), "--json"]).output)
    assert [(r["state"], r["complete"]) for r in rows] == [("corrupt", False)]
    result = CliRunner().invoke(build_app(), ["cache", "gc", "--cache-dir", str(cache.root)])
    assert result.exit_code == 0 and f"removed extract {'2' * 16}" in result.output and not broken.path.exists()


@pytest.mark.parametrize("text, problem", [("data: [1\n", "not valid YAML"), ("- a\n", "expected a mapping"),
                                           ("data: 3\n", "'data' must be a mapping")])
def test_a_bad_stage_config_names_its_file(tmp_path, text, problem):
    bad = tmp_path / "bad-train.yaml"
    bad.write_text(text)
    spec = yaml.safe_load(_workflow(tmp_path).read_text())
    spec["train"][0]["config"] = str(bad)
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=problem) as err:
        WorkflowRunner(load_workflow(path), cache=ArtifactCache(tmp_path / "cache"), log=lambda _: None).plan()
    assert str(bad) in str(err.value)


def test_torchrun_args_run_training_under_torchrun(tmp_path, monkeypatch):
    import subprocess as subprocess_module

    import softclip.train.loop as train_loop
    from softclip.train.config import TrainConfig

    commands, in_process = [], []
    monkeypatch.setattr(subprocess_module, "run", lambda command, check: commands.append(command))
    monkeypatch.setattr(train_loop, "train", lambda cfg, resume: in_process.append(cfg))
    cfg = load_config(TrainConfig, ROOT / "train/configs/shapes-clip.yaml")
    artifact = ArtifactCache(tmp_path / "cache").artifact("train", "3" * 16)
    artifact.path.mkdir(parents=True)
    runner = WorkflowRunner(load_workflow(_workflow(tmp_path)), nproc=1, log=lambda _: None)
    monkeypatch.delenv("TORCHRUN_ARGS", raising=False)
    runner._run_training(cfg, artifact)
    assert in_process == [cfg] and commands == []
    monkeypatch.setenv("TORCHRUN_ARGS", "--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=host:29400")
    runner._run_training(cfg, artifact)
    assert len(commands) == 1 and commands[0][1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=1"]
    assert "--nnodes=2" in commands[0] and "--rdzv-endpoint=host:29400" in commands[0]


def test_annotations_stand_in_for_the_detector(tmp_path):
    import polars as pl

    spec = yaml.safe_load(_workflow(tmp_path).read_text())
    spec["detector"] = {"annotations": True}
    spec["train"] = spec["train"][1:]  # softclip only
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump(spec))
    result, lines = _run(path, tmp_path / "cache")
    assert [(r.stage, r.cached) for r in result.records] == [
        ("dataset", False), ("detector", True), ("extract", False), ("train", False), ("eval", False)]
    extract = result.records[2]
    assert extract.outputs["feature_dim"] == 72 and extract.outputs["num_shards"] == 2
    table = pl.read_parquet(sorted(Path(extract.outputs["packed"]).glob("*.parquet"))[0])
    assert set(table["detector"]) == {"annotations"} and table.height == 24
    assert (result.report / "results.json").is_file()
    again, _ = _run(path, tmp_path / "cache")
    assert all(r.cached for r in again.records)


def test_annotations_take_no_detector_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndataset: {shapes: {}}\ndetector: {annotations: true, weights: w.pth}\n")
    with pytest.raises(ConfigError, match="annotations replaces the detector"):
        load_config(WorkflowConfig, bad)


def test_annotation_tags_keep_the_detector_features_and_replace_only_the_tags(first_run, tmp_path):
    from webdataset.tariterators import tarfile_samples

    from softclip.pipeline.annotation_features import annotation_tags
    from softclip.pipeline.sources import open_source

    _, path, cache, first = first_run
    spec = yaml.safe_load(path.read_text())
    spec["extract"]["tags"] = "annotations"
    oracle = tmp_path / "oracle.yaml"
    oracle.write_text(yaml.safe_dump(spec))
    result, _ = _run(oracle, cache, until="extract")
    assert [(r.stage, r.cached) for r in result.records] == [
        ("dataset", True), ("detector", True), ("extract", False)]
    detector_run, tagged = first.records[2], result.records[2]
    assert tagged.outputs["feature_dim"] == detector_run.outputs["feature_dim"]
    source = open_source(result.records[0].outputs["train"])
    objects = {s.key: s.meta["objects"] for shard in source.shards for s in source.iter_shard(shard)}
    shards = sorted(Path(detector_run.outputs["packed"]).glob("*.tar"))
    assert [p.name for p in sorted(Path(tagged.outputs["packed"]).glob("*.tar"))] == [p.name for p in shards]
    changed = 0
    for shard in shards:
        before = list(tarfile_samples([{"url": str(shard)}]))
        after = list(tarfile_samples([{"url": str(Path(tagged.outputs["packed"]) / shard.name)}]))
        assert [s["__key__"] for s in after] == [s["__key__"] for s in before]
        for old, new in zip(before, after):
            old_meta, new_meta = json.loads(old["json"]), json.loads(new["json"])
            assert new_meta["tags"] == annotation_tags(objects[new_meta["key"]])
            assert {**new_meta, "tags": old_meta["tags"]} == old_meta
            assert new["jpg"] == old["jpg"] and new["roi.npy.zst"] == old["roi.npy.zst"]
            changed += new_meta["tags"] != old_meta["tags"]
    assert changed > 0  # a 3-step detector does not already tag like the annotations
    again, _ = _run(oracle, cache, until="extract")
    assert all(r.cached for r in again.records)


def test_extract_tags_must_be_detector_or_annotations(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndataset: {shapes: {}}\ndetector: {annotations: true}\nextract: {tags: truth}\n")
    with pytest.raises(ConfigError, match="tags must be 'detector' or 'annotations'"):
        load_config(WorkflowConfig, bad)
