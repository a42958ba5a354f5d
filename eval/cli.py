"""The ``softclip eval`` command: zero-shot classification and retrieval reports for checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from softclip.eval.evaluate import EvalConfig, run_eval
from softclip.pipeline.config import ConfigError, apply_overrides, from_dict, read_yaml

__all__ = ["build_config", "eval_command", "register"]


def _split_checkpoint(item: str) -> tuple[str | None, str]:
    """``LABEL=PATH`` -> (LABEL, PATH); a plain path (or one whose '=' sits inside a folder name) -> (None, PATH)."""
    label, sep, path = item.partition("=")
    if sep and label and "/" not in label and path:
        return label, path
    return None, item


def build_config(
    *, checkpoints: list[str], tasks: str | None, out: Path | None, data_root: Path | None,
    batch_size: int | None, config: Path | None, overrides: list[str], model: str | None = None,
) -> EvalConfig:
    """Merge an optional YAML config, the command-line options and ``key=value`` overrides into an
    :class:`~eval.evaluate.EvalConfig` (options win over the file, overrides win over both)."""
    data: dict = {}
    source = "command line"
    if config is not None:
        data = read_yaml(config)
        source = f"{config} + command line"
    if checkpoints:
        pairs = [_split_checkpoint(item) for item in checkpoints]
        data["checkpoints"] = [path for _, path in pairs]
        named = [label for label, _ in pairs if label]
        if named and len(named) != len(pairs):
            raise ValueError("--checkpoint: give LABEL=PATH for every checkpoint or for none")
        if named:
            data["labels"] = named
    if tasks is not None:
        data["tasks"] = [t.strip() for t in tasks.split(",") if t.strip()]
    for key, value in (("out", out), ("data_root", data_root), ("batch_size", batch_size), ("model_name", model)):
        if value is not None:
            data[key] = str(value) if isinstance(value, Path) else value
    for key, flag in (("checkpoints", "--checkpoint"), ("out", "--out")):
        if key not in data:
            raise ConfigError(f"{source}: '{key}' is required; pass {flag} or set it in the config")
    return apply_overrides(from_dict(EvalConfig, data, source=source), overrides, source=source)


def eval_command(
    checkpoint: list[str] = typer.Option(
        [], "--checkpoint", "-c",
        help="Checkpoint file, repeatable; LABEL=PATH names its row (default: the run directory name).",
    ),
    tasks: str | None = typer.Option(None, help="Comma-separated: shapes, imagenet, coco, flickr30k, shapes-shape, ..., wds/NAME (CLIP_benchmark set)."),
    out: Path | None = typer.Option(None, help="Report folder (results.json, results.md, results.png, eval.yaml)."),
    data_root: Path | None = typer.Option(
        None, envvar="DATA_ROOT", help="Datasets root: imagenet/val, coco, flickr30k, shapes/eval, wds_NAME."
    ),
    batch_size: int | None = typer.Option(None, help="Images or texts per forward pass."),
    model: str | None = typer.Option(None, help="open_clip architecture for checkpoints that name none."),
    config: Path | None = typer.Option(None, help="An EvalConfig YAML file."),
    set_: list[str] = typer.Option([], "--set", help="Override any EvalConfig key, e.g. --set device=cpu."),
) -> None:
    """Zero-shot classification (top-1/5, mean per-class recall) and retrieval (R@1/5/10) of checkpoints."""
    cfg = build_config(checkpoints=checkpoint, tasks=tasks, out=out, data_root=data_root,
                       batch_size=batch_size, config=config, overrides=set_, model=model)
    start = time.perf_counter()
    payload = run_eval(cfg)
    headline = "; ".join(
        f"{task} {metric} " + " vs ".join(f"{100 * payload['results'][label][task][metric]:.1f}"
                                          for label in payload["labels"])
        for task, metric in _headline_metrics(payload)
    )
    typer.echo(f"eval: {len(payload['labels'])} checkpoint(s) ({', '.join(payload['labels'])}) x "
               f"{len(payload['tasks'])} task(s) on {payload['device']} in {time.perf_counter() - start:.1f}s; "
               f"{headline} -> {payload['files']['markdown']}, {payload['files']['chart']}")


def _headline_metrics(payload: dict) -> list[tuple[str, str]]:
    """One headline metric per task for the summary line: top-1, image->text R@1, or (Medium) mAP."""
    first = payload["results"][payload["labels"][0]]
    return [(t, next(m for m in ("top1", "image_to_text_R@1", "mAP_medium", "mAP") if m in first[t]))
            for t in payload["tasks"]]


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command to the ``softclip`` app."""
    app.command("eval")(eval_command)
