"""The detector stage: a stateful callable class, one instance per Ray actor (one per GPU on a GPU pool).

:class:`DetectorActor` loads the detector once in ``__init__`` and maps a batch of decoded rows to a
batch of feature rows in ``__call__`` under ``torch.inference_mode()``. Resources (GPUs, CPUs, number
of actors) are chosen at the ``map_batches`` call site in :mod:`extract.job`, never here.

A feature row travels as columns (:data:`FEATURE_COLUMNS`): scalars, the per-box arrays as object
arrays of numpy arrays, and the per-box names and attributes as one JSON string. :func:`batch_to_records`
turns such a batch back into :class:`pipeline.shards.FeatureRecord` objects for the writer.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from softclip.extract.job_config import ExtractConfig
from softclip.extract.vinvl import format_tags
from softclip.pipeline.shards import FeatureRecord, error_record

__all__ = ["FEATURE_COLUMNS", "DetectorActor", "batch_to_records", "detection_to_record", "load_detector",
           "records_to_batch", "resolve_loader"]

_ARRAY_FIELDS = ("boxes", "geometry", "roi_features", "labels", "scores")
_NAME_FIELDS = ("class_names", "attr_labels", "attr_names", "attr_scores")
_ROW_FIELDS = ("key", "shard", "index", "shard_total", "shard_error")
FEATURE_COLUMNS = (*_ROW_FIELDS, "width", "height", "status", "error", "caption", "tags", "detector",
                   "feature_dim", "detect_seconds", "actor_seconds", *_ARRAY_FIELDS, "names")


def resolve_loader(spec: str) -> Callable[..., Any]:
    """Import ``module:attr.attr`` (e.g. ``extract.vinvl:VinVLDetector.from_checkpoint``)."""
    module_name, _, attr_path = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"loader {spec!r}: cannot import module {module_name!r} ({err})") from err
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ValueError(f"loader {spec!r}: {module_name} has no attribute {attr_path!r}")
        target = getattr(target, part)
    return target


def load_detector(cfg: ExtractConfig) -> Any:
    """Build the detector named by ``cfg.loader`` from ``cfg.weights`` and ``cfg.labelmap``."""
    for path in (cfg.weights, cfg.labelmap):
        if not path.is_file():
            raise FileNotFoundError(f"detector file not found: {path} (give --weights and --labelmap)")
    return resolve_loader(cfg.loader)(cfg.weights, cfg.labelmap, **cfg.detector_overrides)


def _kept_attributes(labels: np.ndarray, scores: np.ndarray, names: list[str]) -> tuple[list, list, list]:
    """Per-box attribute lists reduced to the nonzero labels (``names`` may already be reduced)."""
    keep = (np.asarray(labels) > 0) & (np.asarray(scores) > 0)
    kept_names = [n for n, k in zip(names, keep) if k] if len(names) == len(keep) else list(names)
    if len(kept_names) != int(keep.sum()):
        raise ValueError(f"attribute names ({len(names)}) do not match attribute labels {labels.tolist()}")
    return np.asarray(labels)[keep].astype(int).tolist(), np.asarray(scores)[keep].astype(float).tolist(), kept_names


def detection_to_record(det: dict[str, Any], *, key: str, shard: str, width: int, height: int,
                        caption: str | None, max_boxes: int, detector_id: str) -> FeatureRecord:
    """One image's detector output as a feature row: the ``max_boxes`` highest-scoring boxes (in
    descending score), ROI features as float16, attributes reduced to their nonzero entries.

    Args:
        det: ``boxes [n, 4]`` (x1, y1, x2, y2, original pixels), ``geometry [n, 6]``, ``features [n, D]``,
            ``labels [n]``, ``scores [n]``, ``class_names``, ``attr_labels [n, k]``, ``attr_scores [n, k]``,
            ``attr_names`` (per box) and ``tags`` (see :meth:`extract.vinvl.VinVLDetector.detect`).
    """
    scores = np.asarray(det["scores"], np.float32).reshape(-1)
    order = np.argsort(-scores, kind="stable")[:max_boxes]
    attrs = [_kept_attributes(det["attr_labels"][i], det["attr_scores"][i], list(det["attr_names"][i]))
             for i in order]
    class_names = [str(det["class_names"][i]) for i in order]
    # Tags describe the kept boxes: rebuilt in the detector's format when boxes were dropped.
    tags = str(det["tags"]) if len(order) == len(scores) else format_tags(class_names, [a[2] for a in attrs])
    return FeatureRecord(
        key=key, shard=shard, width=width, height=height, caption=caption,
        boxes=np.asarray(det["boxes"], np.float32).reshape(-1, 4)[order],
        geometry=np.asarray(det["geometry"], np.float32).reshape(-1, 6)[order],
        roi_features=np.asarray(det["features"])[order].astype(np.float16),
        labels=np.asarray(det["labels"], np.int32)[order], scores=scores[order],
        class_names=class_names,
        attr_labels=[a[0] for a in attrs], attr_scores=[a[1] for a in attrs], attr_names=[a[2] for a in attrs],
        tags=tags, detector=detector_id,
    )


def records_to_batch(records: list[FeatureRecord], rows: dict[str, np.ndarray], feature_dim: int,
                     timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Columns of ``records`` plus the routing columns (:data:`_ROW_FIELDS`) copied from ``rows``; the
    batch's ``detect_seconds`` and ``actor_seconds`` are spread evenly over its rows."""
    out: dict[str, np.ndarray] = {name: np.asarray(rows[name]) for name in _ROW_FIELDS}
    out["feature_dim"] = np.full(len(records), feature_dim, np.int32)
    for name in ("detect_seconds", "actor_seconds"):
        out[name] = np.full(len(records), (timings or {}).get(name, 0.0) / max(len(records), 1), np.float64)
    for name in ("width", "height"):
        out[name] = np.array([getattr(r, name) for r in records], np.int32)
    for name in ("status", "error", "caption", "tags", "detector"):
        out[name] = np.array([getattr(r, name) or "" for r in records], dtype=object).astype(str)
    for name in _ARRAY_FIELDS:
        column = np.empty(len(records), dtype=object)
        column[:] = [getattr(r, name) for r in records]
        out[name] = column
    out["names"] = np.array([json.dumps({f: getattr(r, f) for f in _NAME_FIELDS}) for r in records])
    return out


