"""The extraction job through Ray on CPU: a full run on the shapes world, resume, refusal, bad input."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import ray
import webdataset as wds
from test_extract_job_actor import BAD_SHARD_EXPECTED, tiny_config, write_bad_source

from softclip.extract.detector.vinvl import VinVLDetector
from softclip.extract.job.manifest import Manifest, ManifestMismatchError
from softclip.extract.job.run import run_extraction
from softclip.pipeline.packed import read_packed_sample
from softclip.pipeline.shards import read_feature_table
from softclip.pipeline.sources import open_source

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # tests/ on the workers' path: the crash test's loader lives in this module.
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


class _KilledOnce:
    """A VinVL detector whose actor process SIGKILLs itself at its third batch, once per marker file."""

    def __init__(self, detector: VinVLDetector, marker: Path):
        self.detector, self.marker, self.calls = detector, marker, 0
        self.detector_id, self.feature_dim = detector.detector_id, detector.feature_dim

    def to(self, device: str) -> _KilledOnce:
        self.detector.to(device)
        return self

    def detect(self, images):
        self.calls += 1
        if self.calls == 3 and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.detector.detect(images)


def killed_once_vinvl(weights, labelmap, *, crash_marker: str, **overrides) -> _KilledOnce:
    """Loader (``test_extract_job:killed_once_vinvl``) for the worker-crash test."""
    return _KilledOnce(VinVLDetector.from_checkpoint(weights, labelmap, **overrides), Path(crash_marker))


def read_feature_frame(path: Path) -> pl.DataFrame:
    return pl.from_arrow(read_feature_table(path))


def _source_keys(spec) -> list[str]:
    source = open_source(spec)
    return [s.key for shard in source.shards for s in source.iter_shard(shard)]


def test_full_extraction_every_key_once_then_resume_and_refuse(tmp_path, shapes_world):
    cfg = tiny_config(tmp_path, shapes_world / "train", max_boxes=20, actors=1, pack=True)
    summary = run_extraction(cfg)
    keys = _source_keys(shapes_world / "train")
    frames = [read_feature_frame(cfg.out / f"{s.name}.parquet") for s in open_source(cfg.dataset).shards]
    found = [k for f in frames for k in f["key"].to_list()]
    assert sorted(found) == sorted(keys) and len(set(found)) == len(keys) == 120
    manifest = Manifest.load(cfg.out)
    detector_id = manifest.data["detector"]["detector_id"]
    assert all(set(f["detector"].to_list()) == {detector_id} for f in frames)
    assert all(f["num_boxes"].max() <= 20 and f["status"].unique().to_list() == ["success"] for f in frames)
    assert summary.totals["images"] == 120 and summary.images_this_run == 120 and summary.shards_written == 3
    assert summary.totals["bytes_per_image"] > 0 and "120 images, 120 ok" in summary.line()
    images = {s.key: s.image for shard in open_source(cfg.dataset).shards for s in open_source(cfg.dataset).iter_shard(shard)}
    for frame, shard in zip(frames, open_source(cfg.dataset).shards):  # packed in the same pass, same rows
        path = cfg.out / "packed" / f"{shard.name}.tar"
        packed = [read_packed_sample(s, str(path)) for s in wds.WebDataset(str(path), shardshuffle=False)]
        assert [p.key for p in packed] == frame["key"].to_list()
        assert all(p.image == images[p.key] and p.tags == t for p, t in zip(packed, frame["tags"].to_list()))
    # A rerun verifies and skips everything; a damaged shard is redone, alone.
    assert run_extraction(cfg).images_this_run == 0
    (cfg.out / "00001.parquet").write_bytes(b"damaged")
    again = run_extraction(cfg)
    assert again.images_this_run == 50 and again.shards_skipped == 2
    assert read_feature_table(cfg.out / "00001.parquet").num_rows == 50
    with pytest.raises(ManifestMismatchError, match="max_boxes"):
        run_extraction(cfg.replace(max_boxes=10))


def test_bad_inputs_become_error_rows_and_the_job_finishes(tmp_path):
    source = write_bad_source(tmp_path / "source")
    cfg = tiny_config(tmp_path, source, actors=1, batch_size=4)
    summary = run_extraction(cfg)
    manifest = Manifest.load(cfg.out)
    assert manifest.shards["00002"]["status"] == "unreadable" and "cannot open" in manifest.shards["00002"]["error"]
    frame = read_feature_frame(cfg.out / "00000.parquet")
    by_key = dict(zip(frame["key"].to_list(), zip(frame["status"].to_list(), frame["error"].to_list())))
    got = [status if status == "success" else error.split(":")[0]
           for status, error in (by_key[k] for k in sorted(by_key))]
    assert got == BAD_SHARD_EXPECTED
    truncated = read_feature_frame(cfg.out / "00001.parquet").sort("key")
    assert truncated["status"].to_list() == ["success", "success", "error"]
    assert read_feature_frame(cfg.out / "00003.parquet")["status"].to_list() == ["success"] * 4
    errors = Counter(e for e in BAD_SHARD_EXPECTED if e != "success")
    errors["read_error"] = 1
    assert summary.totals["errors"] == dict(sorted(errors.items()))
    assert summary.totals["shards_unreadable"] == 1 and summary.totals["images"] == 13 + 3 + 4


def test_a_detector_worker_killed_mid_run_loses_and_duplicates_nothing(tmp_path, shapes_world):
    marker = tmp_path / "killed"
    base = tiny_config(tmp_path, shapes_world / "train")
    cfg = base.replace(loader="test_extract_job:killed_once_vinvl", batch_size=4,
                       detector_overrides={**base.detector_overrides, "crash_marker": str(marker)})
    summary = run_extraction(cfg)
    assert marker.exists()  # the actor process really died (and Ray restarted it, retrying its batches)
    keys = [k for s in open_source(cfg.dataset).shards
            for k in read_feature_frame(cfg.out / f"{s.name}.parquet")["key"].to_list()]
    assert sorted(keys) == sorted(_source_keys(shapes_world / "train")) and summary.totals["ok"] == 120


class _Poisoned:
    """A VinVL detector whose process dies (SIGKILL) on every batch holding a 13x17 image: an input that
    crashes a worker every time."""

    def __init__(self, detector: VinVLDetector):
        self.detector = detector
        self.detector_id, self.feature_dim = detector.detector_id, detector.feature_dim

    def to(self, device: str) -> _Poisoned:
        self.detector.to(device)
        return self

    def detect(self, images):
        if any(image.size == (13, 17) for image in images):
            os.kill(os.getpid(), signal.SIGKILL)
        return self.detector.detect(images)


def poisoned_vinvl(weights, labelmap, **overrides) -> _Poisoned:
    """Loader (``test_extract_job:poisoned_vinvl``) for the crash-every-time test."""
    return _Poisoned(VinVLDetector.from_checkpoint(weights, labelmap, **overrides))


@pytest.mark.slow
def test_an_input_that_kills_its_worker_every_time_fails_the_run_naming_the_shard(tmp_path, shapes_world):
    import io

    from PIL import Image

    from softclip.extract.job.run import WorkerCrashError
    from softclip.pipeline.img2dataset import ShardWriter

    source = tmp_path / "source"
    source.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (source / name).write_bytes((shapes_world / "train" / name).read_bytes())
    buffer = io.BytesIO()
    Image.new("RGB", (13, 17), (200, 10, 10)).save(buffer, format="PNG")
    with ShardWriter(source, 2) as shard:
        shard.write(buffer.getvalue(), caption="a poisoned image", width=13, height=17)
    cfg = tiny_config(tmp_path, source).replace(loader="test_extract_job:poisoned_vinvl", ray_retries=1)
    with pytest.raises(WorkerCrashError, match=r"died 2 times.*unfinished shards: .*00002"):
        run_extraction(cfg)
    assert "00002" not in Manifest.load(cfg.out).shards and not list(cfg.out.glob(".tmp-*"))
