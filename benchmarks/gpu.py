"""GPU readiness in one run: detector, training and extraction-job speed on one CUDA GPU; prints JSON.

On one CUDA GPU (``make bench-gpu``, under 8 minutes on an H100/H200-class GPU):

- ``detector``: X152-C4 at 600x1000 with random weights (VinVL's test settings), images/s of
  ``VinVLDetector.detect`` at batch 1/2/4/8, in fp32 and bf16 (``precision``), each with and without
  ``channels_last``, plus the peak GPU memory; ``fastest`` names the best setting.
- ``train``: RN50 SoftCLIP vs CLIP optimizer steps at batch 256 in bf16 (``benchmarks/train.py``'s setting),
  samples/s of each.
- ``extract_job``: the Ray extraction job (``--pack``) with one GPU actor on ~2,000 shapes images and the
  shipped shapes detector: images/s, start-up seconds, packed bytes per image.
- ``gpu_tests``: the exit status and summary line of ``pytest -m gpu tests/test_gpu.py``.

``--smoke`` runs every part at tiny sizes (the shapes architecture at 64x64, the tiny training model,
40 images) on whatever device there is, CPU included, so the script is known to work before a GPU is lent;
tests/test_bench_gpu.py runs it that way. Each part's seconds are reported; a failing part is reported
with its error and the others still run.

    python benchmarks/gpu.py [--smoke] [--parts detector,train,extract_job,gpu_tests]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from softclip.extract.detector.config import DetectorConfig
from softclip.extract.job.config import ExtractConfig
from softclip.extract.job.run import run_extraction
from softclip.pipeline.config import load_config
from softclip.pipeline.shapes import ShapesConfig, generate
from softclip.train.losses import SoftCLIPLoss
from softclip.train.model import build_model

REPO = Path(__file__).resolve().parents[1]
PARTS = ("detector", "train", "extract_job", "gpu_tests")
SHAPES_DETECTOR = REPO / "extract" / "weights" / "shapes"


def _benchmark(name: str):
    """The sibling benchmark script ``benchmarks/<name>.py`` as a module (``train`` would otherwise be
    taken for the repository's train/ folder)."""
    spec = importlib.util.spec_from_file_location(f"softclip_benchmark_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_DETECTOR, _TRAIN = _benchmark("detector"), _benchmark("train")


def detector(device: str, smoke: bool) -> dict:
    """Images/s per (precision, memory format, batch size); ``fastest`` is the highest."""
    config = load_config(DetectorConfig, REPO / "extract/configs/shapes.yaml") if smoke else DetectorConfig()
    model = _DETECTOR.randomised_detector(config, device)  # DetectorConfig(): X152-C4 with VinVL's test settings
    (width, height), batches = ((64, 64), (1, 2)) if smoke else ((1000, 600), (1, 2, 4, 8))
    images = _DETECTOR.random_images(max(batches) * 2, width, height)
    precisions = ("fp32", "bf16") if device == "cuda" else ("fp32",)  # autocast is CUDA-only (pipeline.precision)
    runs = []
    for precision in precisions:
        for channels_last in (False, True):
            model.configure(precision=precision, channels_last=channels_last)
            for batch in batches:
                run = _DETECTOR.throughput(model, images[: batch * 2], batch, device, repeats=1 if smoke else 2)
                runs.append({"precision": precision, "channels_last": channels_last, **run})
    best = max(runs, key=lambda r: r["images_per_s"])
    return {"arch": model.config.name, "input": f"{height}x{width}", "runs": runs,
            "fastest": {k: best[k] for k in ("precision", "channels_last", "batch_size", "images_per_s")}}


def train(device: str, smoke: bool) -> dict:
    """Samples/s of SoftCLIP and CLIP optimizer steps, taking turns on one model."""
    setting = _TRAIN.train_setting(device == "cuda" and not smoke)
    if smoke:
        setting = {**setting, "batch": 8}
    torch.manual_seed(0)
    model, _, _, tokenizer = build_model(setting["model"])
    model.to(device)
    steps = 2 if smoke else 15
    times = _TRAIN.paired_step_times(model, {"softclip": SoftCLIPLoss(), "clip": SoftCLIPLoss(lam=0.0, mu=0.0)},
                              _TRAIN.synthetic_batch(setting, tokenizer), torch.device(device), steps)
    rate = {name: setting["batch"] / statistics.median(t) for name, t in times.items()}
    return {"model": setting["model"].name, "batch": setting["batch"], "steps": steps,
            "precision": "bf16" if device == "cuda" else "fp32",
            **{f"{name}_samples_per_s": round(r, 1) for name, r in rate.items()},
            "softclip_step_time_over_clip": round(rate["clip"] / rate["softclip"], 3)}


def extract_job(device: str, smoke: bool, work: Path) -> dict:
    """The Ray extraction job with one actor on the device, packing in the same pass."""
    images = 40 if smoke else 2000
    generate(work / "world", ShapesConfig(num_train=images, num_retrieval=0, num_classification_per_class=0,
                                          samples_per_shard=20 if smoke else 250), progress=False)
    cfg = ExtractConfig(dataset=str(work / "world" / "train"), weights=SHAPES_DETECTOR / "model.pth",
                        labelmap=SHAPES_DETECTOR / "labelmap.json", out=work / "features",
                        detector_overrides={"config": str(REPO / "extract/configs/shapes.yaml")},
                        device="cuda" if device == "cuda" else "cpu", actors=1, batch_size=64, pack=True,
                        progress=False, torch_threads=0 if device == "cuda" else 1)
    summary = run_extraction(cfg)
    packed = sum(p.stat().st_size for p in (work / "features" / "packed").glob("*.tar"))
    return {"images": summary.images_this_run, "seconds": round(summary.seconds, 2),
            "images_per_second": round(summary.images_per_second, 1),
            "startup_seconds": round(summary.startup_seconds, 2),
            "detector_ms_per_image": round(1000 * summary.detector_seconds / max(summary.images_this_run, 1), 2),
            "packed_bytes_per_image": round(packed / max(summary.images_this_run, 1))}


def gpu_tests() -> dict:
    """``pytest -m gpu`` in a subprocess (skipped tests where no CUDA device is visible)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                             str(REPO / "tests" / "test_gpu.py")], capture_output=True, text=True, cwd=REPO)
    lines = result.stdout.strip().splitlines()
    return {"returncode": result.returncode, "summary": lines[-1] if lines else result.stderr[-500:]}


def _timed(name: str, fn, *args) -> dict:
    print(f"bench-gpu: {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as err:  # reported, so one broken part does not hide the others' figures
        out = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
    out["part_seconds"] = round(time.perf_counter() - start, 1)
    print(f"bench-gpu: {name} done in {out['part_seconds']} s", file=sys.stderr, flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes on any device (CPU included).")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"Comma-separated subset of {', '.join(PARTS)}.")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        parser.error("no CUDA device: the full run needs one; use --smoke to check the script on CPU")
    start = time.perf_counter()
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "smoke": args.smoke,
                    "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        calls = {"detector": (detector, device, args.smoke), "train": (train, device, args.smoke),
                 "extract_job": (extract_job, device, args.smoke, Path(tmp)), "gpu_tests": (gpu_tests,)}
        for name in parts:
            result[name] = _timed(name, *calls[name])
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    failed = [name for name in parts if "error" in result[name]]
    print(f"bench-gpu: {len(parts) - len(failed)}/{len(parts)} parts ran in {result['seconds']} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
