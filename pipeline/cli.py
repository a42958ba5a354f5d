"""The ``softclip`` command.

The root app holds the foundation command ``shapes``; each stage adds its own through
``<stage>.cli.register(app)``. The stage modules are imported inside :func:`build_app`, never at module
level, so ``pipeline`` stays importable without the stages (see CONTRIBUTING.md, layering).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import typer

from softclip.pipeline.config import apply_overrides, load_config
from softclip.pipeline.io import DiskFullError
from softclip.pipeline.shapes import NOISE_KINDS, ShapesConfig, generate

__all__ = ["STAGE_CLI_MODULES", "build_app", "main"]

# Modules whose `register(app)` adds the stage commands, in the order --help lists them.
STAGE_CLI_MODULES: tuple[str, ...] = (
    "softclip.extract.job.cli", "softclip.extract.detector.cli", "softclip.train.cli", "softclip.train.export",
    "softclip.eval.cli",
    "softclip.workflows.cli",
)


def shapes(
    out: Path = typer.Option(..., help="Output folder (train/ shards and eval/ sets are written inside)."),
    n: int | None = typer.Option(None, help="Number of training image-caption pairs."),
    noise: float | None = typer.Option(None, help="Caption noise: fraction of captions replaced by another's."),
    seed: int | None = typer.Option(None, help="Random seed; same seed, same bytes."),
    config: Path | None = typer.Option(None, help="A ShapesConfig YAML file."),
    set_: list[str] = typer.Option([], "--set", help="Override any ShapesConfig key, e.g. --set image_size=96."),
) -> None:
    """Generate the synthetic shapes world (img2dataset-style shards and evaluation sets)."""
    cfg = load_config(ShapesConfig, config) if config else ShapesConfig()
    overrides = [f"{k}={v}" for k, v in (("num_train", n), ("caption_noise", noise), ("seed", seed)) if v is not None]
    cfg = apply_overrides(cfg, overrides + list(set_))
    summary = generate(out, cfg)
    typer.echo(f"shapes: {summary['num_train']} training pairs in {summary['num_shards']} shards, "
               f"{summary['num_retrieval']} retrieval and {summary['num_classification']} classification images, "
               + "".join(f"{kind} noise {summary[f'{kind}_noise_rate']:.3f}, " for kind in NOISE_KINDS)
               + f"{summary['seconds']:.1f}s -> {summary['out']}")


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"softclip {version('softclip')}")
        except PackageNotFoundError:  # running from a checkout that was never installed
            typer.echo("softclip (not installed: no version metadata)")
        raise typer.Exit()


def _root(
    show_version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                      help="Print the version and exit."),
) -> None:
    """SoftCLIP pipeline: extract ROI features, train SoftCLIP/CLIP, evaluate, run cached workflows.

    Every command takes its settings overrides as --set key=value (repeatable).
    """


def build_app() -> typer.Typer:
    """The full ``softclip`` app: foundation commands plus every stage's commands."""
    app = typer.Typer(
        name="softclip",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_show_locals=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    app.command("shapes")(shapes)
    for module_name in STAGE_CLI_MODULES:
        importlib.import_module(module_name).register(app)
    return app


def main() -> None:
    """Entry point of the ``softclip`` console script.

    User errors (a bad config key, a missing file, an output folder that holds something else, an
    unreadable shard: ``ValueError``, ``FileNotFoundError`` and ``FileExistsError`` subclasses) and a full
    disk (``DiskFullError``, naming the file) print one line and exit with status 2; ``SOFTCLIP_DEBUG=1``
    shows the traceback instead.
    """
    app = build_app()
    try:
        app()
    except (ValueError, FileNotFoundError, FileExistsError, DiskFullError) as err:
        if os.environ.get("SOFTCLIP_DEBUG"):
            raise
        typer.echo(f"softclip: error: {err}", err=True)
        raise SystemExit(2) from err
