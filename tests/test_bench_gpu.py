"""benchmarks/gpu.py works before a GPU is lent: its --smoke mode runs every part at tiny sizes on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _smoke(parts: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--parts", parts], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout)


def test_smoke_detector_and_training_parts_report_their_figures():
    out = _smoke("detector,train")
    assert out["device"] == "cpu" and out["smoke"] is True
    runs = out["detector"]["runs"]
    assert {(r["channels_last"], r["batch_size"]) for r in runs} == {(False, 1), (False, 2), (True, 1), (True, 2)}
    assert all(r["images_per_s"] > 0 for r in runs) and out["detector"]["fastest"] in [
        {k: r[k] for k in ("precision", "channels_last", "batch_size", "images_per_s")} for r in runs]
    assert out["train"]["softclip_samples_per_s"] > 0 and out["train"]["clip_samples_per_s"] > 0


@pytest.mark.slow
def test_smoke_extraction_job_and_gpu_tests_parts_run():
    out = _smoke("extract_job,gpu_tests")
    assert out["extract_job"]["images"] == 40 and out["extract_job"]["packed_bytes_per_image"] > 0
    assert out["gpu_tests"]["returncode"] == 0 and "skipped" in out["gpu_tests"]["summary"]


def test_unknown_parts_and_a_full_run_without_cuda_are_refused():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for args in (["--smoke", "--parts", "detector,warp"], []):
        result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env)
        assert result.returncode == 2 and ("unknown parts" in result.stderr or "--smoke" in result.stderr)
