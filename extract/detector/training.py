"""Train a detector of the VinVL family on box-annotated img2dataset tars (the shapes world).

Each sample in ``DIR/train/*.tar`` has ``<key>.jpg`` and ``<key>.json`` with ``objects``: ``{"box": [x1, y1,
x2, y2], "shape", "colour", "size"}``. Classes are the shapes, attributes the colours and sizes. Each step
calls the model's own training forward, ``model(*collate(model, samples, flips))``, which returns VinVL's
losses (:meth:`~softclip.extract.detector.vinvl.VinVLDetector.losses`). The output folder holds
``model.pth`` (flat ``module.``-prefixed state dict in VinVL's layout), ``labelmap.json`` (VinVL format)
and ``detector.yaml``, so
``VinVLDetector.from_checkpoint(out/"model.pth", out/"labelmap.json", config=out/"detector.yaml")`` loads it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.ops import FrozenBatchNorm2d
from tqdm import tqdm

from softclip.extract.detector.checkpoint import BACKGROUND, NO_ATTRIBUTE, write_checkpoint, write_labelmap
from softclip.extract.detector.config import DetectorConfig
from softclip.extract.detector.vinvl import VinVLDetector
from softclip.pipeline.config import save_config
from softclip.pipeline.images import ImageDecodeError, decode_image
from softclip.pipeline.schedule import cosine_lr
from softclip.pipeline.sources import open_source

__all__ = ["AnnotatedImage", "calibrate_frozen_bn", "collate", "load_annotated_tars", "shapes_vocabulary",
           "train_detector"]


@dataclass(frozen=True, slots=True)
class AnnotatedImage:
    """An RGB image and its objects: ``boxes [G, 4]`` pixels, class ``labels [G]``, ``attributes [G, 2]``."""

    image: Image.Image
    boxes: np.ndarray
    labels: np.ndarray
    attributes: np.ndarray


def shapes_vocabulary() -> tuple[list[str], list[str]]:
    """Class names (background + ``pipeline.shapes.SHAPES``) and attribute names (none + colours + sizes)."""
    from softclip.pipeline.shapes import COLOURS, SHAPES, SIZES

    return [BACKGROUND, *SHAPES], [NO_ATTRIBUTE, *COLOURS, *SIZES]


def annotate(image: Image.Image, objects: list[dict], class_names: list[str], attribute_names: list[str],
             source: str) -> AnnotatedImage:
    """Turn a shapes-world ``objects`` list into label arrays; unknown names are a ``ValueError``."""
    cls_idx = {n: i for i, n in enumerate(class_names)}
    attr_idx = {n: i for i, n in enumerate(attribute_names)}
    try:
        labels = [cls_idx[o["shape"]] for o in objects]
        attributes = [[attr_idx[o["colour"]], attr_idx[o["size"]]] for o in objects]
        boxes = [[float(v) for v in o["box"]] for o in objects]
    except KeyError as err:
        raise ValueError(f"{source}: object annotation has an unknown or missing field/name {err}") from err
    return AnnotatedImage(image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
                          np.asarray(attributes, np.int64).reshape(-1, 2))


def load_annotated_tars(data_dir: str | Path, class_names: list[str], attribute_names: list[str]
                        ) -> list[AnnotatedImage]:
    """Every annotated sample of ``data_dir/train/*.tar``, in storage order, read through
    :func:`softclip.pipeline.sources.open_source` (the project's hardened tar reader) and decoded through
    ``decode_image``. Samples whose json has no ``objects`` list are not annotated and are left out; a
    sample the reader reports as broken (truncated, duplicate key, unreadable json, ...) or whose image does
    not decode is a ``ValueError`` naming the shard and key."""
    train = Path(data_dir) / "train"
    if not any(train.glob("*.tar")):
        raise FileNotFoundError(f"no training shards {train}/*.tar; generate them first "
                                "(softclip shapes generate) or give the dataset folder with --data")
    source = open_source(train)
    samples = []
    for shard in source.shards:
        for sample in source.iter_shard(shard):
            where = f"{shard.path}:{sample.key}"
            if sample.error:
                raise ValueError(f"{where}: unreadable training sample ({sample.error}); re-create this shard")
            if sample.image is None or not isinstance(sample.meta.get("objects"), list):
                continue
            try:
                image = decode_image(sample.image)
            except ImageDecodeError as err:
                raise ValueError(f"{where}: unreadable training sample ({err})") from err
            samples.append(annotate(image, sample.meta["objects"], class_names, attribute_names, where))
    return samples


def collate(model: VinVLDetector, samples: list[AnnotatedImage], flips: np.ndarray
            ) -> tuple[Tensor, list[tuple[int, int]], list[dict[str, Tensor]]]:
    """``(images, image_sizes, targets)`` for the model's training forward ``model(*collate(...))``: the
    samples preprocessed as at test time (those with ``flips`` mirrored), boxes scaled to the resized images."""
    images, targets = [], []
    for sample, flip in zip(samples, flips):
        image, boxes = sample.image, sample.boxes.copy()
        if flip:
            image = ImageOps.mirror(image)
            boxes[:, [0, 2]] = image.width - boxes[:, [2, 0]]
        images.append(image)
        targets.append({"boxes": boxes, "labels": sample.labels, "attributes": sample.attributes,
                        "size": image.size})
    batch, sizes = model.preprocess(images)
    out = []
    for t, (h, w) in zip(targets, sizes):
        scale = np.array([w / t["size"][0], h / t["size"][1]] * 2, np.float32)
        out.append({"boxes": torch.from_numpy(t["boxes"] * scale), "labels": torch.from_numpy(t["labels"]),
                    "attributes": torch.from_numpy(t["attributes"])})
    return batch, sizes, out


@torch.no_grad()
def calibrate_frozen_bn(model: VinVLDetector, images: Tensor, sizes: list[tuple[int, int]],
                        boxes: list[Tensor]) -> None:
    """Data-dependent init of the (frozen, eps 0) norm layers: each one's statistics are set, in forward
    order, to the mean and variance of its input on one batch, so every layer starts standardised."""

    def set_stats(module: FrozenBatchNorm2d, args: tuple[Tensor]) -> None:
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-5)

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    try:
        features = model.backbone.body(images, sizes)
        model.roi_heads.box.feature_extractor(features, boxes, sizes)
    finally:
        for hook in hooks:
            hook.remove()


def train_detector(cfg: DetectorConfig, data_dir: str | Path, out_dir: str | Path, *,
                   progress: bool = True) -> dict:
    """Train on ``data_dir/train/*.tar`` and write ``model.pth``, ``labelmap.json``, ``detector.yaml``.

    Returns a summary dict: steps, images seen, final losses, seconds, output paths.
    """
    threads = torch.get_num_threads()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    try:
        return _train(cfg, data_dir, out_dir, progress)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: DetectorConfig, data_dir: str | Path, out_dir: str | Path, progress: bool) -> dict:
    t = cfg.train
    torch.manual_seed(t.seed)
    rng = np.random.default_rng(t.seed)
    class_names, attribute_names = shapes_vocabulary()
    if (len(class_names), len(attribute_names)) != (cfg.arch.num_classes, cfg.arch.num_attributes):
        raise ValueError(f"config {cfg.name}: arch.num_classes/num_attributes must be {len(class_names)}/"
                         f"{len(attribute_names)} for the shapes world (index 0 included)")
    samples = load_annotated_tars(data_dir, class_names, attribute_names)
    model = VinVLDetector(cfg, class_names=class_names, attribute_names=attribute_names).train()
    start = time.perf_counter()
    first = [samples[i] for i in rng.choice(len(samples), min(len(samples), 4 * t.batch_size), replace=False)]
    images, sizes, targets = collate(model, first, np.zeros(len(first), bool))
    calibrate_frozen_bn(model, images, sizes, [x["boxes"] for x in targets])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                                  weight_decay=t.weight_decay)
    bar = tqdm(range(t.steps), desc="detector", unit="step", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, base_lr=t.lr, warmup_steps=t.warmup_steps, total_steps=t.steps)
        chosen = [samples[i] for i in rng.integers(0, len(samples), t.batch_size)]
        flips = rng.random(t.batch_size) < 0.5 if t.hflip else np.zeros(t.batch_size, bool)
        losses = model(*collate(model, chosen, flips))
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite detector loss at step {step}: "
                                     f"{ {k: float(v) for k, v in losses.items()} }; lower train.lr")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{total.item():.3f}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    write_checkpoint(out / "model.pth", model.state_dict())
    write_labelmap(out / "labelmap.json", class_names, attribute_names, weights=out / "model.pth")
    save_config(cfg, out / "detector.yaml")
    return {"steps": t.steps, "images_seen": t.steps * t.batch_size, "num_train_images": len(samples),
            "final_losses": {k: round(v.item(), 4) for k, v in losses.items()},
            "seconds": round(time.perf_counter() - start, 1), "weights": str(out / "model.pth"),
            "labelmap": str(out / "labelmap.json"), "config": str(out / "detector.yaml")}
