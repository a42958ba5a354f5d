import json
import re
import tarfile

import polars as pl
import pytest

from softclip.pipeline.shapes import (
    COLOURS,
    SHAPES,
    SIZES,
    ShapesConfig,
    generate,
)
from softclip.pipeline.shapes_captions import (
    _COLOUR_WORDS,  # the vocabulary the captions are made from
    _SHAPE_WORDS,
)

TINY = dict(num_train=60, num_retrieval=6, num_classification_per_class=1, samples_per_shard=25)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith("_stats.json")}  # stats hold wall-clock times


def test_vocabulary_is_large_enough():
    assert len(SHAPES) >= 8 and len(COLOURS) >= 8 and len(SIZES) == 2


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    generate(tmp_path / "a", ShapesConfig(**TINY, seed=1), progress=False)
    generate(tmp_path / "b", ShapesConfig(**TINY, seed=1), progress=False)
    generate(tmp_path / "c", ShapesConfig(**TINY, seed=2), progress=False)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_img2dataset_layout(shapes_world):
    train = shapes_world / "train"
    assert sorted(p.name for p in train.iterdir()) == [
        f"0000{i}{ext}" for i in range(3) for ext in (".parquet", ".tar", "_stats.json")]
    with tarfile.open(train / "00001.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["000010000.jpg", "000010000.txt", "000010000.json"]
    side = pl.read_parquet(train / "00001.parquet")
    assert side["key"].to_list()[0] == "000010000" and side.height == 50
    assert {"url", "key", "caption", "status", "width", "height", "error_message"} <= set(side.columns)
    stats = json.loads((train / "00002_stats.json").read_text())
    assert stats["count"] == 20 and stats["successes"] == 20


def _train_meta(root):
    metas = []
    for shard in sorted((root / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    return metas


def test_annotations_inside_image_and_objects_per_image(shapes_world):
    for meta in _train_meta(shapes_world):
        assert 1 <= len(meta["objects"]) <= 4
        for obj in meta["objects"]:
            x1, y1, x2, y2 = obj["box"]
            assert 0 <= x1 < x2 <= meta["width"] and 0 <= y1 < y2 <= meta["height"]
            assert obj["shape"] in SHAPES and obj["colour"] in COLOURS and obj["size"] in SIZES


def _colours_in(caption):
    words = re.findall(r"[a-z]+", caption.lower())
    return {c for c, synonyms in _COLOUR_WORDS.items() for w in words if w in synonyms}


def test_clean_captions_only_mention_present_colours(shapes_world):
    for meta in _train_meta(shapes_world):
        assert meta["noise"] is None
        assert _colours_in(meta["caption"]) <= {o["colour"] for o in meta["objects"]}
    karpathy = json.loads((shapes_world / "eval/retrieval/dataset_karpathy.json").read_text())
    for entry in karpathy["images"]:
        assert len(entry["sentences"]) == 5 and entry["split"] == "test"
        for sentence in entry["sentences"]:
            assert _colours_in(sentence["raw"]) <= {o["colour"] for o in entry["objects"]}
        assert (shapes_world / "eval/retrieval" / entry["filepath"] / entry["filename"]).is_file()


def test_captions_vary_and_some_fit_several_images(tmp_path):
    out = tmp_path / "w"
    generate(out, ShapesConfig(num_train=400, num_retrieval=0, num_classification_per_class=0), progress=False)
    captions = [m["caption"] for m in _train_meta(out)]
    assert len({" ".join(c.split(" ")[:2]) for c in captions}) >= 8  # several templates
    partial = [m for m in _train_meta(out) if len(m["objects"]) > 1 and len(_colours_in(m["caption"])) == 1]
    relations = [c for c in captions if re.search(r"left of|right of|above|below", c)]
    assert partial and relations


@pytest.mark.parametrize("noise", [0.2, 0.4])
def test_caption_noise_rate_matches_knob(tmp_path, noise):
    out = tmp_path / "w"
    summary = generate(out, ShapesConfig(num_train=500, num_retrieval=0, num_classification_per_class=0,
                                         caption_noise=noise, attribute_noise=0.1), progress=False)
    metas = _train_meta(out)
    replaced = [m for m in metas if m["noise"] == "caption"]
    assert abs(len(replaced) / len(metas) - noise) <= 0.01
    assert abs(summary["attribute_noise_rate"] - 0.1) <= 0.01
    for m in [m for m in metas if m["noise"] == "attribute"]:
        assert not _colours_in(m["caption"]) <= {o["colour"] for o in m["objects"]} or len(m["objects"]) > 1


def _shapes_in(caption):
    text = " " + caption.lower().replace(",", " ").replace(".", " ").replace("!", " ") + " "
    return {s for s, synonyms in _SHAPE_WORDS.items() for w in synonyms if f" {w} " in text}


def test_every_noise_model_at_its_exact_rate_on_disjoint_samples(tmp_path):
    rates = dict(caption_noise=0.1, attribute_noise=0.1, partial_noise=0.15, hallucination_noise=0.2)
    summary = generate(tmp_path, ShapesConfig(num_train=400, num_retrieval=0, num_classification_per_class=0,
                                              **rates), progress=False)
    metas = _train_meta(tmp_path)
    for kind in ("caption", "attribute", "partial", "hallucination"):
        assert sum(m["noise"] == kind for m in metas) == round(rates[f"{kind}_noise"] * 400), kind
        assert summary[f"{kind}_noise_rate"] == rates[f"{kind}_noise"]
    for m in metas:
        present = {(o["colour"], o["shape"]) for o in m["objects"]}
        if m["noise"] == "partial":  # one object, by its shape only: true but underspecified
            assert not _colours_in(m["caption"]) and len(_shapes_in(m["caption"])) == 1
            assert _shapes_in(m["caption"]) <= {o["shape"] for o in m["objects"]}
        if m["noise"] == "hallucination":  # one more colour+shape phrase than objects, naming one absent
            phrases = m["caption"].count(",") + m["caption"].count(" and ") + 1  # "a, b and c"
            assert phrases == len(m["objects"]) + 1, m["caption"]
            named = {(c, s) for c in _colours_in(m["caption"]) for s in _shapes_in(m["caption"])}
            assert named - present


def test_noise_rates_must_fit_in_one():
    with pytest.raises(ValueError, match="partial_noise must be in"):
        ShapesConfig(partial_noise=1.5)
    with pytest.raises(ValueError, match="must be at most 1 .* got 1.1"):
        ShapesConfig(caption_noise=0.6, hallucination_noise=0.5)


def test_classification_sets(shapes_world):
    for task, num_classes in (("shape", len(SHAPES)), ("colour_shape", len(SHAPES) * len(COLOURS))):
        data = json.loads((shapes_world / f"eval/classification/{task}.json").read_text())
        assert len(data["classnames"]) == num_classes and data["templates"]
        assert len(data["samples"]) == len(SHAPES) * len(COLOURS)
        assert {s["label"] for s in data["samples"]} == set(range(num_classes))
        assert all((shapes_world / "eval/classification" / s["file"]).is_file() for s in data["samples"])


def test_rerun_into_the_same_folder_replaces_the_previous_world(tmp_path):
    out = tmp_path / "w"
    small = dict(num_retrieval=3, num_classification_per_class=1, samples_per_shard=5)
    generate(out, ShapesConfig(num_train=20, **small, seed=1), progress=False)
    (out / "notes.txt").write_text("mine")  # not the generator's: kept
    generate(out, ShapesConfig(num_train=10, num_retrieval=2, num_classification_per_class=0,
                               samples_per_shard=5, seed=1), progress=False)
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert len(list((out / "train").iterdir())) == 6 and len(_train_meta(out)) == 10
    assert sorted(p.name for p in (out / "eval/retrieval/images").iterdir()) == ["000000.jpg", "000001.jpg"]
    assert not list((out / "eval/classification/images").iterdir())
    assert "num_train: 10" in (out / "shapes.yaml").read_text() and (out / "notes.txt").read_text() == "mine"
    generate(tmp_path / "fresh", ShapesConfig(**TINY, seed=4), progress=False)
    generate(out, ShapesConfig(**TINY, seed=4), progress=False)
    generate(out, ShapesConfig(**TINY, seed=4), progress=False)  # the same config again: the same bytes
    assert {k: v for k, v in _files(out).items() if k.name != "notes.txt"} == _files(tmp_path / "fresh")


def test_refuses_a_non_empty_folder_it_did_not_write(tmp_path):
    (tmp_path / "other" / "train").mkdir(parents=True)
    (tmp_path / "other" / "train" / "00000.tar").write_bytes(b"someone else's shard")
    with pytest.raises(FileExistsError, match=r"other is not empty and has no shapes.yaml"):
        generate(tmp_path / "other", ShapesConfig(**TINY), progress=False)
    assert (tmp_path / "other" / "train" / "00000.tar").read_bytes() == b"someone else's shard"
    (tmp_path / "empty").mkdir()
    generate(tmp_path / "empty", ShapesConfig(num_train=2, num_retrieval=0, num_classification_per_class=0),
             progress=False)
    assert (tmp_path / "empty" / "train" / "00000.tar").is_file()


def test_caption_noise_needs_a_second_training_image():
    with pytest.raises(ValueError, match=r"caption_noise=1.0 .* num_train=1 has no other image"):
        ShapesConfig(num_train=1, caption_noise=1.0)
    assert ShapesConfig(num_train=2, caption_noise=1.0).num_train == 2
    assert ShapesConfig(num_train=0, caption_noise=1.0).num_train == 0
