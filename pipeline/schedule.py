"""The learning-rate schedule both trainers use (the detector's and SoftCLIP's): linear warm-up, then
cosine decay to zero (Loshchilov & Hutter, SGDR, without restarts)."""

from __future__ import annotations

import math

__all__ = ["cosine_lr"]


def cosine_lr(step: int, *, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``base_lr`` over
    ``warmup_steps``, then ``lr = base_lr / 2 * (1 + cos(pi * progress))`` with ``progress`` going from 0 at
    the end of warm-up to 1 at ``total_steps`` (held at 0 after it)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(progress, 1.0)))
