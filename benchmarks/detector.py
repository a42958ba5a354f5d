"""Detector speed: images/s, peak memory and the time split between stages; prints JSON.

    PYTHONPATH=. python benchmarks/detector.py                  # CPU: shapes variant + reduced X152
    PYTHONPATH=. python benchmarks/detector.py --device cuda    # GPU: X152 600x1000, fp32 b1 vs bf16/fp16 batched

Random weights: the box and attribute predictors are redrawn so post-processing sees varied scores; the
FrozenBN layers keep their identity statistics. ``peak_rss_gib`` (CPU) is the process's peak resident
memory so far, so it also covers every run measured before it in the same process; ``peak_gpu_mem_gib`` is
``torch.cuda.max_memory_allocated``. The split times ``backbone`` (C4 body), ``rpn`` (head + proposals), ``box_head`` (ROIAlign + res5 +
predictor), ``postprocess`` (NMS_FILTER) and ``attribute_head`` on the same batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import numpy as np
import torch
from PIL import Image

from softclip.extract.detector.config import DetectorArch, DetectorConfig, DetectorSettings
from softclip.extract.detector.vinvl import VinVLDetector
from softclip.pipeline.config import load_config


def randomised_detector(cfg: DetectorConfig, device: str) -> VinVLDetector:
    torch.manual_seed(0)
    arch = cfg.arch
    model = VinVLDetector(cfg, class_names=[f"c{i}" for i in range(arch.num_classes)],
                          attribute_names=[f"a{i}" for i in range(arch.num_attributes)])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "predictor" in name:
                p.normal_(0, 0.05)
    return model.to(device).eval()


def random_images(n: int, width: int, height: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(n)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def stage_split(model: VinVLDetector, images: list[Image.Image], device: str) -> dict[str, float]:
    """Seconds per stage for one batch (after a warm-up run of :meth:`VinVLDetector.detect`)."""
    model.detect(images)
    times, t = {}, time.perf_counter()

    def mark(name: str) -> None:
        nonlocal t
        _sync(device)
        now = time.perf_counter()
        times[name] = round(now - t, 4)
        t = now

    batch, sizes = model.preprocess(images)
    batch = batch.to(device)
    mark("preprocess")
    with model._autocast(batch.device):
        features = model.backbone.body(batch, sizes)
        mark("backbone")
        proposals = model.propose(features, sizes)
        mark("rpn")
        box_features, scores, boxes = model.box_head(features, proposals, sizes)
        mark("box_head")
        detections = model.postprocess_detections(proposals, scores, boxes)
        mark("postprocess")
        model.attribute_head(features, detections, box_features, sizes)
        mark("attribute_head")
    return times


def throughput(model: VinVLDetector, images: list[Image.Image], batch_size: int, device: str,
               repeats: int) -> dict:
    """Images/s of ``detect`` over ``images`` in batches of ``batch_size`` and the peak memory."""
    model.detect(images[:batch_size])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        for i in range(0, len(images), batch_size):
            model.detect(images[i : i + batch_size])
    _sync(device)
    seconds = time.perf_counter() - start
    out = {"batch_size": batch_size, "precision": model.settings.precision, "images": len(images) * repeats,
           "images_per_s": round(len(images) * repeats / seconds, 3)}
    if device.startswith("cuda"):
        out["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    else:
        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return out


def _cpu_runs(args: argparse.Namespace) -> dict:
    cfg = load_config(DetectorConfig, "extract/configs/shapes.yaml")
    shapes = randomised_detector(cfg, "cpu")
    images = random_images(32, 64, 64)
    result = {
        "shapes_variant": {
            "input": f"64x64 -> {cfg.test.min_size}x{cfg.test.min_size}", "arch": cfg.name,
            "one_at_a_time": throughput(shapes, images, 1, "cpu", args.repeats),
            "batched": throughput(shapes, images, 16, "cpu", args.repeats),
            "split_seconds_batch16": stage_split(shapes, images[:16], "cpu"),
        }
    }
    one, batched = result["shapes_variant"]["one_at_a_time"], result["shapes_variant"]["batched"]
    result["shapes_variant"]["batched_over_one_at_a_time"] = round(batched["images_per_s"] / one["images_per_s"], 3)
    if not args.skip_x152:
        settings = DetectorSettings(min_size=args.x152_min_size, max_size=args.x152_max_size,
                                    post_nms_top_n=args.x152_post_nms_top_n)
        x152 = randomised_detector(DetectorConfig(name="vinvl_x152c4", arch=DetectorArch(), test=settings), "cpu")
        image = random_images(1, 1000, 600, seed=1)
        result["x152_cpu_reduced"] = {
            "note": f"X152-C4 batch 1 fp32 on CPU at REDUCED input (short side {args.x152_min_size}, long <= "
                    f"{args.x152_max_size}) and post_nms_top_n={args.x152_post_nms_top_n} (VinVL: 600/1000/300)",
            "throughput": throughput(x152, image, 1, "cpu", 1),
            "split_seconds": stage_split(x152, image, "cpu"),
        }
    return result


def _gpu_runs(args: argparse.Namespace) -> dict:
    device = args.device
    base = randomised_detector(DetectorConfig(), device)
    images = random_images(args.gpu_images, 1000, 600)
    runs = [throughput(base, images, 1, device, args.repeats)]
    split = {"fp32_b1": stage_split(base, images[:1], device)}
    for precision in ("bf16", "fp16"):
        base.configure(precision=precision, channels_last=True)
        runs.append(throughput(base, images, args.batch_size, device, args.repeats))
        split[f"{precision}_b{args.batch_size}"] = stage_split(base, images[: args.batch_size], device)
    return {"x152_600x1000": runs, "split_seconds": split, "gpu": torch.cuda.get_device_name()}


def main() -> None:
    """Parse arguments, run the CPU or GPU measurements, print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gpu-images", type=int, default=32)
    parser.add_argument("--skip-x152", action="store_true")
    parser.add_argument("--x152-min-size", type=int, default=300)
    parser.add_argument("--x152-max-size", type=int, default=500)
    parser.add_argument("--x152-post-nms-top-n", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine()}
    result.update(_gpu_runs(args) if args.device.startswith("cuda") else _cpu_runs(args))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
