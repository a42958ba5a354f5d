"""Packed WebDataset training shards: image, caption, ROI arrays and tags per key, read back two ways."""

from __future__ import annotations

import numpy as np
import webdataset as wds
from test_extract_job_actor import extract_without_ray, tiny_config

from softclip.extract import job
from softclip.extract.job import run_extraction
from softclip.extract.manifest import Manifest
from softclip.extract.pack import pack_directory
from softclip.pipeline.io import file_sha256
from softclip.pipeline.shards import (
    read_feature_table,
    read_webdataset_shard,
    sample_to_record,
    table_to_records,
)
from softclip.pipeline.sources import open_source


def test_pack_reads_back_with_webdataset_and_pipeline(tmp_path, shapes_world):
    cfg = tiny_config(tmp_path, shapes_world / "train", max_boxes=8)
    source = open_source(cfg.dataset)
    extract_without_ray(cfg, [s.name for s in source.shards[2:]])
    assert pack_directory(cfg.out, progress=False) == 1
    samples = {s.key: s for shard in source.shards[2:] for s in source.iter_shard(shard)}
    for shard in source.shards[2:]:
        packed = cfg.out / "packed" / f"{shard.name}.tar"
        features = {r.key: r for r in table_to_records(read_feature_table(cfg.out / f"{shard.name}.parquet"))}
        raw = list(wds.WebDataset(str(packed), shardshuffle=False))
        assert [s["__key__"] for s in raw] == [s.key for s in source.iter_shard(shard)]  # source order
        for sample in raw:
            record = sample_to_record(sample, str(packed))
            assert sample["jpg"] == samples[record.key].image and sample["txt"].decode() == record.caption
            assert np.array_equal(record.roi_features, features[record.key].roi_features)
            assert record.tags == features[record.key].tags and record.num_boxes <= 8
        pairs = list(read_webdataset_shard(packed))
        assert [r.key for r, _ in pairs] == [s["__key__"] for s in raw]
        assert all(image == samples[r.key].image for r, image in pairs)
    manifest = Manifest.load(cfg.out)
    assert manifest.shards["00002"]["packed"]["samples"] == 20
    assert pack_directory(cfg.out, progress=False) == 0  # resumable: nothing left to pack
    (cfg.out / "packed" / "00002.tar").write_bytes(b"damaged")
    assert pack_directory(cfg.out, progress=False) == 1


def test_rerunning_a_packed_extraction_repacks_nothing(tmp_path, shapes_world, monkeypatch):
    cfg = tiny_config(tmp_path, shapes_world / "train" / "{00002..00002}.tar", max_boxes=8, pack=True)
    extract_without_ray(cfg, ["00002"])
    monkeypatch.setattr(job, "_init_ray", lambda cfg: False)  # nothing to extract; pack in this process
    run_extraction(cfg)
    packed = cfg.out / "packed" / "00002.tar"
    stamp = (packed.stat().st_ino, packed.stat().st_mtime_ns)
    assert Manifest.load(cfg.out).shards["00002"]["packed"]["samples"] == 20
    for _ in range(2):
        assert run_extraction(cfg).shards_skipped == 1
        assert (packed.stat().st_ino, packed.stat().st_mtime_ns) == stamp  # not rewritten
        manifest = Manifest.load(cfg.out)
        assert manifest.shards["00002"]["packed"]["sha256"] == file_sha256(packed)
        assert pack_directory(cfg.out, progress=False) == 0
    assert len(manifest.data["runs"]) == 3
