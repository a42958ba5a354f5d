"""Evaluation datasets: where each task's files are expected, and readers for them.

:data:`TASKS` is the one table of task -> expected layout (relative to ``DATA_ROOT``, matching the
dataset registry in ``pipeline/datasets/*.yaml``). A missing folder or annotation file raises
:class:`MissingDatasetError` saying what is expected and where to put it.

Readers return plain lists of image paths plus labels or captions; the images are decoded lazily by
:class:`ImageFiles` (through :func:`pipeline.images.decode_image`) inside a ``DataLoader``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from softclip.eval.consistent import consistent_indices
from softclip.pipeline.images import ImageDecodeError, decode_image

__all__ = [
    "TASKS",
    "TASK_GROUPS",
    "ClassificationSet",
    "ImageFiles",
    "MissingDatasetError",
    "RetrievalSet",
    "TaskSpec",
    "WDS_LAYOUT",
    "WDS_PREFIX",
    "expand_tasks",
    "imagenet_templates",
    "load_classification_set",
    "load_retrieval_set",
    "is_wds_task",
    "task_directory",
    "task_relative_dir",
]

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_WNID = re.compile(r"^n\d{8}$")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TaskSpec:
    """Where one evaluation task's data lives and what it looks like.

    Attributes:
        name: the task name used on the command line and in reports.
        kind: ``"classification"``, ``"retrieval"`` (image-text) or ``"image_retrieval"`` (image-image,
            read by :mod:`eval.image_retrieval`).
        relative_dir: the task folder relative to ``DATA_ROOT``.
        annotation: the JSON file inside the folder (``""`` for ImageNet's folder-per-class layout).
        image_folder: for retrieval, the image folder used when a Karpathy entry has no ``filepath``.
        coco_captions: for retrieval, an alternative annotation in the COCO captions format (``images[].id,
            .file_name``, ``annotations[].image_id, .caption``; ``{split}`` is the split), read when
            ``annotation`` is absent: CLIP_benchmark's ``coco_test_karpathy.json`` beside ``val2014/``.
        layout: a human-readable description of the expected files, shown when they are missing.
    """

    name: str
    kind: Literal["classification", "retrieval", "image_retrieval"]
    relative_dir: str
    annotation: str
    image_folder: str = ""
    coco_captions: str = ""
    layout: str


_KARPATHY = "the Karpathy split JSON ({annotation}: images[].filename, .filepath, .split, .sentences[].raw)"
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="imagenet", kind="classification", relative_dir="imagenet/val", annotation="",
            layout="ImageNet-1k validation: 1000 folders named by WordNet id (n01440764/ ... n15075141/), "
            "each holding that class's .JPEG images (sorted folder order = open_clip IMAGENET_CLASSNAMES order)",
        ),
        TaskSpec(
            name="coco", kind="retrieval", relative_dir="coco", annotation="dataset_coco.json",
            image_folder="val2014", coco_captions="coco_{split}_karpathy.json",
            layout=_KARPATHY.format(annotation="dataset_coco.json")
            + " beside the image folders named by each entry's filepath (val2014/, train2014/); "
            "split == 'test' is the 5k test set; or CLIP_benchmark's coco_test_karpathy.json (COCO captions "
            "format) beside val2014/",
        ),
        TaskSpec(
            name="flickr30k", kind="retrieval", relative_dir="flickr30k", annotation="dataset_flickr30k.json",
            image_folder="flickr30k-images",
            layout=_KARPATHY.format(annotation="dataset_flickr30k.json")
            + " beside flickr30k-images/*.jpg; split == 'test' is the 1k test set",
        ),
        TaskSpec(
            name="shapes-retrieval", kind="retrieval", relative_dir="shapes/eval/retrieval",
            annotation="dataset_karpathy.json", image_folder="images",
            layout="the shapes world's retrieval set (dataset_karpathy.json + images/), "
            "written by `softclip shapes --out DATA_ROOT/shapes`",
        ),
        TaskSpec(
            name="shapes-shape", kind="classification", relative_dir="shapes/eval/classification",
            annotation="shape.json",
            layout="the shapes world's classification set (shape.json + images/), "
            "written by `softclip shapes --out DATA_ROOT/shapes`",
        ),
        TaskSpec(
            name="shapes-colour_shape", kind="classification", relative_dir="shapes/eval/classification",
            annotation="colour_shape.json",
            layout="the shapes world's classification set (colour_shape.json + images/), "
            "written by `softclip shapes --out DATA_ROOT/shapes`",
        ),
    )
}
for _name in ("roxford5k", "rparis6k"):
    TASKS[_name] = TaskSpec(
        name=_name, kind="image_retrieval", relative_dir=f"revisitop/{_name}", annotation=f"gnd_{_name}.pkl",
        image_folder="jpg",
        layout=f"the revisited benchmark's files: gnd_{_name}.pkl (revisitop's ground truth) beside jpg/ holding "
        "every image of its imlist and qimlist as <name>.jpg",
    )
TASKS["copydays"] = TaskSpec(
    name="copydays", kind="image_retrieval", relative_dir="copydays", annotation="",
    layout="INRIA Copydays: original/*.jpg (the database), strong/*.jpg (the queries; the first four digits of "
    "a file name name its block), optionally distractors/*.jpg (added to the database, no block)",
)
TASK_GROUPS: dict[str, tuple[str, ...]] = {"shapes": ("shapes-shape", "shapes-colour_shape", "shapes-retrieval")}


class MissingDatasetError(FileNotFoundError):
    """A task's folder or annotation file is missing; the message says what layout is expected where."""


# CLIP_benchmark's webdataset sets: task ``wds/NAME`` reads DATA_ROOT/wds_NAME ("/" in NAME becomes "-",
# as its published folders are named: wds/vtab/cifar100 -> wds_vtab-cifar100), or ``paths["wds/NAME"]``.
WDS_PREFIX = "wds/"
_WDS_NAME = re.compile(r"^wds/[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*$")
WDS_LAYOUT = ("CLIP_benchmark's webdataset layout: {split}/*.tar (with {split}/nshards.txt) holding <key>.webp|png|jpg "
              "plus <key>.cls (classification) or <key>.txt (retrieval, one caption a line), classnames.txt and "
              "zeroshot_classification_templates.txt for classification, dataset_type.txt reading 'retrieval' "
              "for retrieval")


def is_wds_task(task: str) -> bool:
    """Whether ``task`` names a CLIP_benchmark webdataset set (``wds/cifar10``, ``wds/vtab/cifar100``)."""
    return bool(_WDS_NAME.match(task))


def task_relative_dir(task: str) -> str:
    """Where ``task`` lives under DATA_ROOT (``imagenet/val``, ``wds_vtab-cifar100``, ...)."""
    return "wds_" + task[len(WDS_PREFIX):].replace("/", "-") if is_wds_task(task) else TASKS[task].relative_dir


def expand_tasks(names: Sequence[str]) -> tuple[str, ...]:
    """Expand group names (``shapes``) into tasks, keeping order and dropping repeats."""
    out: list[str] = []
    for name in names:
        members = TASK_GROUPS.get(name, (name,))
        for member in members:
            if member not in TASKS and not is_wds_task(member):
                known = ", ".join([*TASK_GROUPS, *TASKS, "wds/NAME"])
                raise ValueError(f"unknown evaluation task '{member}' (known: {known})")
            if member not in out:
                out.append(member)
    return tuple(out)


def task_directory(task: str, data_root: Path, overrides: dict[str, Path] | None = None) -> Path:
    """The folder of ``task``: ``overrides[task]`` if given, else ``data_root / relative_dir``.

    Raises:
        MissingDatasetError: the folder or its annotation file does not exist.
    """
    if is_wds_task(task):
        relative = task_relative_dir(task)
        directory = Path(overrides[task]) if overrides and task in overrides else Path(data_root) / relative
        if not directory.is_dir():
            raise MissingDatasetError(
                f"task '{task}': {directory} does not exist. Expected (DATA_ROOT/{relative}) "
                f"{WDS_LAYOUT.format(split='test')}. Pass --data-root or set paths.{task} in the eval config.")
        return directory
    spec = TASKS[task]
    directory = Path(overrides[task]) if overrides and task in overrides else Path(data_root) / spec.relative_dir
    missing = directory if not directory.is_dir() else None
    if missing is None and spec.annotation and not (directory / spec.annotation).is_file() and not (
            spec.coco_captions and list(directory.glob(spec.coco_captions.format(split="*")))):
        missing = directory / spec.annotation
    if missing is not None:
        raise MissingDatasetError(
            f"task '{task}': {missing} does not exist. Expected in {directory} (DATA_ROOT/{spec.relative_dir}): "
            f"{spec.layout}. Put the dataset there, pass --data-root, or set paths.{task} in the eval config."
        )
    return directory


@dataclasses.dataclass(frozen=True, slots=True)
class ClassificationSet:
    """Images with integer labels, the class names and the prompt templates (strings with ``{}``)."""

    name: str
    files: list[Path]
    labels: list[int]
    classnames: list[str]
    templates: list[str]


@dataclasses.dataclass(frozen=True, slots=True)
class RetrievalSet:
    """Images and their captions; ``caption_to_image[j]`` is the image index of ``captions[j]``;
    ``consistent[j]``, when the dataset lists it, the indices of every image ``captions[j]`` fits."""

    name: str
    files: list[Path]
    captions: list[str]
    caption_to_image: list[int]
    consistent: list[list[int]] | None = None


def imagenet_templates() -> list[str]:
    """The 80 OpenAI ImageNet prompt templates from open_clip, as strings with a ``{}`` slot."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({err}); regenerate or re-download it") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def _load_imagenet(directory: Path) -> ClassificationSet:
    from open_clip import IMAGENET_CLASSNAMES

    wnids = sorted(p.name for p in directory.iterdir() if p.is_dir() and _WNID.match(p.name))
    if len(wnids) != len(IMAGENET_CLASSNAMES):
        raise MissingDatasetError(
            f"task 'imagenet': {directory} holds {len(wnids)} WordNet-id folders, expected "
            f"{len(IMAGENET_CLASSNAMES)}. Expected {TASKS['imagenet'].layout}."
        )
    files, labels, empty = [], [], []
    for label, wnid in enumerate(wnids):
        images = [p for p in sorted((directory / wnid).iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES]
        if not images:
            empty.append(wnid)
        files += images
        labels += [label] * len(images)
    if empty:  # a half-copied val set would otherwise be scored on a subset without a word
        raise MissingDatasetError(
            f"task 'imagenet': {len(empty)} of the {len(wnids)} class folders in {directory} hold no image "
            f"(first: {empty[0]}); {len(files)} images found, the ILSVRC2012 val set has 50,000. "
            f"Expected {TASKS['imagenet'].layout}."
        )
    return ClassificationSet("imagenet", files, labels, list(IMAGENET_CLASSNAMES), imagenet_templates())


def load_classification_set(task: str, directory: Path) -> ClassificationSet:
    """Read a classification task from its folder (see :data:`TASKS` for the layouts)."""
    spec = TASKS[task]
    if spec.kind != "classification":
        raise ValueError(f"task '{task}' is a {spec.kind} task, not classification")
    if task == "imagenet":
        return _load_imagenet(directory)
    path = directory / spec.annotation
    data = _read_json(path)
    try:
        classnames, templates = list(data["classnames"]), list(data["templates"])
        files = [directory / s["file"] for s in data["samples"]]
        labels = [int(s["label"]) for s in data["samples"]]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: missing or malformed field {err}; expected {spec.layout}") from err
    if not files or not templates or any(not 0 <= y < len(classnames) for y in labels):
        raise ValueError(f"{path}: needs samples, templates and labels in [0, {len(classnames)})")
    return ClassificationSet(task, files, labels, classnames, templates)


def load_retrieval_set(task: str, directory: Path, *, split: str = "test") -> RetrievalSet:
    """Read the ``split`` entries of a Karpathy-layout JSON: every caption of every image."""
    spec = TASKS[task]
    if spec.kind != "retrieval":
        raise ValueError(f"task '{task}' is a {spec.kind} task, not retrieval")
    path = directory / spec.annotation
    if spec.coco_captions and not path.is_file():
        return _load_coco_captions(task, directory, directory / spec.coco_captions.format(split=split))
    data = _read_json(path)
    files, captions, owners, imgids, consistent = [], [], [], [], []
    try:
        for entry in data["images"]:
            if entry["split"] != split or not entry["sentences"]:
                continue
            files.append(directory / entry.get("filepath", spec.image_folder) / entry["filename"])
            imgids.append(entry.get("imgid"))
            for sentence in entry["sentences"]:
                captions.append(sentence["raw"].strip())
                owners.append(len(files) - 1)
                consistent.append(sentence.get("consistent_imgids"))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: missing or malformed field {err}; expected {spec.layout}") from err
    if not files:
        raise ValueError(f"{path}: no image with split == '{split}' and at least one caption")
    return RetrievalSet(task, files, captions, owners, consistent_indices(path, imgids, consistent))


def _load_coco_captions(task: str, directory: Path, path: Path) -> RetrievalSet:
    """A COCO-captions-format annotation, in CLIP_benchmark's order (torchvision ``CocoCaptions``: images
    by increasing id, each image's captions in file order); ``file_name`` is under ``image_folder``."""
    if not path.is_file():
        raise MissingDatasetError(f"task '{task}': {path} does not exist; expected {TASKS[task].layout}")
    data = _read_json(path)
    by_image: dict[int, list[str]] = {}
    try:
        names = {int(image["id"]): str(image["file_name"]) for image in data["images"]}
        for annotation in data["annotations"]:
            by_image.setdefault(int(annotation["image_id"]), []).append(str(annotation["caption"]).strip())
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: missing or malformed field {err}; expected the COCO captions format "
                         "(images[].id, .file_name; annotations[].image_id, .caption)") from err
    files, captions, owners = [], [], []
    for image_id in sorted(names):
        if not by_image.get(image_id):
            continue
        files.append(directory / TASKS[task].image_folder / names[image_id])
        captions += by_image[image_id]
        owners += [len(files) - 1] * len(by_image[image_id])
    if not files:
        raise ValueError(f"{path}: no image with a caption")
    return RetrievalSet(task, files, captions, owners)


class ImageFiles(Dataset):
    """A map-style dataset over image files: item ``i`` is ``transform(decode_image(bytes of file i))``."""

    def __init__(self, files: Sequence[Path], transform: Callable[[object], torch.Tensor]):
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise MissingDatasetError(f"image {path} listed by the dataset does not exist") from err
        try:
            image = decode_image(data)
        except ImageDecodeError as err:
            raise ImageDecodeError(err.reason, f"{path}: {err.detail}") from err
        return self.transform(image)
