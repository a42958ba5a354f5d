"""Training throughput: SoftCLIP vs CLIP on the same model and batch, and the data loader on its own.

Prints one JSON object. On CPU: the shapes-tiny model, 64 px, batch 64, fp32, on synthetic tensors, and
the data loader over a freshly generated shapes world (oracle annotation features), timed after each
worker's first batch (steady state). With CUDA: RN50 at
224 px, bf16 autocast, batch 256, 50 boxes of 2048-d features per image.

SoftCLIP and CLIP steps are interleaved one by one (S C S C ...) and each step is timed on its own, so a
machine whose speed drifts (a shared CPU) slows both alike: samples/s come from the median step time, and
``softclip_over_clip`` is the median over neighbouring pairs of CLIP's step time over SoftCLIP's, with the
quartiles of those pair ratios beside it.

    PYTHONPATH=. python benchmarks/train.py [--steps 40] [--data-samples 5000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from softclip.pipeline.annotation_features import ANNOTATION_FEATURE_DIM, write_annotation_shards
from softclip.pipeline.shapes import ShapesConfig, generate
from softclip.train.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from softclip.train.data import TrainData, tagset_ids
from softclip.train.loop import param_groups, train_step
from softclip.train.losses import SoftCLIPLoss
from softclip.train.model import build_model


def train_setting(cuda: bool) -> dict:
    if cuda:
        return {"model": ModelConfig(name="RN50", roi_feature_dim=2048), "batch": 256, "boxes": 50, "size": 224}
    return {"model": ModelConfig(name="shapes-tiny", roi_feature_dim=ANNOTATION_FEATURE_DIM, roi_width=128,
                                 roi_heads=4), "batch": 64, "boxes": 6, "size": 64}


def synthetic_batch(setting: dict, tokenizer) -> dict:
    gen = torch.Generator().manual_seed(0)
    b, m, d = setting["batch"], setting["boxes"], setting["model"].roi_feature_dim
    return {"images": torch.randn(b, 3, setting["size"], setting["size"], generator=gen),
            "texts": tokenizer(["a small red circle to the left of a big blue star"] * b),
            "tags": tokenizer(["red circle blue star green square"] * b),
            "roi_features": torch.rand(b, m, d, generator=gen).half(), "roi_geometry": torch.rand(b, m, 6),
            "roi_mask": torch.rand(b, m, generator=gen) > 0.3,
            "tagset": torch.tensor([tagset_ids("red circle, blue star, green square")] * b)}


def paired_step_times(model, loss_fns: dict[str, SoftCLIPLoss], batch, device, steps: int) -> dict[str, list[float]]:
    """Seconds of each optimizer step, per loss; the losses take turns step by step (each with its own
    AdamW state on the same model) after one warm-up step each."""
    cfg = TrainConfig(run_dir=Path("unused"), model=ModelConfig(name="x"), data=DataConfig(train_shards="x"),
                      optim=OptimConfig(precision="bf16"))
    optimizers = {name: torch.optim.AdamW(param_groups(model, 0.1), lr=1e-5, fused=True) for name in loss_fns}
    times: dict[str, list[float]] = {name: [] for name in loss_fns}
    for step in range(steps + 1):
        for name, loss_fn in loss_fns.items():
            start = time.perf_counter()
            losses = train_step(model, loss_fn, optimizers[name], batch, cfg, device)
            float(losses["loss"])  # waits for the device
            if step:  # step 0 warms up
                times[name].append(time.perf_counter() - start)
    return times


def _data_rate(setting: dict, preprocess, tokenizer, num_samples: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "shapes", ShapesConfig(num_train=num_samples, num_retrieval=0,
                                                    num_classification_per_class=0, samples_per_shard=500),
                 progress=False)
        write_annotation_shards(Path(tmp) / "shapes" / "train", Path(tmp) / "packed", progress=False)
        data = TrainData(DataConfig(train_shards=str(Path(tmp) / "packed"), batch_size=setting["batch"],
                                    num_workers=workers, max_boxes=setting["boxes"]),
                         transform=preprocess, tokenizer=tokenizer, feature_dim=ANNOTATION_FEATURE_DIM)
        batches = data.epoch_batches(0)
        for _ in range(max(workers, 1)):  # worker start-up and the shuffle-buffer fill are not the steady state
            next(batches)
        start = time.perf_counter()
        count = sum(b["images"].shape[0] for b in batches)
        return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps of each loss")
    parser.add_argument("--data-samples", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    setting = train_setting(cuda)
    torch.manual_seed(0)
    model, preprocess, _, tokenizer = build_model(setting["model"])
    model.to(device)
    batch = synthetic_batch(setting, tokenizer)
    times = paired_step_times(model, {"softclip": SoftCLIPLoss(), "clip": SoftCLIPLoss(lam=0.0, mu=0.0, roi_weight=0.0)},
                               batch, device, args.steps)
    rate = {name: setting["batch"] / statistics.median(t) for name, t in times.items()}
    pair_ratios = [c / s for s, c in zip(times["softclip"], times["clip"])]
    quartiles = statistics.quantiles(pair_ratios, n=4)
    data_rate = _data_rate(train_setting(False), *_cpu_transforms(), args.data_samples, args.workers)
    print(json.dumps({
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch_threads": torch.get_num_threads(),
        "model": setting["model"].name, "batch": setting["batch"], "image_size": setting["size"],
        "precision": "bf16" if cuda else "fp32", "steps": args.steps,
        "softclip_samples_per_s": round(rate["softclip"], 1), "clip_samples_per_s": round(rate["clip"], 1),
        "softclip_over_clip": round(statistics.median(pair_ratios), 3),
        "softclip_over_clip_quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)],
        "data_workers": args.workers, "data_samples_per_s": round(data_rate, 1),
        "data_over_clip_train": round(data_rate / rate["clip"], 2),
    }))


def _cpu_transforms():
    _, preprocess, _, tokenizer = build_model(train_setting(False)["model"])
    return preprocess, tokenizer


if __name__ == "__main__":
    main()
