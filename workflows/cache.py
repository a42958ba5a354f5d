"""A content-addressed artifact cache.

An artifact is a folder ``CACHE/<kind>/<key>/`` made by one stage. Its key is a hash of the stage's own
settings and of the keys of its inputs, so the same dataset and detector always map to the same extracted
shards, and changing a training hyper-parameter changes only the training and evaluation keys. An
artifact counts only once its ``artifact.json`` says ``complete``: the stage writes into the folder, the
runner writes the marker last (atomically). An interrupted stage leaves a folder without the marker;
the next run hands the same folder back to the stage, which continues where it stopped. A marker that
cannot be read (a disk that filled up, a hand edit) makes the artifact ``corrupt``: listed as such, and
treated like an incomplete one.

A running workflow *holds* each artifact it uses: a shared ``flock`` on the artifact's lock file
``CACHE/<kind>/.<key>.lock`` (beside its folder, which stages want to themselves), kept until the run ends. :meth:`ArtifactCache.gc` deletes only artifacts it can lock exclusively and names
the others as in use. The operating system drops the locks of a process that dies, even by SIGKILL, so a
crashed run never leaves a stale lock.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from softclip.pipeline.config import config_hash
from softclip.pipeline.io import atomic_write_json, file_sha256

__all__ = ["Artifact", "ArtifactCache", "ArtifactInUseError", "CorruptArtifactError", "artifact_key", "default_cache_dir",
           "file_fingerprint", "tree_fingerprint"]

MARKER = "artifact.json"


class CorruptArtifactError(ValueError):
    """An artifact's ``artifact.json`` is not a JSON object; the message names the file."""


class ArtifactInUseError(RuntimeError):
    """An artifact to be recomputed is held by another running workflow."""


def default_cache_dir() -> Path:
    """``$SOFTCLIP_CACHE``, or ``./cache`` when it is unset."""
    return Path(os.environ.get("SOFTCLIP_CACHE", "cache"))


def artifact_key(kind: str, settings: Any, inputs: dict[str, str]) -> str:
    """The cache key: :func:`pipeline.config.config_hash` of the kind, the settings and the input keys."""
    return config_hash({"kind": kind, "settings": settings, "inputs": inputs})


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of a file's bytes (memoised by path, size and modification time within a process)."""
    stat = Path(path).stat()
    memo_key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _SHA_MEMO:
        _SHA_MEMO[memo_key] = file_sha256(path)
    return _SHA_MEMO[memo_key]


