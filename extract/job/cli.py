"""``softclip extract`` and ``softclip inspect``: the extraction job's front doors.

``register(app)`` adds both commands to the root app (``pipeline.cli``), which also turns user errors
(``ValueError``, ``FileNotFoundError``, ``FileExistsError``) into one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from softclip.pipeline.config import apply_overrides, from_dict, read_yaml

__all__ = ["DEFAULT_CONFIG", "extract", "inspect", "load_extract_config", "register"]

DEFAULT_CONFIG = Path(__file__).parents[1] / "configs" / "extract-default.yaml"  # extract/configs/


def load_extract_config(path: str | Path, *, dataset: str, weights: str | Path, labelmap: str | Path,
                        out: str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """An :class:`~softclip.extract.job.config.ExtractConfig` from a settings YAML (which leaves out the paths)
    plus the paths and ``key=value`` overrides; unknown keys are errors naming the file."""
    from softclip.extract.job.config import ExtractConfig

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"extraction config not found: {path}")
    data = read_yaml(path)
    data.update(dataset=str(dataset), weights=str(weights), labelmap=str(labelmap), out=str(out))
    return apply_overrides(from_dict(ExtractConfig, data, source=str(path)), list(overrides), source="--set")


def extract(
    dataset: str = typer.Option(..., help="Dataset path, brace pattern (cc3m/{00000..00331}.tar) or registered name."),
    weights: Path = typer.Option(..., help="Detector checkpoint (VinVL format)."),
    labelmap: Path = typer.Option(..., help="Detector label map JSON."),
    out: Path = typer.Option(..., help="Output folder: one Parquet feature shard per input shard + manifest.json."),
    max_boxes: int | None = typer.Option(None, help="Boxes kept per image, highest scores first (default 50)."),
    actors: int | None = typer.Option(None, help="Detector actors (default: one per GPU, else 1 on CPU)."),
    pack: bool | None = typer.Option(None, "--pack/--no-pack", help="Also write packed WebDataset training "
                                     "shards under OUT/packed/ (default: the config's pack)."),
    config: Path = typer.Option(DEFAULT_CONFIG, help="Extraction settings YAML."),
    set_: list[str] = typer.Option([], "--set", help="Override any setting, e.g. --set batch_size=16."),
) -> None:
    """Extract ROI features with a pool of detector actors on Ray (joins $RAY_ADDRESS when set)."""
    from softclip.extract.job.run import run_extraction

    given = [f"{k}={v}" for k, v in (("max_boxes", max_boxes), ("actors", actors)) if v is not None]
    if pack is not None:
        given.append(f"pack={str(pack).lower()}")
    if os.environ.get("RAY_ADDRESS"):
        given.append(f"ray_address={os.environ['RAY_ADDRESS']}")
    cfg = load_extract_config(config, dataset=dataset, weights=weights, labelmap=labelmap, out=out,
                              overrides=given + list(set_))
    typer.echo(run_extraction(cfg).line())


def inspect(
    directory: Path = typer.Argument(..., help="An extraction output folder (or any folder of feature shards)."),
    top: int = typer.Option(10, help="How many of the most frequent classes, attributes and tags to list."),
    verify: str = typer.Option("size", help="How shards are checked against manifest.json: size (fast) or "
                                            "checksum (SHA-256, reads every byte)."),
) -> None:
    """Summarise a feature directory: rows, errors by reason, boxes/image, frequent tags, bytes/image.
    With a manifest, only its intact complete shards are read; others are reported."""
    from softclip.extract.job.inspect import inspect_features

    typer.echo(inspect_features(directory, top=top, verify=verify).render())


def register(app: typer.Typer) -> None:
    """Add ``extract`` and ``inspect`` to the root ``softclip`` app."""
    app.command("extract")(extract)
    app.command("inspect")(inspect)
