"""SoftCLIP loss (Gao et al., AAAI 2024), as reconstructed in ``docs``' method note. No I/O.

Notation (global batch of N pairs, all embeddings L2-normalised, ``s`` the logit scale):

- predictions ``P_i2t = softmax_rows(s v t^T)``, ``P_t2i = softmax_rows(s t v^T)``;
- InfoNCE ``L_nce = (CE(I, P_i2t) + CE(I, P_t2i)) / 2``;
- self-similarity ``S = softmax_rows(x x^T / tau_s)`` of a teacher view ``x`` per side (image side: ROI
  embeddings ``r`` or mean detector features; text side: tag embeddings ``g`` from the live or an EMA text
  tower, or multi-hot tag sets ``h``), diagonal kept, each side with its own ``tau_s``;
- softened targets ``Y_i2t = (1 - beta) I + beta S_img``, ``Y_t2i = (1 - beta) I + beta S_txt``;
- ``L_soft = (SKL(Y_i2t, P_i2t) + SKL(Y_t2i, P_t2i)) / 2`` with ``SKL(a, b) = KL(a||b) + KL(b||a)``, row mean;
- disentangled negatives: the positive is masked with a large negative logit before the softmax in both
  target and prediction, ``L_neg = (SKL(~Y_i2t, ~P_i2t) + SKL(~Y_t2i, ~P_t2i)) / 2``;
- ROI-to-caption InfoNCE ``L_roi = (CE(I, softmax_rows(s r t^T)) + CE(I, softmax_rows(s t r^T))) / 2``: what
  trains the ROI branch, whose output is detached where it builds the targets (the teacher);
- ``L = L_nce + roi_weight L_roi + ramp (lam L_soft + mu L_neg)``; CLIP is ``lam = mu = roi_weight = 0``,
  the matched control ``lam = mu = 0`` with ``roi_weight > 0``.

Distributions are handled as log-probabilities throughout, so every KL is finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MASK_LOGIT",
    "TAGSET_BUCKETS",
    "TARGET_SOURCES",
    "VIEW_SOURCES",
    "SoftCLIPLoss",
    "calibrate_tau",
    "contrastive_loss",
    "disentangled_negatives",
    "gather_features",
    "label_smoothing_targets",
    "mean_off_diagonal_cosine",
    "mean_roi_features",
    "negative_loss",
    "negatives_entropy",
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


def soft_loss(log_y_i2t: torch.Tensor | None, log_y_t2i: torch.Tensor | None,
              logits_i2t: torch.Tensor, logits_t2i: torch.Tensor) -> torch.Tensor:
    """``L_soft = (SKL(Y_i2t, P_i2t) + SKL(Y_t2i, P_t2i)) / 2``; targets as log-probabilities (None: that
    direction has no soft target and adds 0), predictions as logits."""
    return sum((symmetric_kl(log_y, F.log_softmax(logits, dim=1)) for log_y, logits in
                ((log_y_i2t, logits_i2t), (log_y_t2i, logits_t2i)) if log_y is not None),
               torch.zeros((), device=logits_i2t.device)) / 2


def disentangled_negatives(scores: torch.Tensor) -> torch.Tensor:
    """Row distributions over the negatives only: the diagonal (positive) of ``[N, N]`` logits or
    log-probabilities is set to :data:`MASK_LOGIT` and the rows are renormalised (log-probabilities out)."""
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    return F.log_softmax(scores.masked_fill(eye, MASK_LOGIT), dim=1)


def negative_loss(log_y_i2t: torch.Tensor | None, log_y_t2i: torch.Tensor | None,
                  logits_i2t: torch.Tensor, logits_t2i: torch.Tensor) -> torch.Tensor:
    """``L_neg = (SKL(~Y_i2t, ~P_i2t) + SKL(~Y_t2i, ~P_t2i)) / 2`` with ``~`` :func:`disentangled_negatives`
    (a None target adds 0)."""
    return sum((symmetric_kl(disentangled_negatives(log_y), disentangled_negatives(logits)) for log_y, logits in
                ((log_y_i2t, logits_i2t), (log_y_t2i, logits_t2i)) if log_y is not None),
               torch.zeros((), device=logits_i2t.device)) / 2


def row_entropy(log_p: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the rows of ``[N, N]`` log-probabilities."""
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def negatives_entropy(log_y: torch.Tensor) -> torch.Tensor:
    """The collapse monitor ``H(~Y)``: mean row entropy of the negatives-only target
    (:func:`disentangled_negatives` of ``log Y``). It does not depend on ``beta``; uniform (no signal, or a
    collapsed teacher) is ``ln(N - 1)``, 4.14 nats at ``N = 64``; near 0 is one-hot (tau_s too small)."""
    return row_entropy(disentangled_negatives(log_y))


