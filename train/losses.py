"""SoftCLIP loss (Gao et al., AAAI 2024), as reconstructed in ``docs``' method note. No I/O.

Notation (global batch of N pairs, all embeddings L2-normalised, ``s`` the logit scale):

- predictions ``P_i2t = softmax_rows(s v t^T)``, ``P_t2i = softmax_rows(s t v^T)``;
- InfoNCE ``L_nce = (CE(I, P_i2t) + CE(I, P_t2i)) / 2``;
- self-similarity ``S = softmax_rows(x x^T / tau_s)`` of ROI embeddings ``r`` (image side) and tag
  embeddings ``g`` (text side), diagonal kept;
- softened targets ``Y_i2t = (1 - beta) I + beta S_img``, ``Y_t2i = (1 - beta) I + beta S_txt``;
- ``L_soft = (SKL(Y_i2t, P_i2t) + SKL(Y_t2i, P_t2i)) / 2`` with ``SKL(a, b) = KL(a||b) + KL(b||a)``, row mean;
- disentangled negatives: the positive is masked with a large negative logit before the softmax in both
  target and prediction, ``L_neg = (SKL(~Y_i2t, ~P_i2t) + SKL(~Y_t2i, ~P_t2i)) / 2``;
- ``L = L_nce + lam L_soft + mu L_neg``; CLIP is ``lam = mu = 0``.

Distributions are handled as log-probabilities throughout, so every KL is finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MASK_LOGIT",
    "TAGSET_BUCKETS",
    "SoftCLIPLoss",
    "contrastive_loss",
    "disentangled_negatives",
    "gather_features",
    "label_smoothing_targets",
    "negative_loss",
    "row_entropy",
    "self_similarity",
    "soft_loss",
    "softened_targets",
    "symmetric_kl",
    "tagset_similarity",
    "tagset_vectors",
]

# The "large negative logit" that removes the positive before a softmax (Decoupled KD); finite so that
# 0 * MASK_LOGIT stays 0 in the KL sums.
MASK_LOGIT = -1e4
# Hash buckets of the multi-hot tag-set vectors (:func:`tagset_vectors`).
TAGSET_BUCKETS = 4096


def gather_features(*features: torch.Tensor, world_size: int) -> tuple[torch.Tensor, ...]:
    """All-gather ``[n, d]`` tensors from every rank **with gradient**, concatenated in rank order.

    Like open_clip's ``gather_features(..., gather_with_grad=True)``: the backward of the gather sums the
    gradients of every rank's copy, so with DDP's gradient averaging the result equals one process on the
    global batch. ``world_size == 1`` returns the inputs unchanged.
    """
    if world_size == 1:
        return features
    import torch.distributed.nn  # noqa: PLC0415 (imports torch.distributed only when needed)

    return tuple(torch.cat(torch.distributed.nn.all_gather(f), dim=0) for f in features)


def contrastive_loss(logits_i2t: torch.Tensor, logits_t2i: torch.Tensor) -> torch.Tensor:
    """InfoNCE with one-hot targets: ``(CE(I, P_i2t) + CE(I, P_t2i)) / 2`` for ``[N, N]`` logits."""
    labels = torch.arange(logits_i2t.shape[0], device=logits_i2t.device)
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def self_similarity(x: torch.Tensor, tau_s: float) -> torch.Tensor:
    """Intra-modal self-similarity ``log softmax_rows(x x^T / tau_s)`` of ``[N, d]`` unit vectors, ``[N, N]``
    (log-probabilities; the diagonal is kept)."""
    return F.log_softmax(x @ x.T / tau_s, dim=1)


def tagset_vectors(ids: torch.Tensor, buckets: int = TAGSET_BUCKETS) -> torch.Tensor:
    """Unit multi-hot vectors ``h [N, buckets]`` of tag sets given as ``[N, K]`` feature ids
    (:func:`train.data.tagset_ids`, padding -1). Id ``f`` sets bucket ``f mod buckets``. Two disjoint sets
    of ``k`` features share a bucket by chance ``k^2 / buckets`` times on average, which moves their
    cosine by about ``k / buckets`` (0.007 for 30 features in 4,096 buckets): far below any useful
    ``tau_s``. A sample without tags gets the zero vector (cosine 0 with everything)."""
    valid = ids >= 0
    hot = torch.zeros(ids.shape[0], buckets + 1, device=ids.device)
    hot.scatter_(1, torch.where(valid, ids % buckets, buckets), 1.0)  # padding goes to the extra column
    return F.normalize(hot[:, :buckets], dim=1)


def tagset_similarity(ids: torch.Tensor, tau_s: float, buckets: int = TAGSET_BUCKETS) -> torch.Tensor:
    """The parameter-free text-side self-similarity ``log S_tag = log softmax_rows(cos(h_i, h_j) / tau_s)``
    of the tag sets' multi-hot vectors ``h`` (:func:`tagset_vectors`), ``[N, N]`` log-probabilities. The
    cosine of two multi-hot sets is ``|A & B| / sqrt(|A| |B|)``: shared phrases and words, nothing learnt,
    so it cannot collapse. Equal to :func:`self_similarity` of ``h``."""
    return self_similarity(tagset_vectors(ids, buckets), tau_s)


def softened_targets(log_similarity: torch.Tensor, beta: float) -> torch.Tensor:
    """``log((1 - beta) I + beta S)`` from ``log S`` ``[N, N]``, computed stably with logaddexp."""
    n = log_similarity.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=log_similarity.device)
    if beta == 0.0:
        return torch.where(eye, 0.0, MASK_LOGIT).to(log_similarity.dtype)
    scaled = log_similarity + torch.log(torch.tensor(beta, dtype=log_similarity.dtype))
    if beta == 1.0:
        return scaled
    one_hot = torch.where(eye, torch.log(torch.tensor(1.0 - beta)), torch.tensor(float("-inf")))
    return torch.logaddexp(scaled, one_hot.to(scaled))


def label_smoothing_targets(n: int, beta: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Log of ``(1 - beta) I + beta U``, ``U`` uniform over the ``n - 1`` negatives (PyramidCLIP baseline)."""
    if n == 1:
        return torch.zeros(1, 1, device=device, dtype=dtype)
    off = torch.full((n, n), beta / (n - 1), device=device, dtype=dtype)
    probs = torch.where(torch.eye(n, dtype=torch.bool, device=device), 1.0 - beta, off)
    return torch.log(probs.clamp_min(torch.finfo(dtype).tiny))


