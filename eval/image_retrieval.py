"""Image-to-image retrieval: revisited Oxford5k / Paris6k (Radenović et al., CVPR 2018) and INRIA Copydays.

Ground truth: the revisited benchmarks ship ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl``, Python pickles
of ``{"imlist": [...], "qimlist": [...], "gnd": [{"easy": [...], "hard": [...], "junk": [...], "bbx":
[x1, y1, x2, y2]}, ...]}`` (indices into ``imlist``). A pickle can run code when loaded, so
:func:`load_ground_truth` reads it with :class:`RestrictedUnpickler`, which admits plain containers, numbers,
strings and NumPy arrays only and refuses every other global (:class:`UnsafePickleError`).

Metrics, as the revisitop evaluation (``compute_map``) computes them, in [0, 1]:

* average precision of one query from the 0-based positions ``r_0 < r_1 < ...`` of its positives in the
  ranking, junk images removed first (each positive moves up by the junk ranked before it), with ``n``
  positives::

      AP = sum_j (1/n) * (P0_j + P1_j) / 2,   P0_j = j / r_j (1 when r_j = 0),   P1_j = (j + 1) / (r_j + 1)   (Eq. 1)

  (the trapezoid under the precision-recall curve); mAP is the mean over queries with a positive.
* the three protocols: Easy (positives ``easy``; ``hard`` counts as junk), Medium (``easy`` + ``hard``),
  Hard (positives ``hard``; ``easy`` counts as junk); ``junk`` is junk in all three.

Copydays: each query (an attacked copy) has as positives the database images of its block (INRIA's file
names: the first four digits name the block, ``200000.jpg`` is the original of block 2000); distractor
images belong to no block. mAP by Eq. 1, no junk.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from softclip.eval.datasets import TASKS, ImageFiles, MissingDatasetError

__all__ = ["CroppedImageFiles", "ImageRetrievalSet", "RestrictedUnpickler", "UnsafePickleError", "average_precision",
           "copydays_map", "image_retrieval_metrics", "load_ground_truth", "load_image_retrieval_set",
           "mean_average_precision", "rank_database", "revisited_map"]

# The globals a pickle of plain containers and NumPy arrays needs (NumPy 1.x and 2.x module names).
_ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"),
})


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle names a global other than plain containers and NumPy arrays; it is not loaded."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of plain containers and NumPy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(f"the pickle needs {module}.{name}, which a ground-truth file never does; "
                                    "refusing to load it (only plain containers and NumPy arrays are read)")
        return super().find_class(module, name)


def load_ground_truth(path: str | Path) -> dict[str, Any]:
    """Read a revisited-benchmark ground-truth pickle (module docstring) with :class:`RestrictedUnpickler`.

    Raises:
        FileNotFoundError: no such file.
        UnsafePickleError: the pickle names a disallowed global.
        ValueError: not the ``imlist`` / ``qimlist`` / ``gnd`` layout.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground truth {path} does not exist; download gnd_roxford5k.pkl or "
                                "gnd_rparis6k.pkl beside the jpg/ folder")
    try:
        data = RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: {err}") from err
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as err:
        raise ValueError(f"{path}: not a readable pickle ({err})") from err
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= data.keys():
        raise ValueError(f"{path}: expected a dict with imlist, qimlist and gnd")
    if len(data["gnd"]) != len(data["qimlist"]):
        raise ValueError(f"{path}: {len(data['gnd'])} gnd entries for {len(data['qimlist'])} queries")
    num_db = len(data["imlist"])
    for i, entry in enumerate(data["gnd"]):
        for key in ("easy", "hard", "junk"):
            values = [int(v) for v in entry.get(key, [])]
            if any(not 0 <= v < num_db for v in values):
                raise ValueError(f"{path}: gnd[{i}][{key!r}] has an index outside imlist (0..{num_db - 1})")
    return data


def rank_database(query_embeddings: torch.Tensor, database_embeddings: torch.Tensor) -> np.ndarray:
    """``[database, queries]`` database indices by decreasing cosine similarity (revisitop's ``ranks``);
    ties keep database order (stable sort)."""
    queries = torch.nn.functional.normalize(query_embeddings.float(), dim=-1)
    database = torch.nn.functional.normalize(database_embeddings.float(), dim=-1)
    scores = (database @ queries.T).numpy()
    return np.argsort(-scores, axis=0, kind="stable")


def average_precision(positions: Sequence[int], num_positives: int) -> float:
    """Eq. 1 of the module docstring: AP from the sorted 0-based ranks of the retrieved positives."""
    ap = 0.0
    for j, rank in enumerate(positions):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) / (2.0 * num_positives)
    return ap


