"""The one reader of files written by ``torch.save``: training checkpoints, exported towers, detector weights.

:func:`load_weights_only` reads a file as data (``torch.load(weights_only=True)`` onto the CPU, memory-mapped
on request), after checking it against its ``sha256sum``-style sidecar when it has one (``NAME.sha256``:
``<hex>  NAME``, written by :func:`write_checksum`). Whatever a damaged file makes torch raise (an
``UnpicklingError``, a ``RuntimeError`` from the zip reader, an ``EOFError``, ...) becomes one
:class:`CorruptCheckpointError` naming the file. torch is imported only here and by the layers that train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from softclip.pipeline.io import atomic_write_text, file_sha256

__all__ = ["CorruptCheckpointError", "checksum_sidecar", "load_weights_only", "verify_checksum", "write_checksum"]

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format; only it can be memory-mapped


class CorruptCheckpointError(ValueError):
    """A torch file is damaged (checksum mismatch, truncated, not written by ``torch.save``); names the file."""


def checksum_sidecar(path: str | Path) -> Path:
    """The checksum file of ``path``: ``step_0001000.pt`` -> ``step_0001000.pt.sha256``."""
    path = Path(path)
    return path.with_name(f"{path.name}.sha256")


def write_checksum(path: str | Path, digest: str) -> Path:
    """Write ``path``'s sidecar (``<digest>  <name>``, what ``sha256sum -c`` checks), atomically."""
    return atomic_write_text(checksum_sidecar(path), f"{digest}  {Path(path).name}\n")


def verify_checksum(path: str | Path, *, hint: str = "use another copy") -> bool:
    """Check ``path`` against its ``.sha256`` sidecar; returns False when there is no sidecar to check.

    Raises:
        CorruptCheckpointError: the checksum differs, or the sidecar is damaged; the message ends with ``hint``.
    """
    path = Path(path)
    sidecar = checksum_sidecar(path)
    if not sidecar.is_file():
        return False
    recorded = sidecar.read_bytes().split(b" ", 1)[0].decode("ascii", errors="replace").strip()
    if len(recorded) != 64:
        raise CorruptCheckpointError(f"{path}: its checksum file {sidecar.name} is damaged; {hint}")
    actual = file_sha256(path)
    if actual != recorded:
        raise CorruptCheckpointError(f"{path}: the file is damaged (checksum sha256 {actual[:12]}... differs from "
                                     f"{recorded[:12]}... in {sidecar.name}); {hint}")
    return True


def load_weights_only(path: str | Path, *, mmap: bool = False, hint: str = "use another copy") -> Any:
    """What ``torch.save`` wrote to ``path``, read with ``weights_only=True`` onto the CPU, after
    :func:`verify_checksum`. With ``mmap`` the tensors stay memory-mapped (files in torch's legacy,
    pre-zip format cannot be, and are read whole).

    Raises:
        FileNotFoundError: there is no such file.
        CorruptCheckpointError: a checksum mismatch, or bytes torch cannot read as data (truncated, random,
            not a torch file, or objects other than tensors and containers); one line naming the file and
            ending with ``hint`` (what the caller can do).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; {hint}")
    verify_checksum(path, hint=hint)
    if mmap:
        with open(path, "rb") as f:
            mmap = f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError:
        raise  # the file system's error (permissions, I/O), not the file's bytes
    except Exception as err:  # noqa: BLE001 - damaged bytes raise anything from IndexError to UnpicklingError
        detail = " ".join(str(err).split())[:200]
        raise CorruptCheckpointError(f"{path}: cannot read the checkpoint: it is truncated, not written by torch.save, "
                                     "or holds objects a weights-only load refuses "
                                     f"({type(err).__name__}: {detail}); {hint}") from err