def tree_fingerprint(path: str | Path, *, max_depth: int | None = None) -> str:
    """A cheap fingerprint of a user-provided dataset: names, sizes and modification times of its files.

    Hashing the bytes of a multi-terabyte dataset is not practical; a changed, added or removed file
    changes this fingerprint. With ``max_depth``, only entries (files and folders) that many levels down
    are read: a folder's modification time changes when an entry is added to or removed from it, so depth 1
    notices a half-copied image folder with one ``stat`` per entry of the top folder."""
    root = Path(path)
    if root.is_file():
        entries = [root]
    elif max_depth is None:
        entries = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        entries = sorted(_entries_to_depth(root, max_depth))
    digest = hashlib.sha256()
    for p in entries:
        stat = p.stat()
        digest.update(f"{p.relative_to(root) if p != root else p.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _entries_to_depth(folder: Path, depth: int) -> Iterator[Path]:
    for child in folder.iterdir():
        yield child
        if depth > 1 and child.is_dir():
            yield from _entries_to_depth(child, depth - 1)


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One cache entry: ``path`` holds the stage's output, ``path / artifact.json`` its record."""

    kind: str
    key: str
    path: Path

    @property
    def state(self) -> str:
        """``complete``, ``partial`` (no marker yet: a stage was interrupted) or ``corrupt`` (unreadable marker)."""
        try:
            record = self.record()
        except CorruptArtifactError:
            return "corrupt"
        return "complete" if record.get("complete", False) else "partial"

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    def record(self) -> dict[str, Any]:
        """The marker's content, ``{}`` when there is none yet.

        Raises:
            CorruptArtifactError: the marker is not a JSON object (empty, truncated, not UTF-8)."""
        marker = self.path / MARKER
        if not marker.is_file():
            return {}
        try:
            record = json.loads(marker.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptArtifactError(f"{marker}: not a readable artifact marker ({err})") from err
        if not isinstance(record, dict):
            raise CorruptArtifactError(f"{marker}: not a readable artifact marker (a JSON {type(record).__name__})")
        return record

    def mark_complete(self, *, settings: Any, inputs: dict[str, str], made_by: str, seconds: float,
                      outputs: dict[str, Any] | None = None) -> None:
        atomic_write_json(self.path / MARKER, {
            "kind": self.kind, "key": self.key, "complete": True, "made_by": made_by,
            "settings": settings, "inputs": inputs, "outputs": outputs or {}, "seconds": round(seconds, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })

    def size_bytes(self) -> int:
        """Disk bytes of the artifact's files, hard links (``latest.pt``) counted once."""
        stats = {(s.st_dev, s.st_ino): s.st_size for s in (p.stat() for p in self.path.rglob("*") if p.is_file())}
        return sum(stats.values())


def _lock_path(artifact: Artifact) -> Path:
    return artifact.path.parent / f".{artifact.key}.lock"


def _lock(artifact: Artifact, mode: int) -> int | None:
    """An fd holding ``flock(mode)`` on the artifact's lock file (made if missing), or None when ``mode``
    has ``LOCK_NB`` and another process holds a conflicting lock. A lock taken on a file that a concurrent
    gc removed meanwhile is retaken on a new file."""
    path = _lock_path(artifact)
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(current, os.fstat(fd)):
            return fd
        os.close(fd)  # gc removed the lock file between our open and our lock: lock a new one


class ArtifactCache:
    """The artifacts under one cache folder."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self._held: dict[Path, int] = {}

    def hold(self, artifact: Artifact) -> None:
        """Mark ``artifact`` in use by this process until :meth:`release` (or the process ends): ``gc`` in
        any process then keeps it. Waits while a gc is deleting it."""
        if artifact.path not in self._held:
            self._held[artifact.path] = _lock(artifact, fcntl.LOCK_SH)

    def release(self) -> None:
        """Drop every hold this cache object took."""
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()

    def artifact(self, kind: str, key: str) -> Artifact:
        return Artifact(kind=kind, key=key, path=self.root / kind / key)

    def list(self) -> list[Artifact]:
        """Every artifact folder, complete or not, oldest kind first."""
        if not self.root.is_dir():
            return []
        return [Artifact(kind=kind_dir.name, key=path.name, path=path)
                for kind_dir in sorted(self.root.iterdir()) if kind_dir.is_dir()
                for path in sorted(kind_dir.iterdir()) if path.is_dir()]

    def remove(self, artifact: Artifact) -> bool:
        """Delete ``artifact`` unless a running workflow holds it; returns whether it was deleted."""
        fd = _lock(artifact, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:
            return False
        try:
            if artifact.path.exists():
                shutil.rmtree(artifact.path)
            _lock_path(artifact).unlink(missing_ok=True)  # a run that opened it meanwhile retakes a new one
        finally:
            os.close(fd)
        return True

    def gc(self, keep: set[str] | None = None) -> tuple[list[Artifact], list[Artifact]]:
        """Delete the artifacts whose key is not in ``keep``; without ``keep``, the incomplete (and corrupt)
        ones. An incomplete artifact in ``keep`` stays: the next run resumes it, and so does one a running
        workflow holds (see :meth:`hold`). Returns ``(deleted, kept because in use)``."""
        removed, in_use = [], []
        for artifact in self.list():
            unused = artifact.key not in keep if keep is not None else not artifact.complete
            if unused:
                (removed if self.remove(artifact) else in_use).append(artifact)
        return removed, in_use
