"""Image-text sources: img2dataset output (its ``webdataset``, ``parquet`` and ``files`` formats, keys of
any width), WebDataset tars, or an image folder with a captions file.

A source is a list of shards; each shard yields :class:`Sample` objects that carry their shard name, so
stages can work, write and resume shard by shard. Reading never decodes images (that is the stage's job,
through :func:`pipeline.images.decode_image`) and never stops at a bad sample: a truncated member comes
back as a sample with ``error`` set, and the samples before it are yielded as usual. Only a shard that
cannot be opened at all raises :class:`SourceError`.

img2dataset keeps its failed samples out of the data files and records them in its side files
(``NNNNN.parquet`` status column, ``NNNNN_stats.json``); :func:`pipeline.img2dataset.img2dataset_stats`
reads those counts.

Example::

    source = open_source("data/cc3m/{00000..00331}.tar")
    for shard in source.shards:
        for sample in source.iter_shard(shard):
            ...
"""

from __future__ import annotations

import dataclasses
import tarfile
from collections.abc import Iterator
from pathlib import Path

import braceexpand
import polars as pl
import pyarrow.parquet as pq

from softclip.pipeline.samples import (
    DEFAULT_MAX_CAPTION_CHARS,
    DEFAULT_MAX_MEMBER_BYTES,
    IMAGE_EXTENSIONS,
    SAMPLE_ERROR_REASONS,
    Sample,
    SourceError,
    SourceShard,
    make_sample,
    sample_caption,
    split_member,
)
from softclip.pipeline.shards import shard_name

# The sample types and limits are defined in pipeline.samples and also reachable here, where readers look.
__all__ = ["DEFAULT_MAX_CAPTION_CHARS", "DEFAULT_MAX_MEMBER_BYTES", "IMAGE_EXTENSIONS", "SAMPLE_ERROR_REASONS",
           "Sample", "Source", "SourceError", "SourceShard", "expand_shard_spec", "open_source"]

CAPTION_FILES = ("captions.parquet", "captions.jsonl", "captions.csv")
_IMAGE_COLUMNS = ("image", "file", "filename", "path")
_CAPTION_COLUMNS = ("caption", "text")


@dataclasses.dataclass(frozen=True)
class Source:
    """An image-text dataset split into shards."""

    spec: str
    kind: str  # "webdataset", "parquet" or "files" (img2dataset's output formats), or "folder"
    shards: tuple[SourceShard, ...]
    _captions: pl.DataFrame | None = None
    _image_root: Path | None = None
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS

    def iter_shard(self, shard: SourceShard) -> Iterator[Sample]:
        """Yield the samples of ``shard`` in storage order."""
        if self.kind == "webdataset":
            yield from _iter_tar(shard, self.max_member_bytes, self.max_caption_chars)
        elif self.kind == "parquet":
            yield from _iter_parquet(shard, self.max_member_bytes, self.max_caption_chars)
        elif self.kind == "files":
            yield from _iter_files(shard, self.max_member_bytes, self.max_caption_chars)
        else:
            yield from _iter_folder_rows(shard, self._captions, self._image_root, self.max_caption_chars)


def _unsafe_key(key: str) -> str | None:
    """Why ``key`` (a member name up to its first dot) must not become a sample key, or None.

    Keys end up in member names of the packed training shards, so a key that could climb out of a folder
    or mean different files on different systems is refused: absolute, ``..``, empty parts, backslashes,
    NUL and other control characters."""
    if not key or key.startswith("/") or "" in key.split("/"):
        return "is absolute or has an empty path part"
    if ".." in key.split("/"):
        return "has a '..' path part"
    if "\\" in key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "holds a backslash or a control character"
    return None


def _invalid_key(shard: str, position: int) -> str:
    """The key given to an error row whose own key cannot be used: the member's position in the shard."""
    return f"{shard}_invalid_member_{position:06d}"


