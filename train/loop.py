"""The training loop: one GPU, many GPUs (torchrun + DDP), or CPU.

Reads top to bottom: :func:`train` sets up (distributed, model, loss, optimizer, data, resume), then runs
``step -> log -> checkpoint`` until ``optim.epochs`` (or ``optim.max_steps``) are done, and returns a
:class:`TrainSummary`. Under ``torchrun`` the embeddings of all ranks are gathered with gradient inside the
loss, so the similarity matrices cover the global batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import open_clip
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from softclip.pipeline.config import from_dict, save_config, to_dict
from softclip.pipeline.precision import autocast
from softclip.pipeline.schedule import cosine_lr
from softclip.train.checkpoint import (
    capture_rng,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from softclip.train.config import TrainConfig
from softclip.train.data import TrainData
from softclip.train.export import export_open_clip
from softclip.train.losses import SoftCLIPLoss, mean_roi_features, tagset_vectors
from softclip.train.metrics import MetricLogger, log_line_metrics
from softclip.train.model import SoftCLIPModel, build_model
from softclip.train.runtime import all_ranks, init_distributed, seed_everything, set_threads

__all__ = ["NO_DECAY_TOKENS", "TrainSummary", "param_groups", "soft_ramp", "train", "train_step"]

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the temperature at 1/100
# Learned tokens of the ROI branch: embeddings, not weights, so never decayed (as norms and biases).
NO_DECAY_TOKENS = ("roi.query", "roi.no_box")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrainSummary:
    """What a :func:`train` call did. ``first_loss``/``last_loss`` are the losses of this call's first and last
    steps (NaN when the call had no step left to train)."""

    steps: int
    samples: int
    wall_s: float
    first_loss: float
    last_loss: float
    checkpoint: str

    def line(self) -> str:
        """The one-line summary printed at the end."""
        return (f"trained to step {self.steps} ({self.samples} samples) in {self.wall_s:.1f} s: loss "
                f"{self.first_loss:.4f} -> {self.last_loss:.4f}; checkpoint {self.checkpoint}")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, the logit scale and other 1-d / scalar parameters
    (open_clip's rule) nor on the ROI branch's learned tokens (:data:`NO_DECAY_TOKENS`), ``weight_decay``
    on the rest."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "norm" in name or "bias" in name
        exclude = exclude or "logit_scale" in name or name.removeprefix("module.").startswith(NO_DECAY_TOKENS)
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _checkpoint(cfg: TrainConfig, model: SoftCLIPModel, optimizer, progress: dict, world_size: int) -> dict:
    """The checkpoint dict (see :mod:`train.checkpoint`); collective: every rank must call it."""
    positions = all_ranks(progress["positions"], world_size)
    rng = all_ranks(capture_rng(), world_size)
    return {"state_dict": model.clip.state_dict(), "model_name": cfg.model.name,
            "model_config": open_clip.get_model_config(cfg.model.name),
            "roi_state_dict": model.roi.state_dict(), "optimizer": optimizer.state_dict(),
            "step": progress["step"], "epoch": progress["epoch"], "data_position": positions, "rng": rng,
            "config": to_dict(cfg)} | ({"ema_state_dict": model.ema_text.state_dict()} if model.ema_text else {})


# What a resumable checkpoint must hold (see train.checkpoint).
_CHECKPOINT_KEYS = ("state_dict", "roi_state_dict", "optimizer", "step", "epoch", "data_position", "rng", "config")
# Model settings that change how the model runs, not its parameters: free to change on resume.
_RUNTIME_MODEL_FIELDS = ("compile", "grad_checkpointing")


def _restore(path: Path, cfg: TrainConfig, model: SoftCLIPModel, optimizer, rank: int, world_size: int) -> dict:
    """Load a checkpoint into ``model`` and ``optimizer``; returns the progress to continue from. The run's
    optimizer settings (weight decay, betas, eps) apply, not the saved ones; the moments and step counts are
    restored."""
    ckpt = load_checkpoint(path)  # checksum-verified; a damaged file is one CorruptCheckpointError naming it
    missing = [key for key in _CHECKPOINT_KEYS if key not in ckpt] if isinstance(ckpt, dict) else _CHECKPOINT_KEYS
    if missing:
        raise ValueError(f"{path}: not a training checkpoint of `softclip train` (no {', '.join(missing)}); a "
                         "weights-only file cannot be resumed, give RUN_DIR/checkpoints/latest.pt or a step_*.pt")
    saved = from_dict(TrainConfig, ckpt["config"], source=str(path))
    runtime = {name: getattr(cfg.model, name) for name in _RUNTIME_MODEL_FIELDS}
    if dataclasses.replace(saved.model, **runtime) != cfg.model:
        changed = [f"{f.name}: {getattr(saved.model, f.name)!r} -> {getattr(cfg.model, f.name)!r}"
                   for f in dataclasses.fields(cfg.model)
                   if getattr(saved.model, f.name) != getattr(cfg.model, f.name) and f.name not in runtime]
        raise ValueError(f"{path}: the checkpoint's model differs from the run's ({'; '.join(changed)}); resume "
                         "with the model config the run was started with")
    if len(ckpt["data_position"]) != world_size:
        raise ValueError(f"{path}: saved by {len(ckpt['data_position'])} ranks, this run has {world_size}; "
                         "resume with as many ranks (the data position is per rank)")
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        model.clip.load_state_dict(ckpt["state_dict"])
        model.roi.load_state_dict(ckpt["roi_state_dict"])
        if model.ema_text is not None:
            model.ema_text.load_state_dict(ckpt["ema_state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: the checkpoint does not fit this run ({error}); resume with the config the "
                         "run was started with (loss.lam / loss.mu / loss.roi_weight / loss.detach_targets "
                         "decide which parameters train, loss.*_target=ema_text adds an EMA text tower)") from error
    for group, fresh in zip(optimizer.param_groups, settings):
        group.update(fresh)  # this run's weight decay, betas, eps (lr is set every step by the schedule)
    restore_rng(ckpt["rng"][rank])
    return {"step": ckpt["step"], "epoch": ckpt["epoch"], "positions": ckpt["data_position"][rank]}


def _teacher_views(out: dict, batch: dict, needed: frozenset[str], device: torch.device) -> dict:
    """The loss's teacher views: learned ones from the model output, parameter-free ones from the batch."""
    views = {"roi": out.get("roi"), "text": out.get("tag"), "ema_text": out.get("ema_tag")}
    if "roi_mean" in needed:
        views["roi_mean"] = mean_roi_features(batch["roi_features"].to(device, non_blocking=True),
                                              batch["roi_mask"].to(device, non_blocking=True))
    if "tagset" in needed:
        views["tagset"] = tagset_vectors(batch["tagset"].to(device, non_blocking=True))
    return {k: v for k, v in views.items() if k in needed}


