"""CLIP_benchmark interoperability: its webdataset evaluation sets in, its result JSON out.

Reading (task ``wds/NAME``, see :func:`eval.datasets.task_directory`): the layout CLIP_benchmark's
``build_wds_dataset`` reads and its published ``wds_*`` sets use::

    DIR/test/nshards.txt, DIR/test/0.tar ... (N-1).tar   samples <key>.webp|png|jpg|jpeg + <key>.cls | <key>.txt
    DIR/classnames.txt, DIR/zeroshot_classification_templates.txt      (classification)
    DIR/dataset_type.txt                                                ("retrieval" for retrieval sets)

Samples keep CLIP_benchmark's order (shard 0..N-1, members in tar order), so even index-broken ties fall
the same way. Images stay in the tars: :class:`TarMember` reads one member's bytes by offset.

Writing: :func:`write_clip_benchmark_results` writes one JSON per checkpoint and task in the schema of
``clip_benchmark eval`` (``dataset``, ``model``, ``pretrained``, ``task``, ``metrics`` with its names,
``language``), so ``clip_benchmark build DIR/*.json`` aggregates softclip's results with anyone's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tarfile
from pathlib import Path
from typing import Any

from softclip.eval.datasets import (
    WDS_LAYOUT,
    WDS_PREFIX,
    ClassificationSet,
    MissingDatasetError,
    RetrievalSet,
)
from softclip.pipeline.io import atomic_write_text

__all__ = ["CLIP_BENCHMARK_DATASETS", "TarMember", "clip_benchmark_metrics", "load_wds_set",
           "write_clip_benchmark_results"]

_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's to_tuple order
# softclip task -> CLIP_benchmark dataset name (its --dataset); wds/NAME tasks keep their name.
CLIP_BENCHMARK_DATASETS = {"imagenet": "imagenet1k", "coco": "mscoco_captions", "flickr30k": "flickr30k"}


@dataclasses.dataclass(frozen=True, slots=True)
class TarMember:
    """One file inside a tar, read by offset (picklable, so DataLoader workers can read it)."""

    tar: Path
    name: str
    offset: int
    size: int

    def read_bytes(self) -> bytes:
        """The member's bytes."""
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)

    def stat(self) -> os.stat_result:
        """The tar's stat (what an evaluation cache key fingerprints)."""
        return self.tar.stat()

    def __str__(self) -> str:
        return f"{self.tar}::{self.name}"


def _read_text(path: Path, what: str, task: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise MissingDatasetError(f"task '{task}': {path} ({what}) does not exist; expected "
                                  f"{WDS_LAYOUT.format(split=path.parent.name)}") from err


def _shards(directory: Path, split: str, task: str) -> list[Path]:
    """``split/0.tar .. (n-1).tar`` as ``nshards.txt`` says, else every ``split/*.tar`` in numeric order."""
    folder = directory / split
    nshards = folder / "nshards.txt"
    if nshards.is_file():
        text = nshards.read_text(encoding="utf-8").strip()
        if not text.isdigit():
            raise ValueError(f"{nshards}: expected a number of shards, got {text[:40]!r}")
        shards = [folder / f"{i}.tar" for i in range(int(text))]
    else:
        shards = sorted(folder.glob("*.tar"), key=lambda p: (int(p.stem) if p.stem.isdigit() else math.inf, p.name))
    missing = [p for p in shards if not p.is_file()]
    if not shards or missing:
        raise MissingDatasetError(f"task '{task}': {missing[0] if missing else folder / '*.tar'} does not exist; "
                                  f"expected {WDS_LAYOUT.format(split=split)}")
    return shards


def _samples(tar_path: Path) -> list[dict[str, Any]]:
    """The tar's samples in order: ``{"key", "<ext>": TarMember, ...}`` (key = name up to the first dot)."""
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key = member.name[: len(member.name) - len(base)] + base.split(".", 1)[0]
                ext = base.split(".", 1)[1].lower() if "." in base else ""
                samples.setdefault(key, {"key": key})[ext] = TarMember(tar_path, member.name, member.offset_data,
                                                                      member.size)
    except tarfile.TarError as err:
        raise ValueError(f"{tar_path}: not a readable tar ({err}); re-download that shard") from err
    return list(samples.values())


def _image_of(sample: dict[str, Any], tar: Path) -> TarMember:
    for ext in _IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"{tar}: sample {sample['key']!r} has no image (.webp, .png, .jpg or .jpeg)")