@dataclasses.dataclass
class _Group:
    """The consecutive members of one key, as read so far."""

    key: str
    members: dict[str, bytes] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)


def _member_problem(member: tarfile.TarInfo, shard: SourceShard, max_member_bytes: int) -> str | None:
    """Why ``member`` is not read (a link, a special file, over the size cap), or None."""
    where = f"member {member.name!r} of {shard.path}"
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        return f"link_member: {where} is a {kind} link to {member.linkname!r}; links are never followed"
    if not member.isfile():
        return f"link_member: {where} is not a regular file (tar type {member.type!r})"
    if member.size > max_member_bytes:
        return (f"member_too_large: {where} is {member.size} bytes, over max_member_bytes={max_member_bytes}; "
                "it was not read (raise the cap to keep such samples)")
    return None


def _finish(group: _Group, shard: SourceShard, seen: dict[str, int], position: int, max_caption_chars: int,
            error: str | None = None) -> Sample:
    """The sample of a finished group: an error row under a substitute key when its key is unusable."""
    key, problems = group.key, list(group.problems)
    if (unsafe := _unsafe_key(key)) is not None:
        names = ", ".join(repr(f"{key}.{suffix}" if suffix else key) for suffix in group.members) or repr(key)
        problems.insert(0, f"unsafe_member: {shard.path} holds member(s) {names} whose key {unsafe}; "
                           "such names are never written anywhere")
        key = _invalid_key(shard.name, position)
    elif key in seen:
        problems.insert(0, f"duplicate_key: key {key!r} appears again in {shard.path} (first as sample "
                           f"{seen[key]}); keys must be unique within a shard")
        key = _invalid_key(shard.name, position)
    seen.setdefault(key, len(seen))
    if problems:
        return Sample(key=key, shard=shard.name, image=None, caption=None, meta={}, error=problems[0])
    return make_sample(key, shard.name, group.members, error, max_caption_chars=max_caption_chars)


def _iter_tar(shard: SourceShard, max_member_bytes: int, max_caption_chars: int) -> Iterator[Sample]:
    try:
        tar = tarfile.open(shard.path, "r")
    except (tarfile.TarError, OSError) as err:
        raise SourceError(f"{shard.path}: cannot open shard as a tar file ({err})") from err
    with tar:
        group: _Group | None = None
        seen: dict[str, int] = {}
        position = 0
        try:
            for position, member in enumerate(tar):
                if member.isdir():
                    continue
                member_key, suffix = split_member(member.name)
                if group is not None and (member_key != group.key or suffix in group.members):  # a repeat
                    # of a suffix is a new sample with the same key: reported as a duplicate, not merged
                    yield _finish(group, shard, seen, position, max_caption_chars)
                    group = None
                group = group or _Group(member_key)
                problem = _member_problem(member, shard, max_member_bytes)
                if problem:
                    group.problems.append(problem)
                    group.members.setdefault(suffix, b"")
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} has {len(data)} of {member.size} bytes")
                group.members[suffix] = data
        except (tarfile.TarError, OSError, EOFError) as err:
            if group is not None:
                yield _finish(group, shard, seen, position + 1, max_caption_chars,  # past the last position used
                              error=f"truncated tar member: {err}")
            return
        if group is not None:
            yield _finish(group, shard, seen, position + 1, max_caption_chars)
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


