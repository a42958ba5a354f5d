"""Extraction job throughput on CPU and the storage budget of 2048-d features; prints JSON.

Throughput: the shapes world through the full Ray job (read + decode tasks, detector actors, Parquet
writer) with 1 and 2 CPU actors (1 torch thread each), reporting images/s and the fraction of wall time
the actors spent *outside* the detector (Ray overhead, decode, transfer, write): ``1 - detector seconds /
(actors x wall)``. The detector is the shapes architecture (``extract/configs/shapes.yaml``) with random
weights unless ``--weights/--labelmap`` name a trained one.

Storage: a random-weight VinVL-family model with X152's 2048-d ROI features extracts a few shapes images
at ``max_boxes`` 50; bytes per box and per image are measured on the written shard and extrapolated to
CC3M's 3.3M images, next to VinVL's released float32 features (about 960 GB).

    python benchmarks/extract_job.py [--images 400] [--storage-images 24]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from extract.checkpoint import write_checkpoint, write_labelmap
from extract.detector_config import DetectorArch, DetectorConfig
from extract.job import run_extraction
from extract.job_config import ExtractConfig
from extract.vinvl import VinVLDetector
from pipeline.config import load_config
from pipeline.shapes import ShapesConfig, generate

REPO = Path(__file__).resolve().parents[1]
CC3M_IMAGES = 3_318_333
VINVL_CC3M_FLOAT32_GB = 960


def _random_detector(folder: Path, config: DetectorConfig) -> tuple[Path, Path]:
    torch.manual_seed(0)
    classes = ["__background__"] + [f"class{i}" for i in range(1, config.arch.num_classes)]
    attributes = ["__no_attribute__"] + [f"attr{i}" for i in range(1, config.arch.num_attributes)]
    model = VinVLDetector(config, class_names=classes, attribute_names=attributes)
    folder.mkdir(parents=True, exist_ok=True)
    write_checkpoint(folder / "model.pth", model.state_dict())
    write_labelmap(folder / "labelmap.json", classes, attributes)
    return folder / "model.pth", folder / "labelmap.json"


def _run(cfg: ExtractConfig) -> dict:
    summary = run_extraction(cfg)
    busy = summary.detector_seconds / (summary.actors * summary.seconds)
    return {"actors": summary.actors, "images": summary.images_this_run, "seconds": round(summary.seconds, 2),
            "images_per_second": round(summary.images_per_second, 2),
            "detector_seconds": round(summary.detector_seconds, 2),
            "fraction_outside_detector": round(1 - busy, 3),
            "boxes_per_image": round(summary.totals["boxes_per_image"], 1),
            "bytes_per_image": round(summary.totals["bytes_per_image"])}


def throughput(work: Path, num_images: int, weights: Path | None, labelmap: Path | None) -> dict:
    generate(work / "world", ShapesConfig(num_train=num_images, num_retrieval=0, num_classification_per_class=0,
                                          samples_per_shard=100), progress=False)
    shapes_config = REPO / "extract" / "configs" / "shapes.yaml"
    if weights is None:
        weights, labelmap = _random_detector(work / "detector", load_config(DetectorConfig, shapes_config))
    runs = []
    for actors in (1, 2):
        cfg = ExtractConfig(dataset=str(work / "world" / "train"), weights=weights, labelmap=labelmap,
                            out=work / f"features-{actors}", detector_overrides={"config": str(shapes_config)},
                            actors=actors, cpus_per_actor=1.0, torch_threads=1, batch_size=16, progress=False)
        runs.append(_run(cfg))
    return {"detector": "shapes_r14c4 " + ("trained" if weights != work / "detector" / "model.pth" else
                                           "random weights"), "runs": runs}


def storage(work: Path, num_images: int) -> dict:
    arch = DetectorArch(blocks=(1, 1, 1, 1), groups=1, width_per_group=64, stem_channels=16, res2_channels=256,
                        num_classes=1595, num_attributes=525)
    weights, labelmap = _random_detector(work / "d2048", DetectorConfig(name="random2048", arch=arch))
    generate(work / "world2048", ShapesConfig(num_train=num_images, num_retrieval=0,
                                              num_classification_per_class=0, image_size=128), progress=False)
    cfg = ExtractConfig(dataset=str(work / "world2048" / "train"), weights=weights, labelmap=labelmap,
                        out=work / "features-2048", detector_overrides={"min_size": 256, "max_size": 256},
                        actors=1, torch_threads=1, batch_size=4, progress=False)
    run = _run(cfg)
    bytes_per_box = run["bytes_per_image"] / max(run["boxes_per_image"], 1e-9)
    at = {boxes: round(bytes_per_box * boxes * CC3M_IMAGES / 1e9) for boxes in (run["boxes_per_image"], 35, 50)}
    return {"feature_dim": 2048, "max_boxes": 50, **{k: run[k] for k in ("images", "boxes_per_image",
                                                                          "bytes_per_image")},
            "bytes_per_box": round(bytes_per_box), "float16_bytes_per_box_raw": 2048 * 2,
            "cc3m_gb_at_boxes_per_image": at, "vinvl_released_float32_gb": VINVL_CC3M_FLOAT32_GB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--storage-images", type=int, default=24)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--labelmap", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # 2 actors x 1 CPU + 1 for reading
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = {"throughput": throughput(Path(tmp), args.images, args.weights, args.labelmap),
                      "storage": storage(Path(tmp), args.storage_images)}
    finally:
        ray.shutdown()
    result["cpu_cores"] = os.cpu_count()
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
