"""Training metrics: the numbers of one log line, and their sinks (a JSONL file and TensorBoard, written by
rank 0 only)."""

from __future__ import annotations

import json
from pathlib import Path

from softclip.pipeline.io import atomic_write_text
from softclip.train.data import ERROR_KINDS

__all__ = ["MetricLogger", "log_line_metrics"]


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


def log_line_metrics(losses: dict, lr: float, timing: dict, errors: dict, global_batch: int,
                     skip_nonfinite: bool) -> dict[str, float]:
    """Numbers for one log line. ``timing["nonfinite"]`` counts the steps since the last log whose update
    was skipped (non-finite loss or gradient); unless ``skip_nonfinite``, any raises FloatingPointError
    (training has diverged) -- the weights are those before the first such step."""
    metrics = {k: float(v) for k, v in losses.items() if k != "nonfinite"}
    skipped = int(timing["nonfinite"])
    if skipped and not skip_nonfinite:
        raise FloatingPointError(f"{skipped} step(s) since the last log had a non-finite loss or gradient (loss "
                                 f"now {metrics['loss']}): training diverged; lower optim.lr or raise "
                                 "optim.warmup_steps and resume from an earlier checkpoint (their updates were "
                                 "skipped), or set optim.skip_nonfinite=true to skip such steps and go on")
    elapsed = max(timing["elapsed"], 1e-9)
    metrics |= {"lr": lr, "samples_per_s": timing["steps"] * global_batch / elapsed,
                "data_wait_s": timing["data_wait"] / max(timing["steps"], 1), "nonfinite_steps": float(skipped)}
    metrics |= {f"data_{kind}": float(sum(e.get(kind, 0) for e in errors.values())) for kind in ERROR_KINDS}
    return metrics
