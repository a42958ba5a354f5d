import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from softclip.pipeline.shards import (
    SCHEMA_VERSION,
    CorruptShardError,
    FeatureRecord,
    SchemaVersionError,
    box_geometry,
    error_record,
    load_npy,
    ragged_column,
    read_feature_frame,
    read_feature_table,
    read_webdataset_shard,
    records_to_table,
    sample_to_record,
    shard_name,
    table_to_records,
    write_parquet_shard,
    write_webdataset_shard,
)

DIM = 16


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
    frame = read_feature_frame(path, columns=["key", "num_boxes", "status"])
    assert frame["num_boxes"].to_list() == [3, 0, 5, 1, 0]
    assert frame["status"].to_list()[-1] == "error"
    assert pq.read_metadata(path).metadata[b"softclip.schema_version"] == str(SCHEMA_VERSION).encode()


def test_webdataset_round_trip_with_zero_box_rows(tmp_path, records):
    images = {records[0].key: b"\xff\xd8jpeg"}
    path = write_webdataset_shard(tmp_path / "00000.tar", records, images)
    back = list(read_webdataset_shard(path))
    assert [img for _, img in back] == [b"\xff\xd8jpeg", None, None, None, None]
    for a, (b, _) in zip(records, back):
        _assert_same(a, b)
    raw = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in raw] == [r.key for r in records]
    _assert_same(records[2], sample_to_record(raw[2]))


def test_damaged_shards_are_errors_naming_the_file(tmp_path, records):
    path = write_parquet_shard(tmp_path / "00000.parquet", records, feature_dim=DIM)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match="00000.parquet.*re-extract"):
        read_feature_table(path)
    sample = dict(next(iter(wds.WebDataset(str(write_webdataset_shard(tmp_path / "00000.tar", records)),
                                            shardshuffle=False))))
    del sample["roi.npy"]
    with pytest.raises(CorruptShardError, match="shard.tar: sample .* lacks its roi.npy"):
        sample_to_record(sample, "shard.tar")


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
        read_feature_frame(tmp_path / "foreign.parquet")


def test_wrong_feature_dim_is_refused(records):
    with pytest.raises(ValueError, match="feature_dim"):
        records_to_table(records, DIM + 1)


def test_box_geometry_is_the_oscar_formula():
    geometry = box_geometry(np.array([[10, 20, 30, 60]]), 100, 200)
    assert np.allclose(geometry, [[0.1, 0.1, 0.3, 0.3, 0.2, 0.2]])
    assert box_geometry(np.zeros((0, 4)), 5, 5).shape == (0, 6)
