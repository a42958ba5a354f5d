import io
import json
import shutil

import polars as pl
import pytest
import webdataset as wds
from PIL import Image

from softclip.pipeline.img2dataset import ShardWriter
from softclip.pipeline.sources import SourceError, open_source


def _all(source):
    return [s for shard in source.shards for s in source.iter_shard(shard)]


def test_img2dataset_layout_reads_back_with_webdataset(shapes_world):
    samples = list(wds.WebDataset(str(shapes_world / "train/00000.tar"), shardshuffle=False))
    assert len(samples) == 50
    first = samples[0]
    assert first["__key__"] == "000000000" and {"jpg", "txt", "json"} <= set(first)
    assert json.loads(first["json"])["caption"] == first["txt"].decode()


@pytest.mark.parametrize("spec", ["train", "train/{00000..00002}.tar"])
def test_project_reader_directory_and_brace_pattern(shapes_world, spec):
    source = open_source(f"{shapes_world}/{spec}")
    samples = _all(source)
    assert source.kind == "webdataset" and [s.name for s in source.shards] == ["00000", "00001", "00002"]
    assert len(samples) == 120 and len({s.key for s in samples}) == 120
    assert all(s.key.startswith(s.shard) for s in samples)
    assert all(s.image and s.caption and s.error is None for s in samples)
    assert samples[0].meta["objects"]


def test_single_tar(shapes_world):
    source = open_source(shapes_world / "train/00002.tar")
    assert len(_all(source)) == 20


def test_missing_shards_in_brace_pattern(shapes_world):
    with pytest.raises(SourceError, match="2 of 5 shards are missing"):
        open_source(f"{shapes_world}/train/{{00000..00004}}.tar")


def test_empty_directory_explains_expected_layout(tmp_path):
    with pytest.raises(SourceError, match="captions"):
        open_source(tmp_path)
    with pytest.raises(SourceError, match="no such dataset"):
        open_source(tmp_path / "nope")