def symmetric_kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``SKL(a, b) = KL(a||b) + KL(b||a)`` of row distributions given as log-probabilities, row mean."""
    a, b = log_a.exp(), log_b.exp()
    return ((a - b) * (log_a - log_b)).sum(dim=1).mean()


def soft_loss(log_y_i2t: torch.Tensor, log_y_t2i: torch.Tensor,
              logits_i2t: torch.Tensor, logits_t2i: torch.Tensor) -> torch.Tensor:
    """``L_soft = (SKL(Y_i2t, P_i2t) + SKL(Y_t2i, P_t2i)) / 2``; targets as log-probabilities, predictions
    as logits."""
    return (symmetric_kl(log_y_i2t, F.log_softmax(logits_i2t, dim=1))
            + symmetric_kl(log_y_t2i, F.log_softmax(logits_t2i, dim=1))) / 2


def disentangled_negatives(scores: torch.Tensor) -> torch.Tensor:
    """Row distributions over the negatives only: the diagonal (positive) of ``[N, N]`` logits or
    log-probabilities is set to :data:`MASK_LOGIT` and the rows are renormalised (log-probabilities out)."""
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    return F.log_softmax(scores.masked_fill(eye, MASK_LOGIT), dim=1)


def negative_loss(log_y_i2t: torch.Tensor, log_y_t2i: torch.Tensor,
                  logits_i2t: torch.Tensor, logits_t2i: torch.Tensor) -> torch.Tensor:
    """``L_neg = (SKL(~Y_i2t, ~P_i2t) + SKL(~Y_t2i, ~P_t2i)) / 2`` with ``~`` :func:`disentangled_negatives`."""
    return (symmetric_kl(disentangled_negatives(log_y_i2t), disentangled_negatives(logits_i2t))
            + symmetric_kl(disentangled_negatives(log_y_t2i), disentangled_negatives(logits_t2i))) / 2


def row_entropy(log_p: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the rows of ``[N, N]`` log-probabilities; a collapse monitor."""
    return -(log_p.exp() * log_p).sum(dim=1).mean()


