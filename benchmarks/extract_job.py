"""Extraction job throughput on CPU and the storage budget of 2048-d features; prints JSON.

Throughput: the shapes world through the full Ray job (read + decode tasks, detector actors, Parquet
writer) with 1 and 2 CPU actors (1 torch thread each), reporting images/s and the fraction of wall time
the actors spent *outside* the detector: ``fraction_outside_detector_after_load`` is ``1 - time in
detect / actor time`` counted from each actor's model being loaded to its last batch (waiting for input,
Ray transfer, conversion to rows), ``fraction_outside_detector_wall`` is ``1 - time in detect / (actors x
run wall time)``, which also charges start-up (Ray workers, imports, model load: ``startup_seconds`` to
the first results) and the driver's final writes. The detector is the shapes architecture
(``extract/configs/shapes.yaml``) with random weights unless ``--weights/--labelmap`` name a trained one.

Storage: a random-weight VinVL-family model with X152's 2048-d ROI features extracts a few shapes images
at ``max_boxes`` 50; bytes per box and per image are measured on the written shard and extrapolated to
CC3M's 3.3M images, next to VinVL's released float32 features (about 960 GB, i.e. about 35 boxes per
image at 8 KiB per float32 box). Random weights make features more compressible than trained ones, so the
raw float16 size (no compression) is reported as the upper bound.

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

from softclip.extract.checkpoint import write_checkpoint, write_labelmap
from softclip.extract.detector_config import DetectorArch, DetectorConfig
from softclip.extract.job import run_extraction
from softclip.extract.job_config import ExtractConfig
from softclip.extract.vinvl import VinVLDetector
from softclip.pipeline.config import load_config
from softclip.pipeline.shapes import ShapesConfig, generate

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
    """One run: throughput, and where the actors' time went once their model had loaded."""
    s = run_extraction(cfg)
    return {"actors": s.actors, "images": s.images_this_run, "seconds": round(s.seconds, 2),
            "images_per_second": round(s.images_per_second, 2), "startup_seconds": round(s.startup_seconds, 2),
            "detector_ms_per_image": round(1000 * s.detector_seconds / max(s.images_this_run, 1), 1),
            "fraction_outside_detector_wall": round(1 - s.detector_seconds / (s.actors * s.seconds), 3),
            "fraction_outside_detector_after_load": round(1 - s.detector_seconds / s.actor_seconds, 3),
            "boxes_per_image": round(s.totals["boxes_per_image"], 1),
            "bytes_per_image": round(s.totals["bytes_per_image"])}


def throughput(work: Path, num_images: int, weights: Path | None, labelmap: Path | None,
               shapes_config: Path) -> dict:
    generate(work / "world", ShapesConfig(num_train=num_images, num_retrieval=0, num_classification_per_class=0,
                                          samples_per_shard=100), progress=False)
    if weights is None:
        weights, labelmap = _random_detector(work / "detector", load_config(DetectorConfig, shapes_config))
    runs = []
    for actors in (1, 2):
        cfg = ExtractConfig(dataset=str(work / "world" / "train"), weights=weights, labelmap=labelmap,
                            out=work / f"features-{actors}", detector_overrides={"config": str(shapes_config)},
                            actors=actors, cpus_per_actor=1.0, torch_threads=1, batch_size=16, progress=False)
        runs.append(_run(cfg))
    trained = weights != work / "detector" / "model.pth"
    return {"detector": f"{shapes_config} " + ("trained: " + str(weights) if trained else "random weights"),
            "runs": runs}


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
    measured_per_box = run["bytes_per_image"] / max(run["boxes_per_image"], 1e-9)
    vinvl_boxes = VINVL_CC3M_FLOAT32_GB * 1e9 / CC3M_IMAGES / (2048 * 4)
    return {"feature_dim": 2048, "max_boxes": 50, **{k: run[k] for k in ("images", "boxes_per_image",
                                                                          "bytes_per_image")},
            "bytes_per_box_measured_zstd": round(measured_per_box), "bytes_per_box_float16_raw": 2048 * 2,
            "vinvl_boxes_per_image_implied": round(vinvl_boxes, 1),
            "cc3m_gb_float16_raw_at_vinvl_boxes": round(2048 * 2 * vinvl_boxes * CC3M_IMAGES / 1e9),
            "cc3m_gb_measured_at_vinvl_boxes": round(measured_per_box * vinvl_boxes * CC3M_IMAGES / 1e9),
            "cc3m_gb_float16_raw_at_50_boxes": round(2048 * 2 * 50 * CC3M_IMAGES / 1e9),
            "vinvl_released_float32_gb": VINVL_CC3M_FLOAT32_GB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--storage-images", type=int, default=24)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--labelmap", type=Path)
    parser.add_argument("--detector-config", type=Path, default=REPO / "extract" / "configs" / "shapes.yaml")
    args = parser.parse_args()
    start = time.perf_counter()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # 2 actors x 1 CPU + 1 for reading
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = {"throughput": throughput(Path(tmp), args.images, args.weights, args.labelmap,
                                                args.detector_config),
                      "storage": storage(Path(tmp), args.storage_images)}
    finally:
        ray.shutdown()
    result["cpu_cores"] = os.cpu_count()
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
