"""The process a training run lives in: torchrun's ranks and devices, collective gathers, seeds, threads."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from softclip.train.config import TrainConfig

__all__ = ["all_ranks", "init_distributed", "seed_everything", "set_threads"]


def init_distributed() -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)`` from torchrun's environment (a single process without it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world_size > 1 else 0), world_size, device


def all_ranks(obj, world_size: int) -> list:
    """``obj`` of every rank, in rank order."""
    if world_size == 1:
        return [obj]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (CPU and CUDA) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(cfg: TrainConfig) -> None:
    """Main-process torch threads: ``data.threads``, or this rank's share of the cores (ranks on the node
    share them evenly) less one per loader worker (workers run with 1 thread: :mod:`train.data`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(cfg.data.threads or max(share - cfg.data.num_workers, 1))
