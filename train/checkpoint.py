"""Training checkpoints: plain dicts that ``torch.load(path, weights_only=True)`` reads.

Layout of ``RUN_DIR/checkpoints/``: one step file per checkpointed step, named by the step zero-padded to
7 digits (``step_0001000.pt``), and ``latest.pt``, always the newest one (both written atomically,
``latest.pt`` last). ``latest.pt`` is a hard link to the newest step file, so it costs no disk space (a copy
on file systems without hard links); deleting step files leaves it intact.
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
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from softclip.pipeline.io import atomic_path

__all__ = ["capture_rng", "checkpoint_path", "resolve_resume", "restore_rng", "save_checkpoint"]


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


def save_checkpoint(run_dir: str | Path, step: int, checkpoint: dict, *, keep: int = 0) -> Path:
    """Write ``checkpoint`` as its step file (fsynced) and then ``latest.pt``, atomically; with
    ``keep > 0`` only ``keep`` step files are kept: this one and the highest-numbered others. Returns the
    step file."""
    path = checkpoint_path(run_dir, step)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
    with atomic_path(path.parent / "latest.pt") as tmp:
        _link_or_copy(path, tmp)
    if keep:
        others = sorted(p for p in path.parent.glob("step_*.pt") if p != path)
        for old in others[: max(len(others) - (keep - 1), 0)]:  # the file just written is always kept
            old.unlink()
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


def resolve_resume(resume: str, run_dir: str | Path) -> Path:
    """The checkpoint file of ``--resume``: ``latest`` means ``RUN_DIR/checkpoints/latest.pt``, or the newest
    step file when a crash came between writing that and linking ``latest.pt``."""
    path = Path(run_dir) / "checkpoints" / "latest.pt" if resume == "latest" else Path(resume)
    if resume == "latest" and not path.is_file():
        path = max(path.parent.glob("step_*.pt"), default=path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: checkpoint {path} does not exist (give a checkpoint file or "
                                "'latest' for the run directory's newest)")
    return path
