import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from softclip.pipeline.packed import (
    PACKED_VERSION,
    ROI_MEMBER,
    packed_samples,
    read_packed_sample,
    write_packed_shard,
)
from softclip.pipeline.shards import (
    SCHEMA_VERSION,
    CorruptShardError,
    FeatureRecord,
    SchemaVersionError,
    box_geometry,
    error_record,
    load_npy,
    ragged_column,
    read_feature_table,
    records_to_table,
    shard_name,
    write_parquet_shard,
)

DIM = 16


def table_to_records(table: pa.Table) -> list[FeatureRecord]:
    """Rows of a feature table as :class:`FeatureRecord` objects (the test suite's way to compare rows)."""
    arrays = {name: ragged_column(table, name) for name in ("boxes", "geometry", "roi_features", "labels", "scores")}
    plain = table.drop_columns([*arrays, "num_boxes"]).to_pylist()
    return [FeatureRecord(**row, **{name: np.array(column.row(i)) for name, column in arrays.items()})
            for i, row in enumerate(plain)]


def _record(i, num_boxes, rng):
    boxes = np.sort(rng.uniform(0, 60, size=(num_boxes, 4)).astype(np.float32).reshape(num_boxes, 2, 2),
                    axis=1).transpose(0, 2, 1).reshape(num_boxes, 4)
    names = [f"class{j}" for j in range(num_boxes)]
    attrs = [[f"attr{j}", "red"][: 1 + j % 2] for j in range(num_boxes)]
    return FeatureRecord(
        key=f"00000{i:04d}", shard="00000", width=64, height=48, caption=f"caption {i}",
        boxes=boxes, geometry=box_geometry(boxes, 64, 48),
        roi_features=rng.normal(size=(num_boxes, DIM)).astype(np.float16),
        labels=np.arange(num_boxes, dtype=np.int32), scores=rng.uniform(size=num_boxes).astype(np.float32),
        class_names=names, attr_labels=[list(range(1, len(a) + 1)) for a in attrs], attr_names=attrs,
        attr_scores=[[0.5] * len(a) for a in attrs], tags=", ".join(names), detector="test-detector",
    )


@pytest.fixture
def records():
    rng = np.random.default_rng(0)
    recs = [_record(i, n, rng) for i, n in enumerate([3, 0, 5, 1])]
    recs.append(error_record("000000004", "00000", "decode: truncated", feature_dim=DIM, caption="bad"))
    return recs


def _assert_same(a: FeatureRecord, b: FeatureRecord):
    for field in ("key", "shard", "width", "height", "status", "error", "caption", "class_names",
                  "attr_labels", "attr_names", "tags", "detector"):
        assert getattr(a, field) == getattr(b, field), field
    for field in ("boxes", "geometry", "roi_features", "labels", "scores"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), field
    assert np.allclose([s for box in a.attr_scores for s in box], [s for box in b.attr_scores for s in box])


def test_parquet_round_trip_with_zero_box_rows(tmp_path, records):
    path = write_parquet_shard(tmp_path / f"{shard_name(0)}.parquet", records, feature_dim=DIM)
    back = table_to_records(read_feature_table(path))
    assert len(back) == len(records)
    for a, b in zip(records, back):
        _assert_same(a, b)
    table = read_feature_table(path, columns=["key", "num_boxes", "status"])
    assert table.column("num_boxes").to_pylist() == [3, 0, 5, 1, 0]
    assert table.column("status").to_pylist()[-1] == "error"
    assert pq.read_metadata(path).metadata[b"softclip.schema_version"] == str(SCHEMA_VERSION).encode()


def _packed(tmp_path, records):
    """A packed shard of ``records``, image bytes ``image-<key>``."""
    table = records_to_table(records, DIM).append_column(
        "image", pa.array([f"image-{r.key}".encode() for r in records], pa.binary()))
    return write_packed_shard(tmp_path / "00000.tar", packed_samples(table))


