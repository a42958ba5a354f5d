"""The extraction job without Ray: the read/decode stage, the detector actor, the shard assembler, the
manifest. Also the builders the other extraction tests share (a tiny random-weight VinVL, a source with
every kind of bad input, and an in-process run of the job's stages)."""

from __future__ import annotations

import io
import logging
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray
import torch
from PIL import Image
from test_shards import table_to_records

from softclip.extract.detector.checkpoint import CheckpointError, write_checkpoint, write_labelmap
from softclip.extract.detector.config import DetectorArch, DetectorConfig
from softclip.extract.detector.vinvl import VinVLDetector
from softclip.extract.job import run as job
from softclip.extract.job.actor import ROUTING_COLUMNS, DetectorActor, detection_to_record
from softclip.extract.job.config import ExtractConfig
from softclip.extract.job.manifest import Manifest, ManifestFormatError, ManifestMismatchError
from softclip.extract.job.run import (
    OutputDirError,
    OutputNotEmptyError,
    check_out_dir,
    fingerprint,
    resolve_dataset_spec,
    run_extraction,
)
from softclip.extract.job.stages import ROW_COLUMNS, read_shard_rows
from softclip.extract.job.writer import IncompleteShardsError, ShardAssembler, remove_stale_temporaries
from softclip.pipeline.img2dataset import ShardWriter
from softclip.pipeline.io import file_sha256
from softclip.pipeline.shards import FeatureRecord, feature_schema, read_feature_table

TINY_ARCH = DetectorArch(blocks=(1, 1, 1, 1), groups=2, width_per_group=16, stem_channels=8, res2_channels=32,
                         num_classes=9, num_attributes=11, cls_embed_dim=8, attr_embed_dim=16)
TINY_SETTINGS = {"min_size": 96, "max_size": 160, "pre_nms_top_n": 300, "post_nms_top_n": 50}
CLASSES = ["__background__"] + [f"class{i}" for i in range(1, 9)]
ATTRIBUTES = ["__no_attribute__"] + [f"attr{i}" for i in range(1, 11)]


def write_tiny_vinvl(folder: Path, *, arch: DetectorArch = TINY_ARCH, seed: int = 0) -> tuple[Path, Path]:
    """A random-weight member of the VinVL family saved as a checkpoint + label map (for from_checkpoint)."""
    torch.manual_seed(seed)
    model = VinVLDetector(DetectorConfig(name="tiny", arch=arch), class_names=CLASSES, attribute_names=ATTRIBUTES)
    folder.mkdir(parents=True, exist_ok=True)
    write_checkpoint(folder / "model.pth", model.state_dict())
    write_labelmap(folder / "labelmap.json", CLASSES, ATTRIBUTES)
    return folder / "model.pth", folder / "labelmap.json"


