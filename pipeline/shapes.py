"""The shapes world: a deterministic synthetic image-text dataset that stands in for CC3M.

Images hold 1 to ``max_objects`` coloured shapes on a textured background; every object is annotated
with its box, shape, colour and size. Captions come from varied templates with synonyms; some mention
only a subset of the objects or a spatial relation, so one caption fits several images (the many-to-many
structure that SoftCLIP's soft targets are for). Noise knobs corrupt disjoint sets of *training* captions,
each at exactly its rate (see :mod:`pipeline.shapes_captions`): ``caption_noise`` (another image's caption),
``attribute_noise`` (one wrong colour word), ``partial_noise`` (one object by shape only) and
``hallucination_noise`` (an object the image lacks added). Evaluation sets are always clean, and every
retrieval caption lists the images it fits (``consistent_imgids``, from its ``content``), so evaluation can
credit a caption's other matching images (:mod:`eval.consistent`).

Layout written by :func:`generate`::

    OUT/train/00000.tar, 00000.parquet, 00000_stats.json, ...   (exactly as img2dataset writes them)
    OUT/eval/retrieval/dataset_karpathy.json + images/*.jpg       (MS-COCO Karpathy layout)
    OUT/eval/classification/{shape,colour_shape}.json + images/*.jpg
    OUT/shapes.yaml                                               (the resolved config)

``shapes.yaml`` is written first and marks the folder as the generator's: a rerun into it deletes the
previous generation's files (so a smaller world leaves no stale shards); any other non-empty folder is
refused.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from softclip.pipeline.config import save_config
from softclip.pipeline.img2dataset import ShardWriter
from softclip.pipeline.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from softclip.pipeline.shapes_captions import (
    COLOURS,
    SHAPES,
    SIZES,
    ShapesObject,
    caption_for,
    caption_with_content,
    consistent_images,
    hallucinated_caption,
    partial_caption,
    swap_colour,
)

__all__ = [
    "COLOURS",
    "SHAPES",
    "SIZES",
    "ShapesConfig",
    "NOISE_KINDS",
    "ShapesObject",
    "caption_for",
    "CLASSIFICATION_TEMPLATES",
    "classification_tasks",
    "encode_jpeg",
    "generate",
    "render_image",
    "sample_objects",
]

NOISE_KINDS = ("caption", "attribute", "partial", "hallucination")
_RGB = {
    "red": (215, 35, 35), "orange": (245, 140, 25), "yellow": (240, 215, 35), "green": (40, 165, 60),
    "cyan": (40, 200, 215), "blue": (40, 70, 215), "purple": (135, 50, 185), "pink": (245, 125, 190),
}
# Relative side of an object's box, as a fraction of the image side.
_SIZE_RANGE = {"small": (0.17, 0.23), "large": (0.30, 0.38)}
CLASSIFICATION_TEMPLATES = (
    "a photo of a {}.", "an image of a {}.", "a picture showing a {}.", "a drawing of a {}.", "a {}.",
)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ShapesConfig:
    """Settings of a shapes-world dataset; the same config and seed give the same bytes."""

    num_train: int = 5000  # training image-caption pairs
    num_retrieval: int = 500  # held-out images, 5 captions each (the study uses >= 2,000)
    num_classification_per_class: int = 4  # single-object images per colour+shape class
    image_size: int = 64
    max_objects: int = 4
    caption_noise: float = 0.0  # fraction of training captions replaced by another image's caption
    attribute_noise: float = 0.0  # fraction of training captions with one wrong colour word
    partial_noise: float = 0.0  # fraction replaced by an underspecified caption (one object, shape only)
    hallucination_noise: float = 0.0  # fraction naming one colour+shape the image does not hold
    samples_per_shard: int = 1000
    seed: int = 0
    jpeg_quality: int = 95

    def __post_init__(self):
        rates = {f"{kind}_noise": getattr(self, f"{kind}_noise") for kind in NOISE_KINDS}
        for name, rate in rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        if sum(rates.values()) > 1.0:
            raise ValueError(f"{' + '.join(rates)} must be at most 1 (they corrupt disjoint samples), "
                             f"got {sum(rates.values()):g}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        if not 1 <= self.max_objects <= 6:
            raise ValueError(f"max_objects must be in [1, 6], got {self.max_objects}")
        if not 1 <= self.samples_per_shard <= 10_000:
            raise ValueError("samples_per_shard must be in [1, 10000] (img2dataset keys have 4 index digits)")
        if min(self.num_train, self.num_retrieval, self.num_classification_per_class) < 0:
            raise ValueError("sample counts must be non-negative")
        if self.num_train < 2 and round(self.caption_noise * self.num_train) > 0:
            raise ValueError(f"caption_noise={self.caption_noise} replaces a caption by another training image's, "
                             f"but num_train={self.num_train} has no other image; use num_train >= 2 or caption_noise=0")


def _iou(a: tuple, b: tuple) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def sample_objects(rng: np.random.Generator, image_size: int, num_objects: int,
                   forced: tuple[str, str, str] | None = None) -> list[ShapesObject]:
    """Place up to ``num_objects`` random objects with little overlap (IoU <= 0.05 pairwise).

    ``forced`` = (shape, colour, size) fixes the single object of a classification image.
    """
    objects: list[ShapesObject] = []
    for _ in range(num_objects):
        if forced is not None:
            shape, colour, size = forced
        else:
            shape, colour, size = (str(rng.choice(SHAPES)), str(rng.choice(COLOURS)), str(rng.choice(SIZES)))
        for _attempt in range(50):
            side = int(round(rng.uniform(*_SIZE_RANGE[size]) * image_size))
            x1 = int(rng.integers(1, image_size - side - 1))
            y1 = int(rng.integers(1, image_size - side - 1))
            box = (float(x1), float(y1), float(x1 + side), float(y1 + side))
            if all(_iou(box, o.box) <= 0.05 for o in objects):
                objects.append(ShapesObject(shape=shape, colour=colour, size=size, box=box))
                break
    return objects


def _shape_polygon(shape: str, box: tuple) -> list[tuple[float, float]]:
    x1, y1, x2, y2 = box
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2

    def regular(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(phase + 2 * math.pi * k / n), cy + radius * math.sin(phase + 2 * math.pi * k / n))
                for k in range(n)]

    if shape == "triangle":
        return [(cx, y1), (x2, y2), (x1, y2)]
    if shape == "diamond":
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    if shape == "hexagon":
        return regular(6, r, 0.0)
    if shape == "star":
        outer, inner = regular(5, r, -math.pi / 2), regular(5, r * 0.45, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        t = (x2 - x1) / 3
        return [(x1 + t, y1), (x2 - t, y1), (x2 - t, y1 + t), (x2, y1 + t), (x2, y2 - t), (x2 - t, y2 - t),
                (x2 - t, y2), (x1 + t, y2), (x1 + t, y2 - t), (x1, y2 - t), (x1, y1 + t), (x1 + t, y1 + t)]
    raise ValueError(f"no polygon for shape {shape!r}")


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A low-saturation textured background: noise, stripes, checks or a gradient."""
    base = rng.uniform(90, 200)
    tint = rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = int(rng.integers(4))
    if kind == 0:
        pattern = rng.normal(0, 10, size=(size, size))
    elif kind == 1:
        period, angle = rng.uniform(4, 12), rng.uniform(0, math.pi)
        pattern = 14 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    elif kind == 2:
        cell = int(rng.integers(4, 12))
        pattern = 12 * (((xx // cell) + (yy // cell)) % 2 * 2 - 1)
    else:
        angle = rng.uniform(0, 2 * math.pi)
        pattern = 30 * ((xx * math.cos(angle) + yy * math.sin(angle)) / size - 0.5)
    pixels = base + pattern[..., None] + tint[None, None, :] + rng.normal(0, 3, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def render_image(rng: np.random.Generator, image_size: int, objects: list[ShapesObject]) -> Image.Image:
    """Draw ``objects`` onto a fresh textured background."""
    image = _background(rng, image_size)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        rgb = tuple(int(np.clip(c + rng.normal(0, 6), 0, 255)) for c in _RGB[obj.colour])
        x1, y1, x2, y2 = obj.box
        if obj.shape == "circle":
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=rgb)
        elif obj.shape == "square":
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=rgb)
        elif obj.shape == "ring":
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], outline=rgb, width=max(2, int((x2 - x1) / 5)))
        else:
            draw.polygon(_shape_polygon(obj.shape, (x1, y1, x2 - 1, y2 - 1)), fill=rgb)
    return image


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """JPEG bytes of ``image`` (deterministic for a given Pillow version)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def classification_tasks() -> dict[str, list[str]]:
    """Class names of the two zero-shot tasks: by shape, and by colour + shape."""
    return {"shape": list(SHAPES), "colour_shape": [f"{c} {s}" for c in COLOURS for s in SHAPES]}


_SPLIT_TRAIN, _SPLIT_RETRIEVAL, _SPLIT_CLASSIFICATION, _SPLIT_NOISE = 0, 1, 2, 3


def _sample_rng(seed: int, split: int, index: int) -> np.random.Generator:
    """Each sample's own generator: independent of generation order, so any subset is reproducible."""
    return np.random.default_rng([seed, split, index])


