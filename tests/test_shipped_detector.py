"""The shipped shapes detector (``extract/weights/shapes/``): loads strictly, matches the training config,
and still tags held-out shapes images well (a regression guard; the full figure is in its README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from softclip.extract.detector.config import DetectorConfig
from softclip.extract.detector.evaluation import evaluate_tags
from softclip.extract.detector.vinvl import VinVLDetector
from softclip.pipeline.config import load_config
from softclip.pipeline.shapes import COLOURS, ShapesConfig, generate

ROOT = Path(__file__).parent.parent
WEIGHTS = ROOT / "extract" / "weights" / "shapes"


@pytest.fixture(scope="module")
def shipped() -> VinVLDetector:
    return VinVLDetector.from_checkpoint(WEIGHTS / "model.pth", WEIGHTS / "labelmap.json",
                                         config=WEIGHTS / "detector.yaml")


def test_shipped_config_is_the_repository_config() -> None:
    shipped_cfg = load_config(DetectorConfig, WEIGHTS / "detector.yaml")
    assert shipped_cfg == load_config(DetectorConfig, ROOT / "extract" / "configs" / "shapes.yaml")


def test_shipped_weights_are_small() -> None:
    assert (WEIGHTS / "model.pth").stat().st_size < 10 * 2**20


def test_shipped_detector_tags_held_out_images(shipped: VinVLDetector, tmp_path: Path) -> None:
    # 100 held-out images of seed 0 (the demo's world; the detector was trained on seed 1000).
    generate(tmp_path, ShapesConfig(num_train=0, num_retrieval=100, num_classification_per_class=0, seed=0),
             progress=False)
    report = evaluate_tags(shipped, tmp_path, colours=COLOURS, batch_size=25, progress=False)
    assert report["images"] == 100 and report["objects"] >= 100
    assert report["precision"] >= 0.85, report
    assert report["recall"] >= 0.85, report
