"""Atomic file writes: a temporary file in the same folder, then ``os.replace``.

A reader never sees a half-written file, and a crash leaves at worst a ``.tmp-*`` file that readers
ignore (the extraction job deletes its own on the next run). Files get the permissions a plain ``open``
would give them (``0o666`` less the umask), not ``mkstemp``'s owner-only ``0o600``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["DiskFullError", "HashingWriter", "atomic_path", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text", "disk_full_names", "file_sha256", "temporary_file_beside"]

_UMASK = os.umask(0)  # read once at import (os.umask can only be read by setting it) ...
os.umask(_UMASK)  # ... and put back at once


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class DiskFullError(OSError):
    """The disk (or the quota) filled up while writing a file; the message names the file."""

    def __str__(self) -> str:
        return str(self.strerror)


@contextlib.contextmanager
def disk_full_names(path: str | Path) -> Iterator[None]:
    """Turn an ``ENOSPC``/``EDQUOT`` error inside the block into a :class:`DiskFullError` naming ``path``
    (the error alone says "No space left on device", not where); other errors pass unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as err:
        if err.errno not in _DISK_FULL:
            raise
        raise DiskFullError(err.errno, f"disk full writing {path} ({err.strerror}); free space there, then "
                                       "rerun (finished work is kept)") from err


def temporary_file_beside(path: Path) -> Path:
    """Create an empty ``.tmp-<name>.*`` file in ``path``'s folder (made if missing), mode ``0o666 & ~umask``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    os.chmod(tmp_name, 0o666 & ~_UMASK)
    return Path(tmp_name)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, else removed.

    Example::

        with atomic_path("out/00000.parquet") as tmp:
            pq.write_table(table, tmp)
    """
    path = Path(path)
    tmp = temporary_file_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and fsync it."""
    path = Path(path)
    with disk_full_names(path), atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class HashingWriter:
    """A file opened for writing (truncated) that keeps the SHA-256 and size of what is written, so the
    checksum of a file written front to back (Parquet, tar streams) needs no second read. It has the
    methods pyarrow and tarfile write through; seeking is not supported.

    Example::

        with HashingWriter(tmp) as f:
            f.write(data)
        assert f.hexdigest() == file_sha256(tmp) and f.size == len(data)
    """

    def __init__(self, path: str | Path):
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._digest = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None  # the first failed write (torch.save hides it in a RuntimeError)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        try:
            written = self._file.write(view)
        except OSError as err:
            self.error = self.error or err
            raise
        self._digest.update(view[:written])
        self.size += written
        return written

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        self._file.close()

    def hexdigest(self) -> str:
        """Hex SHA-256 of everything written so far."""
        return self._digest.hexdigest()

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