def _training_samples(cfg: ShapesConfig) -> tuple[list[list[ShapesObject]], list[str], list[str | None]]:
    """Objects, captions (noise applied) and the noise kind of every training sample."""
    objects, clean = [], []
    for i in range(cfg.num_train):
        rng = _sample_rng(cfg.seed, _SPLIT_TRAIN, i)
        objs = sample_objects(rng, cfg.image_size, int(rng.integers(1, cfg.max_objects + 1)))
        objects.append(objs)
        clean.append(caption_for(rng, objs))
    captions, noise = list(clean), [None] * cfg.num_train
    rng = _sample_rng(cfg.seed, _SPLIT_NOISE, 0)
    order = rng.permutation(cfg.num_train)
    num_caption = int(round(cfg.caption_noise * cfg.num_train))
    for i in order[:num_caption]:
        j = (int(i) + int(rng.integers(1, cfg.num_train))) % cfg.num_train  # another image, never itself
        captions[i], noise[i] = clean[j], "caption"
    num_attribute = int(round(cfg.attribute_noise * cfg.num_train))
    for i in order[num_caption:]:
        if num_attribute == 0:
            break
        swapped = swap_colour(rng, clean[i])
        if swapped != clean[i]:
            captions[i], noise[i] = swapped, "attribute"
            num_attribute -= 1
    untouched = [int(i) for i in order[num_caption:] if noise[i] is None]
    num_partial = int(round(cfg.partial_noise * cfg.num_train))
    num_hallucination = int(round(cfg.hallucination_noise * cfg.num_train))
    for i in untouched[:num_partial]:
        captions[i], noise[i] = partial_caption(rng, objects[i]), "partial"
    for i in untouched[num_partial : num_partial + num_hallucination]:
        captions[i], noise[i] = hallucinated_caption(rng, objects[i]), "hallucination"
    return objects, captions, noise


