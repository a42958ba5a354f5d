"""Evaluate checkpoints on zero-shot classification and retrieval tasks and write the reports.

:func:`run_eval` checks every task folder first (so a missing dataset fails before any model loads),
then for each checkpoint embeds each task's images and texts (:mod:`eval.embed`), computes the metrics
(:mod:`eval.zeroshot`, :mod:`eval.retrieval`) and writes ``results.json``, ``results.md``,
``results.png``, the resolved ``eval.yaml`` and CLIP_benchmark-schema JSON (``clip_benchmark/*.json``,
see :mod:`eval.clip_benchmark`) into ``cfg.out``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch

from softclip.eval.checkpoint import LoadedModel, load_open_clip_checkpoint, read_checkpoint_metadata
from softclip.eval.clip_benchmark import load_wds_set, write_clip_benchmark_results
from softclip.eval.consistent import consistency_matrix, consistent_retrieval_metrics
from softclip.eval.datasets import (
    TASKS,
    ClassificationSet,
    ImageFiles,
    MissingDatasetError,
    RetrievalSet,
    expand_tasks,
    is_wds_task,
    load_classification_set,
    load_retrieval_set,
    task_directory,
)
from softclip.eval.embed import encode_images, encode_texts, pick_device, zero_shot_classifier
from softclip.eval.image_retrieval import (
    CroppedImageFiles,
    ImageRetrievalSet,
    image_retrieval_metrics,
    load_image_retrieval_set,
)
from softclip.eval.report import write_report
from softclip.eval.retrieval import chance_recall, retrieval_metrics
from softclip.eval.zeroshot import TIE_POLICIES, chance_accuracy, classification_metrics
from softclip.pipeline.config import save_config, to_dict
from softclip.pipeline.io import atomic_write_json, file_sha256
from softclip.pipeline.precision import Precision, effective_precision

__all__ = ["EvalConfig", "checkpoint_labels", "evaluate_model", "run_eval"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EvalConfig:
    """Settings of ``softclip eval``.

    Attributes:
        checkpoints: checkpoint files, evaluated in this order (the report shows second minus first).
        labels: one label per checkpoint; empty = each checkpoint's run directory name.
        tasks: task or group names (``shapes``, ``imagenet``, ``coco``, ``flickr30k``, ``shapes-shape``, ...),
            or ``wds/NAME`` for a CLIP_benchmark webdataset set in ``DATA_ROOT/wds_NAME``.
        out: the report folder.
        data_root: datasets are found under it, at the layouts of :data:`eval.datasets.TASKS`.
        paths: per-task folder overrides (task -> folder), taking precedence over ``data_root``.
        model_name: open_clip architecture for checkpoints that do not name one.
        batch_size: images or texts per forward pass.
        num_workers: DataLoader processes decoding images.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast on CUDA (:mod:`pipeline.precision`; CPU runs fp32).
        split: the Karpathy split evaluated for retrieval tasks.
        ties: ``clip_benchmark`` (its numbers, ties broken by index as ``torch.topk`` does) or ``strict``
            (a tie counts against the query); see :mod:`eval.zeroshot` and :mod:`eval.retrieval`.
        tensorboard: also write the metrics into the TensorBoard of each checkpoint's run folder
            (``RUN/tensorboard``, ``eval/<task>/<metric>`` at the checkpoint's step) when it lies in one.
        reuse: keep a task's metrics from an earlier run into the same ``out`` when the checkpoint file
            (path, size, mtime), the task's files (annotation bytes; each image's size and mtime), the
            device, the precision and these settings are unchanged.
    """

    checkpoints: tuple[Path, ...]
    labels: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("shapes",)
    out: Path
    data_root: Path = Path("data")
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)
    model_name: str | None = None
    batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"
    precision: Precision = "bf16"
    split: str = "test"
    ties: str = "clip_benchmark"
    tensorboard: bool = True
    reuse: bool = True

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ValueError("checkpoints: give at least one checkpoint file")
        if self.labels and len(self.labels) != len(self.checkpoints):
            raise ValueError(f"labels: {len(self.labels)} labels for {len(self.checkpoints)} checkpoints")
        if self.labels and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {list(self.labels)}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")
        expand_tasks(self.tasks)  # raises ValueError naming an unknown task
        if self.ties not in TIE_POLICIES:
            raise ValueError(f"ties must be one of {', '.join(TIE_POLICIES)}, got {self.ties!r}")
        unknown = [task for task in self.paths if task not in TASKS and not is_wds_task(task)]
        if unknown:
            raise ValueError(f"paths: unknown task '{unknown[0]}' (known: {', '.join(TASKS)})")


def checkpoint_labels(checkpoints: tuple[Path, ...]) -> list[str]:
    """Default labels: the run directory of each checkpoint (``runs/clip/last.pt`` -> ``clip``; a
    ``checkpoints/`` folder is skipped), made unique with the file stem when two runs share a name."""
    def run_name(path: Path) -> str:
        parent = path.parent
        if parent.name == "checkpoints" and parent.parent.name:
            parent = parent.parent
        return parent.name or path.stem

    labels = [run_name(Path(p)) for p in checkpoints]
    if len(set(labels)) < len(labels):
        labels = [f"{label}/{Path(p).stem}" for label, p in zip(labels, checkpoints)]
    if len(set(labels)) < len(labels):
        raise ValueError(f"checkpoints {list(map(str, checkpoints))} give repeated labels; set labels explicitly")
    return labels


def _evaluate_classification(loaded: LoadedModel, data: ClassificationSet, cfg: EvalConfig,
                             device: torch.device) -> dict[str, float | None]:
    classifier = zero_shot_classifier(loaded.model, loaded.tokenizer, data.classnames, data.templates,
                                      batch_size=cfg.batch_size, device=device, precision=cfg.precision)
    images = encode_images(loaded.model, ImageFiles(data.files, loaded.preprocess), batch_size=cfg.batch_size,
                           num_workers=cfg.num_workers, device=device, precision=cfg.precision, desc=f"{data.name} images")
    return classification_metrics(images, classifier, torch.tensor(data.labels), ties=cfg.ties)


def _evaluate_retrieval(loaded: LoadedModel, data: RetrievalSet, cfg: EvalConfig,
                        device: torch.device) -> dict[str, float]:
    images = encode_images(loaded.model, ImageFiles(data.files, loaded.preprocess), batch_size=cfg.batch_size,
                           num_workers=cfg.num_workers, device=device, precision=cfg.precision, desc=f"{data.name} images")
    texts = encode_texts(loaded.model, loaded.tokenizer, data.captions, batch_size=cfg.batch_size,
                         device=device, precision=cfg.precision, desc=f"{data.name} captions")
    metrics = retrieval_metrics(images.to(device), texts.to(device), torch.tensor(data.caption_to_image),
                                ties=cfg.ties)
    if data.consistent is not None:  # the dataset knows every image a caption fits (the shapes world)
        matrix = consistency_matrix(data.consistent, len(data.files))
        metrics |= consistent_retrieval_metrics(images.to(device), texts.to(device), matrix)
    return metrics


def _evaluate_image_retrieval(loaded: LoadedModel, data: ImageRetrievalSet, cfg: EvalConfig,
                              device: torch.device) -> dict[str, float]:
    database = encode_images(loaded.model, ImageFiles(data.files, loaded.preprocess), batch_size=cfg.batch_size,
                             num_workers=cfg.num_workers, device=device, precision=cfg.precision, desc=f"{data.name} database")
    queries = encode_images(loaded.model, CroppedImageFiles(data.query_files, data.boxes, loaded.preprocess),
                            batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device, precision=cfg.precision,
                            desc=f"{data.name} queries")
    return image_retrieval_metrics(data, queries, database)


def evaluate_model(loaded: LoadedModel, datasets: dict[str, ClassificationSet | RetrievalSet],
                   cfg: EvalConfig, device: torch.device) -> dict[str, dict[str, float | None]]:
    """Metrics of one model on every loaded task: task -> metric -> fraction in [0, 1]."""
    results = {}
    for task, data in datasets.items():
        if isinstance(data, ClassificationSet):
            results[task] = _evaluate_classification(loaded, data, cfg, device)
        elif isinstance(data, ImageRetrievalSet):
            results[task] = _evaluate_image_retrieval(loaded, data, cfg, device)
        else:
            results[task] = _evaluate_retrieval(loaded, data, cfg, device)
    return results


def _load_datasets(cfg: EvalConfig) -> tuple[dict[str, ClassificationSet | RetrievalSet], dict[str, Path]]:
    tasks = expand_tasks(cfg.tasks)
    directories = {task: task_directory(task, cfg.data_root, cfg.paths) for task in tasks}  # fail fast
    datasets = {task: _load_task(task, directory, cfg.split) for task, directory in directories.items()}
    return datasets, directories


def _load_task(task: str, directory: Path, split: str) -> ClassificationSet | RetrievalSet:
    if is_wds_task(task):
        return load_wds_set(task, directory, split=split)
    if TASKS[task].kind == "classification":
        return load_classification_set(task, directory)
    if TASKS[task].kind == "image_retrieval":
        return load_image_retrieval_set(task, directory)
    return load_retrieval_set(task, directory, split=split)


def _task_data_key(task: str, directory: Path, data: ClassificationSet | RetrievalSet, cfg: EvalConfig,
                   device: torch.device) -> dict[str, Any]:
    """The checkpoint-independent part of a task's cache key: the folder, a fingerprint of its files
    (annotation SHA-256; count, sizes and mtimes of the listed images), the split, device and precision."""
    spec = TASKS.get(task)
    annotation = Path(directory) / spec.annotation if spec and spec.annotation else None
    annotation = annotation if annotation and annotation.is_file() else None  # else an alternative layout
    texts = hashlib.sha256(json.dumps(
        [data.classnames, data.templates, data.labels] if isinstance(data, ClassificationSet)
        else [list(map(str, data.query_files)), data.boxes] if isinstance(data, ImageRetrievalSet)
        else [data.captions, data.caption_to_image]).encode())
    images = hashlib.sha256()
    for path in [*data.files, *getattr(data, "query_files", [])]:
        try:
            stat = path.stat()
        except FileNotFoundError as err:
            raise MissingDatasetError(f"task '{task}': image {path} listed in {directory} does not exist") from err
        images.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"task_dir": str(Path(directory).resolve()), "split": cfg.split, "device": str(device),
            "precision": effective_precision(device, cfg.precision), "ties": cfg.ties,
            "annotation_sha256": file_sha256(annotation) if annotation else None, "texts_sha256": texts.hexdigest(),
            "num_images": len(data.files), "images_sha256": images.hexdigest()}


def _task_key(cfg: EvalConfig, checkpoint: Path, data_key: dict[str, Any]) -> dict[str, Any]:
    """What a cached task result depends on; a rerun recomputes the task when any of it changes."""
    stat = Path(checkpoint).stat()
    return {"checkpoint": str(Path(checkpoint).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "model_name": cfg.model_name, **data_key}


def _read_cache(path: Path) -> dict[str, Any]:
    """An earlier run's ``per_checkpoint/<label>.json``; a damaged one is an error naming it."""
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: unreadable evaluation cache ({err}); delete it or set reuse=false") from err
    if not isinstance(cache, dict) or not isinstance(cache.get("tasks"), dict):
        raise ValueError(f"{path}: not an evaluation cache (no 'tasks' object); delete it or set reuse=false")
    return cache


