"""Task layouts, dataset readers and the missing-dataset message."""

import json

import pytest

from softclip.eval.datasets import (
    TASKS,
    MissingDatasetError,
    expand_tasks,
    imagenet_templates,
    load_classification_set,
    load_retrieval_set,
    task_directory,
)


def test_expand_tasks_groups_and_unknown():
    assert expand_tasks(["shapes", "shapes-shape", "coco"]) == (
        "shapes-shape", "shapes-colour_shape", "shapes-retrieval", "coco")
    with pytest.raises(ValueError, match="unknown evaluation task 'cifar10'"):
        expand_tasks(["cifar10"])


@pytest.mark.parametrize("task", ["coco", "flickr30k", "imagenet", "shapes-retrieval"])
def test_missing_dataset_says_what_layout_and_where(tmp_path, task):
    with pytest.raises(MissingDatasetError) as info:
        task_directory(task, tmp_path)
    message = str(info.value)
    assert str(tmp_path / TASKS[task].relative_dir) in message
    assert "--data-root" in message
    if task == "coco":
        assert "dataset_coco.json" in message and "val2014" in message
    if task == "flickr30k":
        assert "dataset_flickr30k.json" in message and "flickr30k-images" in message
    if task == "imagenet":
        assert "WordNet id" in message


def test_missing_annotation_file_is_named(tmp_path):
    (tmp_path / "coco").mkdir()
    with pytest.raises(MissingDatasetError, match="dataset_coco.json does not exist"):
        task_directory("coco", tmp_path)


def test_path_override_wins(tmp_path):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "dataset_flickr30k.json").write_text("{}")
    assert task_directory("flickr30k", tmp_path / "nothing", {"flickr30k": folder}) == folder


def test_karpathy_reader_keeps_test_split_and_all_captions(tmp_path):
    entries = [
        {"filename": "a.jpg", "split": "test", "sentences": [{"raw": " one. "}, {"raw": "two."}]},
        {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "skip."}]},
        {"filename": "c.jpg", "split": "test", "sentences": [{"raw": "three."}]},
        {"filepath": "val2014", "filename": "d.jpg", "split": "test", "sentences": [{"raw": "four."}]},
    ]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    data = load_retrieval_set("flickr30k", tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in data.files] == [
        "flickr30k-images/a.jpg", "flickr30k-images/c.jpg", "val2014/d.jpg"]
    assert data.captions == ["one.", "two.", "three.", "four."]
    assert data.caption_to_image == [0, 0, 1, 2]


def test_malformed_annotation_names_the_file(tmp_path):
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [{"filename": "x.jpg"}]}))
    with pytest.raises(ValueError, match="dataset_coco.json: missing or malformed field 'split'"):
        load_retrieval_set("coco", tmp_path)


def test_imagenet_folder_order_is_class_order(tmp_path):
    from open_clip import IMAGENET_CLASSNAMES

    root = tmp_path / "imagenet" / "val"
    wnids = [f"n{index:08d}" for index in range(1000)]
    for index, wnid in enumerate(wnids):
        (root / wnid).mkdir(parents=True)
        if index not in (7, 999):
            (root / wnid / f"ILSVRC2012_val_{index + 1:08d}.JPEG").write_bytes(b"")
    with pytest.raises(MissingDatasetError, match="2 of the 1000 class folders .* hold no image .*n00000007"):
        load_classification_set("imagenet", root)  # a half-copied val set
    (root / wnids[7] / "ILSVRC2012_val_00000008.JPEG").write_bytes(b"")
    (root / wnids[999] / "ILSVRC2012_val_00001000.jpeg").write_bytes(b"")
    data = load_classification_set("imagenet", task_directory("imagenet", tmp_path))
    assert data.labels == list(range(1000)) and data.files[7].name == "ILSVRC2012_val_00000008.JPEG"
    assert data.classnames == list(IMAGENET_CLASSNAMES)
    assert len(data.templates) == 80 and data.templates[0] == "a bad photo of a {}."
    assert all("{}" in t for t in imagenet_templates())
    (root / wnids[0]).rename(root / "not-a-wnid")
    with pytest.raises(MissingDatasetError, match="999 WordNet-id folders, expected 1000"):
        load_classification_set("imagenet", root)


@pytest.mark.parametrize("content", [b'{"images": [', b'{"images": "\xff\xfe"}'], ids=["json", "utf8"])
def test_unreadable_annotation_names_the_file(tmp_path, content):
    (tmp_path / "dataset_coco.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"dataset_coco.json: not valid UTF-8 JSON"):
        load_retrieval_set("coco", tmp_path)


def _to_tensor(image):
    import torch

    return torch.zeros(3, 2, 2)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_undecodable_image_names_the_file_also_from_a_worker(tmp_path, num_workers):
    from torch.utils.data import DataLoader

    from softclip.eval.datasets import ImageFiles
    from softclip.pipeline.images import ImageDecodeError

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    loader = DataLoader(ImageFiles([bad], _to_tensor), batch_size=1, num_workers=num_workers)
    with pytest.raises(ImageDecodeError) as info:
        next(iter(loader))
    assert info.value.reason == "corrupt" and str(bad) in info.value.detail
    missing = tmp_path / "missing.jpg"
    with pytest.raises(MissingDatasetError, match="missing.jpg listed by the dataset does not exist"):
        next(iter(DataLoader(ImageFiles([missing], _to_tensor), batch_size=1, num_workers=num_workers)))
