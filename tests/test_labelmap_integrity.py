"""Label maps (issue 14, row 18): the two directions must agree, and a detector's weights carry the names
they were trained with, so a permuted or swapped label map is refused instead of relabelling every box."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from softclip.extract.detector.checkpoint import (
    CheckpointError,
    read_labelmap,
    read_labelmap_for,
    write_labelmap,
)
from softclip.extract.detector.vinvl import VinVLDetector

SHIPPED = Path(__file__).resolve().parents[1] / "extract" / "weights" / "shapes"


def _permuted(tmp_path: Path) -> Path:
    classes, attributes = read_labelmap(SHIPPED / "labelmap.json")
    swapped = [classes[0], classes[2], classes[1], *classes[3:]]  # circle <-> square: still self-consistent
    return write_labelmap(tmp_path / "labelmap.json", swapped, attributes)


def test_idx_to_label_must_agree_with_label_to_idx(tmp_path):
    data = json.loads((SHIPPED / "labelmap.json").read_text())
    data["idx_to_label"]["1"], data["idx_to_label"]["2"] = data["idx_to_label"]["2"], data["idx_to_label"]["1"]
    path = tmp_path / "labelmap.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"{path}: 'idx_to_label' and 'label_to_idx' disagree.*index 1"):
        read_labelmap(path)


def test_attribute_maps_must_agree_too(tmp_path):
    data = json.loads((SHIPPED / "labelmap.json").read_text())
    data["idx_to_attribute"]["1"] = "mauve"
    path = tmp_path / "labelmap.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="'idx_to_attribute' and 'attribute_to_idx' disagree"):
        read_labelmap(path)


def test_the_shipped_detector_refuses_a_permuted_label_map(tmp_path):
    permuted = _permuted(tmp_path)
    assert read_labelmap(permuted)[0] != read_labelmap(SHIPPED / "labelmap.json")[0]
    with pytest.raises(CheckpointError, match=rf"{permuted}: .*differ.*model\.pth.*circle"):
        read_labelmap_for(SHIPPED / "model.pth", permuted)
    with pytest.raises(CheckpointError, match="differ"):
        VinVLDetector.from_checkpoint(SHIPPED / "model.pth", permuted, config=SHIPPED / "detector.yaml")
    assert read_labelmap_for(SHIPPED / "model.pth", SHIPPED / "labelmap.json") == read_labelmap(
        SHIPPED / "labelmap.json")


def test_weights_without_names_accept_any_label_map_of_the_right_size(tmp_path):
    shutil.copy(SHIPPED / "model.pth", tmp_path / "released.pth")  # e.g. VinVL's own release: no names file
    assert read_labelmap_for(tmp_path / "released.pth", _permuted(tmp_path))[0][1] == "square"


def test_writing_a_label_map_for_weights_records_their_names(tmp_path):
    weights = tmp_path / "model.pth"
    shutil.copy(SHIPPED / "model.pth", weights)
    classes, attributes = read_labelmap(SHIPPED / "labelmap.json")
    write_labelmap(tmp_path / "own.json", classes, attributes, weights=weights)
    assert read_labelmap_for(weights, tmp_path / "own.json") == (classes, attributes)
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError, match="differ"):
        read_labelmap_for(weights, _permuted(tmp_path / "other"))
