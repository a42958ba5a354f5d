import pytest

from softclip.pipeline.registry import DatasetNotFoundError, list_datasets, load_dataset_spec, resolve_dataset


def test_every_registered_dataset_loads():
    names = list_datasets()
    assert {"shapes", "cc3m", "cc12m", "coco", "flickr30k", "imagenet"} <= set(names)
    for name in names:
        spec = load_dataset_spec(name)
        assert spec.name == name and spec.how_to_get


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        resolve_dataset("cc3m", root=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "cc3m") in message and "img2dataset" in message


def test_present_dataset_resolves(tmp_path):
    (tmp_path / "shapes" / "train").mkdir(parents=True)
    assert resolve_dataset("shapes", root=tmp_path) == tmp_path / "shapes" / "train"


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="cc3m"):
        load_dataset_spec("cc4m")
