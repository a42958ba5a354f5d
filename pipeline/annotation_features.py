"""The "oracle detector": packed training shards from the shapes world's own box annotations.

Before the real detector exists (and as an upper bound for the study), every annotated object of a
shapes-world training image becomes one box, and its ROI feature is a fixed, deterministic function of
the pixels inside the box (:func:`annotation_roi_features`). Tags are ``"colour shape"`` per object, class
names the shapes, attributes the colours, scores 1.0, detector id ``"annotations"``.

:func:`write_annotation_tag_shards` keeps a detector's packed shards and replaces only their tags with the
annotated objects: the study's positive control, whose soft targets come from the truth while every
other input (ROI features, boxes, images, captions) is the detector run's, byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm.auto import tqdm

from softclip.pipeline.images import ImageDecodeError, decode_image
from softclip.pipeline.packed import packed_samples, write_packed_shard
from softclip.pipeline.samples import Sample
from softclip.pipeline.shapes import COLOURS, SHAPES
from softclip.pipeline.shards import (
    FeatureRecord,
    box_geometry,
    error_record,
    records_to_table,
    write_parquet_shard,
)
from softclip.pipeline.sources import open_source

__all__ = ["ANNOTATION_DETECTOR", "ANNOTATION_FEATURE_DIM", "annotation_record", "annotation_roi_features",
           "annotation_tags", "write_annotation_shards", "write_annotation_tag_shards"]

ANNOTATION_DETECTOR = "annotations"
_THUMB = 4  # the crop is resized to _THUMB x _THUMB RGB
_BINS = 8  # colour histogram bins per channel
ANNOTATION_FEATURE_DIM = _THUMB * _THUMB * 3 + _BINS * 3  # 72


def annotation_roi_features(image: Image.Image, boxes: np.ndarray) -> np.ndarray:
    """ROI features of ``boxes`` ``[n, 4]`` ``(x1, y1, x2, y2)`` pixels in an RGB ``image``: ``[n, 72]`` float16.

    Per box, the crop (box rounded outwards to whole pixels, clipped to the image, at least 1x1) gives
    48 values, the crop resized to 4x4 with bilinear filtering, RGB in row-major order, scaled to [0, 1],
    then 24 values, an 8-bin histogram of each of R, G, B over the crop's pixels (bins of width 32),
    each histogram divided by the pixel count.
    """
    pixels = np.asarray(image, dtype=np.uint8)
    height, width = pixels.shape[:2]
    out = np.zeros((len(boxes), ANNOTATION_FEATURE_DIM), dtype=np.float32)
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)):
        left, top = min(max(int(np.floor(x1)), 0), width - 1), min(max(int(np.floor(y1)), 0), height - 1)
        right, bottom = max(min(int(np.ceil(x2)), width), left + 1), max(min(int(np.ceil(y2)), height), top + 1)
        crop = pixels[top:bottom, left:right]
        thumb = np.asarray(Image.fromarray(crop).resize((_THUMB, _THUMB), Image.BILINEAR), dtype=np.float32)
        hist = [np.bincount(crop[..., c].reshape(-1) // (256 // _BINS), minlength=_BINS) for c in range(3)]
        out[i, : _THUMB * _THUMB * 3] = thumb.reshape(-1) / 255.0
        out[i, _THUMB * _THUMB * 3:] = np.concatenate(hist) / float(crop.shape[0] * crop.shape[1])
    return out.astype(np.float16)


def annotation_record(sample: Sample) -> FeatureRecord:
    """The feature row of one shapes-world sample (its json ``objects``: ``box``, ``shape``, ``colour``);
    an error row when the sample or its image is unusable."""
    error = dict(key=sample.key, shard=sample.shard, feature_dim=ANNOTATION_FEATURE_DIM,
                 detector=ANNOTATION_DETECTOR, caption=sample.caption)
    if sample.error or sample.image is None:
        return error_record(error=sample.error or "no image", **error)
    try:
        image = decode_image(sample.image)
    except ImageDecodeError as err:
        return error_record(error=f"image {err}", **error)
    objects = sample.meta.get("objects") or []
    boxes = np.array([o["box"] for o in objects], dtype=np.float32).reshape(-1, 4)
    colours = [o["colour"] for o in objects]
    shapes = [o["shape"] for o in objects]
    return FeatureRecord(
        key=sample.key, shard=sample.shard, width=image.width, height=image.height, caption=sample.caption,
        boxes=boxes, geometry=box_geometry(boxes, image.width, image.height),
        roi_features=annotation_roi_features(image, boxes),
        labels=np.array([SHAPES.index(s) for s in shapes], dtype=np.int32),
        scores=np.ones(len(objects), dtype=np.float32), class_names=shapes,
        attr_labels=[[COLOURS.index(c)] for c in colours], attr_names=[[c] for c in colours],
        attr_scores=[[1.0] for _ in colours], tags=annotation_tags(objects),
        detector=ANNOTATION_DETECTOR,
    )


def annotation_tags(objects: list[dict]) -> str:
    """The tag text of annotated objects, in the detector's format (:func:`extract.detector.vinvl.format_tags`:
    ``"attr class"`` per box, boxes joined by ``", "``): ``"red circle, blue star"``."""
    return ", ".join(f"{o['colour']} {o['shape']}" for o in objects)


def write_annotation_shards(source: str | Path, out_dir: str | Path, *, parquet: bool = False,
                            progress: bool = True) -> list[Path]:
    """Turn a shapes-world training folder (img2dataset tars) into packed training shards ``OUT/NNNNN.tar``
    (features + the image per key) and, with ``parquet``, Parquet feature shards ``OUT/NNNNN.parquet``.

    Shards already present are kept (writes are atomic), so a rerun after a crash only finishes the rest.
    Returns the packed shard paths.
    """
    src = open_source(source)
    out_dir = Path(out_dir)
    written = []
    for shard in tqdm(src.shards, desc="annotation features", disable=not progress):
        tar_path, parquet_path = out_dir / f"{shard.name}.tar", out_dir / f"{shard.name}.parquet"
        if tar_path.is_file() and (not parquet or parquet_path.is_file()):
            written.append(tar_path)
            continue
        samples = list(src.iter_shard(shard))
        records = [annotation_record(s) for s in samples]
        if parquet:
            write_parquet_shard(parquet_path, records, feature_dim=ANNOTATION_FEATURE_DIM)
        table = records_to_table(records, ANNOTATION_FEATURE_DIM).append_column(
            "image", pa.array([s.image or b"" for s in samples], pa.binary()))
        written.append(write_packed_shard(tar_path, packed_samples(table)))
    return written


def write_annotation_tag_shards(packed_dir: str | Path, source: str | Path, out_dir: str | Path, *,
                                progress: bool = True) -> list[Path]:
    """Copy the packed shards ``packed_dir/*.tar`` to ``out_dir``, each sample's ``tags`` replaced by its
    annotated objects (:func:`annotation_tags`) from the shapes-world folder ``source`` it was extracted from;
    every other member is copied unchanged. Shards already present are kept (writes are atomic).

    Raises:
        KeyError: a packed sample whose key ``source`` does not have (naming the shard and the key).
    """
    src = open_source(source)
    objects = {s.key: s.meta.get("objects") or [] for shard in src.shards for s in src.iter_shard(shard)}
    out_dir = Path(out_dir)
    written = []
    for tar_path in tqdm(sorted(Path(packed_dir).glob("*.tar")), desc="annotation tags", disable=not progress):
        target = out_dir / tar_path.name
        if not target.is_file():
            write_packed_shard(target, _retagged_samples(tar_path, objects, source))
        written.append(target)
    return written


def _retagged_samples(tar_path: Path, objects: dict[str, list[dict]], source: str | Path
                      ) -> Iterator[dict[str, bytes]]:
    """The samples of the packed shard ``tar_path``, streamed, each json's ``tags`` from ``objects``."""
    from webdataset.tariterators import tarfile_samples

    for sample in tarfile_samples([{"url": str(tar_path)}]):
        meta = json.loads(sample["json"])
        if meta["key"] not in objects:
            raise KeyError(f"{tar_path}: sample {meta['key']} is not in {source}; extract and annotations "
                           "must come from the same dataset")
        meta["tags"] = annotation_tags(objects[meta["key"]])
        yield {**{k: v for k, v in sample.items() if k not in ("__url__", "__local_path__")},
               "json": json.dumps(meta).encode()}