def _iter_parquet(shard: SourceShard, max_member_bytes: int, max_caption_chars: int) -> Iterator[Sample]:
    """Rows of an img2dataset ``parquet``-format shard; failed rows (status other than ``success``, no
    image) are skipped here and counted from the side files by :func:`pipeline.img2dataset.img2dataset_stats`. Images over
    ``max_member_bytes`` and captions over ``max_caption_chars`` become error rows, as in tars."""
    column = _parquet_image_column(shard.path)
    try:
        batches = pq.ParquetFile(shard.path).iter_batches(batch_size=256)
        for batch in batches:
            for row in batch.to_pylist():
                if row.get("status", "success") != "success":
                    continue
                image = row.pop(column, None)
                caption = row.pop("txt", None)
                caption, error = sample_caption({}, {"caption": caption if caption is not None else row.get("caption")},
                                          max_caption_chars)
                if image is None:
                    error = error or f"row {row.get('key')} of {shard.path} has no {column} bytes"
                elif len(image) > max_member_bytes:
                    error = error or (f"member_too_large: the {column} of row {row.get('key')} of {shard.path} "
                                      f"is {len(image)} bytes, over max_member_bytes={max_member_bytes}")
                yield Sample(key=str(row.get("key")), shard=shard.name, image=None if error else image,
                             caption=caption, meta=row, error=error)
    except OSError as err:
        raise SourceError(f"{shard.path}: cannot read parquet shard ({err})") from err


def _iter_files(shard: SourceShard, max_member_bytes: int, max_caption_chars: int) -> Iterator[Sample]:
    """Samples of an img2dataset ``files``-format shard folder (``<key>.jpg/.txt/.json``), in key order;
    files over ``max_member_bytes`` are not read (an error row, as in tars)."""
    grouped: dict[str, dict[str, Path]] = {}
    for path in sorted(shard.path.iterdir()):
        if path.is_file():
            key, suffix = split_member(path.name)
            grouped.setdefault(key, {})[suffix] = path
    for key, files in grouped.items():
        try:
            large = next((p for p in files.values() if p.stat().st_size > max_member_bytes), None)
            if large is not None:
                members, error = {}, (f"member_too_large: {large} is {large.stat().st_size} bytes, over "
                                      f"max_member_bytes={max_member_bytes}")
            else:
                members, error = {suffix: path.read_bytes() for suffix, path in files.items()}, None
        except OSError as err:
            members, error = {}, f"cannot read a file of sample {key} in {shard.path}: {err.strerror or err}"
        yield make_sample(key, shard.name, members, error=error, max_caption_chars=max_caption_chars)


