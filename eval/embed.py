"""Batched embedding of images and texts with a CLIP-like model (``encode_image`` / ``encode_text``).

This is the only eval module that runs a model; the metrics in :mod:`eval.zeroshot` and
:mod:`eval.retrieval` take the tensors it returns. Embeddings come back L2-normalised, float32, on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from softclip.eval.zeroshot import classifier_from_template_embeddings
from softclip.pipeline.precision import autocast

__all__ = ["encode_images", "encode_texts", "pick_device", "zero_shot_classifier"]


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; any other name is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return device


@torch.inference_mode()
def encode_images(
    model: torch.nn.Module, dataset: Dataset, *, batch_size: int, num_workers: int = 0,
    device: torch.device, precision: str = "bf16", desc: str = "images",
) -> torch.Tensor:
    """Embed every item of ``dataset`` (preprocessed image tensors) in order.

    Returns:
        ``Tensor[len(dataset), D]``, L2-normalised float32 on CPU.
    """
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    out = []
    for images in tqdm(loader, desc=desc, unit="batch", leave=False):
        with autocast(device, precision):
            features = model.encode_image(images.to(device, non_blocking=True))
        out.append(F.normalize(features.float(), dim=-1).cpu())
    return torch.cat(out)


@torch.inference_mode()
def encode_texts(
    model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], texts: Sequence[str], *,
    batch_size: int, device: torch.device, precision: str = "bf16", desc: str = "texts",
) -> torch.Tensor:
    """Tokenize and embed ``texts`` in batches of ``batch_size``.

    Returns:
        ``Tensor[len(texts), D]``, L2-normalised float32 on CPU.
    """
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", leave=False):
        tokens = tokenizer(list(texts[start : start + batch_size])).to(device)
        with autocast(device, precision):
            features = model.encode_text(tokens)
        out.append(F.normalize(features.float(), dim=-1).cpu())
    return torch.cat(out)


def zero_shot_classifier(
    model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
    templates: Sequence[str], *, batch_size: int, device: torch.device, precision: str = "bf16",
) -> torch.Tensor:
    """Classifier rows ``Tensor[C, D]``: every template (a string with ``{}``) filled with every class name,
    embedded, then reduced by :func:`eval.zeroshot.classifier_from_template_embeddings`."""
    prompts = [template.replace("{}", name) for name in classnames for template in templates]
    embeddings = encode_texts(model, tokenizer, prompts, batch_size=batch_size, device=device, precision=precision,
                              desc="class prompts")
    return classifier_from_template_embeddings(embeddings.view(len(classnames), len(templates), -1))
