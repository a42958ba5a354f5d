"""Exactly once across a crash: ``softclip extract`` killed with SIGKILL mid-run, then rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import typer
from test_extract_job_actor import TINY_SETTINGS, write_tiny_vinvl
from typer.testing import CliRunner

from softclip.extract.job.cli import register
from softclip.extract.job.manifest import ManifestMismatchError
from softclip.pipeline.shapes import ShapesConfig, generate
from softclip.pipeline.sources import open_source

REPO = Path(__file__).resolve().parents[1]
CLI = "import typer; from softclip.extract.job.cli import register; app = typer.Typer(); register(app); app()"
NUM_SHARDS = 6


def _args(world: Path, files: tuple[Path, Path], out: Path) -> list[str]:
    settings = json.dumps(TINY_SETTINGS)
    return ["extract", "--dataset", str(world / "train"), "--weights", str(files[0]), "--labelmap", str(files[1]),
            "--out", str(out), "--actors", "1", "--set", f"detector_overrides={settings}", "--set", "num_cpus=2",
            "--set", "batch_size=4", "--set", "row_group_size=4"]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    with open(log, "wb") as stream:  # a file, not a pipe: a full pipe would stall the child
        return subprocess.Popen([sys.executable, "-c", CLI, *args], env=env, stdout=stream,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _complete_shards(out: Path) -> int:
    try:
        shards = json.loads((out / "manifest.json").read_text())["shards"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0
    return sum(e.get("status") == "complete" for e in shards.values())


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume_world")
    generate(out, ShapesConfig(num_train=15 * NUM_SHARDS, num_retrieval=0, num_classification_per_class=0,
                               samples_per_shard=15, seed=3), progress=False)
    return out


def test_sigkill_mid_run_then_rerun_gives_every_key_exactly_once(tmp_path, world):
    files, out = write_tiny_vinvl(tmp_path / "tiny"), tmp_path / "features"
    first = _start(_args(world, files, out), tmp_path / "first.log")
    deadline = time.monotonic() + 240
    while _complete_shards(out) < 1 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
    first.wait()
    done_at_kill = _complete_shards(out)
    assert 1 <= done_at_kill < NUM_SHARDS, (tmp_path / "first.log").read_text()[-3000:]
    second = _start(_args(world, files, out), tmp_path / "second.log")
    try:
        assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    log = (tmp_path / "second.log").read_text()
    assert f"({done_at_kill} skipped, 0 unreadable)" in log
    source = open_source(world / "train")
    expected = sorted(s.key for shard in source.shards for s in source.iter_shard(shard))
    keys = pl.concat([pl.read_parquet(out / f"{s.name}.parquet", columns=["key"]) for s in source.shards])
    assert sorted(keys["key"].to_list()) == expected  # none lost, none duplicated
    assert _complete_shards(out) == NUM_SHARDS and not list(out.glob(".tmp-*"))
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"{s.name}.parquet" for s in source.shards]
    # Other settings into the same folder are refused before any work starts.
    app = typer.Typer()
    register(app)
    refused = CliRunner().invoke(app, _args(world, files, out) + ["--max-boxes", "10"])
    assert isinstance(refused.exception, ManifestMismatchError) and "max_boxes: 50 -> 10" in str(refused.exception)