def tiny_config(tmp_path: Path, dataset: str | Path, **changes) -> ExtractConfig:
    """An ExtractConfig for the tiny detector on CPU with small test-time sizes."""
    weights, labelmap = write_tiny_vinvl(tmp_path / "tiny")
    base = dict(dataset=str(dataset), weights=weights, labelmap=labelmap, out=tmp_path / "features",
                detector_overrides=TINY_SETTINGS, batch_size=8, row_group_size=16, progress=False)
    return ExtractConfig(**{**base, **changes})


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _odd_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    jpeg = _encode(photo, "JPEG")
    palette = Image.new("P", (40, 30), 3)
    palette.info["transparency"] = 3
    return {
        "rgb": jpeg, "cmyk": _encode(Image.new("CMYK", (32, 40), (0, 200, 200, 0)), "JPEG"),
        "palette": _encode(palette, "PNG"), "la": _encode(Image.new("LA", (30, 30), (90, 128)), "PNG"),
        "i16": _encode(Image.fromarray(np.full((20, 24), 40000, np.uint16)), "PNG"),
        "one_pixel": _encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
        "corrupt": b"this is not an image" * 10, "truncated": jpeg[: len(jpeg) // 2], "empty": b"",
        "bomb": _png_bomb(),
    }


# Expected status (or error reason) per sample of shard 00000 of the bad source, in order.
BAD_SHARD_EXPECTED = ["success", "success", "success", "success", "success", "success", "corrupt",
                      "truncated", "empty", "too_large", "missing_caption", "missing_image", "success"]


def write_bad_source(folder: Path) -> Path:
    """img2dataset shards with every kind of bad input: ``00000`` odd modes and broken images,
    ``00001`` a tar truncated inside a member, ``00002`` an unreadable shard, ``00003`` a good shard."""
    images = _odd_images()
    with ShardWriter(folder, 0) as shard:
        for name, data in images.items():
            shard.write(data, caption=f"a {name} image", width=0, height=0)
        shard.write(images["rgb"], caption=None, width=64, height=48)
        shard.write(None, caption="a failed download", width=0, height=0, status="failed_to_download")
        shard.write(images["rgb"], caption="the last one", width=64, height=48)
    for index in (1, 3):
        with ShardWriter(folder, index) as shard:
            for i in range(4):
                shard.write(images["rgb"], caption=f"photo {i}", width=64, height=48)
    tar = (folder / "00001.tar").read_bytes()
    cut = tar.index(b"000010002.jpg") + 512 + 100  # inside the third sample's image
    (folder / "00001.tar").write_bytes(tar[:cut])
    (folder / "00002.tar").write_bytes(b"")
    return folder


def _rows_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows as Ray Data hands them to map_batches (numpy columns; pixels and images as object arrays)."""
    batch = {name: np.array([r[name] for r in rows]) for name in rows[0] if name not in ("pixels", "image")}
    for name in ("pixels", "image"):
        batch[name] = np.empty(len(rows), dtype=object)
        batch[name][:] = [r[name] for r in rows]
    return batch


def _records(table: pa.Table) -> list[FeatureRecord]:
    """The sample rows of an actor's output table as records (end-of-shard markers dropped)."""
    samples = table.filter(pc.greater_equal(table.column("index"), 0))
    return table_to_records(samples.drop_columns(list(ROUTING_COLUMNS)))


def extract_without_ray(cfg: ExtractConfig, shards: list[str]) -> Manifest:
    """The job's stages in this process (read -> actor -> assembler), for tests that need features fast."""
    manifest = Manifest.open(cfg.out, fingerprint(cfg, cfg.dataset))
    cfg.out.mkdir(parents=True, exist_ok=True)
    actor = DetectorActor(cfg)
    assembler = ShardAssembler(cfg.out, manifest, row_group_size=cfg.row_group_size, pack=cfg.pack)
    for shard in shards:
        rows = list(read_shard_rows({"spec": cfg.dataset, "shard": shard}, max_pixels=cfg.max_pixels,
                                    require_caption=cfg.require_caption, keep_image=cfg.pack))
        for start in range(0, len(rows), cfg.batch_size):
            assembler.add(actor(_rows_batch(rows[start:start + cfg.batch_size])))
    assembler.close()
    return manifest


@pytest.fixture(scope="module")
def bad_source(tmp_path_factory) -> Path:
    return write_bad_source(tmp_path_factory.mktemp("bad") / "source")


def test_read_stage_turns_every_bad_input_into_a_row(bad_source):
    rows = list(read_shard_rows({"spec": str(bad_source), "shard": "00000"}, max_pixels=64_000_000,
                                require_caption=True))
    assert rows[-1]["index"] == -1 and rows[-1]["shard_total"] == len(BAD_SHARD_EXPECTED)
    reasons = [r["error"].split(":")[0] if r["error"] else "success" for r in rows[:-1]]
    assert reasons == BAD_SHARD_EXPECTED
    for row in rows[:6]:  # odd but valid modes come out as RGB uint8
        assert row["pixels"].dtype == np.uint8 and row["pixels"].shape[2] == 3
    truncated = list(read_shard_rows({"spec": str(bad_source), "shard": "00001"}, max_pixels=10**8,
                                     require_caption=True))
    assert [r["error"].split(":")[0] for r in truncated[:-1]] == ["", "", "read_error"]
    unreadable = list(read_shard_rows({"spec": str(bad_source), "shard": "00002"}, max_pixels=10**8,
                                      require_caption=True))
    assert len(unreadable) == 1 and "cannot open shard" in unreadable[0]["shard_error"]


def test_actor_detects_without_ray_and_truncates_to_max_boxes(tmp_path, bad_source):
    cfg = tiny_config(tmp_path, bad_source, max_boxes=5)
    actor = DetectorActor(cfg)
    rows = list(read_shard_rows({"spec": str(bad_source), "shard": "00000"}, max_pixels=cfg.max_pixels,
                                require_caption=True))
    batch = actor(_rows_batch(rows))
    records = _records(batch)
    assert [r.key for r in records] == batch.column("key").to_pylist()[:-1]  # one row per sample, marker last
    assert [r.status == "success" for r in records] == [e == "success" for e in BAD_SHARD_EXPECTED]
    ok = [r for r in records if r.status == "success"]
    assert all(0 < r.num_boxes <= 5 and r.roi_features.dtype == np.float16 for r in ok)
    assert all(r.roi_features.shape == (r.num_boxes, actor.feature_dim) == (r.num_boxes, 256) for r in ok)
    assert all(list(r.scores) == sorted(r.scores, reverse=True) and r.detector == actor.detector_id for r in ok)
    assert ok[5].width == 1 and ok[5].height == 1  # the 1x1 image
    assert all(r.tags.count(",") == r.num_boxes - 1 for r in ok)  # tags describe the kept boxes


def test_detection_to_record_keeps_top_scores_and_nonzero_attributes():
    det = {"boxes": np.arange(12, dtype=np.float32).reshape(3, 4), "geometry": np.zeros((3, 6)),
           "features": np.ones((3, 4), np.float32) * [[1], [2], [3]], "labels": np.array([1, 2, 3]),
           "scores": np.array([0.2, 0.9, 0.5]), "class_names": ["a", "b", "c"],
           "attr_labels": np.array([[0, 0], [4, 0], [5, 6]]), "attr_scores": np.array([[0, 0], [.7, 0], [.6, .3]]),
           "attr_names": [[], ["x"], ["y", "z"]], "tags": "a, x b, y z c"}
    record = detection_to_record(det, key="k", shard="s", width=10, height=10, caption="c", max_boxes=2,
                                 detector_id="d")
    assert record.class_names == ["b", "c"] and record.roi_features[:, 0].tolist() == [2.0, 3.0]
    assert record.attr_labels == [[4], [5, 6]] and record.attr_names == [["x"], ["y", "z"]]
    assert record.attr_scores == [[pytest.approx(0.7)], [pytest.approx(0.6), pytest.approx(0.3)]]
    assert record.tags == "x b, y z c"


def test_zero_boxes_is_a_successful_row(tmp_path, bad_source):
    cfg = tiny_config(tmp_path, bad_source, detector_overrides={**TINY_SETTINGS, "score_thresh": 1.0,
                                                                "min_detections_per_img": 0})
    manifest = extract_without_ray(cfg, ["00003"])
    records = table_to_records(read_feature_table(cfg.out / "00003.parquet"))
    assert len(records) == 4 and all(r.status == "success" and r.num_boxes == 0 for r in records)
    assert manifest.shards["00003"]["boxes"] == 0


def test_assembler_drops_duplicates_and_waits_for_the_marker(tmp_path, bad_source):
    cfg = tiny_config(tmp_path, bad_source)
    actor = DetectorActor(cfg)
    rows = list(read_shard_rows({"spec": str(bad_source), "shard": "00003"}, max_pixels=cfg.max_pixels,
                                require_caption=True))
    out = actor(_rows_batch(rows))
    assert all(set(row) == set(ROW_COLUMNS) for row in rows)
    assert out.column_names == feature_schema(actor.feature_dim).names + list(ROUTING_COLUMNS)
    manifest = Manifest.open(cfg.out, {"dataset": "x"})
    cfg.out.mkdir(parents=True)
    assembler = ShardAssembler(cfg.out, manifest, row_group_size=2)
    first, rest = out.take([0, 1]), out.take([2, 1, 3, 4])  # row 1 again (a retried task), then the marker
    assert assembler.add(first) == (2, [])
    assert assembler.add(rest) == (2, ["00003"]) and assembler.duplicates == 1
    table = read_feature_table(cfg.out / "00003.parquet")
    assert sorted(table.column("key").to_pylist()) == out.column("key").to_pylist()[:4]
    committed = (cfg.out / "00003.parquet").read_bytes()
    assert assembler.add(out.take([0, 4])) == (0, [])  # row 0 and the marker again
    assert assembler.duplicates == 3 and (cfg.out / "00003.parquet").read_bytes() == committed
    assembler.close()  # nothing left open
    one = out.take([0])
    rows_of_another_shard = one.set_column(one.schema.get_field_index("shard"), "shard", pa.array(["00009"]))
    assembler.add(rows_of_another_shard)
    with pytest.raises(IncompleteShardsError, match="00009"):
        assembler.close()
    assert not list(cfg.out.glob(".tmp-*"))


def test_manifest_refuses_other_settings_and_detects_tampering(tmp_path, bad_source):
    cfg = tiny_config(tmp_path, bad_source)
    manifest = extract_without_ray(cfg, ["00003"])
    assert manifest.verified("00003", "checksum")
    with pytest.raises(ManifestMismatchError, match="max_boxes: 50 -> 10"):
        Manifest.open(cfg.out, fingerprint(cfg.replace(max_boxes=10), cfg.dataset))
    other_weights, _ = write_tiny_vinvl(tmp_path / "other", seed=1)
    with pytest.raises(ManifestMismatchError, match="weights_sha256"):
        Manifest.open(cfg.out, fingerprint(cfg.replace(weights=other_weights), cfg.dataset))
    path = cfg.out / "00003.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    reopened = Manifest.open(cfg.out, fingerprint(cfg, cfg.dataset))
    assert reopened.verified("00003", "size") and not reopened.verified("00003", "checksum")


def test_dataset_names_resolve_through_the_registry_and_paths_stay_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    (tmp_path / "cc3m").mkdir()
    assert resolve_dataset_spec("cc3m") == str(tmp_path / "cc3m")
    assert resolve_dataset_spec(str(tmp_path / "cc3m" / "{00000..00001}.tar")).endswith("{00000..00001}.tar")
    with pytest.raises(ValueError, match="unknown dataset 'nosuch'"):
        resolve_dataset_spec("nosuch")


@pytest.mark.parametrize(("text", "problem"), [
    ("[]", "top level is a JSON list"),
    ('{"format": "softclip.extract", "version": 1, "detector": {}, "shards": {}, "runs": []}', "'fingerprint'"),
    ('{"format": "softclip.extract", "version": 1, "fingerprint": {}, "detector": {}, "runs": [], "shards": '
     '{"00000": {"status": "complete", "file": "00000.parquet", "rows": 1, "ok": 1, "errors": {}, "boxes": 2, '
     '"bytes": 9}}}', "shard 00000: 'sha256' missing"),
    ("{not json", "not valid JSON"),
])
def test_a_malformed_manifest_is_refused_naming_the_file_and_the_problem(tmp_path, text, problem):
    (tmp_path / "manifest.json").write_text(text)
    for read in (lambda: Manifest.load(tmp_path), lambda: Manifest.open(tmp_path, {"dataset": "x"})):
        with pytest.raises(ManifestFormatError, match=re.escape(str(tmp_path / "manifest.json"))) as info:
            read()
        assert problem in str(info.value) and "to start over" in str(info.value)


def test_a_manifest_without_shards_takes_a_new_fingerprint(tmp_path, caplog):
    first = Manifest.open(tmp_path, {"dataset": "d", "labelmap_sha256": "wrong"})
    first.set_detector("det-a", 8)
    first.save()  # a run that failed before its first commit
    with caplog.at_level(logging.WARNING, logger="softclip.extract.job.manifest"):
        second = Manifest.open(tmp_path, {"dataset": "d", "labelmap_sha256": "right"})
    assert second.data["fingerprint"]["labelmap_sha256"] == "right" and second.data["detector"] == {}
    assert "replacing its fingerprint" in caplog.text and "labelmap_sha256: 'wrong' -> 'right'" in caplog.text
    second.record("00000", {"status": "unreadable", "error": "cannot open"})
    with pytest.raises(ManifestMismatchError, match="labelmap_sha256"):
        Manifest.open(tmp_path, {"dataset": "d", "labelmap_sha256": "other"})


def _no_ray(cfg):
    raise AssertionError("Ray was started before the input checks")


def test_a_failed_first_run_does_not_lock_the_folder(tmp_path, bad_source, monkeypatch):
    cfg = tiny_config(tmp_path, bad_source)
    monkeypatch.setattr(job, "_init_ray", lambda cfg: False)

    def dying_actors(*args):
        raise RuntimeError("the actors died")

    monkeypatch.setattr(job, "_run_pending", dying_actors)
    with pytest.raises(RuntimeError, match="actors died"):
        run_extraction(cfg)
    assert (cfg.out / "manifest.json").is_file()
    other = tmp_path / "other" / "labelmap.json"  # same sizes, other names: another checksum
    write_labelmap(other, CLASSES[:1] + [f"thing{i}" for i in range(1, 9)], ATTRIBUTES)
    done = {"images_this_run": 0, "detector_seconds": 0.0, "actor_seconds": 0.0, "actors": 1, "startup_seconds": 0.0}
    monkeypatch.setattr(job, "_run_pending", lambda *args: done)
    run_extraction(cfg.replace(labelmap=other))
    assert Manifest.load(cfg.out).data["fingerprint"]["labelmap_sha256"] == file_sha256(other)


def test_a_label_map_that_does_not_fit_the_weights_stops_before_ray(tmp_path, bad_source, monkeypatch):
    wrong = write_labelmap(tmp_path / "wrong.json", CLASSES[:3], ATTRIBUTES[:2])
    monkeypatch.setattr(job, "_init_ray", _no_ray)
    with pytest.raises(CheckpointError, match=r"wrong.json: 2 classes / 1 attributes, but .*model.pth has 8 / 10"):
        run_extraction(tiny_config(tmp_path, bad_source, labelmap=wrong))
    assert not (tmp_path / "features").exists()


def test_out_inside_the_dataset_or_not_empty_is_refused(tmp_path, shapes_world, monkeypatch):
    monkeypatch.setattr(job, "_init_ray", _no_ray)
    train = shapes_world / "train"
    before = (train / "00000.parquet").read_bytes()
    for dataset, out in ((train, train), (train / "{00000..00001}.tar", train / "features")):
        with pytest.raises(OutputDirError, match=f"--out {re.escape(str(out))} is the dataset folder"):
            run_extraction(tiny_config(tmp_path, dataset, out=out))
    assert (train / "00000.parquet").read_bytes() == before and not (train / "features").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(OutputNotEmptyError, match=f"--out {re.escape(str(busy))} is not empty \\(notes.txt\\)"):
        run_extraction(tiny_config(tmp_path, train, out=busy))
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    leftovers = tmp_path / "crashed"  # only the job's own temporaries: a new extraction may start here
    (leftovers / "packed").mkdir(parents=True)
    (leftovers / ".tmp-00000.parquet.x1").write_bytes(b"partial")
    (leftovers / "packed" / ".tmp-00000.tar.x2").write_bytes(b"partial")
    check_out_dir(leftovers, str(train))
    (leftovers / "manifest.json").write_text("{}")  # with a manifest, Manifest.open decides
    (leftovers / "00000.parquet").write_bytes(b"x")
    check_out_dir(leftovers, str(train))


def test_stale_temporaries_are_removed_at_the_top_and_under_packed(tmp_path):
    (tmp_path / "packed").mkdir()
    stale = [tmp_path / ".tmp-00001.parquet.ab12", tmp_path / ".tmp-manifest.json.cd34",
             tmp_path / ".tmp-extract.yaml.ef56", tmp_path / "packed" / ".tmp-00001.tar.gh78"]
    kept = [tmp_path / ".tmp-notes.txt", tmp_path / "packed" / "00000.tar", tmp_path / "00000.parquet"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == 4
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_the_workers_get_a_package_named_softclip(tmp_path):
    package = job.stage_worker_package(tmp_path)
    assert package == tmp_path / "softclip"
    assert sorted(p.name for p in package.iterdir()) == ["__init__.py", "extract", "pipeline"]
    assert (package / "extract" / "detector" / "vinvl.py").is_file() and (package / "extract" / "job" / "actor.py").is_file() and not (package / "extract" / "weights").exists()


def test_ray_address_from_the_environment_joins_with_the_code(tmp_path, bad_source, monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    cfg = tiny_config(tmp_path, bad_source)
    assert job._init_ray(cfg) is True
    assert calls[-1]["address"] == "ray://head:10001"
    assert [Path(p).name for p in calls[-1]["runtime_env"]["py_modules"]] == ["softclip"]
    assert job._init_ray(cfg.replace(ray_address="auto")) and calls[-1]["address"] == "auto"
    monkeypatch.delenv("RAY_ADDRESS")
    assert job._init_ray(cfg) and "address" not in calls[-1] and "runtime_env" not in calls[-1]
