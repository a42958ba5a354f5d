"""Image-text retrieval math: pure functions on embedding tensors, no model and no I/O.

Two directions, named by what is the query and what is retrieved:

* ``image_to_text_R@k``: each *image* queries all captions; a hit when *any* of its captions is in the
  top k (the usual MS-COCO / Flickr30K protocol, where an image has about 5 captions). Averaged over
  images. Papers call this "text retrieval" or "image->text"; CLIP_benchmark calls it
  ``text_retrieval_recall@k``.
* ``text_to_image_R@k``: each *caption* queries all images; a hit when its image is in the top k.
  Averaged over captions. CLIP_benchmark calls this ``image_retrieval_recall@k``, named after what is
  retrieved, which is easy to read backwards; we name the query first to avoid that.

Similarity is the cosine of the L2-normalised embeddings. Ties count against the query (pessimistic):
the rank of a query's best positive is the number of *negatives* scoring greater than *or equal to* it,
and the query is a hit at k when that rank is below k. Other positives never push a positive down (for
image->text the best-scoring caption of the image is the one that counts). With no ties this equals the
``torch.topk`` recall of CLIP_benchmark; with ties it never overstates it.

Scores are computed ``chunk_size`` queries at a time, so MS-COCO 5k (5,000 x 25,000) fits in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_RECALL_KS", "image_to_text_ranks", "recall_at_k", "retrieval_metrics", "text_to_image_ranks"]

DEFAULT_RECALL_KS = (1, 5, 10)


def _check(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, text_to_image: torch.Tensor) -> None:
    if image_embeddings.ndim != 2 or text_embeddings.ndim != 2:
        raise ValueError(
            f"embeddings must be 2-D [items, dim]; got images {tuple(image_embeddings.shape)} "
            f"and texts {tuple(text_embeddings.shape)}"
        )
    if image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(
            f"image and text embeddings differ in width: {image_embeddings.shape[1]} vs {text_embeddings.shape[1]}"
        )
    if text_to_image.shape != (text_embeddings.shape[0],):
        raise ValueError(
            f"text_to_image must have one image index per text ({text_embeddings.shape[0]}), "
            f"got shape {tuple(text_to_image.shape)}"
        )
    num_images = image_embeddings.shape[0]
    if num_images == 0 or text_to_image.numel() == 0:
        raise ValueError("retrieval needs at least one image and one text")
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= num_images:
        raise ValueError(f"text_to_image indices must lie in [0, {num_images})")
    uncaptioned = (torch.bincount(text_to_image.long(), minlength=num_images) == 0).nonzero().flatten()
    if uncaptioned.numel():
        raise ValueError(
            f"{uncaptioned.numel()} image(s) have no caption (first: index {int(uncaptioned[0])}); "
            "image-to-text recall is undefined for them: drop them from the set"
        )
    for name, emb in (("image", image_embeddings), ("text", text_embeddings)):
        if not torch.isfinite(emb).all():
            raise ValueError(f"{name} embeddings contain NaN or inf; check the model and its precision")


def _prepare(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
             text_to_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(image_embeddings, text_embeddings, text_to_image)
    images = F.normalize(image_embeddings.float(), dim=-1)
    texts = F.normalize(text_embeddings.float(), dim=-1)
    return images, texts, text_to_image.long().to(images.device)


def image_to_text_ranks(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, text_to_image: torch.Tensor,
    *, chunk_size: int = 1024,
) -> torch.Tensor:
    """For each image, the number of *other images'* captions scoring ``>=`` its best own caption.

    Args:
        image_embeddings: ``Tensor[I, D]``; text_embeddings: ``Tensor[T, D]``.
        text_to_image: ``LongTensor[T]``, the image index of each caption (every image needs one).

    Returns:
        ``LongTensor[I]``; 0 means one of its captions is a clean first.
    """
    images, texts, owner = _prepare(image_embeddings, text_embeddings, text_to_image)
    ranks = []
    for start in range(0, images.shape[0], chunk_size):
        scores = images[start : start + chunk_size] @ texts.T  # [b, T]
        query = torch.arange(start, start + scores.shape[0], device=images.device)
        positive = owner[None, :] == query[:, None]
        best_positive = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append(((scores >= best_positive) & ~positive).sum(dim=1))
    return torch.cat(ranks).cpu()


def text_to_image_ranks(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, text_to_image: torch.Tensor,
    *, chunk_size: int = 1024,
) -> torch.Tensor:
    """For each caption, the number of *other* images scoring ``>=`` its own image.

    Args: as :func:`image_to_text_ranks`. Returns ``LongTensor[T]``.
    """
    images, texts, owner = _prepare(image_embeddings, text_embeddings, text_to_image)
    ranks = []
    for start in range(0, texts.shape[0], chunk_size):
        scores = texts[start : start + chunk_size] @ images.T  # [b, I]
        own = scores.gather(1, owner[start : start + chunk_size, None])
        ranks.append((scores >= own).sum(dim=1) - 1)  # minus the own image
    return torch.cat(ranks).cpu()


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_RECALL_KS) -> dict[int, float]:
    """Fraction of queries whose rank is below ``k``, for each ``k`` in ``ks``."""
    if ranks.numel() == 0:
        raise ValueError("recall_at_k needs at least one query")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    return {k: (ranks < k).double().mean().item() for k in ks}


def retrieval_metrics(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, text_to_image: torch.Tensor,
    *, ks: Sequence[int] = DEFAULT_RECALL_KS, chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k in both directions, as fractions in [0, 1].

    Args:
        image_embeddings: ``Tensor[I, D]``; text_embeddings: ``Tensor[T, D]``.
        text_to_image: ``LongTensor[T]``, the image of each caption.
        ks: the cut-offs (default 1, 5, 10).

    Returns:
        ``{"image_to_text_R@1": ..., ..., "text_to_image_R@1": ..., ...}`` (see the module docstring).
    """
    i2t = recall_at_k(image_to_text_ranks(image_embeddings, text_embeddings, text_to_image, chunk_size=chunk_size), ks)
    t2i = recall_at_k(text_to_image_ranks(image_embeddings, text_embeddings, text_to_image, chunk_size=chunk_size), ks)
    return {**{f"image_to_text_R@{k}": v for k, v in i2t.items()}, **{f"text_to_image_R@{k}": v for k, v in t2i.items()}}