def test_truncated_shard_keeps_samples_before_the_cut(shapes_world, tmp_path):
    data = (shapes_world / "train/00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[: len(data) // 2])
    samples = _all(open_source(tmp_path))
    assert samples[-1].error and "truncated" in samples[-1].error
    assert all(s.error is None for s in samples[:-1]) and len(samples) > 10


def test_unreadable_shard_raises_naming_it(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    source = open_source(tmp_path)
    with pytest.raises(SourceError, match="00000.tar"):
        _all(source)


def test_failed_download_rows_have_no_image(tmp_path):
    with ShardWriter(tmp_path, 0) as shard:
        shard.write(None, caption="lost", width=0, height=0, status="failed_to_download", error_message="404")
    (sample,) = _all(open_source(tmp_path))
    assert sample.image is None and sample.meta["status"] == "failed_to_download"


def _png(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_image_folder_with_captions_file(tmp_path, fmt):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(5):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(_png((i * 40, 0, 0)))
        rows.append({"file": f"imgs/{i}.png", "text": f"image {i}"})
    rows.append({"file": "imgs/missing.png", "text": "gone"})
    frame = pl.DataFrame(rows)
    path = tmp_path / f"captions.{fmt}"
    {"csv": frame.write_csv, "jsonl": frame.write_ndjson, "parquet": frame.write_parquet}[fmt](path)
    source = open_source(tmp_path, samples_per_shard=4)
    samples = _all(source)
    assert [s.name for s in source.shards] == ["00000", "00001"]
    assert [s.shard for s in samples] == ["00000"] * 4 + ["00001"] * 2
    assert [s.caption for s in samples[:5]] == [f"image {i}" for i in range(5)]
    assert len({s.key for s in samples}) == 6
    assert samples[-1].image is None and "missing.png" in samples[-1].error
    assert open_source(path).shards[0].rows == (0, 6)


def test_captions_file_without_caption_column(tmp_path):
    pl.DataFrame({"file": ["a.png"], "label": [1]}).write_csv(tmp_path / "captions.csv")
    with pytest.raises(SourceError, match="caption column"):
        open_source(tmp_path)


def test_copied_dataset_is_independent_of_location(shapes_world, tmp_path):
    shutil.copytree(shapes_world / "train", tmp_path / "copy")
    assert [s.key for s in _all(open_source(tmp_path / "copy"))] == [
        s.key for s in _all(open_source(shapes_world / "train"))]


def test_shard_cut_at_a_member_header_ends_with_an_error_row(shapes_world, tmp_path):
    data = (shapes_world / "train/00000.tar").read_bytes()
    import tarfile

    with tarfile.open(shapes_world / "train/00000.tar") as tar:
        offsets = [m.offset for m in tar.getmembers()]
    cut = offsets[len(offsets) // 2]  # exactly at a header: tarfile itself stops without an error
    with tarfile.open(shapes_world / "train/00000.tar") as tar:
        key_at_cut = tar.getmembers()[len(offsets) // 2].name.partition(".")[0]
    (tmp_path / "00000.tar").write_bytes(data[:cut] + b"\x07" * 100)
    samples = _all(open_source(tmp_path))
    assert samples[-1].error and "truncated tar" in samples[-1].error and str(cut) in samples[-1].error
    assert samples[-1].image is None and "." not in samples[-1].key
    good = samples[:-1]
    assert good and all(s.key < key_at_cut or s.error for s in good)
    (tmp_path / "00000.tar").write_bytes(data[:cut])
    assert "truncated tar" in _all(open_source(tmp_path))[-1].error


def test_complete_shards_have_no_truncation_row(shapes_world):
    assert all(s.error is None for s in _all(open_source(shapes_world / "train")))


def test_brace_pattern_with_two_shards_of_one_name(shapes_world, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(shapes_world / "train/00000.tar", tmp_path / folder / "00000.tar")
    with pytest.raises(SourceError, match="two shards are named 00000"):
        open_source(f"{tmp_path}/{{a,b}}/00000.tar")


def test_malformed_rows_become_error_samples(tmp_path):
    pl.DataFrame({"file": ["a.png", None], "text": ["x", "y"]}).write_csv(tmp_path / "captions.csv")
    (tmp_path / "a.png").write_bytes(_png((1, 2, 3)))
    samples = _all(open_source(tmp_path))
    assert samples[0].error is None and "has no image path" in samples[1].error
    with ShardWriter(tmp_path / "tars", 0) as shard:
        shard.write(_png((1, 2, 3)), caption="ok", width=8, height=8)
    import tarfile

    path = tmp_path / "tars" / "00000.tar"
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            data = b"[1]" if name.endswith(".json") else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = _all(open_source(tmp_path / "tars"))
    assert "not an object" in sample.error


def test_captions_keys_with_dots_are_refused(tmp_path):
    pl.DataFrame({"key": ["img.001"], "file": ["a.png"], "text": ["x"]}).write_csv(tmp_path / "captions.csv")
    with pytest.raises(SourceError, match="img.001"):
        open_source(tmp_path)


def test_one_shard_spec_expansion_serves_sources_and_training(shapes_world, tmp_path):
    from softclip.pipeline.sources import expand_shard_spec
    from softclip.train.config import DataConfig
    from softclip.train.data import TrainData

    train = shapes_world / "train"
    tars = [train / f"{i:05d}.tar" for i in range(3)]
    assert expand_shard_spec(train) == tars == expand_shard_spec(f"{train}/{{00000..00002}}.tar")
    assert expand_shard_spec(tars[1]) == [tars[1]]
    with pytest.raises(SourceError, match=rf"{tmp_path}: no \*.tar shards in this directory; look here$"):
        expand_shard_spec(tmp_path, hint="look here")
    with pytest.raises(SourceError, match=rf"{tmp_path / 'x.tar'}: no such file or directory"):
        expand_shard_spec(tmp_path / "x.tar")
    spec = f"{train}/{{00000..00004}}.tar"
    with pytest.raises(SourceError, match=r"2 of 5 shards are missing, e.g. .*00003.tar; check data.train_shards"):
        TrainData(DataConfig(train_shards=spec, batch_size=2), transform=None, tokenizer=None, feature_dim=4)
