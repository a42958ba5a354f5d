"""``softclip datasets`` (and, with the workflow runner, ``run`` and ``cache``)."""

from __future__ import annotations

import json

import typer

from workflows.datasets import data_root, list_datasets, load_dataset_spec

__all__ = ["register"]


def datasets(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the registered datasets and whether each is present under DATA_ROOT."""
    rows = []
    for name in list_datasets():
        spec = load_dataset_spec(name)
        location = data_root() / spec.path
        rows.append({"name": name, "kind": spec.kind, "path": str(location), "present": location.exists()})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "present" if row["present"] else "missing"
        typer.echo(f"{row['name']:<10} {row['kind']:<15} {state:<8} {row['path']}")


def register(app: typer.Typer) -> None:
    """Add the workflow commands to the root ``softclip`` app."""
    app.command("datasets")(datasets)
