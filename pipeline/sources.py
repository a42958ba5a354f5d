"""Image-text sources: img2dataset output (its ``webdataset``, ``parquet`` and ``files`` formats, keys of
any width), WebDataset tars, or an image folder with a captions file.

A source is a list of shards; each shard yields :class:`Sample` objects that carry their shard name, so
stages can work, write and resume shard by shard. Reading never decodes images (that is the stage's job,
through :func:`pipeline.images.decode_image`) and never stops at a bad sample: a truncated member comes
back as a sample with ``error`` set, and the samples before it are yielded as usual. Only a shard that
cannot be opened at all raises :class:`SourceError`.

img2dataset keeps its failed samples out of the data files and records them in its side files
(``NNNNN.parquet`` status column, ``NNNNN_stats.json``); :func:`img2dataset_stats` reads those counts.

Example::

    source = open_source("data/cc3m/{00000..00331}.tar")
    for shard in source.shards:
        for sample in source.iter_shard(shard):
            ...
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import braceexpand
import polars as pl
import pyarrow.parquet as pq

from softclip.pipeline.shards import shard_name

__all__ = ["IMAGE_EXTENSIONS", "Sample", "Source", "SourceError", "SourceShard", "img2dataset_stats", "open_source"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
CAPTION_FILES = ("captions.parquet", "captions.jsonl", "captions.csv")
_IMAGE_COLUMNS = ("image", "file", "filename", "path")
_CAPTION_COLUMNS = ("caption", "text")


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


@dataclasses.dataclass(frozen=True)
class Source:
    """An image-text dataset split into shards."""

    spec: str
    kind: str  # "webdataset", "parquet" or "files" (img2dataset's output formats), or "folder"
    shards: tuple[SourceShard, ...]
    _captions: pl.DataFrame | None = None
    _image_root: Path | None = None

    def iter_shard(self, shard: SourceShard) -> Iterator[Sample]:
        """Yield the samples of ``shard`` in storage order."""
        if self.kind == "webdataset":
            yield from _iter_tar(shard)
        elif self.kind == "parquet":
            yield from _iter_parquet(shard)
        elif self.kind == "files":
            yield from _iter_files(shard)
        else:
            yield from _iter_folder_rows(shard, self._captions, self._image_root)


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), suffix.lower()


def _make_sample(key: str, shard: str, members: dict[str, bytes], error: str | None = None) -> Sample:
    meta: dict = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            error = error or f"unreadable json member: {err}"
        if not isinstance(meta, dict):
            meta, error = {}, error or f"json member is a {type(meta).__name__}, not an object"
    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    caption = members["txt"].decode("utf-8", errors="replace") if "txt" in members else meta.get("caption")
    return Sample(key=key, shard=shard, image=image, caption=caption, meta=meta, error=error)


def _iter_tar(shard: SourceShard) -> Iterator[Sample]:
    try:
        tar = tarfile.open(shard.path, "r")
    except (tarfile.TarError, OSError) as err:
        raise SourceError(f"{shard.path}: cannot open shard as a tar file ({err})") from err
    with tar:
        key, members = None, {}
        try:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, suffix = _split_member(member.name)
                if key is not None and member_key != key:
                    yield _make_sample(key, shard.name, members)
                    members = {}
                key = member_key
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} has {len(data)} of {member.size} bytes")
                members[suffix] = data
        except (tarfile.TarError, OSError, EOFError) as err:
            if key is not None:
                yield _make_sample(key, shard.name, members, error=f"truncated tar member: {err}")
            return
        if key is not None:
            yield _make_sample(key, shard.name, members)
        cut = _end_of_archive_missing(tar)
        if cut is not None:  # tarfile ends quietly at a cut-off or garbled header: say so as an error row
            yield Sample(key=f"truncated_at_byte_{cut}", shard=shard.name, image=None, caption=None, meta={},
                         error=f"truncated tar: {shard.path} has no end-of-archive block at byte {cut}, after "
                               "its last complete member; the samples after it are lost (re-create this shard)")


def _end_of_archive_missing(tar: tarfile.TarFile) -> int | None:
    """The offset where ``tar``'s iteration stopped when no zero block (tar's end-of-archive marker) is there."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    return None if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0") else tar.offset


