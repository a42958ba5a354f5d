"""Image-text retrieval math: pure functions on embedding tensors, no model and no I/O.

Two directions, named by what is the query and what is retrieved:

* ``image_to_text_R@k``: each *image* queries all captions; a hit when *any* of its captions is in the
  top k (the usual MS-COCO / Flickr30K protocol, where an image has about 5 captions). Averaged over
  images. Papers call this "text retrieval" or "image->text"; CLIP_benchmark calls it
  ``text_retrieval_recall@k``.
* ``text_to_image_R@k``: each *caption* queries all images; a hit when its image is in the top k.
  Averaged over captions. CLIP_benchmark calls this ``image_retrieval_recall@k``, named after what is
  retrieved, which is easy to read backwards; we name the query first to avoid that.

Similarity is the cosine of the L2-normalised embeddings. Ties have two policies (``ties=``):

* ``"clip_benchmark"`` (the default): exactly CLIP_benchmark 1.6's ``zeroshot_retrieval``: the score
  matrix ``texts @ images.T``, a hit when a positive is among ``torch.topk``'s k indices (ties broken by
  index), the recall a float32 mean;
* ``"strict"``: ties count against the query. The rank of a query's best positive is the number of
  *negatives* scoring greater than *or equal to* it, and the query is a hit at k when that rank is below
  k. Other positives never push a positive down (for image->text the best-scoring caption of the image
  is the one that counts). With no ties this equals the ``torch.topk`` recall; with ties it never
  overstates it.

Scores are computed ``chunk_size`` queries at a time, so MS-COCO 5k (5,000 x 25,000) fits in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from softclip.eval.zeroshot import TIE_POLICIES, TiePolicy, normalize_once

__all__ = ["DEFAULT_RECALL_KS", "chance_recall", "clip_benchmark_retrieval_metrics", "image_to_text_ranks", "recall_at_k",
           "retrieval_metrics", "text_to_image_ranks"]

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


def _topk_hits(scores: torch.Tensor, positive: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """Per row of ``scores``: is any positive among the ``torch.topk`` k indices (CLIP_benchmark's test)."""
    hits = []
    for start in range(0, scores.shape[0], chunk_size):
        top = scores[start : start + chunk_size].topk(min(k, scores.shape[1]), dim=1)[1]
        hits.append(positive[start : start + chunk_size].gather(1, top).any(dim=1))
    return torch.cat(hits)


def clip_benchmark_retrieval_metrics(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, text_to_image: torch.Tensor,
    *, ks: Sequence[int] = DEFAULT_RECALL_KS, chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k as CLIP_benchmark's ``zeroshot_retrieval.evaluate`` computes it (see the module docstring);
    keys as :func:`retrieval_metrics`. A ``k`` above the number of candidates counts every candidate.
    Embeddings already L2-normalised (as :mod:`eval.embed` returns them, by the same ``F.normalize``
    CLIP_benchmark applies) are used as given (:func:`eval.zeroshot.normalize_once`)."""
    _check(image_embeddings, text_embeddings, text_to_image)
    images, texts = normalize_once(image_embeddings), normalize_once(text_embeddings)
    owner = text_to_image.long().to(images.device)
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    scores = texts @ images.T  # [T, I], one product as CLIP_benchmark computes it
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), owner] = True
    i2t = {k: _topk_hits(scores.T, positive.T, k, chunk_size).float().mean().item() for k in ks}
    t2i = {k: _topk_hits(scores, positive, k, chunk_size).float().mean().item() for k in ks}
    return {**{f"image_to_text_R@{k}": v for k, v in i2t.items()}, **{f"text_to_image_R@{k}": v for k, v in t2i.items()}}


def retrieval_metrics(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, text_to_image: torch.Tensor,
    *, ks: Sequence[int] = DEFAULT_RECALL_KS, chunk_size: int = 1024, ties: TiePolicy = "clip_benchmark",
) -> dict[str, float]:
    """Recall@k in both directions, as fractions in [0, 1].

    Args:
        image_embeddings: ``Tensor[I, D]``; text_embeddings: ``Tensor[T, D]``.
        text_to_image: ``LongTensor[T]``, the image of each caption.
        ks: the cut-offs (default 1, 5, 10).
        ties: ``"clip_benchmark"`` or ``"strict"`` (see the module docstring).

    Returns:
        ``{"image_to_text_R@1": ..., ..., "text_to_image_R@1": ..., ...}`` (see the module docstring).
    """
    if ties not in TIE_POLICIES:
        raise ValueError(f"ties must be one of {TIE_POLICIES}, got {ties!r}")
    if ties == "clip_benchmark":
        return clip_benchmark_retrieval_metrics(image_embeddings, text_embeddings, text_to_image, ks=ks,
                                                chunk_size=chunk_size)
    i2t = recall_at_k(image_to_text_ranks(image_embeddings, text_embeddings, text_to_image, chunk_size=chunk_size), ks)
    t2i = recall_at_k(text_to_image_ranks(image_embeddings, text_embeddings, text_to_image, chunk_size=chunk_size), ks)
    return {**{f"image_to_text_R@{k}": v for k, v in i2t.items()}, **{f"text_to_image_R@{k}": v for k, v in t2i.items()}}


def chance_recall(caption_to_image: Sequence[int], ks: Sequence[int] = DEFAULT_RECALL_KS) -> dict[str, float]:
    """Expected recall@k of a random ranking, keys as :func:`retrieval_metrics`.

    Text-to-image: ``min(k, I) / I``. Image-to-text, for an image with ``m`` of the ``T`` captions: the
    chance that a random top k holds one of them, ``1 - prod_{i<k} (T - m - i) / (T - i)``, averaged over
    images (hypergeometric).
    """
    counts = torch.bincount(torch.as_tensor(list(caption_to_image), dtype=torch.long)).double()
    num_images, num_texts = len(counts), float(counts.sum())
    out = {}
    for k in ks:
        miss = torch.ones_like(counts)
        for i in range(min(k, int(num_texts))):
            miss = miss * ((num_texts - counts - i) / (num_texts - i)).clamp(min=0.0)
        out[f"image_to_text_R@{k}"] = float((1 - miss).mean())
    out.update({f"text_to_image_R@{k}": min(k, num_images) / num_images for k in ks})
    return out
