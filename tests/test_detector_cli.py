"""Detector commands end to end on a tiny shapes world: train a few steps, evaluate, detect, draw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from softclip.extract.detector.checkpoint import read_labelmap, read_state_dict
from softclip.extract.detector.cli import register
from softclip.extract.detector.losses import attribute_loss, attribute_soft_targets
from softclip.extract.detector.vinvl import VinVLDetector
from softclip.pipeline.shapes import COLOURS, SHAPES, ShapesConfig, generate

SHAPES_YAML = Path(__file__).parent.parent / "extract" / "configs" / "shapes.yaml"


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """softclip (test root)."""

    register(app)
    return app


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    data = tmp_path_factory.mktemp("shapes")
    generate(data, ShapesConfig(num_train=24, num_retrieval=6, num_classification_per_class=1,
                                samples_per_shard=12), progress=False)
    out = tmp_path_factory.mktemp("detector")
    result = CliRunner().invoke(_app(), [
        "detector", "train", "--config", str(SHAPES_YAML), "--data", str(data), "--out", str(out),
        "--set", "train.steps=3", "--set", "train.batch_size=2", "--set", "train.warmup_steps=1", "--no-progress",
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "trained shapes_r14c4: 3 steps" in result.output
    return data, out


def test_train_writes_vinvl_layout(trained: tuple[Path, Path]) -> None:
    _, out = trained
    raw = torch.load(out / "model.pth", map_location="cpu", weights_only=True)
    assert all(k.startswith("module.") for k in raw)
    assert "module.attribute.feature_extractor.head.layer4.0.conv1.weight" in raw
    classes, attributes = read_labelmap(out / "labelmap.json")
    assert classes[1:] == list(SHAPES) and attributes[1 : 1 + len(COLOURS)] == list(COLOURS)
    assert len(read_state_dict(out / "model.pth")) == len(raw)
    detector = VinVLDetector.from_checkpoint(out / "model.pth", out / "labelmap.json", config=out / "detector.yaml")
    assert detector.detector_id.startswith("shapes_r14c4-w")


def test_eval_and_detect_commands(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, out = trained
    common = ["--weights", str(out / "model.pth"), "--labelmap", str(out / "labelmap.json"),
              "--config", str(out / "detector.yaml")]
    result = CliRunner().invoke(_app(), ["detector", "eval", *common, "--data", str(data), "--json",
                                         "--no-progress", "--set", "score_thresh=0.0"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["images"] == 6 and 0.0 <= report["precision"] <= 1.0 and 0.0 <= report["recall"] <= 1.0
    image = next((data / "eval" / "retrieval" / "images").glob("*.jpg"))
    drawn = tmp_path / "drawn.png"
    result = CliRunner().invoke(_app(), ["detect", str(image), *common, "--set", "min_detections_per_img=2",
                                         "--draw", str(drawn)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "tags:" in result.output and drawn.is_file()
    result = CliRunner().invoke(_app(), ["detect", str(image), *common, "--json", "--set", "bogus=1"])
    assert result.exit_code != 0 and "bogus" in str(result.exception)
    result = CliRunner().invoke(_app(), ["detect", str(image), *common, "--set", "score_thresh"])  # the one parser
    assert result.exit_code != 0 and "'score_thresh' must look like key.sub=value" in str(result.exception)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_bytes(b"plain text, not a JPEG")
    result = CliRunner().invoke(_app(), ["detect", str(not_an_image), *common])
    assert result.exit_code != 0 and "notes.jpg" in result.output + str(result.exception)


def test_attribute_loss_is_soft_target_cross_entropy() -> None:
    targets = attribute_soft_targets(torch.tensor([[3, 5], [0, 0], [2, 0]]), 6)
    assert targets.tolist()[0] == [0, 0, 0, 0.5, 0, 0.5] and targets[1].sum() == 0 and targets[2, 2] == 1
    logits = torch.randn(3, 6)
    expected = -(0.5 * logits[0].log_softmax(0)[3] + 0.5 * logits[0].log_softmax(0)[5]
                 + logits[2].log_softmax(0)[2]) / 2  # the row without attributes is left out
    assert torch.allclose(attribute_loss(logits, torch.tensor([[3, 5], [0, 0], [2, 0]])), expected)
