"""Detector settings travel with the weights: the ``detector.yaml`` beside a checkpoint is used when no
config is named, and a named config that contradicts it loads with a visible warning (issue 12, gap 1)."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from softclip.extract.detector.config import DetectorConfig, DetectorSettings
from softclip.extract.detector.vinvl import DetectorSettingsWarning, VinVLDetector
from softclip.pipeline.cli import build_app
from softclip.pipeline.config import load_config, save_config
from softclip.pipeline.shapes import ShapesConfig, generate

WEIGHTS = Path(__file__).parent.parent / "extract" / "weights" / "shapes"
SHIPPED = load_config(DetectorConfig, WEIGHTS / "detector.yaml")


def test_detector_yaml_beside_the_weights_is_used_without_a_config() -> None:
    detector = VinVLDetector.from_checkpoint(WEIGHTS / "model.pth", WEIGHTS / "labelmap.json")
    assert detector.settings == SHIPPED.test
    assert detector.config.name == SHIPPED.name
    assert detector.settings != DetectorSettings()  # VinVL's defaults would have been the wrong ones


def test_weights_without_detector_yaml_keep_vinvl_settings(tmp_path: Path) -> None:
    shutil.copy(WEIGHTS / "model.pth", tmp_path / "model.pth")
    cfg = replace(SHIPPED, test=DetectorSettings())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detector = VinVLDetector.from_checkpoint(tmp_path / "model.pth", WEIGHTS / "labelmap.json", config=cfg)
    assert detector.settings == DetectorSettings()


def test_a_contradicting_config_warns_and_names_each_setting(tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    save_config(replace(SHIPPED, test=SHIPPED.test.replace(score_thresh=0.2, detections_per_img=100)), other)
    with pytest.warns(DetectorSettingsWarning, match=r"score_thresh: 0\.2 vs 0\.5; detections_per_img: 100 vs 20"):
        detector = VinVLDetector.from_checkpoint(WEIGHTS / "model.pth", WEIGHTS / "labelmap.json", config=other)
    assert detector.settings.score_thresh == 0.2  # the explicit choice wins; the warning makes it visible


def test_the_same_config_named_explicitly_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VinVLDetector.from_checkpoint(WEIGHTS / "model.pth", WEIGHTS / "labelmap.json",
                                      config=WEIGHTS / "detector.yaml")


def test_generic_detect_command_uses_the_shipped_settings(tmp_path: Path) -> None:
    generate(tmp_path, ShapesConfig(num_train=0, num_retrieval=8, num_classification_per_class=0, seed=0),
             progress=False)
    images = sorted((tmp_path / "eval" / "retrieval" / "images").glob("*"))[:8]
    assert images, "the shapes generator wrote no retrieval images"
    result = CliRunner().invoke(build_app(), ["detect", *map(str, images), "--weights", str(WEIGHTS / "model.pth"),
                                      "--labelmap", str(WEIGHTS / "labelmap.json"), "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    boxes = sum(len(r["boxes"]) for r in rows) / len(rows)
    assert rows[0]["detector_id"].startswith(SHIPPED.name)
    assert boxes <= 4, f"{boxes} boxes per image: VinVL's test settings were used instead of detector.yaml"