class SoftCLIPLoss(nn.Module):
    """SoftCLIP's training loss; with ``lam = mu = 0`` exactly open_clip's ``ClipLoss``.

    Args:
        beta: weight of the self-similarity in the softened targets; must be > 0 unless ``lam = mu = 0``.
        tau_s: temperature of the intra-modal self-similarity.
        lam, mu: weights of ``L_soft`` and ``L_neg``.
        target_source: ``roi_tag`` (``S_img`` from ROI, ``S_txt`` from tag embeddings), ``roi`` (``S_img``
            for both directions), ``tag`` (``S_txt`` for both), ``label_smoothing`` (uniform negatives),
            ``raw`` (the model's own image / caption embeddings, detached).
        detach_targets: stop gradients into the targets (the ROI branch and the tags' text tower pass).
        world_size: ranks to gather embeddings from (:func:`gather_features`, with gradient).

    ``forward(image, text, logit_scale, roi=None, tag=None)`` takes ``[n, d]`` normalised embeddings of the
    local batch and the *exponentiated* logit scale, and returns a dict of scalars: ``loss`` (to
    backpropagate), ``loss_nce``, ``loss_soft``, ``loss_neg``, ``entropy_target`` and ``entropy_pred`` (mean
    row entropy of the targets, 0 for one-hot, and of the predictions, averaged over both directions).
    """

    def __init__(self, *, beta: float = 0.3, tau_s: float = 0.07, lam: float = 1.0, mu: float = 0.5,
                 target_source: str = "roi_tag", detach_targets: bool = False, world_size: int = 1):
        super().__init__()
        if target_source not in ("roi_tag", "roi", "tag", "label_smoothing", "raw"):
            raise ValueError(f"unknown target_source {target_source!r}: use roi_tag, roi, tag, "
                             "label_smoothing or raw")
        if beta <= 0 and (lam > 0 or mu > 0):
            raise ValueError(f"beta={beta} with lam={lam}, mu={mu}: beta=0 makes the targets one-hot, for which "
                             "the soft and negative terms are not defined; use beta > 0, or lam=mu=0 for CLIP")
        self.beta, self.tau_s, self.lam, self.mu = beta, tau_s, lam, mu
        self.target_source, self.detach_targets, self.world_size = target_source, detach_targets, world_size

    @property
    def needs_roi(self) -> bool:
        """Whether ``forward`` uses ROI embeddings."""
        return (self.lam > 0 or self.mu > 0) and self.target_source in ("roi_tag", "roi")

    @property
    def needs_tags(self) -> bool:
        """Whether ``forward`` uses tag embeddings."""
        return (self.lam > 0 or self.mu > 0) and self.target_source in ("roi_tag", "tag")

    def targets(self, image, text, roi, tag) -> tuple[torch.Tensor, torch.Tensor]:
        """Log softened targets ``(log Y_i2t, log Y_t2i)`` for gathered ``[N, d]`` embeddings."""
        if self.target_source == "label_smoothing":
            y = label_smoothing_targets(image.shape[0], self.beta, device=image.device, dtype=image.dtype)
            return y, y
        sources = {"roi_tag": (roi, tag), "roi": (roi, roi), "tag": (tag, tag),
                   "raw": (image.detach(), text.detach())}[self.target_source]
        if any(s is None for s in sources):
            raise ValueError(f"target_source={self.target_source} needs the ROI and/or tag embeddings")
        x_img, x_txt = (s.detach() if self.detach_targets else s for s in sources)
        y_i2t = softened_targets(self_similarity(x_img, self.tau_s), self.beta)
        y_t2i = y_i2t if x_txt is x_img else softened_targets(self_similarity(x_txt, self.tau_s), self.beta)
        return y_i2t, y_t2i

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                roi: torch.Tensor | None = None, tag: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        local = [image, text] + [x for x in (roi, tag) if x is not None]
        gathered = list(gather_features(*(x.float() for x in local), world_size=self.world_size))
        image, text = gathered[0], gathered[1]
        roi = gathered[2] if roi is not None else None
        tag = gathered[-1] if tag is not None else None
        logits_i2t = logit_scale * image @ text.T
        logits_t2i = logits_i2t.T
        out = {"loss_nce": contrastive_loss(logits_i2t, logits_t2i)}
        zero = torch.zeros((), device=image.device)
        entropy_pred = (row_entropy(F.log_softmax(logits_i2t.detach(), 1))
                        + row_entropy(F.log_softmax(logits_t2i.detach(), 1))) / 2
        if self.lam > 0 or self.mu > 0:
            y_i2t, y_t2i = self.targets(image, text, roi, tag)
            out["loss_soft"] = soft_loss(y_i2t, y_t2i, logits_i2t, logits_t2i) if self.lam > 0 else zero
            out["loss_neg"] = negative_loss(y_i2t, y_t2i, logits_i2t, logits_t2i) if self.mu > 0 else zero
            entropy_target = (row_entropy(y_i2t.detach()) + row_entropy(y_t2i.detach())) / 2
        else:
            out["loss_soft"], out["loss_neg"], entropy_target = zero, zero, zero
        out["loss"] = out["loss_nce"] + self.lam * out["loss_soft"] + self.mu * out["loss_neg"]
        out["entropy_target"], out["entropy_pred"] = entropy_target, entropy_pred
        return out