def batch_to_records(batch: dict[str, np.ndarray], feature_dim: int) -> list[FeatureRecord]:
    """The sample rows of a detector-stage batch as records (end-of-shard markers are skipped)."""
    records = []
    for i in np.flatnonzero(np.asarray(batch["index"]) >= 0):
        arrays = {name: np.asarray(batch[name][i]) for name in _ARRAY_FIELDS}
        arrays["roi_features"] = arrays["roi_features"].reshape(-1, feature_dim)
        records.append(FeatureRecord(
            key=str(batch["key"][i]), shard=str(batch["shard"][i]), width=int(batch["width"][i]),
            height=int(batch["height"][i]), status=str(batch["status"][i]), error=str(batch["error"][i]) or None,
            caption=str(batch["caption"][i]) or None, tags=str(batch["tags"][i]),
            detector=str(batch["detector"][i]), **arrays, **json.loads(str(batch["names"][i])),
        ))
    return records


def _actor_device(cfg: ExtractConfig) -> str:
    """The actor's torch device: Ray shows an actor only the GPUs it reserved (none on a CPU pool)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but this actor sees no GPU; use device=auto or device=cpu")
    return "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"


class DetectorActor:
    """Ray Data callable class: decoded rows in, feature rows out (see the module docstring).

    Example (no Ray needed; ``batch`` holds the columns :data:`extract.stages.ROW_COLUMNS` of rows from
    :func:`extract.stages.read_shard_rows`, as ``map_batches`` hands them over)::

        features = DetectorActor(cfg)(batch)  # columns: FEATURE_COLUMNS
    """

    def __init__(self, cfg: ExtractConfig):
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.device = _actor_device(cfg)
        self.detector = load_detector(cfg)
        if hasattr(self.detector, "to"):
            self.detector.to(self.device)
        self.detector_id = str(self.detector.detector_id)
        self.feature_dim = int(self.detector.feature_dim)
        self._last_call_end = time.perf_counter()  # actor time is counted from here (model loaded)

    def _error(self, rows: dict[str, np.ndarray], i: int, error: str) -> FeatureRecord:
        return error_record(str(rows["key"][i]), str(rows["shard"][i]), error, feature_dim=self.feature_dim,
                            detector=self.detector_id, caption=str(rows["caption"][i]) or None)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Detect on the rows without an error; every input row gives exactly one output row."""
        errors = [str(e) for e in rows["error"]]
        todo = [i for i, e in enumerate(errors) if not e and rows["index"][i] >= 0]
        pending = set(todo)
        records: list[FeatureRecord | None] = [
            None if i in pending else self._error(rows, i, errors[i]) for i in range(len(errors))]
        seconds = 0.0
        if todo:
            images = [Image.fromarray(np.asarray(rows["pixels"][i], np.uint8)) for i in todo]
            start = time.perf_counter()
            with torch.inference_mode():
                detections = self.detector.detect(images)
            seconds = time.perf_counter() - start
            for i, image, det in zip(todo, images, detections):
                records[i] = detection_to_record(
                    det, key=str(rows["key"][i]), shard=str(rows["shard"][i]), width=image.width,
                    height=image.height, caption=str(rows["caption"][i]), max_boxes=self.cfg.max_boxes,
                    detector_id=self.detector_id)
        end = time.perf_counter()
        timings = {"detect_seconds": seconds, "actor_seconds": end - self._last_call_end}
        self._last_call_end = end
        return records_to_batch(records, rows, self.feature_dim, timings)
