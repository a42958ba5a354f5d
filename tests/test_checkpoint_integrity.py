"""Checkpoint integrity (issue 14, rows 8-10, 16, 17): checksums, fallback, fuzzing, disk full, stale files."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
from pathlib import Path

import pytest
import torch

from softclip.pipeline.io import DiskFullError
from softclip.train import checkpoint as checkpoint_module
from softclip.train.checkpoint import CorruptCheckpointError, load_checkpoint, resolve_resume, save_checkpoint


def _ckpt(step: int) -> dict:
    return {"step": step, "weight": torch.full((64,), float(step)), "config": {"name": "x"}}


def _save(run_dir: Path, steps, **kwargs) -> Path:
    for step in steps:
        save_checkpoint(run_dir, step, _ckpt(step), **kwargs)
    return run_dir / "checkpoints"


def test_each_checkpoint_has_a_sha256sum_sidecar(tmp_path):
    folder = _save(tmp_path, [1])
    for name in ("step_0000001.pt", "latest.pt"):
        digest, _, listed = (folder / f"{name}.sha256").read_text().strip().partition("  ")
        assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest() and listed == name
    assert load_checkpoint(folder / "latest.pt")["step"] == 1


def test_a_flipped_bit_is_refused_naming_the_file(tmp_path):
    folder = _save(tmp_path, [1])
    path = folder / "step_0000001.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: .*checksum"):
        load_checkpoint(path)


def test_truncated_latest_falls_back_to_the_newest_intact_step_file(tmp_path, caplog):
    folder = _save(tmp_path, [1, 2], keep=2)
    latest = folder / "latest.pt"
    os.truncate(latest, 100)  # a hard link: the step file it names is truncated too
    with caplog.at_level("WARNING"):
        path = resolve_resume("latest", tmp_path)
    assert path == folder / "step_0000001.pt" and load_checkpoint(path)["step"] == 1
    assert "latest.pt" in caplog.text and "step_0000001.pt" in caplog.text


def test_no_intact_checkpoint_left_is_one_clear_error(tmp_path):
    folder = _save(tmp_path, [1], keep=1)
    os.truncate(folder / "latest.pt", 10)
    with pytest.raises(CorruptCheckpointError, match="no intact checkpoint"):
        resolve_resume("latest", tmp_path)


def test_an_explicit_corrupt_path_is_refused_not_replaced(tmp_path):
    folder = _save(tmp_path, [1, 2], keep=2)
    os.truncate(folder / "step_0000002.pt", 50)
    with pytest.raises(CorruptCheckpointError, match="step_0000002.pt"):
        resolve_resume(str(folder / "step_0000002.pt"), tmp_path)


def _variants(data: bytes, rng: random.Random, count: int):
    """Truncations, single bit flips and random files of a checkpoint's bytes."""
    for i in range(count):
        kind = i % 3
        if kind == 0:
            yield "truncated", data[: rng.randrange(len(data))]
        elif kind == 1:
            flipped = bytearray(data)
            bit = rng.randrange(len(data) * 8)
            flipped[bit // 8] ^= 1 << (bit % 8)
            yield "bit flip", bytes(flipped)
        else:
            yield "random", rng.randbytes(rng.choice([0, 1, 7, 512, 1024, 4096]))


@pytest.mark.parametrize("sidecar", [True, False])
def test_fuzzed_checkpoints_give_one_clear_error_naming_the_file(tmp_path, sidecar):
    folder = _save(tmp_path, [1])
    good = (folder / "step_0000001.pt").read_bytes()
    rng = random.Random(14)
    target = tmp_path / "fuzz" / "latest.pt"
    target.parent.mkdir()
    if sidecar:
        (target.parent / "latest.pt.sha256").write_text((folder / "step_0000001.pt.sha256").read_text()
                                                        .replace("step_0000001.pt", "latest.pt"))
    outcomes = {"refused": 0, "loaded": 0}
    for kind, data in _variants(good, rng, 300):
        target.write_bytes(data)
        try:
            loaded = load_checkpoint(target)
        except CorruptCheckpointError as err:
            assert str(target) in str(err) and "\n" not in str(err), (kind, str(err))
            outcomes["refused"] += 1
            continue
        # Only without a checksum can a damaged file load, and only a bit flip can leave it loadable.
        assert not sidecar and kind == "bit flip", kind
        assert isinstance(loaded, dict)
        outcomes["loaded"] += 1
    assert outcomes["refused"] + outcomes["loaded"] == 300
    if sidecar:
        assert outcomes["refused"] == 300


def test_disk_full_while_saving_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, [1])

    @contextlib.contextmanager
    def full_disk(path):
        yield Path("/dev/full")  # writes fail with ENOSPC, as on a full disk

    monkeypatch.setattr(checkpoint_module, "atomic_path", full_disk)
    with pytest.raises(DiskFullError, match=r"disk full writing .*step_0000002\.pt") as info:
        save_checkpoint(tmp_path, 2, _ckpt(2))
    assert info.value.errno == errno.ENOSPC and "inline_container" not in str(info.value)
    monkeypatch.undo()
    assert load_checkpoint(resolve_resume("latest", tmp_path))["step"] == 1


def test_stale_temporaries_are_removed_on_the_next_save(tmp_path):
    folder = _save(tmp_path, [1])
    stale = [folder / ".tmp-step_0000002.pt.abc123", folder / ".tmp-latest.pt.x1",
             folder / ".tmp-step_0000002.pt.sha256.q"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)  # a training run killed inside torch.save
    keep = folder / ".tmp-notes.txt"
    keep.write_text("not ours")
    save_checkpoint(tmp_path, 2, _ckpt(2))
    assert not any(p.exists() for p in stale) and keep.exists()


def test_pruned_step_files_take_their_sidecars_along(tmp_path):
    folder = _save(tmp_path, [1, 2, 3], keep=2)
    assert sorted(p.name for p in folder.iterdir()) == [
        "latest.pt", "latest.pt.sha256", "step_0000002.pt", "step_0000002.pt.sha256", "step_0000003.pt",
        "step_0000003.pt.sha256"]


def test_shipped_shapes_configs_keep_an_older_checkpoint():
    from softclip.pipeline.config import load_config
    from softclip.train.config import TrainConfig

    root = Path(checkpoint_module.__file__).parent / "configs"
    for path in sorted(root.glob("*.yaml")):
        keep = load_config(TrainConfig, path).log.keep_checkpoints
        assert keep == 0 or keep >= 2, f"{path.name}: keep_checkpoints {keep} leaves nothing to fall back to"