def _parquet_image_column(path: Path) -> str | None:
    """The image column of an img2dataset ``parquet``-format file (``jpg``, ``png``, ``webp``), if any."""
    try:
        names = pq.read_schema(path).names
    except (OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError) for a non-parquet file
        raise SourceError(f"{path}: cannot read the parquet schema ({err})") from err
    return next((ext for ext in IMAGE_EXTENSIONS if ext in names), None)


def _iter_parquet(shard: SourceShard) -> Iterator[Sample]:
    """Rows of an img2dataset ``parquet``-format shard; failed rows (status other than ``success``, no
    image) are skipped here and counted from the side files by :func:`img2dataset_stats`."""
    column = _parquet_image_column(shard.path)
    try:
        batches = pq.ParquetFile(shard.path).iter_batches(batch_size=256)
        for batch in batches:
            for row in batch.to_pylist():
                if row.get("status", "success") != "success":
                    continue
                image = row.pop(column, None)
                caption = row.pop("txt", None)
                caption = caption if caption is not None else row.get("caption")
                yield Sample(key=str(row.get("key")), shard=shard.name, image=image, caption=caption, meta=row,
                             error=None if image is not None else f"row {row.get('key')} has no {column} bytes")
    except OSError as err:
        raise SourceError(f"{shard.path}: cannot read parquet shard ({err})") from err


def _iter_files(shard: SourceShard) -> Iterator[Sample]:
    """Samples of an img2dataset ``files``-format shard folder (``<key>.jpg/.txt/.json``), in key order."""
    grouped: dict[str, dict[str, Path]] = {}
    for path in sorted(shard.path.iterdir()):
        if path.is_file():
            key, suffix = _split_member(path.name)
            grouped.setdefault(key, {})[suffix] = path
    for key, files in grouped.items():
        try:
            members, error = {suffix: path.read_bytes() for suffix, path in files.items()}, None
        except OSError as err:
            members, error = {}, f"cannot read a file of sample {key} in {shard.path}: {err.strerror or err}"
        yield _make_sample(key, shard.name, members, error=error)