def _evaluate_with_cache(cfg: EvalConfig, label: str, checkpoint: Path, device: torch.device,
                         datasets: dict[str, ClassificationSet | RetrievalSet],
                         data_keys: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Metrics of one checkpoint on every task, reusing ``out/per_checkpoint/<label>.json`` entries whose
    key matches (a rerun after a crash or with more tasks only computes what is missing)."""
    cache_path = Path(cfg.out) / "per_checkpoint" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.json"
    cache = _read_cache(cache_path) if cfg.reuse and cache_path.is_file() else {"tasks": {}}
    keys = {task: _task_key(cfg, checkpoint, data_keys[task]) for task in datasets}
    todo = {task: data for task, data in datasets.items() if cache["tasks"].get(task, {}).get("key") != keys[task]}
    if todo:
        loaded = load_open_clip_checkpoint(checkpoint, model_name=cfg.model_name, device=device)
        cache["model_name"] = loaded.model_name
        for task, metrics in evaluate_model(loaded, todo, cfg, device).items():
            cache["tasks"][task] = {"key": keys[task], "metrics": metrics}
            atomic_write_json(cache_path, cache)  # after every task, so a crash loses at most one
    else:
        log.info("%s: every task reused from %s", label, cache_path)
    return {task: cache["tasks"][task]["metrics"] for task in datasets}, cache["model_name"]


def _task_notes(datasets: dict[str, ClassificationSet | RetrievalSet]) -> dict[str, str]:
    notes = {}
    for task, data in datasets.items():
        if isinstance(data, ClassificationSet):
            notes[task] = (f"{len(data.files)} images, {len(data.classnames)} classes, "
                           f"{len(data.templates)} templates")
        elif isinstance(data, ImageRetrievalSet):
            notes[task] = f"{len(data.query_files)} queries, {len(data.files)} database images"
        else:
            notes[task] = f"{len(data.files)} images, {len(data.captions)} captions"
    return notes


def _chance(datasets: dict[str, ClassificationSet | RetrievalSet]) -> dict[str, dict[str, float | None]]:
    return {task: chance_accuracy(len(data.classnames)) if isinstance(data, ClassificationSet)
            else chance_recall(data.caption_to_image) for task, data in datasets.items()
            if not isinstance(data, ImageRetrievalSet)}  # a random ranking's mAP depends on every query


def _log_to_tensorboard(info: list[dict[str, Any]], results: dict[str, Any]) -> list[str]:
    """Write each checkpoint's metrics into its run's TensorBoard (``RUN/tensorboard``, tag ``eval/<task>/
    <metric>``, at the checkpoint's step) when it lies in a run folder (``RUN/checkpoints/*.pt`` beside
    ``RUN/config.yaml``); returns the run folders written to."""
    from torch.utils.tensorboard import SummaryWriter

    written = []
    for entry in info:
        run = Path(entry["path"]).resolve().parent.parent
        if Path(entry["path"]).resolve().parent.name != "checkpoints" or not (run / "config.yaml").is_file():
            continue
        step = read_checkpoint_metadata(entry["path"]).get("step", 0)
        with SummaryWriter(str(run / "tensorboard")) as writer:
            for task, metrics in results[entry["label"]].items():
                for metric, value in metrics.items():
                    if value is not None:
                        writer.add_scalar(f"eval/{task}/{metric}", value, step)
        written.append(str(run))
    return written


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every checkpoint on every task, write the reports into ``cfg.out``, return the payload.

    Raises:
        MissingDatasetError: a task folder, or an image it lists, is missing (before any model is loaded).
        FileNotFoundError / ValueError: a checkpoint is missing or names no usable architecture.
    """
    labels = list(cfg.labels) or checkpoint_labels(cfg.checkpoints)
    missing = [str(p) for p in cfg.checkpoints if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint(s) not found: {', '.join(missing)}")
    datasets, directories = _load_datasets(cfg)
    device = pick_device(cfg.device)
    data_keys = {task: _task_data_key(task, directories[task], data, cfg, device) for task, data in datasets.items()}
    results, info, seconds = {}, [], {}
    for label, path in zip(labels, cfg.checkpoints):
        start = time.perf_counter()
        results[label], model_name = _evaluate_with_cache(cfg, label, path, device, datasets, data_keys)
        seconds[label] = round(time.perf_counter() - start, 2)
        info.append({"label": label, "path": str(path), "model_name": model_name})
        log.info("evaluated %s (%s) in %.1f s", label, path, seconds[label])
    payload = {
        "labels": labels,
        "tasks": list(datasets),
        "units": f"fractions in [0, 1]; ties: {cfg.ties} (see eval.zeroshot, eval.retrieval)",
        "checkpoints": info,
        "task_notes": _task_notes(datasets),
        "chance": _chance(datasets),
        "results": results,
        "seconds": seconds,
        "device": str(device),
        "config": to_dict(cfg),
    }
    save_config(cfg, Path(cfg.out) / "eval.yaml")
    payload["files"] = {kind: str(p) for kind, p in write_report(cfg.out, payload).items()}
    payload["files"]["clip_benchmark"] = [str(p) for p in write_clip_benchmark_results(cfg.out, payload)]
    if cfg.tensorboard:
        payload["files"]["tensorboard_runs"] = _log_to_tensorboard(info, results)
    return payload
