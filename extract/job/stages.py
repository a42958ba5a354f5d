"""The CPU stages of the extraction job: read a source shard into rows, decode and validate images.

Rows travel through Ray Data as columns (see :data:`ROW_COLUMNS`). Every sample of a shard becomes one
row with ``index`` its position in the shard; after the last sample comes one *end-of-shard marker*
(``index = -1``, ``shard_total`` = number of samples, ``shard_error`` set when the shard could not be
read at all). The writer on the driver uses the marker to know when a shard is complete, whatever order
the rows arrive in.

Problems never raise here: they become the row's ``error``, ``"<reason>: <detail>"`` with a reason among
:data:`pipeline.images.ERROR_REASONS` (decoding) and ``missing_image``, ``missing_caption``, ``read_error``.

With ``keep_image`` the row also carries the encoded image bytes as stored (``image``), so the writer can
pack the training shard from the same rows; the detector only ever sees the decoded ``pixels``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

from softclip.pipeline.images import ImageDecodeError, decode_image
from softclip.pipeline.sources import (
    DEFAULT_MAX_CAPTION_CHARS,
    DEFAULT_MAX_MEMBER_BYTES,
    SAMPLE_ERROR_REASONS,
    Source,
    SourceError,
    open_source,
)

__all__ = ["ROW_COLUMNS", "decode_sample", "error_reason", "read_shard_rows"]

ROW_COLUMNS = ("key", "shard", "index", "shard_total", "shard_error", "caption", "error", "pixels", "width",
               "height", "image")
_EMPTY_PIXELS = np.zeros((0, 0, 3), np.uint8)


def error_reason(error: str) -> str:
    """The reason part of an error string ``"<reason>: <detail>"``."""
    return error.partition(":")[0].strip()


@functools.lru_cache(maxsize=4)
def _cached_source(spec: str, max_member_bytes: int, max_caption_chars: int) -> Source:
    # A worker process reads many shards of the same dataset; listing it once is enough.
    return open_source(spec, max_member_bytes=max_member_bytes, max_caption_chars=max_caption_chars)


def _row(key: str, shard: str, index: int, *, caption: str = "", error: str = "", pixels: np.ndarray = _EMPTY_PIXELS,
         shard_total: int = -1, shard_error: str = "", image: bytes = b"") -> dict[str, Any]:
    return {"key": key, "shard": shard, "index": index, "shard_total": shard_total, "shard_error": shard_error,
            "caption": caption, "error": error, "pixels": pixels, "width": pixels.shape[1],
            "height": pixels.shape[0], "image": image}


def read_shard_rows(item: dict[str, Any], *, max_pixels: int, require_caption: bool,
                    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
                    keep_image: bool = False) -> Iterator[dict[str, Any]]:
    """Ray ``flat_map`` function (a CPU task per shard): ``{"spec": dataset, "shard": name}`` -> one
    decoded row per sample (see :func:`decode_sample`), then the end-of-shard marker. A shard that cannot
    be opened yields only the marker, with ``shard_error``; a truncated one ends with the samples it had.
    ``max_member_bytes`` and ``max_caption_chars`` are the source's limits (see ``open_source``); with
    ``keep_image`` a row also carries the encoded image bytes (for the packed shard)."""
    spec, name = str(item["spec"]), str(item["shard"])
    count = 0
    try:
        source = _cached_source(spec, max_member_bytes, max_caption_chars)
        shard = next((s for s in source.shards if s.name == name), None)
        if shard is None:
            raise SourceError(f"{spec}: no shard named {name} (was the dataset changed during the run?)")
        for sample in source.iter_shard(shard):
            caption = sample.caption or ""
            if sample.error:
                known = error_reason(sample.error) in SAMPLE_ERROR_REASONS
                pixels, error = _EMPTY_PIXELS, sample.error if known else f"read_error: {sample.error}"
            else:
                pixels, error = decode_sample(sample.image, caption, max_pixels=max_pixels,
                                              require_caption=require_caption)
            yield _row(sample.key, name, count, caption=caption, error=error, pixels=pixels,
                       image=sample.image if keep_image and not error else b"")
            count += 1
    except SourceError as err:
        yield _row("", name, -1, shard_total=count, shard_error=str(err))
        return
    yield _row("", name, -1, shard_total=count)


def decode_sample(image: bytes | None, caption: str, *, max_pixels: int,
                  require_caption: bool) -> tuple[np.ndarray, str]:
    """Validate and decode one sample through :func:`pipeline.images.decode_image` (EXIF orientation, RGB
    conversion, decompression-bomb guard): ``(pixels [H, W, 3] uint8, "")`` or ``([0, 0, 3], error)``."""
    if require_caption and not caption.strip():
        return _EMPTY_PIXELS, "missing_caption: the sample has no caption (.txt or json 'caption')"
    if image is None:
        return _EMPTY_PIXELS, "missing_image: the sample has no image member"
    try:
        return np.asarray(decode_image(image, max_pixels=max_pixels)), ""
    except ImageDecodeError as err:
        return _EMPTY_PIXELS, f"{err.reason}: {err.detail}"