def _write_train(out: Path, cfg: ShapesConfig, bar) -> dict[str, int]:
    objects, captions, noise = _training_samples(cfg)
    counts = dict.fromkeys(NOISE_KINDS, 0)
    for start in range(0, cfg.num_train, cfg.samples_per_shard):
        with ShardWriter(out, start // cfg.samples_per_shard) as shard:
            for i in range(start, min(start + cfg.samples_per_shard, cfg.num_train)):
                rng = _sample_rng(cfg.seed, _SPLIT_TRAIN, i)
                rng.bit_generator.advance(1 << 20)  # rendering draws, disjoint from the caption draws
                image = render_image(rng, cfg.image_size, objects[i])
                extra = {"objects": [o.to_json() for o in objects[i]], "noise": noise[i]}
                shard.write(encode_jpeg(image, cfg.jpeg_quality), caption=captions[i],
                            width=cfg.image_size, height=cfg.image_size, extra=extra)
                if noise[i]:
                    counts[noise[i]] += 1
                bar.update(1)
    return counts


def _write_retrieval(out: Path, cfg: ShapesConfig, bar) -> None:
    entries, images, contents = [], [], []
    for i in range(cfg.num_retrieval):
        rng = _sample_rng(cfg.seed, _SPLIT_RETRIEVAL, i)
        objs = sample_objects(rng, cfg.image_size, int(rng.integers(1, cfg.max_objects + 1)))
        captioned = [caption_with_content(rng, objs) for _ in range(5)]
        filename = f"{i:06d}.jpg"
        atomic_write_bytes(out / "images" / filename, encode_jpeg(render_image(rng, cfg.image_size, objs),
                                                                  cfg.jpeg_quality))
        entries.append({
            "filepath": "images", "filename": filename, "imgid": i, "cocoid": i, "split": "test",
            "sentids": list(range(5 * i, 5 * i + 5)),
            "sentences": [{"raw": c, "tokens": c.lower().strip(".!").replace(",", "").split(),
                           "imgid": i, "sentid": 5 * i + k, "content": content.to_json()}
                          for k, (c, content) in enumerate(captioned)],
            "objects": [o.to_json() for o in objs],
        })
        images.append(objs)
        contents += [content for _, content in captioned]
        bar.update(1)
    fitting = iter(consistent_images(contents, images))  # imgid == index here
    for entry in entries:
        for sentence in entry["sentences"]:
            sentence["consistent_imgids"] = next(fitting)
    # compact, as the real Karpathy files are: the id lists would take ~8x the bytes indented
    atomic_write_text(out / "dataset_karpathy.json",
                      json.dumps({"dataset": "shapes", "images": entries}, separators=(",", ":")) + "\n")


def _write_classification(out: Path, cfg: ShapesConfig, bar) -> None:
    samples = []
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    for index in range(len(classes) * cfg.num_classification_per_class):
        colour, shape = classes[index // cfg.num_classification_per_class]
        rng = _sample_rng(cfg.seed, _SPLIT_CLASSIFICATION, index)
        objs = sample_objects(rng, cfg.image_size, 1, forced=(shape, colour, str(rng.choice(SIZES))))
        filename = f"images/{index:06d}.jpg"
        atomic_write_bytes(out / filename, encode_jpeg(render_image(rng, cfg.image_size, objs), cfg.jpeg_quality))
        samples.append({"file": filename, "colour": colour, "shape": shape, "objects": [o.to_json() for o in objs]})
        bar.update(1)
    for task, classnames in classification_tasks().items():
        labelled = [{"file": s["file"], "label": classnames.index(s["shape"] if task == "shape"
                                                                  else f"{s['colour']} {s['shape']}")}
                    for s in samples]
        atomic_write_json(out / f"{task}.json", {"task": task, "classnames": classnames,
                                                 "templates": list(CLASSIFICATION_TEMPLATES), "samples": labelled})


def _generated_files(out: Path) -> list[Path]:
    """Every file of the layout :func:`generate` writes that exists under ``out`` now."""
    patterns = ["train/*.tar", "train/*.parquet", "train/*_stats.json", "eval/retrieval/dataset_karpathy.json",
                "eval/retrieval/images/*.jpg", "eval/classification/images/*.jpg",
                *(f"eval/classification/{task}.json" for task in classification_tasks())]
    return sorted(path for pattern in patterns for path in out.glob(pattern) if path.is_file())


def _claim_folder(out: Path, cfg: ShapesConfig) -> None:
    """Make ``out`` the generator's: delete an earlier generation's files if ``shapes.yaml`` marks it as
    one, refuse any other non-empty folder, then write ``shapes.yaml``."""
    if out.is_dir() and any(out.iterdir()):
        if not (out / "shapes.yaml").is_file():
            raise FileExistsError(f"{out} is not empty and has no shapes.yaml (it was not written by the shapes "
                                  "generator); give a new or empty folder")
        for path in _generated_files(out):
            path.unlink()
    save_config(cfg, out / "shapes.yaml")


def generate(out_dir: str | Path, cfg: ShapesConfig, *, progress: bool = True) -> dict:
    """Write the shapes world (training shards and evaluation sets) under ``out_dir``; see the module
    docstring for the layout. Returns a summary: counts, realised noise rates, wall time.

    Raises:
        FileExistsError: ``out_dir`` is a non-empty folder the generator did not write.
    """
    out = Path(out_dir)
    start = time.perf_counter()
    _claim_folder(out, cfg)
    total = cfg.num_train + cfg.num_retrieval + cfg.num_classification_per_class * len(COLOURS) * len(SHAPES)
    with tqdm(total=total, desc="shapes", unit="img", disable=not progress) as bar:
        noise_counts = _write_train(out / "train", cfg, bar)
        _write_retrieval(out / "eval" / "retrieval", cfg, bar)
        _write_classification(out / "eval" / "classification", cfg, bar)
    n = max(cfg.num_train, 1)
    return {
        "out": str(out), "num_train": cfg.num_train, "num_shards": math.ceil(cfg.num_train / cfg.samples_per_shard),
        "num_retrieval": cfg.num_retrieval,
        "num_classification": cfg.num_classification_per_class * len(COLOURS) * len(SHAPES),
        **{f"{kind}_noise_rate": noise_counts[kind] / n for kind in NOISE_KINDS},
        "seconds": round(time.perf_counter() - start, 2),
    }
