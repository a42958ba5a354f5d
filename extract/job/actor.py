"""The detector stage: a stateful callable class, one instance per Ray actor (one per GPU on a GPU pool).

:class:`DetectorActor` loads the detector once in ``__init__`` and maps a batch of decoded rows to a
batch of feature rows in ``__call__`` under ``torch.inference_mode()``. Resources (GPUs, CPUs, number
of actors) are chosen at the ``map_batches`` call site in :mod:`softclip.extract.job.run`, never here.

Feature rows leave the actor in one form, an Arrow table (:func:`feature_batch`): the feature shard's
columns (:func:`pipeline.shards.feature_schema`) plus :data:`ROUTING_COLUMNS` (where the row goes, the encoded
image for packing, timings). The writer on the driver appends them to the shard files as they are.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from softclip.extract.detector.vinvl import format_tags
from softclip.extract.job.config import ExtractConfig
from softclip.pipeline.shards import FeatureRecord, error_record, records_to_table

__all__ = ["ROUTING_COLUMNS", "DetectorActor", "detection_to_record", "feature_batch", "load_detector",
           "resolve_loader"]

ROUTING_COLUMNS = ("index", "shard_total", "shard_error", "image", "detect_seconds", "actor_seconds")


def resolve_loader(spec: str) -> Callable[..., Any]:
    """Import ``module:attr.attr`` (e.g. ``softclip.extract.detector.vinvl:VinVLDetector.from_checkpoint``)."""
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
            ``attr_names`` (per box) and ``tags`` (see :meth:`~softclip.extract.detector.vinvl.VinVLDetector.detect`).
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


def feature_batch(records: list[FeatureRecord], rows: dict[str, np.ndarray], feature_dim: int,
                  timings: dict[str, float] | None = None) -> pa.Table:
    """The one row form from the actor to the writer: ``records`` as a feature table
    (:func:`pipeline.shards.records_to_table`) plus the routing columns (:data:`ROUTING_COLUMNS`) copied from
    ``rows``; the batch's ``detect_seconds`` and ``actor_seconds`` are spread evenly over its rows."""
    table = records_to_table(records, feature_dim)
    share = {name: (timings or {}).get(name, 0.0) / max(len(records), 1) for name in ("detect_seconds", "actor_seconds")}
    columns = {"index": pa.array(np.asarray(rows["index"], np.int64)),
               "shard_total": pa.array(np.asarray(rows["shard_total"], np.int64)),
               "shard_error": pa.array([str(e) for e in rows["shard_error"]], pa.string()),
               "image": pa.array([bytes(b) for b in rows["image"]], pa.binary()),
               **{name: pa.array(np.full(len(records), value)) for name, value in share.items()}}
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table


def _actor_device(cfg: ExtractConfig) -> str:
    """The actor's torch device: Ray shows an actor only the GPUs it reserved (none on a CPU pool)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but this actor sees no GPU; use device=auto or device=cpu")
    return "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"


class DetectorActor:
    """Ray Data callable class: decoded rows in, feature rows out (see the module docstring).

    Example (no Ray needed; ``batch`` holds the columns :data:`~softclip.extract.job.stages.ROW_COLUMNS` of rows from
    :func:`softclip.extract.job.stages.read_shard_rows`, as ``map_batches`` hands them over)::

        features = DetectorActor(cfg)(batch)  # an Arrow table, see feature_batch
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

    def __call__(self, rows: dict[str, np.ndarray]) -> pa.Table:
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
        return feature_batch(records, rows, self.feature_dim, timings)
