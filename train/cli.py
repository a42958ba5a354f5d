"""``softclip train``: a config file, ``--set key=value`` overrides and ``--resume``."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from softclip.pipeline.config import apply_overrides, load_config

__all__ = ["register", "train_command"]


def train_command(
    config: Path = typer.Option(..., "--config", help="Training config YAML (see train/configs/)."),
    set_: list[str] = typer.Option([], "--set", help="Override any TrainConfig key, e.g. --set optim.lr=1e-4; repeatable."),
    resume: str | None = typer.Option(None, "--resume", help="A checkpoint file, or 'latest' for RUN_DIR's."),
    positional: list[str] = typer.Argument(None, hidden=True, help="Deprecated: key=value overrides; use --set."),
) -> None:
    """Train SoftCLIP (or CLIP: --set loss.lam=0 --set loss.mu=0) from feature shards; run under torchrun for many GPUs."""
    from softclip.train.config import TrainConfig  # noqa: PLC0415 (keeps `softclip --help` fast)
    from softclip.train.loop import train  # noqa: PLC0415

    if positional:
        typer.echo(f"softclip train: positional overrides are deprecated; write --set {' --set '.join(positional)}",
                   err=True)
    cfg = apply_overrides(load_config(TrainConfig, config), [*(positional or []), *set_])
    summary = train(cfg, resume=resume)  # destroys the torchrun process group it started
    if int(os.environ.get("RANK", "0")) == 0:  # one summary per job, not one per rank
        typer.echo(summary.line())


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to the ``softclip`` app."""
    app.command("train")(train_command)
