"""Training checkpoints: plain dicts that ``torch.load(path, weights_only=True)`` reads.

Layout of ``RUN_DIR/checkpoints/``: one step file per checkpointed step, named by the step zero-padded to
7 digits (``step_0001000.pt``), and ``latest.pt``, always the newest one (both written atomically,
``latest.pt`` last). ``latest.pt`` is a hard link to the newest step file, so it costs no disk space (a copy
on file systems without hard links); deleting step files leaves it intact. Beside each file, a
``sha256sum``-style sidecar (``step_0001000.pt.sha256``: ``<hex>  step_0001000.pt``) holds its checksum:
:func:`load_checkpoint` refuses a file that does not match it, and resuming from ``latest`` falls back to
the newest intact step file (``sha256sum -c *.sha256`` checks them by hand). A file without a sidecar
(written before checksums existed) loads unverified, with a warning.
A checkpoint holds:

- ``state_dict``: the open_clip ``CLIP`` state dict in open_clip's own layout (what
  ``open_clip.create_model_and_transforms(model_name, pretrained=path)`` loads);
- ``model_name`` (str) and ``model_config`` (open_clip's model config dict);
- ``roi_state_dict``: the ROI branch; ``optimizer``: AdamW's state dict;
- ``step`` (optimizer steps done), ``epoch``, ``data_position`` (per rank, per worker ``[consumed,
  batches]`` of the current epoch), ``rng`` (torch CPU / CUDA, numpy and Python states as tensors and
  lists), ``config`` (the resolved training config as a plain dict).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from softclip.pipeline.io import HashingWriter, atomic_path, disk_full_names
from softclip.pipeline.torchio import (
    CorruptCheckpointError,
    checksum_sidecar,
    load_weights_only,
    verify_checksum,
    write_checksum,
)

__all__ = ["CorruptCheckpointError", "capture_rng", "checkpoint_path", "load_checkpoint", "resolve_resume",
           "restore_rng", "save_checkpoint"]

log = logging.getLogger(__name__)

# What a killed save leaves: pipeline.io names its temporaries ``.tmp-<final name>.<random>``.
_STALE_PATTERNS = (".tmp-step_*.pt.*", ".tmp-latest.pt.*")


# What to do about a damaged checkpoint, ending each CorruptCheckpointError.
_RESUME_HINT = "resume from another checkpoints/step_*.pt"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """The step file of ``step``: ``RUN_DIR/checkpoints/step_0001000.pt`` for step 1000."""
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}.pt"


def capture_rng() -> dict:
    """Every RNG state the training process uses, as weights-only-loadable values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng(state: dict) -> None:
    """Restore what :func:`capture_rng` saved (CUDA states only when as many devices are visible)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _write_step_file(path: Path, checkpoint: dict) -> str:
    """Write ``path`` atomically and fsynced; returns its SHA-256. A full disk raises DiskFullError."""
    with disk_full_names(path), atomic_path(path) as tmp, HashingWriter(tmp) as f:
        try:
            torch.save(checkpoint, f)
        except RuntimeError as err:
            if f.error is None:
                raise
            raise f.error from err  # the OSError torch hid (ENOSPC: named by disk_full_names)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it visible
        return f.hexdigest()


def save_checkpoint(run_dir: str | Path, step: int, checkpoint: dict, *, keep: int = 0) -> Path:
    """Write ``checkpoint`` as its step file (fsynced) with its checksum sidecar, then ``latest.pt`` (and
    its sidecar), atomically; with ``keep > 0`` only ``keep`` step files are kept: this one and the
    highest-numbered others. Temporaries left by a killed save are removed. Returns the step file.

    Raises:
        DiskFullError: the disk filled up; the message names the file, earlier checkpoints are intact.
    """
    path = checkpoint_path(run_dir, step)
    digest = _write_step_file(path, checkpoint)
    write_checksum(path, digest)
    latest = path.parent / "latest.pt"
    with disk_full_names(latest), atomic_path(latest) as tmp:
        _link_or_copy(path, tmp)
    write_checksum(latest, digest)
    if keep:
        others = sorted(p for p in path.parent.glob("step_*.pt") if p != path)
        for old in others[: max(len(others) - (keep - 1), 0)]:  # the file just written is always kept
            old.unlink()
            checksum_sidecar(old).unlink(missing_ok=True)
    for pattern in _STALE_PATTERNS:  # a save killed earlier (only rank 0 saves: none of these is live)
        for stale in path.parent.glob(pattern):
            stale.unlink(missing_ok=True)
    return path


# errno values of a file system that has no hard links (FAT, some FUSE and network mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK}


def _link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` (replacing it) a hard link to ``source``, or a copy where links are not supported."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
        shutil.copyfile(source, target)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint dict from ``path``, read by :func:`softclip.pipeline.torchio.load_weights_only` (checked
    against its checksum sidecar, then ``torch.load(weights_only=True)`` on the CPU).

    Raises:
        FileNotFoundError: there is no such file.
        CorruptCheckpointError: a checksum mismatch, or a file torch cannot read (truncated, random
            bytes, not a dict); one line naming the file.
    """
    if Path(path).is_file() and not checksum_sidecar(path).is_file():
        log.warning("%s has no checksum file (%s): loading it unverified", path, checksum_sidecar(path).name)
    checkpoint = load_weights_only(path, hint=_RESUME_HINT)
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def resolve_resume(resume: str, run_dir: str | Path) -> Path:
    """The checkpoint file of ``--resume``: a path (checked against its checksum), or ``latest``: the newest
    intact one of ``RUN_DIR/checkpoints/latest.pt`` and its step files (a damaged ``latest.pt`` falls back
    to the newest step file that matches its checksum, with a warning saying which).

    Raises:
        FileNotFoundError: no such checkpoint.
        CorruptCheckpointError: the given file is damaged, or (``latest``) every checkpoint is.
    """
    if resume != "latest":
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: checkpoint {path} does not exist (give a checkpoint file or "
                                    "'latest' for the run directory's newest)")
        verify_checksum(path, hint=_RESUME_HINT)
        return path
    folder = Path(run_dir) / "checkpoints"
    candidates = [p for p in [folder / "latest.pt", *sorted(folder.glob("step_*.pt"), reverse=True)] if p.is_file()]
    if not candidates:
        raise FileNotFoundError(f"cannot resume: checkpoint {folder / 'latest.pt'} does not exist (give a checkpoint "
                                "file or 'latest' for the run directory's newest)")
    problems = []
    for path in candidates:
        try:
            verify_checksum(path, hint=_RESUME_HINT)
        except CorruptCheckpointError as err:
            problems.append(str(err))
            continue
        if problems:
            log.warning("resuming from %s, the newest intact checkpoint: %s", path, "; ".join(problems))
        return path
    raise CorruptCheckpointError(f"{folder}: no intact checkpoint to resume from ({'; '.join(problems)}); "
                                 "start a new run_dir")