def _img2dataset_source(spec: str, path: Path, limits: dict[str, int]) -> Source | None:
    """A directory in img2dataset's ``files`` (shard folders) or ``parquet`` (image column) format, else None."""
    folders = sorted(p for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    if folders:
        return Source(spec=spec, kind="files", shards=tuple(SourceShard(name=p.name, path=p) for p in folders),
                      **limits)
    parquets = sorted(p for p in path.glob("*.parquet") if p.stem.isdigit())
    if parquets and _parquet_image_column(parquets[0]) is not None:
        return Source(spec=spec, kind="parquet",
                      shards=tuple(SourceShard(name=p.stem, path=p) for p in parquets), **limits)
    return None


def _iter_folder_rows(shard: SourceShard, captions: pl.DataFrame, image_root: Path,
                      max_caption_chars: int) -> Iterator[Sample]:
    start, stop = shard.rows
    for row in captions.slice(start, stop - start).iter_rows(named=True):
        meta = {k: v for k, v in row.items() if k not in ("image", "caption", "key")}
        meta["image"] = row["image"]
        caption, error = sample_caption({}, {"caption": row["caption"]}, max_caption_chars)
        if error:
            yield Sample(key=row["key"], shard=shard.name, image=None, caption=None, meta=meta, error=error)
            continue
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


def _folder_source(spec: str, captions_path: Path, image_root: Path, samples_per_shard: int,
                   limits: dict[str, int]) -> Source:
    captions = _read_captions(captions_path)
    shards = tuple(
        SourceShard(name=shard_name(i), path=captions_path,
                    rows=(start, min(start + samples_per_shard, captions.height)))
        for i, start in enumerate(range(0, captions.height, samples_per_shard))
    )
    return Source(spec=spec, kind="folder", shards=shards, _captions=captions, _image_root=image_root, **limits)


def expand_shard_spec(spec: str | Path, suffix: str = "tar", *, hint: str = "") -> list[Path]:
    """The shard files of ``spec``: a brace pattern (``cc3m/{00000..00331}.tar``, in its order), a directory
    (its ``*.suffix`` files, sorted) or one file.

    Raises:
        SourceError: a file is missing, or a directory holds no ``*.suffix`` file; the message names the
            spec, the first missing file and ends with ``hint`` (what to check).
    """
    spec = str(spec)
    path = Path(spec)
    end = f"; {hint}" if hint else ""
    if "{" in spec:
        paths = [Path(p) for p in braceexpand.braceexpand(spec)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise SourceError(f"{spec}: {len(missing)} of {len(paths)} shards are missing, e.g. {missing[0]}{end}")
        return paths
    if path.is_dir():
        paths = sorted(path.glob(f"*.{suffix}"))
        if not paths:
            raise SourceError(f"{spec}: no *.{suffix} shards in this directory{end}")
        return paths
    if not path.is_file():
        raise SourceError(f"{spec}: no such file or directory of .{suffix} shards{end}")
    return [path]


def _untarred_source(spec: str, path: Path, samples_per_shard: int, limits: dict[str, int]) -> Source:
    """A directory without tars: an image folder with a captions file, or img2dataset's other formats."""
    for name in CAPTION_FILES:
        if (path / name).is_file():
            return _folder_source(spec, path / name, path, samples_per_shard, limits)
    found = _img2dataset_source(spec, path, limits)
    if found is not None:
        return found
    raise SourceError(f"{spec}: no *.tar shards, no NNNNN.parquet with an image column, no NNNNN/ shard "
                      f"folders and no {' / '.join(CAPTION_FILES)} in this directory; expected an "
                      "img2dataset output folder (webdataset, parquet or files format) or an image folder "
                      "with a captions file")


def open_source(spec: str | Path, *, samples_per_shard: int = 10_000,
                max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> Source:
    """Open a dataset given as a directory of tars, a brace pattern (``cc3m/{00000..00331}.tar``), one tar,
    a captions file (.csv/.jsonl/.parquet with image and caption columns; image paths relative to it), or
    a directory holding ``captions.{parquet,jsonl,csv}``. Raises :class:`SourceError` when nothing usable
    is there, saying what was expected.

    A tar member over ``max_member_bytes`` (checked from its header, before reading) and a caption over
    ``max_caption_chars`` characters make their sample an error row."""
    if max_member_bytes < 1 or max_caption_chars < 1:
        raise ValueError(f"max_member_bytes and max_caption_chars must be positive, got {max_member_bytes} "
                         f"and {max_caption_chars}")
    limits = {"max_member_bytes": max_member_bytes, "max_caption_chars": max_caption_chars}
    spec = str(spec)
    path = Path(spec)
    if path.is_dir() and "{" not in spec and not any(path.glob("*.tar")):
        return _untarred_source(spec, path, samples_per_shard, limits)
    if "{" in spec or path.is_dir() or (path.is_file() and path.suffix == ".tar"):
        tars = expand_shard_spec(spec)
    elif path.is_file() and path.suffix in (".csv", ".jsonl", ".parquet"):
        return _folder_source(spec, path, path.parent, samples_per_shard, limits)
    else:
        raise SourceError(f"{spec}: no such dataset (expected a directory of .tar shards, a brace pattern, "
                          "a .tar file, or a captions .csv/.jsonl/.parquet file)")
    shards = tuple(SourceShard(name=p.name.removesuffix(".tar"), path=p) for p in tars)
    first: dict[str, Path] = {}
    for shard in shards:
        if first.setdefault(shard.name, shard.path) != shard.path:
            raise SourceError(f"{spec}: two shards are named {shard.name} ({first[shard.name]} and {shard.path}); "
                              "shard names key the extracted shards, so each file name must appear once")
    return Source(spec=spec, kind="webdataset", shards=shards, **limits)