def mean_average_precision(ranks: np.ndarray, positives: Sequence[Sequence[int]],
                           junk: Sequence[Sequence[int]] | None = None) -> float:
    """mAP over the queries (columns of ``ranks``) that have a positive; junk images are skipped."""
    aps = []
    for query, ok in enumerate(positives):
        if len(ok) == 0:
            continue
        column = ranks[:, query]
        is_junk = np.isin(column, np.asarray(junk[query] if junk else [], dtype=np.int64))
        kept = column[~is_junk]  # removing junk moves every later positive up by the junk before it
        positions = np.flatnonzero(np.isin(kept, np.asarray(ok, dtype=np.int64)))
        aps.append(average_precision(positions.tolist(), len(ok)))
    if not aps:
        raise ValueError("no query has a positive: mAP is undefined")
    return float(np.mean(aps))


def revisited_map(ranks: np.ndarray, gnd: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``{"mAP_easy", "mAP_medium", "mAP_hard"}`` of the revisited protocol (module docstring)."""
    def ids(entry: dict[str, Any], *keys: str) -> list[int]:
        return [int(v) for key in keys for v in entry.get(key, [])]

    return {
        "mAP_easy": mean_average_precision(ranks, [ids(g, "easy") for g in gnd], [ids(g, "junk", "hard") for g in gnd]),
        "mAP_medium": mean_average_precision(ranks, [ids(g, "easy", "hard") for g in gnd], [ids(g, "junk") for g in gnd]),
        "mAP_hard": mean_average_precision(ranks, [ids(g, "hard") for g in gnd], [ids(g, "junk", "easy") for g in gnd]),
    }


def copydays_map(ranks: np.ndarray, query_names: Sequence[str], database_names: Sequence[str],
                 distractors: int = 0) -> dict[str, float]:
    """Copydays mAP: the positives of a query are the database images of its block (the first four digits
    of the file name); the last ``distractors`` database images belong to no block."""
    blocks = [Path(name).name[:4] for name in database_names[: len(database_names) - distractors]]
    positives = [[i for i, block in enumerate(blocks) if block == Path(q).name[:4]] for q in query_names]
    return {"mAP": mean_average_precision(ranks, positives)}


@dataclasses.dataclass(frozen=True, slots=True)
class ImageRetrievalSet:
    """Database and query images of an image-retrieval task, with what scores them.

    ``gnd`` is revisitop's per-query ground truth (revisited tasks; queries are cropped to ``boxes``);
    Copydays has no ``gnd``: its positives come from the file names and ``distractors`` counts the last
    database images, which belong to no block.
    """

    name: str
    files: list[Path]
    query_files: list[Path]
    boxes: list[tuple[float, float, float, float] | None]
    gnd: list[dict[str, Any]] | None = None
    distractors: int = 0


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def load_image_retrieval_set(task: str, directory: Path) -> ImageRetrievalSet:
    """Read ``roxford5k`` / ``rparis6k`` (revisitop layout) or ``copydays`` (see :data:`eval.datasets.TASKS`)."""
    spec = TASKS[task]
    if task == "copydays":
        database, queries = _images_in(directory / "original"), _images_in(directory / "strong")
        distractors = _images_in(directory / "distractors")
        if not database or not queries:
            raise MissingDatasetError(f"task 'copydays': no images in {directory}/original or {directory}/strong; "
                                      f"expected {spec.layout}")
        return ImageRetrievalSet(task, database + distractors, queries, [None] * len(queries),
                                 distractors=len(distractors))
    data = load_ground_truth(directory / spec.annotation)
    images = directory / spec.image_folder
    boxes = [tuple(float(v) for v in g["bbx"]) if g.get("bbx") is not None else None for g in data["gnd"]]
    return ImageRetrievalSet(task, [images / f"{name}.jpg" for name in data["imlist"]],
                             [images / f"{name}.jpg" for name in data["qimlist"]], boxes, gnd=list(data["gnd"]))


def _unchanged(image: Any) -> Any:
    return image


class CroppedImageFiles(Dataset):
    """Like :class:`eval.datasets.ImageFiles`, each image first cropped to its box (revisitop's query crops)."""

    def __init__(self, files: Sequence[Path], boxes: Sequence[tuple[float, float, float, float] | None],
                 transform: Callable[[object], torch.Tensor]):
        self.images = ImageFiles(files, _unchanged)
        self.boxes = list(boxes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        image, box = self.images[index], self.boxes[index]
        return self.transform(image.crop(box) if box is not None else image)


def image_retrieval_metrics(data: ImageRetrievalSet, query_embeddings: torch.Tensor,
                            database_embeddings: torch.Tensor) -> dict[str, float]:
    """mAP of the task: Easy/Medium/Hard for the revisited sets, one mAP for Copydays."""
    ranks = rank_database(query_embeddings, database_embeddings)
    if data.gnd is not None:
        return revisited_map(ranks, data.gnd)
    return copydays_map(ranks, [p.name for p in data.query_files], [p.name for p in data.files], data.distractors)