def mean_off_diagonal_cosine(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine between different rows of ``[N, d]`` unit vectors; 1.0 when every row is the same."""
    n = x.shape[0]
    if n < 2:
        return torch.zeros((), device=x.device)
    gram = x @ x.T
    return (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))


def mean_roi_features(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The parameter-free image-side view ``roi_mean``: the detector's ROI features ``[N, M, D]`` averaged
    over the valid boxes (``mask [N, M]``) and L2-normalised, ``[N, D]``; zero for an image without boxes."""
    weights = mask.unsqueeze(-1).float()
    return F.normalize((features.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0), dim=-1)


def calibrate_tau(x: torch.Tensor, target_nats: float = 2.25, *, steps: int = 40) -> float:
    """The ``tau_s`` at which a teacher view ``x [N, d]`` (unit rows, e.g. one batch of 64) gives
    ``H(~Y) = target_nats``, by bisection on ``log tau`` (``H(~Y)`` grows with ``tau_s``). Aim for 1.5 to
    3 nats at batch 64: lower is close to one-hot (no soft signal), ``ln(N - 1)`` is uniform.

    Example: ``calibrate_tau(tagset_vectors(batch["tagset"]))`` for ``loss.tau_text`` with ``tagset``."""
    with torch.no_grad():
        low, high = math.log(1e-4), math.log(1e2)
        for _ in range(steps):
            mid = (low + high) / 2
            if float(negatives_entropy(self_similarity(x.float(), math.exp(mid)))) < target_nats:
                low = mid
            else:
                high = mid
    return math.exp((low + high) / 2)


# Teacher views of the softened targets; "student", "uniform" and "none" need no view.
VIEW_SOURCES = ("roi", "roi_mean", "text", "ema_text", "tagset")
TARGET_SOURCES = (*VIEW_SOURCES, "student", "uniform", "none")


class SoftCLIPLoss(nn.Module):
    """SoftCLIP's training loss; with ``lam = mu = roi_weight = 0`` exactly open_clip's ``ClipLoss``.

    Args:
        beta: weight of the self-similarity in the softened targets; must be > 0 unless ``lam = mu = 0``.
        lam, mu: weights of ``L_soft`` and ``L_neg``.
        image_target, text_target: the source of ``S_img`` (target of image->text) and ``S_txt`` (text->image):
            a teacher view ``roi`` (the ROI aggregator's embedding ``r``), ``roi_mean`` (mean detector ROI
            features, no parameters), ``text`` (the tags through the live text tower, ``g``), ``ema_text``
            (the tags through an EMA copy of the text tower), ``tagset`` (multi-hot tag sets,
            :func:`tagset_vectors`); or ``student`` (the model's own image / caption embeddings, detached),
            ``uniform`` (label smoothing: uniform over the negatives) or ``none`` (no soft terms that way).
        tau_image, tau_text: ``tau_s`` of each side's self-similarity (see :func:`calibrate_tau`).
        roi_weight: weight of ``L_roi``, InfoNCE between ``r`` and the captions: what trains the ROI branch.
        detach_targets: stop gradients into the targets (the teacher): the ROI branch then learns from
            ``L_roi`` only and the tag pass of the text tower gets no gradient.
        world_size: ranks to gather embeddings from (:func:`gather_features`, with gradient).

    ``forward(image, text, logit_scale, views, soft_scale=1.0)`` takes ``[n, d]`` normalised embeddings of the
    local batch, the *exponentiated* logit scale and ``views`` (source name -> ``[n, d']`` unit vectors, the
    names in :attr:`views`). ``soft_scale`` multiplies ``lam`` and ``mu`` (the warm-up ramp). It returns a dict
    of scalars: ``loss`` (to backpropagate), ``loss_nce``, ``loss_soft``, ``loss_neg``, ``loss_roi``,
    ``entropy_pred`` (mean row entropy of the predictions), the monitors ``neg_entropy_i2t`` /
    ``neg_entropy_t2i`` (:func:`negatives_entropy`) for each side with a target, and ``cos_r`` / ``cos_g``
    (:func:`mean_off_diagonal_cosine` of ``r`` and of the text-side view) when those are computed.
    """

    def __init__(self, *, beta: float = 0.3, lam: float = 1.0, mu: float = 0.5, image_target: str = "roi",
                 text_target: str = "tagset", tau_image: float = 0.1, tau_text: float = 0.1,
                 roi_weight: float = 1.0, detach_targets: bool = True, world_size: int = 1):
        super().__init__()
        for side, source in (("image_target", image_target), ("text_target", text_target)):
            if source not in TARGET_SOURCES:
                raise ValueError(f"unknown {side} {source!r}: use one of {', '.join(TARGET_SOURCES)}")
        soft = lam > 0 or mu > 0
        if soft and beta <= 0:
            raise ValueError(f"beta={beta} with lam={lam}, mu={mu}: beta=0 makes the targets one-hot, for which "
                             "the soft and negative terms are not defined; use beta > 0, or lam=mu=0 for CLIP")
        if soft and image_target == text_target == "none":
            raise ValueError("image_target=none and text_target=none leave no soft target: choose a source, or "
                             "lam=mu=0 for CLIP")
        if tau_image <= 0 or tau_text <= 0 or roi_weight < 0:
            raise ValueError("tau_image and tau_text must be positive and roi_weight non-negative")
        self.beta, self.lam, self.mu, self.roi_weight = beta, lam, mu, roi_weight
        self.image_target, self.text_target = image_target, text_target
        self.tau_image, self.tau_text = tau_image, tau_text
        self.detach_targets, self.world_size = detach_targets, world_size

    @property
    def views(self) -> frozenset[str]:
        """The teacher views ``forward`` needs (names from :data:`VIEW_SOURCES`)."""
        soft = self.lam > 0 or self.mu > 0
        used = {self.image_target, self.text_target} & set(VIEW_SOURCES) if soft else set()
        return frozenset(used | ({"roi"} if self.roi_weight > 0 else set()))

    def _log_similarity(self, source: str, views: dict, own: torch.Tensor, tau: float) -> torch.Tensor | None:
        """``log S`` of one side (``own``: that side's student embeddings); None for ``none``."""
        if source == "none":
            return None
        if source == "uniform":
            return label_smoothing_targets(own.shape[0], self.beta, device=own.device, dtype=own.dtype)
        if source == "student":
            return softened_targets(self_similarity(own.detach(), tau), self.beta)
        x = views[source].detach() if self.detach_targets else views[source]
        return softened_targets(self_similarity(x, tau), self.beta)

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                views: dict[str, torch.Tensor] | None = None, soft_scale: float = 1.0) -> dict[str, torch.Tensor]:
        names = sorted(k for k, v in (views or {}).items() if v is not None)
        missing = sorted(self.views - set(names))
        if missing:
            raise ValueError(f"the loss needs the teacher view(s) {', '.join(missing)} (targets "
                             f"{self.image_target}/{self.text_target}, roi_weight {self.roi_weight}), which "
                             "forward was not given")
        gathered = gather_features(image.float(), text.float(), *(views[k].float() for k in names),
                                   world_size=self.world_size)
        image, text, views = gathered[0], gathered[1], dict(zip(names, gathered[2:]))
        logits_i2t = logit_scale * image @ text.T
        logits_t2i = logits_i2t.T
        zero = torch.zeros((), device=image.device)
        out = {"loss_nce": contrastive_loss(logits_i2t, logits_t2i), "loss_soft": zero, "loss_neg": zero,
               "loss_roi": zero}
        if self.roi_weight > 0:
            roi_logits = logit_scale * views["roi"] @ text.T
            out["loss_roi"] = contrastive_loss(roi_logits, roi_logits.T)
        out["entropy_pred"] = (row_entropy(F.log_softmax(logits_i2t.detach(), 1))
                               + row_entropy(F.log_softmax(logits_t2i.detach(), 1))) / 2
        if self.lam > 0 or self.mu > 0:
            self._soft_terms(out, views, image, text, logits_i2t, logits_t2i)
        soft = self.lam * out["loss_soft"] + self.mu * out["loss_neg"]
        out["loss"] = out["loss_nce"] + self.roi_weight * out["loss_roi"] + soft_scale * soft
        if "roi" in views:
            out["cos_r"] = mean_off_diagonal_cosine(views["roi"].detach())
        if self.text_target in views:
            out["cos_g"] = mean_off_diagonal_cosine(views[self.text_target].detach())
        return out

    def _soft_terms(self, out: dict, views: dict, image, text, logits_i2t, logits_t2i) -> None:
        """Adds ``loss_soft``, ``loss_neg`` and the ``H(~Y)`` monitors; a side with target ``none`` adds 0."""
        y_i2t = self._log_similarity(self.image_target, views, image, self.tau_image)
        y_t2i = self._log_similarity(self.text_target, views, text, self.tau_text)
        if self.lam > 0:
            out["loss_soft"] = soft_loss(y_i2t, y_t2i, logits_i2t, logits_t2i)
        if self.mu > 0:
            out["loss_neg"] = negative_loss(y_i2t, y_t2i, logits_i2t, logits_t2i)
        for direction, log_y in (("i2t", y_i2t), ("t2i", y_t2i)):
            if log_y is not None:
                out[f"neg_entropy_{direction}"] = negatives_entropy(log_y.detach())
