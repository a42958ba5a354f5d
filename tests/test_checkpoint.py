"""Checkpoint files: ``latest.pt`` is the newest step without a second copy on disk; ``keep`` prunes step files."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from softclip.train.checkpoint import resolve_resume, save_checkpoint


def _save(run_dir, steps, **kwargs):
    for step in steps:
        save_checkpoint(run_dir, step, {"step": step, "weight": torch.full((4,), float(step))}, **kwargs)
    return run_dir / "checkpoints"


def _names(folder):
    """The checkpoint files of ``folder`` (their ``.sha256`` sidecars are tested in test_checkpoint_integrity)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".sha256"))


def test_latest_is_a_link_to_the_newest_step_file(tmp_path):
    folder = _save(tmp_path, [1, 2])
    assert _names(folder) == ["latest.pt", "step_0000001.pt", "step_0000002.pt"]
    assert os.path.samefile(folder / "latest.pt", folder / "step_0000002.pt")
    assert torch.load(resolve_resume("latest", tmp_path), weights_only=True)["step"] == 2


def test_keep_prunes_old_step_files_and_latest_survives(tmp_path):
    folder = _save(tmp_path, [1, 2, 3], keep=1)
    assert _names(folder) == ["latest.pt", "step_0000003.pt"]
    (folder / "step_0000003.pt").unlink()  # a user cleaning up step files does not lose latest.pt
    assert torch.load(folder / "latest.pt", weights_only=True)["step"] == 3


def test_keep_never_prunes_the_file_just_written(tmp_path):
    folder = _save(tmp_path, [5, 6])  # higher-numbered files left by a later, abandoned branch of the run
    save_checkpoint(tmp_path, 3, {"step": 3, "weight": torch.zeros(1)}, keep=2)
    assert _names(folder) == ["latest.pt", "step_0000003.pt", "step_0000006.pt"]
    assert torch.load(folder / "latest.pt", weights_only=True)["step"] == 3


def test_checkpoint_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(f"replace {os.path.basename(b)}")
                        or real_replace(a, b))
    _save(tmp_path, [1])
    assert events == ["fsync", "replace step_0000001.pt", "fsync", "replace step_0000001.pt.sha256",
                      "replace latest.pt", "fsync", "replace latest.pt.sha256"]


def test_resaving_a_step_replaces_latest(tmp_path):
    folder = _save(tmp_path, [2])
    save_checkpoint(tmp_path, 2, {"step": 2, "weight": torch.zeros(1)})
    assert torch.equal(torch.load(folder / "latest.pt", weights_only=True)["weight"], torch.zeros(1))


def test_file_systems_without_hard_links_get_a_copy(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    folder = _save(tmp_path, [1, 2], keep=1)
    assert not os.path.samefile(folder / "latest.pt", folder / "step_0000002.pt")
    assert torch.load(folder / "latest.pt", weights_only=True)["step"] == 2


def test_other_link_errors_are_raised_and_the_step_file_stays(tmp_path, monkeypatch):
    def disk_full(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, [1])
    folder = tmp_path / "checkpoints"
    assert _names(folder) == ["step_0000001.pt"]


def test_latest_falls_back_to_the_newest_step_file(tmp_path):
    folder = _save(tmp_path, [1, 2])
    (folder / "latest.pt").unlink()  # a crash between the step file and the link
    assert resolve_resume("latest", tmp_path) == folder / "step_0000002.pt"
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        resolve_resume("latest", tmp_path / "elsewhere")
