"""Load any open_clip-layout checkpoint from a local path (nothing is downloaded).

A checkpoint is a file ``torch.load(path, weights_only=True)`` can read, holding either a bare state dict
or a dict with ``"state_dict"`` (open_clip's own layout, ``module.`` prefixes allowed), and optionally
``"model_name"`` (an open_clip config name) and ``"model_config"`` (the open_clip model config dict). The
architecture name comes from the caller, else from the checkpoint; a name open_clip does not know is
registered from the checkpoint's ``model_config`` first.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from softclip.pipeline.torchio import load_weights_only

__all__ = ["LoadedModel", "load_open_clip_checkpoint", "read_checkpoint_metadata", "register_model_config"]

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclasses.dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model in eval mode with its validation transform and tokenizer."""

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    model_name: str


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``model_name``, ``model_config`` and ``step`` (any may be absent), read memory-mapped by
    :func:`softclip.pipeline.torchio.load_weights_only` (a damaged file: CorruptCheckpointError naming it)."""
    checkpoint = load_weights_only(path, mmap=True, hint="pass the path of a checkpoint saved by torch.save")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a dict (a state dict or {{'state_dict': ...}}), got {type(checkpoint)}")
    return {key: checkpoint[key] for key in ("model_name", "model_config", "step") if key in checkpoint}


def register_model_config(model_name: str, model_config: dict[str, Any]) -> None:
    """Make ``model_name`` known to open_clip from a config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``)."""
    import open_clip

    if not _NAME.match(model_name):
        raise ValueError(f"model name {model_name!r} must be letters, digits and . _ + - only")
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in model_config]
    if missing:
        raise ValueError(f"model_config for {model_name!r} lacks {missing}; it is not an open_clip config")
    with tempfile.TemporaryDirectory(prefix="softclip-model-config-") as tmp:
        config_file = Path(tmp) / f"{model_name}.json"
        config_file.write_text(json.dumps(model_config))
        open_clip.add_model_config(config_file)  # read into open_clip's registry now; the file may go
    if model_name not in open_clip.list_models():
        raise ValueError(f"open_clip did not accept the model_config for {model_name!r}")


def load_open_clip_checkpoint(
    path: str | Path, *, model_name: str | None = None, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Build the open_clip model for ``path`` and load its weights (strict).

    Args:
        path: the checkpoint file.
        model_name: the open_clip architecture; defaults to the checkpoint's ``model_name``.
        device: where the model is put.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no architecture name anywhere, or an unknown name without a ``model_config``.
    """
    import open_clip

    metadata = read_checkpoint_metadata(path)
    name = model_name or metadata.get("model_name")
    if not name:
        raise ValueError(
            f"{path}: the checkpoint names no architecture (no 'model_name'); pass --model NAME "
            "or set model_name in the eval config"
        )
    if name not in open_clip.list_models():
        if "model_config" not in metadata:
            raise ValueError(
                f"{path}: open_clip does not know the model {name!r} and the checkpoint has no 'model_config'; "
                "pass a known --model NAME"
            )
        register_model_config(name, metadata["model_config"])
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=str(path), device=device, weights_only=True
    )
    model.eval()
    return LoadedModel(model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(name), model_name=name)
