"""Training data: oracle annotation features, packed shards, resume positions, corrupt input."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from test_shards import table_to_records
from webdataset.tariterators import tarfile_samples

from softclip.pipeline.annotation_features import (
    ANNOTATION_FEATURE_DIM,
    annotation_roi_features,
    write_annotation_shards,
)
from softclip.pipeline.packed import ROI_MEMBER, read_packed_sample
from softclip.pipeline.shards import read_feature_table
from softclip.pipeline.sources import SourceError, expand_shard_spec
from softclip.train.config import DataConfig, ModelConfig
from softclip.train.data import TrainData, count_samples, tagset_ids
from softclip.train.model import build_model


@pytest.fixture(scope="module")
def packed(shapes_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    write_annotation_shards(shapes_world / "train", out, parquet=True, progress=False)
    return out


@pytest.fixture(scope="module")
def transforms():
    _, preprocess, _, tokenizer = build_model(ModelConfig(name="shapes-tiny", roi_feature_dim=72, roi_width=32,
                                                          roi_heads=4))
    return preprocess, tokenizer


def _data(transforms, root, **kw):
    preprocess, tokenizer = transforms
    rank, world_size = kw.pop("rank", 0), kw.pop("world_size", 1)
    cfg = DataConfig(**{"train_shards": str(root), "batch_size": 8, "num_workers": 0, "max_boxes": 5,
                        "shuffle_buffer": 20} | kw)
    return TrainData(cfg, transform=preprocess, tokenizer=tokenizer, feature_dim=ANNOTATION_FEATURE_DIM,
                     seed=3, rank=rank, world_size=world_size)


def test_annotation_features(packed, shapes_world):
    records = table_to_records(read_feature_table(packed / "00000.parquet"))
    assert len(records) == 50 and all(r.detector == "annotations" for r in records)
    samples = [read_packed_sample(s) for s in tarfile_samples([{"url": str(packed / "00000.tar")}])]
    assert [s.key for s in samples] == [r.key for r in records]
    assert all(np.array_equal(s.roi_features, r.roi_features) and s.tags == r.tags for s, r in zip(samples, records))
    record = records[0]
    assert record.roi_features.shape == (record.num_boxes, 72) and record.roi_features.dtype == np.float16
    # one "colour shape" phrase per box, joined like the detector's tags (extract.detector.vinvl.format_tags)
    assert record.tags == ", ".join(f"{a[0]} {c}" for a, c in zip(record.attr_names, record.class_names))
    from PIL import Image

    red = Image.new("RGB", (20, 20), (255, 0, 0))
    feats = annotation_roi_features(red, np.array([[2, 2, 10, 10]])).astype(np.float32)
    np.testing.assert_allclose(feats[0, :48].reshape(4, 4, 3)[..., 0], 1.0)
    np.testing.assert_allclose(feats[0, 48 + 7], 1.0)  # all of R in the top bin
    np.testing.assert_allclose(feats[0, 48 + 8], 1.0)  # all of G in the bottom bin
    assert count_samples(expand_shard_spec(packed)) == 120


def test_packed_batches_hold_the_feature_shards_rows(packed, transforms):
    batches = list(_data(transforms, packed).epoch_batches(0))
    assert len(batches) == 15
    records = {r.key: r for shard in sorted(packed.glob("*.parquet")) for r in table_to_records(read_feature_table(shard))}
    for batch in batches:
        for i, key in enumerate(batch["keys"]):
            record, n = records[key], int(batch["roi_mask"][i].sum())
            top = np.argsort(-record.scores, kind="stable")[:5]
            assert n == len(top)
            assert torch.equal(batch["roi_features"][i, :n], torch.from_numpy(record.roi_features[top]))
            assert torch.equal(batch["roi_geometry"][i, :n], torch.from_numpy(record.geometry[top]))
    batch = batches[0]
    assert batch["images"].shape == (8, 3, 64, 64) and batch["roi_features"].shape == (8, 5, 72)
    assert batch["roi_mask"].any(1).all()


def test_training_reads_only_packed_shards():
    from softclip.pipeline.config import ConfigError, from_dict

    for retired in ({"format": "parquet"}, {"source_shards": "cc3m"}):  # the Parquet route is gone
        with pytest.raises(ConfigError, match=next(iter(retired))):
            from_dict(DataConfig, {"train_shards": "packed"} | retired)


def test_tagset_ids_are_phrases_and_words():
    ids = tagset_ids("Red circle, red star,  red circle")
    expected = {"p:red circle", "p:red star", "w:red", "w:circle", "w:star"}
    import zlib

    assert ids == sorted(zlib.crc32(f.encode()) for f in expected)
    assert tagset_ids("") == [] and tagset_ids(" , ") == []


def test_batches_carry_each_samples_tag_set(packed, transforms):
    batch = next(_data(transforms, packed).epoch_batches(0))
    assert batch["tagset"].dtype == torch.int64 and batch["tagset"].shape[0] == 8
    records = {r.key: r for shard in sorted(packed.glob("*.parquet")) for r in table_to_records(read_feature_table(shard))}
    for key, row in zip(batch["keys"], batch["tagset"]):
        assert row[row >= 0].tolist() == tagset_ids(records[key].tags)
        assert (row[len(tagset_ids(records[key].tags)):] == -1).all()


def test_epochs_differ_and_resume_positions_are_exact(packed, transforms):
    data = _data(transforms, packed, num_workers=2)
    epoch0 = list(data.epoch_batches(0))
    assert [b["keys"] for b in epoch0] == [b["keys"] for b in data.epoch_batches(0)]
    assert [b["keys"] for b in epoch0] != [b["keys"] for b in data.epoch_batches(1)]
    positions = [[0, 0], [0, 0]]
    for batch in epoch0[:5]:
        positions[batch["worker"]] = [batch["consumed"], batch["batches"]]
    rest = list(data.epoch_batches(0, positions))
    assert [b["keys"] for b in rest] == [b["keys"] for b in epoch0[5:]]
    assert torch.equal(rest[0]["images"], epoch0[5]["images"])  # the random crop is per sample, not per stream


def test_resume_reads_only_what_is_left(packed, transforms):
    data = _data(transforms, packed)  # no worker processes: the reads are counted in this one
    read = []
    original = data._read

    def counting(shards, errors):
        for raw in original(shards, errors):
            read.append(raw.key)
            yield raw

    data._read = counting
    done = [[0, 0]]
    for batch in data.epoch_batches(0):
        done[batch["worker"]] = [batch["consumed"], batch["batches"]]
    assert done[0][1] == len(data.worker_plan(0)[2]) == data.steps_per_epoch and read
    read.clear()
    assert list(data.epoch_batches(0, done)) == [] and read == []  # an epoch-boundary checkpoint reads nothing


def test_ranks_read_disjoint_samples(packed, transforms):
    # each rank reads its own contiguous range of the epoch's samples
    keys = [{k for b in _data(transforms, packed, world_size=2, rank=r, batch_size=16, num_samples=32,
                              shuffle_buffer=4).epoch_batches(0)
             for k in b["keys"]} for r in range(2)]
    assert len(keys[0]) == len(keys[1]) == 16
    assert keys[0] and keys[1] and not keys[0] & keys[1]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_an_epoch_is_every_sample_exactly_once(packed, transforms, workers):
    """3 shards of 50, 50 and 20 samples; batch 7 does not divide 120, the buffer's tail must come out."""
    every = sorted(key for shard in sorted(packed.glob("*.parquet")) for key in read_feature_table(shard).column("key").to_pylist())
    data = _data(transforms, packed, num_workers=workers, batch_size=7, shuffle_buffer=30)
    batches = list(data.epoch_batches(0))
    assert len(batches) == data.steps_per_epoch == 18 and [len(b["keys"]) for b in batches][-1] == 120 - 17 * 7
    assert sorted(k for b in batches for k in b["keys"]) == every
    ranks = [[k for b in _data(transforms, packed, num_workers=workers, batch_size=8, world_size=2, rank=r,
                               shuffle_buffer=30).epoch_batches(1) for k in b["keys"]] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 60 and sorted(ranks[0] + ranks[1]) == every


def _member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_corrupt_samples_are_skipped_and_counted(packed, tmp_path, transforms):
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(packed / "00000.tar") as src, tarfile.open(bad / "00000.tar", "w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            key, _, suffix = member.name.partition(".")
            if key.endswith("0001") and suffix == "jpg":
                data = b"not a jpeg"
            if key.endswith("0002") and suffix == ROI_MEMBER:
                data = b"garbage"
            if key.endswith("0003") and suffix == "json":  # an older packed format
                data = json.dumps(json.loads(data) | {"packed_version": 1}).encode()
            _member(dst, member.name, data)
        _member(dst, "zzzz.json", b"{broken")
    batches = list(_data(transforms, bad).epoch_batches(0))  # 51 counted: 50 samples and the broken json
    assert [len(b["keys"]) for b in batches] == [8] * 6 + [3]  # unusable samples' places hold repeats
    errors = batches[-1]["errors"]
    assert errors["bad_image"] >= 1 and errors["bad_sample"] >= 3
    assert not any(k.endswith(("0001", "0002", "0003")) for b in batches for k in b["keys"])


def test_wrong_feature_dim_and_missing_shards_are_explained(packed, transforms, tmp_path):
    preprocess, tokenizer = transforms
    data = TrainData(DataConfig(train_shards=str(packed), batch_size=4, num_workers=0), transform=preprocess,
                     tokenizer=tokenizer, feature_dim=2048)
    with pytest.raises(ValueError, match="model.roi_feature_dim=72"):
        next(data.epoch_batches(0))
    with pytest.raises(SourceError, match="no such file or directory of .tar shards; check data.train_shards"):
        _data(transforms, tmp_path / "nothing")
