"""The one reader of torch files (pipeline.torchio): every damaged file is one CorruptCheckpointError naming it,
and training, evaluation and export all read through it."""

from __future__ import annotations

import collections
import os

import pytest
import torch

from softclip.pipeline.io import file_sha256
from softclip.pipeline.torchio import (
    CorruptCheckpointError,
    checksum_sidecar,
    load_weights_only,
    verify_checksum,
    write_checksum,
)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.pt"
    torch.save({"w": torch.arange(8.0), "step": 3}, path)
    return path


def _damaged(tmp_path, good):
    data = good.read_bytes()
    files = {"truncated.pt": data[: len(data) // 2], "empty.pt": b"", "random.pt": os.urandom(512)}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return [tmp_path / name for name in files]


@pytest.mark.parametrize("mmap", [False, True])
def test_every_damaged_file_is_one_error_naming_it_and_saying_what_to_do(tmp_path, good, mmap):
    for path in _damaged(tmp_path, good):
        with pytest.raises(CorruptCheckpointError, match=rf"^{path}: cannot read the checkpoint.*; try another$"):
            load_weights_only(path, mmap=mmap, hint="try another")


def test_objects_other_than_data_are_refused(tmp_path):
    path = tmp_path / "code.pt"
    torch.save(collections.OrderedDict(f=print), path)  # a function: weights_only must not rebuild it
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: .*weights-only load refuses .*UnpicklingError"):
        load_weights_only(path)


def test_a_legacy_format_file_loads_even_when_mmap_is_asked(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    torch.testing.assert_close(load_weights_only(path, mmap=True)["w"], torch.ones(3))


def test_mmap_and_plain_reads_agree(good):
    plain, mapped = load_weights_only(good), load_weights_only(good, mmap=True)
    torch.testing.assert_close(plain["w"], mapped["w"])
    assert plain["step"] == mapped["step"] == 3


def test_the_sidecar_is_checked_when_there_is_one(good):
    assert verify_checksum(good) is False  # none yet: loads unverified
    assert checksum_sidecar(good).name == "good.pt.sha256"
    write_checksum(good, file_sha256(good))
    assert checksum_sidecar(good).read_text() == f"{file_sha256(good)}  good.pt\n"
    assert verify_checksum(good) is True
    write_checksum(good, "0" * 64)
    with pytest.raises(CorruptCheckpointError, match=rf"{good}: the file is damaged .*; resume elsewhere"):
        load_weights_only(good, hint="resume elsewhere")
    checksum_sidecar(good).write_text("garbage\n")
    with pytest.raises(CorruptCheckpointError, match="good.pt.sha256 is damaged"):
        verify_checksum(good)


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'none.pt'} does not exist; pass a file"):
        load_weights_only(tmp_path / "none.pt", hint="pass a file")


def test_training_evaluation_and_export_share_the_reader(tmp_path, good):
    from softclip.eval.checkpoint import read_checkpoint_metadata
    from softclip.train.checkpoint import load_checkpoint
    from softclip.train.export import export_open_clip

    truncated = _damaged(tmp_path, good)[0]
    readers = [load_checkpoint, read_checkpoint_metadata, lambda p: export_open_clip(p, tmp_path / "out")]
    for read in readers:
        with pytest.raises(CorruptCheckpointError, match=rf"^{truncated}: cannot read the checkpoint"):
            read(truncated)
