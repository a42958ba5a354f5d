"""One pass: the packed training shard is written with its Parquet shard, from the same rows, by a writer
that imports neither torch nor the detector."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import webdataset as wds
from test_extract_job_actor import extract_without_ray, tiny_config, write_bad_source

from softclip.extract.job import run as job
from softclip.extract.job.manifest import Manifest
from softclip.extract.job.writer import packed_ok
from softclip.pipeline.packed import read_packed_sample
from softclip.pipeline.shards import ragged_column, read_feature_table
from softclip.pipeline.sources import open_source


def test_the_packed_shard_is_written_with_the_parquet_shard_from_the_same_rows(tmp_path):
    source = write_bad_source(tmp_path / "source")
    cfg = tiny_config(tmp_path, source, pack=True)
    manifest = extract_without_ray(cfg, ["00000", "00003"])
    images = {s.key: s.image for shard in open_source(str(source)).shards if shard.name in ("00000", "00003")
              for s in open_source(str(source)).iter_shard(shard)}
    for name in ("00000", "00003"):
        entry = manifest.shards[name]
        assert packed_ok(cfg.out, entry, "checksum") and entry["packed"]["samples"] == entry["ok"]
        table = read_feature_table(cfg.out / f"{name}.parquet")
        ok = [i for i, status in enumerate(table.column("status").to_pylist()) if status == "success"]
        keys, roi = table.column("key").to_pylist(), ragged_column(table, "roi_features")
        path = cfg.out / "packed" / f"{name}.tar"
        samples = [read_packed_sample(s, str(path)) for s in wds.WebDataset(str(path), shardshuffle=False)]
        assert [s.key for s in samples] == [keys[i] for i in ok]  # successful rows, in the Parquet's order
        for sample, i in zip(samples, ok):
            assert sample.image == images[sample.key]  # the encoded bytes as stored in the source
            assert np.array_equal(sample.roi_features, roi.row(i))
            assert sample.tags == table.column("tags")[i].as_py()
    with tarfile.open(cfg.out / "packed" / "00003.tar") as tar:
        assert len(tar.getnames()) == 3 * manifest.shards["00003"]["ok"]  # three members per sample


def test_a_complete_shard_without_its_packed_tar_is_extracted_again_with_pack(tmp_path, monkeypatch):
    source = write_bad_source(tmp_path / "source")
    cfg = tiny_config(tmp_path, source)
    extract_without_ray(cfg, ["00000", "00001", "00003"])  # complete, not packed
    seen = []
    done = {"images_this_run": 0, "detector_seconds": 0.0, "actor_seconds": 0.0, "actors": 1, "startup_seconds": 0.0}
    monkeypatch.setattr(job, "_init_ray", lambda cfg: False)
    monkeypatch.setattr(job, "_run_pending", lambda cfg, spec, pending, *rest: seen.append(pending) or done)
    job.run_extraction(cfg)
    job.run_extraction(cfg.replace(pack=True))
    assert seen == [["00002"], ["00000", "00001", "00002", "00003"]]
    assert "packed" not in Manifest.load(cfg.out).shards.get("00000", {})
    extract_without_ray(cfg.replace(pack=True), ["00000", "00001", "00003"])  # now packed ...
    manifest = Manifest.load(cfg.out)
    manifest.shards["00001"]["packed"]["format"] = 1  # ... but 00001 in an older packed format
    manifest.save()
    job.run_extraction(cfg.replace(pack=True))
    assert seen[-1] == ["00001", "00002"]


@pytest.mark.parametrize("pack", [False, True])
def test_the_writer_path_imports_neither_torch_nor_the_detector(tmp_path, pack):
    """The driver's modules (job, writer) run the writer on Arrow rows in a fresh interpreter. With packing,
    webdataset's TarWriter comes in, and importing webdataset imports torch (never the detector)."""
    source = write_bad_source(tmp_path / "source")
    cfg = tiny_config(tmp_path, source)
    extract_without_ray(cfg, ["00003"])
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import pyarrow as pa
        import pyarrow.parquet as pq
        import softclip.extract.job.run
        from softclip.extract.job.manifest import Manifest
        from softclip.extract.job.writer import ShardAssembler

        rows = pq.read_table({str(cfg.out / "00003.parquet")!r})
        n = rows.num_rows
        rows = rows.append_column("index", pa.array(range(n), pa.int64()))
        rows = rows.append_column("shard_total", pa.array([-1] * n, pa.int64()))
        rows = rows.append_column("shard_error", pa.array([""] * n))
        rows = rows.append_column("image", pa.array([b"jpeg"] * n, pa.binary()))
        marker = rows.slice(0, 1).set_column(rows.schema.get_field_index("index"), "index", pa.array([-1], pa.int64()))
        marker = marker.set_column(rows.schema.get_field_index("shard_total"), "shard_total", pa.array([n], pa.int64()))
        out = Path({str(tmp_path / "again")!r})
        out.mkdir()
        assembler = ShardAssembler(out, Manifest.open(out, {{"dataset": "x"}}), row_group_size=2, pack={pack})
        assert assembler.add(pa.concat_tables([rows, marker])) == (n, ["00003"])
        assembler.close()
        detector = sorted(m for m in sys.modules
                          if m.startswith(("torchvision", "softclip.extract.job.actor", "softclip.extract.detector")))
        print("DETECTOR", detector, "TORCH", "torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert f"DETECTOR [] TORCH {pack}" in result.stdout, result.stdout + result.stderr
    assert (tmp_path / "again" / "packed" / "00003.tar").is_file() == pack