def load_wds_set(task: str, directory: Path, *, split: str = "test") -> ClassificationSet | RetrievalSet:
    """Read a CLIP_benchmark webdataset set (module docstring); the kind comes from ``dataset_type.txt``."""
    type_file = directory / "dataset_type.txt"
    kind = type_file.read_text(encoding="utf-8").strip().lower() if type_file.is_file() else "classification"
    if kind not in ("classification", "retrieval"):
        raise ValueError(f"{type_file}: dataset type {kind!r} is not evaluated by softclip (classification or "
                         "retrieval zero-shot only)")
    shards = _shards(directory, split, task)
    files, labels, captions, owners = [], [], [], []
    for tar in shards:
        for sample in _samples(tar):
            member = sample.get("txt" if kind == "retrieval" else "cls")
            if member is None:
                raise ValueError(f"{tar}: sample {sample['key']!r} has no .{'txt' if kind == 'retrieval' else 'cls'}"
                                 f" file; expected {WDS_LAYOUT.format(split=split)}")
            files.append(_image_of(sample, tar))
            text = member.read_bytes().decode("utf-8")
            if kind == "retrieval":
                lines = text.splitlines()
                captions += lines
                owners += [len(files) - 1] * len(lines)
            else:
                labels.append(int(text.strip()))
    if kind == "retrieval":
        return RetrievalSet(task, files, captions, owners)
    classnames = [line.strip() for line in _read_text(directory / "classnames.txt", "class names", task).splitlines()]
    templates = [line.strip().replace("{c}", "{}")  # CLIP_benchmark's "{c}" slot is softclip's "{}"
                 for line in _read_text(directory / "zeroshot_classification_templates.txt", "prompt templates",
                                        task).splitlines()]
    bad = [y for y in labels if not 0 <= y < len(classnames)]
    if bad or not templates:
        raise ValueError(f"{directory}: {'label ' + str(bad[0]) if bad else 'no templates'} for "
                         f"{len(classnames)} class names; the set is incomplete")
    return ClassificationSet(task, files, labels, classnames, templates)


def clip_benchmark_metrics(metrics: dict[str, float | None]) -> tuple[str, dict[str, float]]:
    """softclip's metric names -> CLIP_benchmark's task and metric names.

    ``top1``/``top5`` -> ``acc1``/``acc5`` (``None`` -> NaN, as CLIP_benchmark writes it); image-to-text
    ``R@k`` -> ``text_retrieval_recall@k``; text-to-image -> ``image_retrieval_recall@k`` (it names the
    direction by what is retrieved). The many-to-many ``consistent_*`` metrics, which CLIP_benchmark does
    not define, keep their names.
    """
    if "top1" in metrics:
        renamed = {"acc1": metrics["top1"], "acc5": metrics.get("top5"),
                   "mean_per_class_recall": metrics.get("mean_per_class_recall")}
        return "zeroshot_classification", {k: math.nan if v is None else v for k, v in renamed.items()}
    out = {}
    for name, value in metrics.items():
        if name.startswith("consistent_"):  # many-to-many metrics (the shapes world): CLIP_benchmark has none
            out[name] = value
            continue
        direction, _, k = name.partition("_R@")
        cb = {"image_to_text": "text_retrieval_recall", "text_to_image": "image_retrieval_recall"}.get(direction)
        if cb is None or not k:
            raise ValueError(f"metric {name!r} has no CLIP_benchmark name")
        out[f"{cb}@{k}"] = value
    return "zeroshot_retrieval", out


def _dataset_name(task: str) -> str:
    return task if task.startswith(WDS_PREFIX) else CLIP_BENCHMARK_DATASETS.get(task, task)


def write_clip_benchmark_results(out_dir: str | Path, payload: dict[str, Any]) -> list[Path]:
    """Write ``out_dir/clip_benchmark/<dataset>_<label>_<task>.json`` for every checkpoint and task.

    ``model`` is the open_clip architecture and ``pretrained`` the checkpoint path (as one passes a local
    checkpoint to ``clip_benchmark eval --model ARCH --pretrained PATH``).
    """
    folder = Path(out_dir) / "clip_benchmark"
    written = []
    for info in payload["checkpoints"]:
        for task, metrics in payload["results"][info["label"]].items():
            if not any(k.startswith(("top1", "image_to_text_R@")) for k in metrics):
                continue  # image-to-image retrieval (mAP): no CLIP_benchmark task to report it under
            kind, renamed = clip_benchmark_metrics(metrics)
            dataset = _dataset_name(task)
            record = {"dataset": dataset, "model": info["model_name"], "pretrained": info["path"], "task": kind,
                      "metrics": renamed, "language": "en"}
            name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", f"{dataset}_{info['label']}_{kind}") + ".json"
            written.append(atomic_write_text(folder / name, json.dumps(record, indent=2) + "\n"))
    return written