def _img2dataset_source(spec: str, path: Path) -> Source | None:
    """A directory in img2dataset's ``files`` (shard folders) or ``parquet`` (image column) format, else None."""
    folders = sorted(p for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    if folders:
        return Source(spec=spec, kind="files", shards=tuple(SourceShard(name=p.name, path=p) for p in folders))
    parquets = sorted(p for p in path.glob("*.parquet") if p.stem.isdigit())
    if parquets and _parquet_image_column(parquets[0]) is not None:
        return Source(spec=spec, kind="parquet",
                      shards=tuple(SourceShard(name=p.stem, path=p) for p in parquets))
    return None


def img2dataset_stats(source: Source) -> dict[str, dict]:
    """img2dataset's per-shard record (``NNNNN_stats.json`` beside the shards), by shard name, for every
    stats file there, including shards whose every sample failed (they have no data to read).

    Each value holds ``count``, ``successes``, ``failed_to_download``, ``failed_to_resize`` and
    ``status_dict`` (reason -> count) as img2dataset writes them. Empty for sources without side files.
    """
    whole_folder = Path(source.spec).is_dir()  # else a pattern or one file: only its own shards count
    names = {shard.name for shard in source.shards}
    stats = {}
    for folder in sorted({shard.path.parent for shard in source.shards} | ({Path(source.spec)} if whole_folder else set())):
        for path in sorted(folder.glob("*_stats.json")):
            if not whole_folder and path.name.removesuffix("_stats.json") not in names:
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise SourceError(f"{path}: unreadable img2dataset stats ({err})") from err
            if not isinstance(data, dict) or not isinstance(data.get("count"), int):
                raise SourceError(f"{path}: not an img2dataset stats file (no integer 'count')")
            stats[path.name.removesuffix("_stats.json")] = data
    return stats


def _iter_folder_rows(shard: SourceShard, captions: pl.DataFrame, image_root: Path) -> Iterator[Sample]:
    start, stop = shard.rows
    for row in captions.slice(start, stop - start).iter_rows(named=True):
        meta = {k: v for k, v in row.items() if k not in ("image", "caption", "key")}
        meta["image"] = row["image"]
        if not row["image"]:
            yield Sample(key=row["key"], shard=shard.name, image=None, caption=row["caption"], meta=meta,
                         error=f"row {row['key']} of {shard.path} has no image path")
            continue
        image_path = image_root / row["image"]
        try:
            image, error = image_path.read_bytes(), None
        except OSError as err:
            image, error = None, f"cannot read image file {image_path}: {err.strerror or err}"
        yield Sample(key=row["key"], shard=shard.name, image=image, caption=row["caption"], meta=meta, error=error)


def _read_captions(path: Path) -> pl.DataFrame:
    if path.suffix == ".parquet":
        frame = pl.read_parquet(path)
    elif path.suffix == ".jsonl":
        frame = pl.read_ndjson(path)
    elif path.suffix == ".csv":
        frame = pl.read_csv(path, infer_schema=False)
    else:
        raise SourceError(f"{path}: captions file must be .csv, .jsonl or .parquet")
    image_col = next((c for c in _IMAGE_COLUMNS if c in frame.columns), None)
    caption_col = next((c for c in _CAPTION_COLUMNS if c in frame.columns), None)
    if image_col is None or caption_col is None:
        raise SourceError(f"{path}: needs an image column (one of {', '.join(_IMAGE_COLUMNS)}) and a caption "
                          f"column (one of {', '.join(_CAPTION_COLUMNS)}); found {', '.join(frame.columns)}")
    frame = frame.rename({image_col: "image", caption_col: "caption"})
    if "key" not in frame.columns:
        frame = frame.with_row_index("key").with_columns(pl.col("key").cast(pl.String).str.zfill(9))
    frame = frame.with_columns(pl.col("key").cast(pl.String))
    dotted = frame.filter(pl.col("key").str.contains(".", literal=True))["key"]
    if len(dotted):
        raise SourceError(f"{path}: {len(dotted)} keys contain '.' (e.g. {dotted[0]!r}); WebDataset shards split "
                          "member names at the first dot of the key, so rename them or drop the key column")
    return frame


def _folder_source(spec: str, captions_path: Path, image_root: Path, samples_per_shard: int) -> Source:
    captions = _read_captions(captions_path)
    shards = tuple(
        SourceShard(name=shard_name(i), path=captions_path,
                    rows=(start, min(start + samples_per_shard, captions.height)))
        for i, start in enumerate(range(0, captions.height, samples_per_shard))
    )
    return Source(spec=spec, kind="folder", shards=shards, _captions=captions, _image_root=image_root)


def open_source(spec: str | Path, *, samples_per_shard: int = 10_000) -> Source:
    """Open a dataset given as a directory of tars, a brace pattern (``cc3m/{00000..00331}.tar``), one tar,
    a captions file (.csv/.jsonl/.parquet with image and caption columns; image paths relative to it), or
    a directory holding ``captions.{parquet,jsonl,csv}``. Raises :class:`SourceError` when nothing usable
    is there, saying what was expected."""
    spec = str(spec)
    path = Path(spec)
    if "{" in spec:
        paths = [Path(p) for p in braceexpand.braceexpand(spec)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise SourceError(f"{spec}: {len(missing)} of {len(paths)} shards are missing, e.g. {missing[0]}")
        tars = paths
    elif path.is_dir():
        tars = sorted(path.glob("*.tar"))
        if not tars:
            for name in CAPTION_FILES:
                if (path / name).is_file():
                    return _folder_source(spec, path / name, path, samples_per_shard)
            found = _img2dataset_source(spec, path)
            if found is not None:
                return found
            raise SourceError(f"{spec}: no *.tar shards, no NNNNN.parquet with an image column, no NNNNN/ shard "
                              f"folders and no {' / '.join(CAPTION_FILES)} in this directory; expected an "
                              "img2dataset output folder (webdataset, parquet or files format) or an image folder "
                              "with a captions file")
    elif path.is_file() and path.suffix == ".tar":
        tars = [path]
    elif path.is_file() and path.suffix in (".csv", ".jsonl", ".parquet"):
        return _folder_source(spec, path, path.parent, samples_per_shard)
    else:
        raise SourceError(f"{spec}: no such dataset (expected a directory of .tar shards, a brace pattern, "
                          "a .tar file, or a captions .csv/.jsonl/.parquet file)")
    shards = tuple(SourceShard(name=p.name.removesuffix(".tar"), path=p) for p in tars)
    first: dict[str, Path] = {}
    for shard in shards:
        if first.setdefault(shard.name, shard.path) != shard.path:
            raise SourceError(f"{spec}: two shards are named {shard.name} ({first[shard.name]} and {shard.path}); "
                              "shard names key the extracted shards, so each file name must appear once")
    return Source(spec=spec, kind="webdataset", shards=shards)