def train_step(model, loss_fn: SoftCLIPLoss, optimizer, batch: dict, cfg: TrainConfig, device: torch.device,
               soft_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """One optimizer step on ``batch`` (a :class:`train.data.TrainData` batch); ``model`` is the
    :class:`SoftCLIPModel`, possibly wrapped by DDP / ``torch.compile``; ``optimizer`` a fused AdamW.
    ``soft_scale`` multiplies ``lam`` and ``mu`` (the warm-up ramp). A non-finite loss or gradient norm
    skips the update on the device (the fused AdamW's ``found_inf``: no host sync) and sets ``nonfinite``.
    Returns the loss terms, monitors, the gradient norm, ``nonfinite`` (0 or 1) and the logit scale as
    detached tensors (reading them is what waits for the device)."""
    needed = loss_fn.views
    inputs = {"images": batch["images"], "texts": batch["texts"]}
    if "text" in needed:
        inputs["tags"] = batch["tags"]
    if "ema_text" in needed:
        inputs["ema_tags"] = batch["tags"]
    if "roi" in needed:
        inputs |= {k: batch[k] for k in ("roi_features", "roi_geometry", "roi_mask")}
    inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    with autocast(device, cfg.optim.precision):
        out = model(inputs.pop("images"), inputs.pop("texts"), **inputs)
    losses = loss_fn(out["image"], out["text"], out["logit_scale"], _teacher_views(out, batch, needed, device),
                     soft_scale=soft_scale)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = cfg.optim.grad_clip_norm or float("inf")
    losses["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_norm)
    nonfinite = ~(torch.isfinite(losses["loss"]) & torch.isfinite(losses["grad_norm"]))
    optimizer.found_inf = nonfinite.float()  # fused AdamW skips the whole update where this is 1
    optimizer.step()
    unwrapped = _unwrap(model)
    if unwrapped.ema_text is not None:
        unwrapped.ema_text.update(unwrapped.clip, cfg.loss.ema_decay)
    logit_scale = unwrapped.clip.logit_scale
    with torch.no_grad():
        logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    losses["logit_scale"] = logit_scale.detach().exp()
    losses["nonfinite"] = nonfinite.float()
    return {k: v.detach() for k, v in losses.items()}


def _unwrap(model) -> SoftCLIPModel:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def _loss_fn(cfg: TrainConfig, world_size: int) -> SoftCLIPLoss:
    loss = cfg.loss
    return SoftCLIPLoss(beta=loss.beta, lam=loss.lam, mu=loss.mu, image_target=loss.image_target,
                        text_target=loss.text_target, tau_image=loss.tau_image, tau_text=loss.tau_text,
                        roi_weight=loss.roi_weight, detach_targets=loss.detach_targets, world_size=world_size)


def _setup(cfg: TrainConfig, resume: str | None, rank: int, world_size: int, device: torch.device):
    """Model, loss, optimizer, data and the progress to start from (fresh or resumed)."""
    seed_everything(cfg.seed)  # identical initial weights on every rank
    set_threads(cfg)
    loss_fn = _loss_fn(cfg, world_size)
    model, preprocess_train, _, tokenizer = build_model(cfg.model, ema_text="ema_text" in loss_fn.views)
    model.to(device)
    if "roi" not in loss_fn.views or (loss_fn.roi_weight == 0 and loss_fn.detach_targets):
        # No gradient ever reaches the ROI branch (CLIP baseline, a detached ROI teacher without L_roi):
        # freeze it, so that DDP does not wait for its gradients and AdamW does not decay it.
        model.roi.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps, fused=True)
    data = TrainData(cfg.data, transform=preprocess_train, tokenizer=tokenizer,
                     feature_dim=cfg.model.roi_feature_dim, seed=cfg.seed, rank=rank, world_size=world_size)
    seed_everything(cfg.seed + rank)
    progress = {"step": 0, "epoch": 0, "positions": None}
    if resume:
        progress = _restore(resolve_resume(resume, cfg.run_dir), cfg, model, optimizer, rank, world_size)
    return model, loss_fn, optimizer, data, progress


@dataclasses.dataclass(kw_only=True)
class _Run:
    """Everything one training run carries between steps."""

    cfg: TrainConfig
    model: SoftCLIPModel  # unwrapped: what checkpoints hold
    step_model: torch.nn.Module  # DDP / compiled wrapper that runs the steps
    loss_fn: SoftCLIPLoss
    optimizer: torch.optim.Optimizer
    data: TrainData
    logger: MetricLogger
    bar: tqdm
    device: torch.device
    rank: int
    world_size: int
    total_steps: int
    progress: dict  # step, epoch, positions (per worker [consumed, batches] this epoch)
    first_loss: float | None = None  # loss of this call's first step
    last_loss: float | None = None  # loss of the last logged step (the last step is always logged)
    saved_at: int = -1


def _fresh_timing(device: torch.device) -> dict:
    """Counters between two log steps; ``nonfinite`` (skipped updates) stays on the device."""
    return {"elapsed": 0.0, "steps": 0, "data_wait": 0.0, "nonfinite": torch.zeros((), device=device)}


def soft_ramp(step: int, cfg: TrainConfig) -> float:
    """The factor on ``lam`` and ``mu`` at optimizer step ``step`` (0-based): ``(step + 1) / warmup_steps``
    during the warm-up when ``loss.ramp``, else 1. Early predictions are near uniform, so full-weight soft
    terms would dominate the first gradients (InfoNCE and L_roi carry the warm-up alone)."""
    if not cfg.loss.ramp or step >= cfg.optim.warmup_steps:
        return 1.0
    return (step + 1) / cfg.optim.warmup_steps


def _run_epoch(run: _Run) -> None:
    """Steps through the rest of the current epoch (or up to ``total_steps``)."""
    progress = run.progress
    positions = [list(p) for p in (progress["positions"] or [[0, 0]] * run.data.num_workers)]
    timing, errors = _fresh_timing(run.device), {}
    tick = time.perf_counter()
    for batch in run.data.epoch_batches(progress["epoch"], progress["positions"]):
        timing["data_wait"] += time.perf_counter() - tick
        step = progress["step"]
        lr = cosine_lr(step, base_lr=run.cfg.optim.lr, warmup_steps=run.cfg.optim.warmup_steps,
                       total_steps=run.total_steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        losses = train_step(run.step_model, run.loss_fn, run.optimizer, batch, run.cfg, run.device,
                            soft_scale=soft_ramp(step, run.cfg))
        if run.first_loss is None:
            run.first_loss = float(losses["loss"])
        positions[batch["worker"]] = [batch["consumed"], batch["batches"]]
        errors[batch["worker"]] = batch["errors"]
        progress |= {"step": step + 1, "positions": positions}
        timing["steps"] += 1
        timing["nonfinite"] += losses["nonfinite"]  # on the device: no sync until the next log
        timing["elapsed"] += time.perf_counter() - tick
        run.bar.update(1)
        if step == 0 or (step + 1) % run.cfg.log.every_n_steps == 0 or step + 1 == run.total_steps:
            metrics = log_line_metrics(losses, lr, timing, errors, run.cfg.data.batch_size, run.cfg.optim.skip_nonfinite)
            run.last_loss = metrics["loss"]
            run.logger.log(step + 1, metrics | {"epoch": progress["epoch"]})
            run.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            timing = _fresh_timing(run.device)
        if (step + 1) % run.cfg.log.checkpoint_every_n_steps == 0 or step + 1 == run.total_steps:
            _save(run)
        if progress["step"] >= run.total_steps:
            return
        tick = time.perf_counter()
    progress |= {"epoch": progress["epoch"] + 1, "positions": None}


def _save(run: _Run) -> None:
    """Checkpoint the current step (collective; rank 0 writes)."""
    ckpt = _checkpoint(run.cfg, run.model, run.optimizer, run.progress, run.world_size)
    if run.rank == 0:
        save_checkpoint(run.cfg.run_dir, run.progress["step"], ckpt, keep=run.cfg.log.keep_checkpoints)
    run.saved_at = run.progress["step"]


def _wrap(model: SoftCLIPModel, cfg: TrainConfig, world_size: int, device: torch.device) -> torch.nn.Module:
    """DDP across ranks, then ``torch.compile`` when asked."""
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if cfg.model.compile else model


def _refuse_mixed_runs(cfg: TrainConfig, resume: str | None) -> None:
    """A fresh start must not write into a run folder that holds another run's checkpoints."""
    folder = Path(cfg.run_dir) / "checkpoints"
    found = sorted(p.name for p in folder.glob("*.pt")) if not resume and folder.is_dir() else []
    if found:
        raise FileExistsError(f"{folder} already holds checkpoints ({', '.join(found[-3:])}): pass --resume "
                              "latest (resume='latest') to continue that run, or choose a new run_dir")


def train(cfg: TrainConfig, *, resume: str | None = None) -> TrainSummary:
    """Train ``cfg`` (resuming from a checkpoint path or ``"latest"``); every rank of a torchrun job calls
    this. Writes ``RUN_DIR/config.yaml``, ``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/``
    (``latest.pt`` is always the newest complete checkpoint). A fresh start (no ``resume``) refuses a run
    folder that already has checkpoints. A process group this call starts is destroyed when it returns, and
    the caller's torch thread count is put back (training sets its own: :func:`train.runtime.set_threads`)."""
    start, caller_threads = time.perf_counter(), torch.get_num_threads()
    _refuse_mixed_runs(cfg, resume)
    started_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    rank, world_size, device = init_distributed()
    model, loss_fn, optimizer, data, progress = _setup(cfg, resume, rank, world_size, device)
    total_steps = data.steps_per_epoch * cfg.optim.epochs
    total_steps = min(total_steps, cfg.optim.max_steps) if cfg.optim.max_steps else total_steps
    if rank == 0:
        save_config(cfg, Path(cfg.run_dir) / "config.yaml")
    run = _Run(cfg=cfg, model=model, step_model=_wrap(model, cfg, world_size, device), loss_fn=loss_fn,
               optimizer=optimizer, data=data, device=device, rank=rank, world_size=world_size,
               total_steps=total_steps, progress=progress,
               logger=MetricLogger(cfg.run_dir, resume_step=progress["step"], tensorboard=cfg.log.tensorboard,
                                   enabled=rank == 0),
               bar=tqdm(total=total_steps, initial=progress["step"], desc="train", unit="step",
                        disable=rank != 0 or not cfg.log.progress))
    while progress["step"] < total_steps:
        _run_epoch(run)
    if run.saved_at != progress["step"]:  # nothing left to train: still leave latest.pt in place
        _save(run)
    if rank == 0:  # open_clip's local-dir layout beside the checkpoints (train.export)
        export_open_clip(Path(cfg.run_dir) / "checkpoints" / "latest.pt", Path(cfg.run_dir) / "open_clip")
    run.bar.close()
    run.logger.close()
    if started_group:
        dist.destroy_process_group()
    torch.set_num_threads(caller_threads)
    nan = float("nan")
    return TrainSummary(steps=progress["step"], samples=progress["step"] * cfg.data.batch_size,
                        wall_s=time.perf_counter() - start,
                        first_loss=nan if run.first_loss is None else run.first_loss,
                        last_loss=nan if run.last_loss is None else run.last_loss,
                        checkpoint=str(Path(cfg.run_dir) / "checkpoints" / "latest.pt"))
