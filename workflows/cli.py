"""``softclip run``, ``softclip cache ls|gc`` and ``softclip datasets``."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import typer

from softclip.pipeline.registry import data_root, list_datasets, load_dataset_spec
from softclip.workflows.cache import MARKER, ArtifactCache

__all__ = ["register"]

cache_app = typer.Typer(help="Inspect and clean the artifact cache ($SOFTCLIP_CACHE, default ./cache).",
                        no_args_is_help=True)


def run(
    workflow: Path = typer.Argument(..., help="A workflow YAML file (see workflows/configs/)."),
    force: list[str] = typer.Option([], help="Recompute this stage and every later one (repeatable)."),
    until: str = typer.Option("eval", help="Last stage to run: dataset, detector, extract, train or eval."),
    nproc: int = typer.Option(int(os.environ.get("NGPUS", "1")), help="Training processes per node (torchrun)."),
    train_config: list[Path] = typer.Option([], help="Train these configs instead of the workflow's."),
    cache_dir: Path | None = typer.Option(None, help="Artifact cache folder."),
) -> None:
    """Run a workflow: extract -> train -> eval, reusing every cached artifact."""
    from softclip.workflows.config import TrainStep, load_workflow
    from softclip.workflows.runner import WorkflowRunner

    config = load_workflow(workflow)
    if train_config:
        steps = tuple(TrainStep(name=p.stem, config=str(p)) for p in train_config)
        config = dataclasses.replace(config, train=steps)
    runner = WorkflowRunner(config, cache=ArtifactCache(cache_dir), force=tuple(force), until=until,
                            nproc=nproc, log=typer.echo)
    result = runner.run()
    if result.report is not None:
        typer.echo("\n" + (result.report / "results.md").read_text())
        typer.echo(f"chart: {result.report / 'results.png'}")
    typer.echo(result.summary())


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@cache_app.command("ls")
def cache_ls(cache_dir: Path | None = typer.Option(None, help="Artifact cache folder."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """What is cached: kind, key, state, size and what made it."""
    cache = ArtifactCache(cache_dir)
    rows = []
    for artifact in cache.list():
        state = artifact.state
        record = {} if state == "corrupt" else artifact.record()
        made_by = {"partial": "(incomplete)", "corrupt": f"(unreadable {artifact.path / MARKER})"}.get(state, "")
        rows.append({"kind": artifact.kind, "key": artifact.key, "complete": state == "complete", "state": state,
                     "bytes": artifact.size_bytes(), "seconds": record.get("seconds"),
                     "made_by": record.get("made_by", made_by), "created": record.get("created", ""),
                     "path": str(artifact.path)})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(f"{row['kind']:<9} {row['key']} {row['state']:<8} {_human(row['bytes']):>9}  {row['made_by']}  "
                   f"{row['created']}")
    total = sum(r["bytes"] for r in rows)
    typer.echo(f"{len(rows)} artifacts, {_human(total)} in {cache.root}")


@cache_app.command("gc")
def cache_gc(keep: list[Path] = typer.Argument(None, help="Workflow files whose artifacts are kept, complete "
                                                          "or not; without any, only incomplete artifacts go."),
             cache_dir: Path | None = typer.Option(None, help="Artifact cache folder.")) -> None:
    """Delete the artifacts no given workflow uses (complete or not); without any, the incomplete ones."""
    from softclip.workflows.config import load_workflow
    from softclip.workflows.runner import WorkflowRunner

    cache = ArtifactCache(cache_dir)
    keep_keys = None
    if keep:
        keep_keys = {r.key for path in keep
                     for r in WorkflowRunner(load_workflow(path), cache=cache, log=lambda _: None).plan()}
    start = time.perf_counter()
    removed, in_use = cache.gc(keep_keys)
    for artifact in removed:
        typer.echo(f"removed {artifact.kind} {artifact.key}")
    for artifact in in_use:
        typer.echo(f"kept {artifact.kind} {artifact.key}: in use by a running workflow")
    typer.echo(f"cache gc: removed {len(removed)} artifacts, kept {len(in_use)} in use, in "
               f"{time.perf_counter() - start:.1f}s")


def datasets(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the registered datasets and whether each is under DATA_ROOT: missing, empty (a folder with
    nothing in it) or present (something is there; its layout is checked when a stage reads it)."""
    rows = []
    for name in list_datasets():
        spec = load_dataset_spec(name)
        location = data_root() / spec.path
        state = ("missing" if not location.exists()
                 else "empty" if location.is_dir() and not any(location.iterdir()) else "present")
        rows.append({"name": name, "kind": spec.kind, "path": str(location), "state": state})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(f"{row['name']:<10} {row['kind']:<15} {row['state']:<8} {row['path']}")


def register(app: typer.Typer) -> None:
    """Add the workflow commands to the root ``softclip`` app."""
    app.command("run")(run)
    app.add_typer(cache_app, name="cache")
    app.command("datasets")(datasets)
