"""One image-text sample as every source reads it, and the checks every reader applies to one: the
WebDataset member-name convention, the caption (strict UTF-8, capped in length) and the json metadata.

A reader (:mod:`pipeline.sources`) never raises for a bad sample: it returns a :class:`Sample` whose
``error`` starts with one of :data:`SAMPLE_ERROR_REASONS` (or is a read error), so a stage can count it and
go on. Only a shard that cannot be opened at all raises :class:`SourceError`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

__all__ = ["DEFAULT_MAX_CAPTION_CHARS", "DEFAULT_MAX_MEMBER_BYTES", "IMAGE_EXTENSIONS", "SAMPLE_ERROR_REASONS",
           "Sample", "SourceError", "SourceShard", "make_sample", "sample_caption", "split_member"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
DEFAULT_MAX_MEMBER_BYTES = 64 << 20  # a tar member larger than this is an error row, never read
DEFAULT_MAX_CAPTION_CHARS = 4096  # CLIP reads 77 tokens; a longer caption is an error row
# The reasons a sample's ``error`` may start with (``"<reason>: <detail>"``); other errors are read errors.
SAMPLE_ERROR_REASONS = ("unsafe_member", "link_member", "duplicate_key", "member_too_large", "bad_caption",
                        "caption_too_long")


class SourceError(ValueError):
    """A dataset or one of its shards cannot be read at all."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Sample:
    """One image-text pair as stored; ``image`` is the encoded file, ``error`` a read problem."""

    key: str
    shard: str
    image: bytes | None
    caption: str | None
    meta: dict
    error: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SourceShard:
    """A unit of work: a tar file, an img2dataset parquet file or ``files`` folder, or a slice of rows of a
    captions file."""

    name: str
    path: Path
    rows: tuple[int, int] | None = None  # [start, stop) rows of a captions file


def split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), suffix.lower()


def sample_caption(members: dict[str, bytes], meta: dict, max_chars: int) -> tuple[str | None, str | None]:
    """``(caption, error)``: the .txt member (strict UTF-8) or the json's ``caption``, capped in length."""
    if "txt" in members:
        try:
            caption = members["txt"].decode("utf-8")
        except UnicodeDecodeError as err:
            return None, f"bad_caption: the .txt member is not UTF-8 (byte {err.start}); re-encode it as UTF-8"
    else:
        caption = meta.get("caption")
        if caption is not None and not isinstance(caption, str):
            return None, f"bad_caption: the json caption is a {type(caption).__name__}, not text"
    if caption is not None and len(caption) > max_chars:
        return None, (f"caption_too_long: {len(caption)} characters, over max_caption_chars={max_chars} "
                      "(raise it to keep such captions)")
    return caption, None


def make_sample(key: str, shard: str, members: dict[str, bytes], error: str | None = None, *,
                max_caption_chars: int) -> Sample:
    """The sample of one key's members (suffix -> bytes): its json metadata, caption and first image member;
    the first problem found becomes its ``error`` (and then it carries no image)."""
    meta: dict = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            error = error or f"unreadable json member: {err}"
        if not isinstance(meta, dict):
            meta, error = {}, error or f"json member is a {type(meta).__name__}, not an object"
    caption, caption_error = sample_caption(members, meta, max_caption_chars)
    error = error or caption_error
    image = None if error else next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    return Sample(key=key, shard=shard, image=image, caption=caption, meta=meta, error=error)
