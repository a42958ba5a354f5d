"""Detector commands: ``softclip detect`` and ``softclip detector {train, eval}``.

``register(app)`` adds them to the root CLI (``pipeline/cli.py``). Overrides are ``--set key=value``
(values parsed as YAML): test-time settings for ``detect``/``eval``, ``train.x=...``-style config keys
for ``train``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from softclip.pipeline.config import parse_overrides

__all__ = ["register"]

_SET_HELP = "override as key=value (YAML value); repeatable"


def _load(weights: Path, labelmap: Path, config: Path | None, overrides: list[str], device: str):
    from softclip.extract.detector.vinvl import VinVLDetector

    return VinVLDetector.from_checkpoint(weights, labelmap, config=config, device=device,
                                         **parse_overrides(overrides))


def _draw(image, result: dict, out: Path) -> None:
    from PIL import ImageDraw

    from softclip.pipeline.io import atomic_path

    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    for box, name, attrs, score in zip(result["boxes"], result["class_names"], result["attr_names"],
                                       result["scores"]):
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=(255, 0, 0), width=max(1, round(min(canvas.size) / 300)))
        label = " ".join([*attrs[:1], name]) + f" {score:.2f}"
        draw.text((x1 + 2, y1 + 1), label, fill=(255, 255, 0))
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")


def _as_json(result: dict) -> dict:
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in result.items() if k != "features"}


def detect_command(
    images: list[Path] = typer.Argument(..., help="image files"),
    weights: Path = typer.Option(..., "--weights", help="VinVL checkpoint (.pth state dict)"),
    labelmap: Path = typer.Option(..., "--labelmap", help="VinVL label map JSON"),
    config: Path | None = typer.Option(None, "--config", help="detector YAML (name, test settings)"),
    overrides: list[str] = typer.Option([], "--set", help=_SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per image (no features)"),
    draw: Path | None = typer.Option(None, "--draw", help="save the (first) image with labelled boxes"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Detect objects and attributes; prints boxes, scores and "attribute class" tags."""
    from softclip.pipeline.images import ImageDecodeError, decode_image

    detector = _load(weights, labelmap, config, overrides, device)
    decoded = []
    for path in images:
        if not path.is_file():
            raise typer.BadParameter(f"image not found: {path}")
        try:
            decoded.append(decode_image(path.read_bytes()))
        except ImageDecodeError as err:
            raise typer.BadParameter(f"{path}: {err}") from err
    results = detector.detect(decoded)
    for path, result in zip(images, results):
        if as_json:
            typer.echo(json.dumps({"image": str(path), "detector_id": detector.detector_id, **_as_json(result)}))
            continue
        typer.echo(f"{path}: {len(result['boxes'])} detections ({detector.detector_id})")
        for box, score, name, attrs in zip(result["boxes"], result["scores"], result["class_names"],
                                           result["attr_names"]):
            coords = ", ".join(f"{v:.1f}" for v in box)
            typer.echo(f"  [{coords}] {score:.3f} {' '.join([*attrs, name])}")
        typer.echo(f"  tags: {result['tags']}")
    if draw is not None:
        _draw(decoded[0], results[0], draw)
        typer.echo(f"drew {len(results[0]['boxes'])} boxes on {images[0]} -> {draw}")


def train_command(
    config: Path = typer.Option(..., "--config", help="detector YAML, e.g. extract/configs/shapes.yaml"),
    data: Path = typer.Option(..., "--data", help="dataset folder with train/*.tar"),
    out: Path = typer.Option(..., "--out", help="output folder for model.pth, labelmap.json, detector.yaml"),
    overrides: list[str] = typer.Option([], "--set", help=_SET_HELP + " (e.g. train.steps=200)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a detector of the VinVL family on box-annotated tars (the shapes world)."""
    from softclip.extract.detector.config import DetectorConfig
    from softclip.extract.detector.training import train_detector
    from softclip.pipeline.config import apply_overrides, load_config

    cfg = apply_overrides(load_config(DetectorConfig, config), overrides)
    summary = train_detector(cfg, data, out, progress=progress)
    losses = " ".join(f"{k}={v}" for k, v in summary["final_losses"].items())
    typer.echo(f"trained {cfg.name}: {summary['steps']} steps, {summary['images_seen']} images in "
               f"{summary['seconds']} s; {losses}; wrote {summary['weights']}")


def eval_command(
    weights: Path = typer.Option(..., "--weights"),
    labelmap: Path = typer.Option(..., "--labelmap"),
    data: Path = typer.Option(..., "--data", help="dataset folder with eval/retrieval/dataset_karpathy.json"),
    config: Path | None = typer.Option(None, "--config", help="detector YAML (name, test settings)"),
    overrides: list[str] = typer.Option([], "--set", help=_SET_HELP),
    as_json: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Tag ("colour shape") precision and recall on the held-out annotated shapes images."""
    from softclip.extract.detector.evaluation import evaluate_tags
    from softclip.pipeline.shapes import COLOURS

    detector = _load(weights, labelmap, config, overrides, "cpu")
    report = evaluate_tags(detector, data, colours=COLOURS, progress=progress)
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(f"{report['images']} images, {report['objects']} objects, {report['detections']} detections: "
               f"tag precision {report['precision']:.3f} recall {report['recall']:.3f}; class precision "
               f"{report['class_precision']:.3f} recall {report['class_recall']:.3f} ({report['detector_id']})")


def register(app: typer.Typer) -> None:
    """Add ``detect`` and the ``detector`` group (``train``, ``eval``) to ``app``."""
    app.command("detect")(detect_command)
    detector = typer.Typer(help="Train and evaluate detectors of the VinVL family.", no_args_is_help=True)
    detector.command("train")(train_command)
    detector.command("eval")(eval_command)
    app.add_typer(detector, name="detector")
