"""Training metrics sinks: a JSONL file and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path

from softclip.pipeline.io import atomic_write_text

__all__ = ["MetricLogger"]


class MetricLogger:
    """Append one JSON object per logged step to ``RUN_DIR/metrics.jsonl`` and mirror the numbers to
    TensorBoard (``RUN_DIR/tensorboard``) under ``train/<name>``.

    Args:
        run_dir: the run folder.
        resume_step: when resuming, lines of steps after this one (written after the checkpoint, by the
            interrupted run) are dropped first, so the file never holds a step twice.
        tensorboard: also write TensorBoard events.
        enabled: False on ranks other than 0 (then every method does nothing).
    """

    def __init__(self, run_dir: str | Path, *, resume_step: int = 0, tensorboard: bool = True,
                 enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for step, line in _read_lines(self.path) if step <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (optional, slow import)

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` (name -> number) for ``step``."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.writer is not None:
            self.writer.close()


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """``(step, line)`` of each line of a ``metrics.jsonl``. A broken last line (a run killed while appending
    it) is dropped; a broken line before it raises ValueError naming the file and line."""
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    out = []
    for i, (number, line) in enumerate(lines):
        try:
            out.append((int(json.loads(line)["step"]), line))
        except (ValueError, KeyError, TypeError) as error:
            if i == len(lines) - 1:
                break  # half-written by the interrupted run
            raise ValueError(f"{path}: line {number} is not a metrics record ({error}); fix or remove that "
                             "line and resume again") from error
    return out
