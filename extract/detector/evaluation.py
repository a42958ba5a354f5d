"""Tag precision and recall of a detector on held-out annotated images (the shapes world's eval set).

The held-out set is ``DIR/eval/retrieval/dataset_karpathy.json`` (Karpathy layout; every image has
``objects`` with ``shape`` and ``colour``), images under ``DIR/eval/retrieval/<filepath>/<filename>``.

A predicted tag is ``(colour, class)``: the class name of a detection and the highest-scoring of its
attributes that is a colour ("" if none). A ground-truth tag is ``(colour, shape)`` of an object. Per
image, true positives are the size of the multiset intersection of predicted and ground-truth tags;
precision = TP / predicted tags and recall = TP / ground-truth tags, both summed over all images
(micro-average). The same figures on classes alone are reported as ``class_precision``/``class_recall``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from softclip.extract.detector.vinvl import VinVLDetector
from softclip.pipeline.images import ImageDecodeError, decode_image

__all__ = ["evaluate_tags", "load_eval_set", "predicted_tags"]


def load_eval_set(data_dir: str | Path) -> list[tuple[Path, list[dict]]]:
    """``(image path, objects)`` of every image in the Karpathy-layout eval file under ``data_dir``."""
    root = Path(data_dir) / "eval" / "retrieval"
    path = root / "dataset_karpathy.json"
    if not path.is_file():
        raise FileNotFoundError(f"eval annotations not found: {path}; generate the shapes world first")
    try:
        images = json.loads(path.read_text()).get("images", [])
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{path}: not a Karpathy-layout annotation file ({err})") from err
    missing = [im.get("filename") for im in images if "objects" not in im]
    if missing:
        raise ValueError(f"{path}: {len(missing)} image(s) have no 'objects' annotations, e.g. {missing[0]}")
    return [(root / im["filepath"] / im["filename"], im["objects"]) for im in images]


def _decode(path: Path) -> Image.Image:
    try:
        return decode_image(path.read_bytes())
    except ImageDecodeError as err:
        raise ValueError(f"{path}: {err}") from err


def predicted_tags(result: dict, colours: set[str]) -> list[tuple[str, str]]:
    """``(colour, class)`` per detection of a :meth:`VinVLDetector.detect` result."""
    tags = []
    for name, attrs in zip(result["class_names"], result["attr_names"]):
        colour = next((a for a in attrs if a in colours), "")
        tags.append((colour, name))
    return tags


def _micro(tp: int, predicted: int, truth: int) -> tuple[float, float]:
    return tp / max(predicted, 1), tp / max(truth, 1)


def evaluate_tags(detector: VinVLDetector, data_dir: str | Path, *, colours: tuple[str, ...],
                  batch_size: int = 32, progress: bool = True) -> dict:
    """Tag and class precision/recall (definitions in the module docstring) of ``detector`` on the eval set."""
    samples = load_eval_set(data_dir)
    colour_set = set(colours)
    counts = Counter()
    start = time.perf_counter()
    for i in tqdm(range(0, len(samples), batch_size), desc="detector eval", unit="batch", disable=not progress):
        chunk = samples[i : i + batch_size]
        results = detector.detect([_decode(path) for path, _ in chunk])
        for (_, objects), result in zip(chunk, results):
            pred = Counter(predicted_tags(result, colour_set))
            truth = Counter((o["colour"], o["shape"]) for o in objects)
            counts["tp"] += sum((pred & truth).values())
            counts["pred"] += sum(pred.values())
            counts["truth"] += sum(truth.values())
            pred_cls = Counter(c for _, c in pred.elements())
            truth_cls = Counter(o["shape"] for o in objects)
            counts["tp_cls"] += sum((pred_cls & truth_cls).values())
    precision, recall = _micro(counts["tp"], counts["pred"], counts["truth"])
    class_precision, class_recall = _micro(counts["tp_cls"], counts["pred"], counts["truth"])
    return {"images": len(samples), "objects": counts["truth"], "detections": counts["pred"],
            "precision": round(precision, 4), "recall": round(recall, 4),
            "class_precision": round(class_precision, 4), "class_recall": round(class_recall, 4),
            "detector_id": detector.detector_id, "seconds": round(time.perf_counter() - start, 1)}