def test_packed_shards_hold_successful_rows_in_three_members(tmp_path, records):
    path = _packed(tmp_path, records)
    with tarfile.open(path) as tar:
        names = tar.getnames()
    ok = [r for r in records if r.status == "success"]
    assert names == [f"{r.key}.{m}" for r in ok for m in ("jpg", "json", ROI_MEMBER)]
    raw = list(wds.WebDataset(str(path), shardshuffle=False))  # webdataset reads them as they are
    assert [s["__key__"] for s in raw] == [r.key for r in ok]
    for record, sample in zip(ok, raw):
        back = read_packed_sample(sample, str(path))
        assert (back.key, back.caption, back.tags, back.image) == (record.key, record.caption, record.tags,
                                                                   f"image-{record.key}".encode())
        for field, got in (("roi_features", back.roi_features), ("geometry", back.geometry),
                           ("scores", back.scores)):
            want = getattr(record, field)
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), field
        assert json.loads(sample["json"])["caption"] == record.caption and "txt" not in sample  # caption once


def test_damaged_shards_are_errors_naming_the_file(tmp_path, records):
    path = write_parquet_shard(tmp_path / "00000.parquet", records, feature_dim=DIM)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match="00000.parquet.*re-extract"):
        read_feature_table(path)
    sample = dict(next(iter(wds.WebDataset(str(_packed(tmp_path, records)), shardshuffle=False))))
    with pytest.raises(CorruptShardError, match=f"shard.tar: sample .* lacks its json or {ROI_MEMBER}"):
        read_packed_sample({k: v for k, v in sample.items() if k != ROI_MEMBER}, "shard.tar")
    with pytest.raises(CorruptShardError, match="shard.tar: sample"):
        read_packed_sample({**sample, ROI_MEMBER: sample[ROI_MEMBER][:-5]}, "shard.tar")
    old = {**sample, "json": json.dumps({**json.loads(sample["json"]), "packed_version": 1}).encode()}
    with pytest.raises(SchemaVersionError, match=f"packed format 1, this softclip reads format {PACKED_VERSION}"):
        read_packed_sample(old, "shard.tar")


def _npy(array, version=None):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float16).reshape(3, 4), np.zeros((0, 72), np.float16), np.arange(5, dtype=np.int32),
    np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)), np.array(3.5), np.arange(4, dtype=">i8"),
], ids=["f16", "zero-rows", "i32", "fortran", "scalar", "big-endian"])
@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_load_npy_equals_np_load(array, version):
    data = _npy(array, version)
    expected = np.load(io.BytesIO(data), allow_pickle=False)
    loaded = load_npy(data)
    assert loaded.dtype == expected.dtype and loaded.shape == expected.shape and np.array_equal(loaded, expected)
    assert loaded.flags.writeable and load_npy(data) is not loaded


def test_load_npy_refuses_what_np_load_would():
    data = _npy(np.arange(6, dtype=np.float32))
    with pytest.raises(ValueError, match="needs 24 bytes"):
        load_npy(data[:-4])
    with pytest.raises(ValueError, match="not an .npy"):
        load_npy(b"PK\x03\x04 a zip file")
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="never unpickled"):
        load_npy(buffer.getvalue())


def test_ragged_columns_are_flat_arrays(tmp_path, records):
    table = read_feature_table(write_parquet_shard(tmp_path / "s.parquet", records, feature_dim=DIM))
    roi = ragged_column(table, "roi_features")
    assert roi.values.shape == (9, DIM) and roi.values.dtype == np.float16
    assert list(roi.offsets) == [0, 3, 3, 8, 9, 9]
    assert np.array_equal(roi.row(2), records[2].roi_features)
    assert ragged_column(table, "scores").values.shape == (9,)


def test_schema_version_mismatch_is_a_clear_error(tmp_path, records):
    table = records_to_table(records, DIM)
    other = table.replace_schema_metadata({b"softclip.schema_version": b"99"})
    pq.write_table(other, tmp_path / "old.parquet")
    with pytest.raises(SchemaVersionError, match="version 99.*reads version 1"):
        read_feature_table(tmp_path / "old.parquet")
    pq.write_table(table.replace_schema_metadata({}), tmp_path / "foreign.parquet")
    with pytest.raises(SchemaVersionError, match="not a softclip feature shard"):
        read_feature_table(tmp_path / "foreign.parquet")


def test_wrong_feature_dim_is_refused(records):
    with pytest.raises(ValueError, match="feature_dim"):
        records_to_table(records, DIM + 1)


def test_box_geometry_is_the_oscar_formula():
    geometry = box_geometry(np.array([[10, 20, 30, 60]]), 100, 200)
    assert np.allclose(geometry, [[0.1, 0.1, 0.3, 0.3, 0.2, 0.2]])
    assert box_geometry(np.zeros((0, 4)), 5, 5).shape == (0, 6)
