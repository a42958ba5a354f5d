"""``softclip export``: a training checkpoint -> open_clip's ``local-dir:`` layout, loadable with no softclip code.

The folder holds what ``open_clip.create_model_and_transforms("local-dir:DIR")`` reads (the layout
open_clip's ``save_for_hf`` writes)::

    DIR/open_clip_config.json          {"model_cfg": <the open_clip model config>, "preprocess_cfg": {...}}
    DIR/open_clip_model.safetensors    the image and text towers' state dict (no optimizer, no ROI branch)

so CLIP_benchmark's CLI evaluates it as ``--model local-dir:DIR --pretrained ''``. The training run writes
``RUN_DIR/open_clip/`` at its end (:func:`export_open_clip` from ``train.loop.train``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import typer

from softclip.pipeline.io import atomic_write_bytes, atomic_write_text
from softclip.pipeline.torchio import load_weights_only

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "export_open_clip", "register"]

CONFIG_NAME = "open_clip_config.json"  # open_clip's HF_CONFIG_NAME
WEIGHTS_NAME = "open_clip_model.safetensors"  # open_clip's HF_SAFE_WEIGHTS_NAME, its first choice in a folder


def _read_towers(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The towers' state dict (``module.`` prefixes dropped) and the open_clip model config of ``checkpoint``."""
    ckpt = load_weights_only(checkpoint, mmap=True, hint="pass a .pt file written by softclip train")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{checkpoint}: no 'state_dict'; export needs a checkpoint written by softclip train")
    config = ckpt.get("model_config")
    if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= config.keys():
        raise ValueError(f"{checkpoint}: no open_clip 'model_config' (embed_dim, vision_cfg, text_cfg) to export; "
                         "it was not written by softclip train")
    state = {k.removeprefix("module."): v.contiguous() for k, v in ckpt["state_dict"].items()}
    return state, config


def export_open_clip(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``checkpoint``'s towers into ``out`` in open_clip's ``local-dir:`` layout; returns ``out``.

    The weights are written first and the config last, each atomically, so a folder with a config is complete.
    Rerunning overwrites both with the same bytes.

    Raises:
        FileNotFoundError: no such checkpoint.
        CorruptCheckpointError: the file is damaged (checksum, truncation; a ValueError).
        ValueError: not a softclip training checkpoint (no ``state_dict`` or ``model_config``).
    """
    from open_clip.transform import PreprocessCfg
    from safetensors.torch import save

    state, model_config = _read_towers(Path(checkpoint))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # one metadata key: safetensors writes a metadata map in no fixed order, and reruns must give equal bytes
    atomic_write_bytes(out / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
    # The transform softclip trains and evaluates with: open_clip's defaults at the model's image size.
    preprocess = {k: v for k, v in dataclasses.asdict(PreprocessCfg()).items() if k != "size"}
    config = {"model_cfg": model_config, "preprocess_cfg": preprocess}
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return out


def export_command(
    checkpoint: Path = typer.Argument(..., help="a checkpoint written by softclip train (e.g. RUN/checkpoints/latest.pt)"),
    out: Path = typer.Option(..., "--out", help="output folder; load it with open_clip as local-dir:OUT"),
) -> None:
    """Export a checkpoint's image and text towers in open_clip's local-dir layout (safetensors, no optimizer)."""
    export_open_clip(checkpoint, out)
    size = (out / WEIGHTS_NAME).stat().st_size
    typer.echo(f"exported {checkpoint} -> {out} ({size / 2**20:.1f} MiB of weights, "
               f"checkpoint {checkpoint.stat().st_size / 2**20:.1f} MiB); "
               f"load with open_clip.create_model_and_transforms('local-dir:{out}')")


def register(app: typer.Typer) -> None:
    """Add the ``export`` command to the ``softclip`` app."""
    app.command("export")(export_command)
