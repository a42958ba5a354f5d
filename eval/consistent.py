"""Many-to-many retrieval metrics: every item consistent with a query counts as a correct answer.

In the shapes world a caption such as "a red star" fits every image holding a red star, so strict
single-positive recall (:mod:`eval.retrieval`) punishes a model for ranking another fitting image first. The
dataset lists, for every caption, the images it fits (``consistent[t, i]``, its own image included); these
metrics credit all of them:

* ``consistent_text_to_image_R@k``: a caption is a hit when *any* consistent image is in the top k.
* ``consistent_image_to_text_R@k``: an image is a hit when *any* caption consistent with it is in the top k.
* ``consistent_*_mAP``: mean over queries of the average precision over *all* consistent items,
  ``AP = (1 / |P|) sum_{p in P} (positives ranked at or above p) / rank(p)``.

Ties always count against the query, as ``ties=strict`` does in :mod:`eval.retrieval`: R@k counts the
inconsistent items scoring ``>=`` the best consistent one, and AP orders tied items with the inconsistent
ones first. (Identical captions of one image tie exactly, so under the default ``ties=clip_benchmark`` the
strict image-to-text recall can exceed its many-to-many counterpart.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from softclip.eval.retrieval import DEFAULT_RECALL_KS, recall_at_k

__all__ = ["average_precision", "consistency_matrix", "consistent_indices", "consistent_ranks",
           "consistent_retrieval_metrics"]


def consistent_indices(path: object, imgids: Sequence[object], lists: Sequence[Sequence[object] | None]
                       ) -> list[list[int]] | None:
    """Turn each caption's ``consistent_imgids`` (Karpathy ``imgid`` values, read from ``path``) into
    indices among the loaded images ``imgids``; ``None`` when no caption lists them."""
    if all(ids is None for ids in lists):
        return None
    if any(ids is None for ids in lists):
        raise ValueError(f"{path}: some captions have consistent_imgids and some do not; give it for all or none")
    index = {imgid: i for i, imgid in enumerate(imgids)}
    try:
        return [[index[imgid] for imgid in ids] for ids in lists]
    except KeyError as err:
        raise ValueError(f"{path}: consistent_imgids names image {err} that is not in the evaluated split; "
                         "regenerate the dataset") from err


def consistency_matrix(consistent: Sequence[Sequence[int]], num_images: int) -> torch.Tensor:
    """``BoolTensor[T, I]`` from one list of consistent image indices per caption."""
    matrix = torch.zeros(len(consistent), num_images, dtype=torch.bool)
    for t, images in enumerate(consistent):
        if not images:
            raise ValueError(f"caption {t} lists no consistent image (it must at least fit its own)")
        index = torch.as_tensor(list(images), dtype=torch.long)
        if int(index.min()) < 0 or int(index.max()) >= num_images:
            raise ValueError(f"caption {t} lists consistent image indices outside [0, {num_images})")
        matrix[t, index] = True
    return matrix


def consistent_ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per query row, the number of non-positive items scoring ``>=`` the best positive (0 = a hit at 1).

    ``scores`` ``[Q, N]`` and ``positive`` ``BoolTensor[Q, N]``; every row needs a positive."""
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    return ((scores >= best) & ~positive).sum(dim=1)


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per query row, the average precision of ranking by ``scores`` with ``positive`` relevant items;
    tied items are ordered with the non-positive ones first (pessimistic)."""
    negatives_first = torch.argsort(positive.to(torch.int8), dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, negatives_first), dim=1, descending=True, stable=True)
    hits = positive.gather(1, negatives_first.gather(1, by_score)).double()
    precision = hits.cumsum(dim=1) / torch.arange(1, hits.shape[1] + 1, dtype=torch.float64,
                                                     device=hits.device)
    return (precision * hits).sum(dim=1) / hits.sum(dim=1)


def consistent_retrieval_metrics(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, consistent: torch.Tensor,
    *, ks: Sequence[int] = DEFAULT_RECALL_KS, chunk_size: int = 1024,
) -> dict[str, float]:
    """Many-to-many R@k and mAP in both directions (module docstring), as fractions in [0, 1].

    Args:
        image_embeddings: ``Tensor[I, D]``; text_embeddings: ``Tensor[T, D]``.
        consistent: ``BoolTensor[T, I]``, which images each caption fits (:func:`consistency_matrix`).
    """
    num_texts, num_images = text_embeddings.shape[0], image_embeddings.shape[0]
    if consistent.shape != (num_texts, num_images):
        raise ValueError(f"consistent must be [texts, images] = [{num_texts}, {num_images}], "
                         f"got {tuple(consistent.shape)}")
    if not consistent.any(dim=0).all() or not consistent.any(dim=1).all():
        raise ValueError("every caption needs a consistent image and every image a consistent caption")
    images = F.normalize(image_embeddings.float(), dim=-1)
    texts = F.normalize(text_embeddings.float(), dim=-1)
    if not (torch.isfinite(images).all() and torch.isfinite(texts).all()):
        raise ValueError("embeddings contain NaN or inf; check the model and its precision")
    consistent = consistent.to(images.device)
    out: dict[str, float] = {}
    for name, queries, items, positive in (("text_to_image", texts, images, consistent),
                                           ("image_to_text", images, texts, consistent.T)):
        ranks, ap = [], []
        for start in range(0, queries.shape[0], chunk_size):
            scores = queries[start : start + chunk_size] @ items.T
            rows = positive[start : start + chunk_size]
            ranks.append(consistent_ranks(scores, rows).cpu())
            ap.append(average_precision(scores, rows).cpu())
        out |= {f"consistent_{name}_R@{k}": v for k, v in recall_at_k(torch.cat(ranks), ks).items()}
        out[f"consistent_{name}_mAP"] = torch.cat(ap).mean().item()
    return out
