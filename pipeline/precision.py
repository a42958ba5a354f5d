"""The one precision vocabulary of the project: ``fp32`` (no autocast), ``bf16`` and ``fp16`` (``torch.autocast``
to that dtype). Autocast runs on CUDA only; a CPU always computes in fp32, whatever a config says.

Training and evaluation configs type their ``precision`` field as :data:`Precision` (the config loader
refuses any other word); :func:`autocast` is the context both run their forward passes under. torch is
imported only when a context is made, so configs can use the vocabulary without loading torch.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

__all__ = ["PRECISIONS", "Precision", "autocast", "effective_precision"]

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def effective_precision(device: torch.device, precision: str) -> str:
    """What runs on ``device`` when ``precision`` is asked for: ``precision`` on CUDA, ``fp32`` elsewhere.

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision if device.type == "cuda" else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``precision``'s dtype on CUDA; a null context for ``fp32`` or another device."""
    import torch

    effective = effective_precision(device, precision)
    if effective == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if effective == "bf16" else torch.float16)
