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

Bytes read (``--reads``, needs ``strace``): one ``softclip extract --pack`` run of the shapes world as a
subprocess under ``strace``, summing every ``read`` of a file in the dataset folder and in the output folder
(the Ray workers included), next to the dataset's size; plus packed and source bytes per image and the
run's wall and start-up seconds.

    python benchmarks/extract_job.py [--images 400] [--storage-images 24] [--reads]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from softclip.extract.detector.checkpoint import write_checkpoint, write_labelmap
from softclip.extract.detector.config import DetectorArch, DetectorConfig
from softclip.extract.detector.vinvl import VinVLDetector
from softclip.extract.job.config import ExtractConfig
from softclip.extract.job.run import run_extraction
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


_READ_CALL = re.compile(r"^(\d+)\s+(?:read|pread64|readv|preadv|preadv2)\((\d+)<([^>]*)>(.*)$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. \w+ resumed>.*\)\s+=\s+(\d+)")
_RESULT = re.compile(r"\)\s+=\s+(\d+)")


def traced_read_bytes(trace: Path, folders: dict[str, Path]) -> dict[str, int]:
    """Bytes returned by read calls on files under each of ``folders``, from an ``strace -f -y`` log
    (calls interrupted by another thread are matched with their ``resumed`` line by process id)."""
    totals = dict.fromkeys(folders, 0)
    pending: dict[str, str] = {}
    prefixes = {name: str(folder.resolve()) + os.sep for name, folder in folders.items()}
    for line in trace.read_text(errors="replace").splitlines():
        call, resumed = _READ_CALL.match(line), _RESUMED.match(line)
        if call:
            pid, path, rest = call.group(1), call.group(3), call.group(4)
            if rest.endswith("<unfinished ...>"):
                pending[pid] = path
                continue
            result = _RESULT.search(rest)
            size = int(result.group(1)) if result else 0
        elif resumed and resumed.group(1) in pending:
            path, size = pending.pop(resumed.group(1)), int(resumed.group(2))
        else:
            continue
        for name, prefix in prefixes.items():
            if path.startswith(prefix):
                totals[name] += size
    return totals


def bytes_read(work: Path, num_images: int, weights: Path | None, labelmap: Path | None,
               shapes_config: Path) -> dict:
    """One ``softclip extract --pack`` under strace: bytes read from the dataset and the output folder."""
    if shutil.which("strace") is None:
        raise FileNotFoundError("--reads needs strace on PATH (apt-get install strace)")
    world = work / "world-reads"
    generate(world, ShapesConfig(num_train=num_images, num_retrieval=0, num_classification_per_class=0,
                                 samples_per_shard=100), progress=False)
    if weights is None:
        weights, labelmap = _random_detector(work / "detector", load_config(DetectorConfig, shapes_config))
    out, trace = work / "features-reads", work / "reads.strace"
    command = [sys.executable, "-m", "softclip", "extract", "--dataset", str(world / "train"), "--weights",
               str(weights), "--labelmap", str(labelmap), "--out", str(out), "--pack", "--config",
               str(REPO / "extract" / "configs" / "extract-shapes.yaml"), "--set",
               f"detector_overrides.config={shapes_config}"]
    subprocess.run(["strace", "-f", "--seccomp-bpf", "-qq", "-y", "-e", "trace=read,pread64,readv,preadv,preadv2",
                    "-e", "signal=none", "-o", str(trace), *command], check=True, capture_output=True)
    reads = traced_read_bytes(trace, {"dataset": world / "train", "output": out})
    tars = sorted((world / "train").glob("*.tar"))
    source_bytes = sum(p.stat().st_size for p in tars)
    packed_bytes = sum(p.stat().st_size for p in (out / "packed").glob("*.tar"))
    run = json.loads((out / "manifest.json").read_text())["runs"][-1]
    return {"images": num_images, "dataset_tar_bytes": source_bytes, "read_dataset_bytes": reads["dataset"],
            "read_output_bytes": reads["output"], "read_dataset_ratio": round(reads["dataset"] / source_bytes, 3),
            "read_total_ratio": round((reads["dataset"] + reads["output"]) / source_bytes, 3),
            "source_bytes_per_image": round(source_bytes / num_images),
            "packed_bytes_per_image": round(packed_bytes / num_images),
            "packed_to_source_ratio": round(packed_bytes / source_bytes, 3),
            "seconds": run["seconds"], "startup_seconds": run.get("startup_seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--storage-images", type=int, default=24)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--labelmap", type=Path)
    parser.add_argument("--detector-config", type=Path, default=REPO / "extract" / "configs" / "shapes.yaml")
    parser.add_argument("--reads", action="store_true", help="Only the bytes-read measurement (needs strace).")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.reads:
        with tempfile.TemporaryDirectory() as tmp:
            result = bytes_read(Path(tmp), args.images, args.weights, args.labelmap, args.detector_config)
        print(json.dumps({**result, "seconds_total": round(time.perf_counter() - start, 1)}, indent=2))
        return
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
