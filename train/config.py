"""The training config: one frozen dataclass tree, loaded from YAML by :func:`pipeline.config.load_config`.

Example::

    from softclip.pipeline.config import apply_overrides, load_config
    cfg = load_config(TrainConfig, "train/configs/shapes-softclip.yaml")
    cfg = apply_overrides(cfg, ["optim.lr=1e-4", "data.root=/data"])
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Literal

from softclip.pipeline.precision import Precision

__all__ = [
    "DataConfig",
    "LogConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "resolve_data_path",
]

Aggregator = Literal["pool", "mhsa", "mean", "max", "min"]
# See train.losses.SoftCLIPLoss: teacher views, the model's own embeddings, label smoothing, or no target.
TargetSource = Literal["roi", "roi_mean", "text", "ema_text", "tagset", "student", "uniform", "none"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Towers (an open_clip model config name) and the ROI branch."""

    name: str  # open_clip model config, e.g. "RN50", "ViT-B-16", or "shapes-tiny" from train/model_configs
    roi_feature_dim: int = 2048  # channels of a detector ROI feature (VinVL: 2048)
    roi_width: int = 512  # width of the projected box tokens
    roi_heads: int = 8  # attention heads of the `pool` and `mhsa` aggregators
    aggregator: Aggregator = "pool"  # see train.model.ROIEncoder
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the model's forward

    def __post_init__(self):
        if self.roi_feature_dim < 1 or self.roi_width < 1:
            raise ValueError("model.roi_feature_dim and model.roi_width must be positive")
        if self.roi_width % self.roi_heads:
            raise ValueError(f"model.roi_width ({self.roi_width}) must be divisible by model.roi_heads "
                             f"({self.roi_heads})")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """Where the training shards are and how they are batched.

    ``train_shards`` are packed shards (image + features per key, :mod:`softclip.pipeline.packed`), given as a
    directory, a brace pattern or a file. Relative paths are taken under ``root`` (environment variables such
    as ``$DATA_ROOT`` are expanded).
    """

    root: str = "."
    train_shards: str
    batch_size: int = 256  # global batch: split evenly across ranks
    num_workers: int = 4  # DataLoader workers per rank
    max_boxes: int = 50  # boxes kept per image (highest scores first); the rest is padding
    shuffle_buffer: int = 1000  # samples per worker shuffle buffer
    num_samples: int = 0  # samples per epoch; 0 counts them from the shards
    # torch threads of the main process; 0: the cores left after one per loader worker (each worker runs
    # with 1 thread), at least 1, so that workers and the main process never oversubscribe the cores
    threads: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.max_boxes < 1 or self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("data.batch_size, data.max_boxes and data.shuffle_buffer must be positive and "
                             "data.num_workers non-negative")
        if self.threads < 0:
            raise ValueError(f"data.threads must be non-negative (0: derived from the cores), got {self.threads}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LossConfig:
    """SoftCLIP loss switches (see :class:`train.losses.SoftCLIPLoss`). CLIP is ``lam = mu = roi_weight = 0``
    (the only case where beta = 0 is allowed); the matched control is ``lam = mu = 0`` with ``roi_weight``.
    Label smoothing is ``image_target = text_target = uniform``; the oracle (targets from ground-truth
    objects) is ``tagset`` on both sides when the tags are the ground truth (the shapes annotation features).
    Calibrate ``tau_image`` / ``tau_text`` per source with :func:`train.losses.calibrate_tau` so that
    ``H(~Y)`` is 1.5 to 3 nats at batch 64 (the logged ``neg_entropy_*``)."""

    beta: float = 0.3
    lam: float = 1.0
    mu: float = 0.5
    image_target: TargetSource = "roi"  # S_img, the target of image->text
    text_target: TargetSource = "tagset"  # S_txt, the target of text->image
    tau_image: float = 0.1
    tau_text: float = 0.1
    roi_weight: float = 1.0  # ROI-to-caption InfoNCE: trains the ROI aggregator
    detach_targets: bool = True  # targets are a teacher: no gradient into the ROI branch or the tag pass
    ema_decay: float = 0.999  # of the EMA text tower (text source ema_text)
    ramp: bool = True  # lam and mu grow linearly from 0 over optim.warmup_steps

    def __post_init__(self):
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"loss.beta must be in [0, 1], got {self.beta}")
        if self.tau_image <= 0 or self.tau_text <= 0 or self.lam < 0 or self.mu < 0 or self.roi_weight < 0:
            raise ValueError("loss.tau_image and loss.tau_text must be positive and loss.lam, loss.mu, "
                             "loss.roi_weight non-negative")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"loss.ema_decay must be in [0, 1), got {self.ema_decay}")
        soft = self.lam > 0 or self.mu > 0
        if soft and self.beta == 0:
            raise ValueError("loss.beta=0 makes the soft targets one-hot, so L_soft and L_neg compare with a "
                             "distribution that has zeros and are not defined; use beta > 0, or "
                             "loss.lam=0 loss.mu=0 for CLIP")
        if soft and self.image_target == self.text_target == "none":
            raise ValueError("loss.image_target=none and loss.text_target=none leave the soft terms without a "
                             "target: choose a source, or loss.lam=0 loss.mu=0")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    """AdamW with a linear warm-up then cosine decay to zero; no weight decay on norms, biases, logit scale."""

    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 2000
    epochs: int = 32
    max_steps: int = 0  # stop after this many steps (0: run all epochs)
    grad_clip_norm: float = 1.0  # 0 disables clipping
    precision: Precision = "bf16"  # autocast on CUDA (pipeline.precision); CPU always runs fp32; fp16 is refused
    # A step with a non-finite loss or gradient never updates the weights (skipped on the device); at the
    # next log step training stops with advice, or with skip_nonfinite goes on and logs the count.
    skip_nonfinite: bool = False

    def __post_init__(self):
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0 or self.epochs < 1:
            raise ValueError("optim.lr must be positive, optim.weight_decay and optim.warmup_steps "
                             "non-negative, optim.epochs at least 1")
        if self.max_steps < 0 or self.grad_clip_norm < 0:
            raise ValueError("optim.max_steps and optim.grad_clip_norm must be non-negative")
        if self.precision == "fp16":
            raise ValueError("optim.precision=fp16 needs loss scaling, which training does not do; use bf16 "
                             "(or fp32)")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LogConfig:
    """How often to log and checkpoint."""

    every_n_steps: int = 50
    checkpoint_every_n_steps: int = 1000
    keep_checkpoints: int = 0  # step checkpoints kept besides latest.pt; 0 keeps all
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.every_n_steps < 1 or self.checkpoint_every_n_steps < 1 or self.keep_checkpoints < 0:
            raise ValueError("log.every_n_steps and log.checkpoint_every_n_steps must be at least 1")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """A training run: output folder, seed and the stage configs."""

    run_dir: Path  # checkpoints/, metrics.jsonl, tensorboard/ and config.yaml go here
    seed: int = 0
    model: ModelConfig
    data: DataConfig
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)


def resolve_data_path(root: str, path: str) -> str:
    """``path`` under ``root`` unless absolute, with environment variables expanded in both.

    Raises:
        ValueError: a ``$VAR`` is not set in the environment.
    """
    joined = os.path.expandvars(path if os.path.isabs(os.path.expandvars(path)) else os.path.join(root, path))
    unresolved = re.search(r"\$\{?(\w+)", joined)
    if unresolved:
        raise ValueError(f"data path '{joined}' uses ${unresolved.group(1)}, which is not set: export it or "
                         "override data.root=/path/to/data")
    return str(Path(joined)) if "{" not in joined else joined
