"""Zero-shot classification math: pure functions on embedding tensors, no model and no I/O.

The classifier follows CLIP (Radford et al., 2021, Sec. 3.1.4) as open_clip and CLIP_benchmark build it:
each class's prompt embeddings are L2-normalised, averaged and renormalised,

    w_c = normalize( (1/T) * sum_t normalize(e_{c,t}) ),                                   (Eq. 1)

and an image with normalised embedding ``x`` gets logits ``x @ W.T`` (the logit scale is left out: it is a
positive constant and changes no ranking).

Metrics, as CLIP_benchmark defines them (``clip_benchmark/metrics/zeroshot_classification.py``):

* top-k accuracy: the fraction of samples whose true class is among the k highest logits;
* mean per-class recall: CLIP_benchmark uses ``sklearn.metrics.balanced_accuracy_score(target, pred)``,
  which averages recall over the classes *present in the targets*; a class that no sample belongs to is
  left out of the average (sklearn drops the NaN recall of a class that is predicted but absent, and
  never sees a class that is neither). We do the same: a class with no samples does not count.

Ties have two policies (``ties=``):

* ``"clip_benchmark"`` (the default, so numbers compare with everyone else's): computed exactly as
  CLIP_benchmark 1.6 does, logits ``100 * x @ W`` with ``W`` the ``[D, C]`` classifier, top-k from
  ``torch.topk`` and the prediction for the per-class recall from ``argmax`` (both break ties by index);
* ``"strict"``: ties count against the sample. The rank of the true class is the number of *other*
  classes whose logit is greater than *or equal to* the true class's logit, and the sample is correct at
  k when that rank is below k, so a true class tied for the top logit is not a top-1 hit.

Without ties the two agree.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "TIE_POLICIES",
    "chance_accuracy",
    "clip_benchmark_classification_metrics",
    "classification_metrics",
    "classifier_from_template_embeddings",
    "mean_per_class_recall",
    "normalize_once",
    "top_k_accuracy",
    "true_class_ranks",
]

TIE_POLICIES = ("clip_benchmark", "strict")
TiePolicy = Literal["clip_benchmark", "strict"]


def classifier_from_template_embeddings(template_embeddings: torch.Tensor) -> torch.Tensor:
    """Zero-shot classifier rows from prompt embeddings (Eq. 1 of the module docstring).

    Args:
        template_embeddings: ``Tensor[C, T, D]``, the text embedding of template ``t`` filled with class
            ``c`` (need not be normalised).

    Returns:
        ``Tensor[C, D]``: one unit-norm row per class, the renormalised mean of its normalised templates.
    """
    if template_embeddings.ndim != 3 or 0 in template_embeddings.shape:
        raise ValueError(
            f"template_embeddings must be a non-empty [classes, templates, dim] tensor, "
            f"got shape {tuple(template_embeddings.shape)}"
        )
    mean = F.normalize(template_embeddings.float(), dim=-1).mean(dim=1)
    return F.normalize(mean, dim=-1)


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"logits must be [N, C] and labels [N]; got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(
            f"labels must lie in [0, {logits.shape[1]}); got range [{int(labels.min())}, {int(labels.max())}]"
        )
    if not torch.isfinite(logits).all():  # a NaN true score would rank first and count as a hit
        raise ValueError("logits contain NaN or inf (from the image embeddings or the classifier); check the "
                         "model and its precision")


def true_class_ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rank of each sample's true class, ties counted against the sample.

    Args:
        logits: ``Tensor[N, C]`` image-to-class scores.
        labels: ``Tensor[N]`` integer true classes in ``[0, C)``.

    Returns:
        ``LongTensor[N]``: the number of other classes scoring ``>=`` the true class (0 = a clean top-1).
    """
    _check_logits_labels(logits, labels)
    labels = labels.long()
    true_scores = logits.gather(1, labels[:, None])
    at_least = (logits >= true_scores).sum(dim=1)
    return at_least - 1  # the true class itself always counts once


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of samples whose true class is among the ``k`` highest logits (ties count against).

    Args:
        logits: ``Tensor[N, C]``; labels: ``Tensor[N]``; k: ``1 <= k <= C``.
    """
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k={k} must lie in [1, number of classes={logits.shape[-1]}]")
    if labels.numel() == 0:
        raise ValueError("top_k_accuracy needs at least one sample")
    return (true_class_ranks(logits, labels) < k).double().mean().item()


def mean_per_class_recall(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Average over the classes present in ``labels`` of the fraction of their samples ranked top-1.

    Classes with no sample are left out (CLIP_benchmark / sklearn ``balanced_accuracy_score``); ties
    count against the sample, as in :func:`true_class_ranks`.
    """
    if labels.numel() == 0:
        raise ValueError("mean_per_class_recall needs at least one sample")
    correct = (true_class_ranks(logits, labels) == 0).double()
    labels = labels.long()
    num_classes = logits.shape[1]
    hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, correct)
    counts = torch.bincount(labels, minlength=num_classes).double()
    present = counts > 0
    return (hits[present] / counts[present]).mean().item()


def normalize_once(embeddings: torch.Tensor) -> torch.Tensor:
    """``embeddings`` (float32) L2-normalised by rows, left as they are when every row already has unit
    norm (to 1e-5): normalising twice can move the last bit, and so which of two tied scores is higher."""
    embeddings = embeddings.float()
    norms = embeddings.norm(dim=-1)
    if embeddings.numel() and torch.allclose(norms, torch.ones_like(norms), rtol=0.0, atol=1e-5):
        return embeddings
    return F.normalize(embeddings, dim=-1)


def clip_benchmark_classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """``acc1``/``acc5``/``mean_per_class_recall`` as CLIP_benchmark's ``zeroshot_classification.evaluate``
    computes them from ``logits [N, C]`` (ties broken by ``torch.topk`` / ``argmax``, i.e. by index).

    Top-k: ``(true class among topk(logits, k)).sum() / N``; per-class recall: sklearn's
    ``balanced_accuracy_score(labels, argmax)``, the mean over the classes present in ``labels`` of their
    recall (``numpy.mean`` of the float64 recalls, in class order). ``acc5`` is ``None`` below 5 classes.
    """
    _check_logits_labels(logits, labels)
    if labels.numel() == 0:
        raise ValueError("classification metrics need at least one sample")
    labels = labels.long()
    num_classes = logits.shape[1]
    ks = (1, 5) if num_classes >= 5 else (1,)
    pred = logits.topk(max(ks), 1, True, True)[1].t()
    correct = pred.eq(labels.view(1, -1).expand_as(pred))
    accs = [correct[:k].reshape(-1).float().sum().item() / len(labels) for k in ks]
    argmax = logits.argmax(dim=1).cpu().numpy()
    target = labels.cpu().numpy()
    recalls = [float((argmax[target == c] == c).sum()) / float((target == c).sum()) for c in np.unique(target)]
    return {"top1": accs[0], "top5": accs[1] if len(accs) > 1 else None,
            "mean_per_class_recall": float(np.mean(np.asarray(recalls, dtype=np.float64)))}


def classification_metrics(
    image_embeddings: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor, *,
    ties: TiePolicy = "clip_benchmark",
) -> dict[str, float | None]:
    """Top-1, top-5 and mean per-class recall of a zero-shot classifier.

    Args:
        image_embeddings: ``Tensor[N, D]`` (normalised here, once: see :func:`normalize_once`).
        classifier: ``Tensor[C, D]`` from :func:`classifier_from_template_embeddings`.
        labels: ``Tensor[N]`` true classes.
        ties: ``"clip_benchmark"`` or ``"strict"`` (see the module docstring).

    Returns:
        ``{"top1", "top5", "mean_per_class_recall"}`` as fractions in [0, 1]; ``top5`` is ``None`` when
        there are fewer than 5 classes (CLIP_benchmark reports NaN there).
    """
    if ties not in TIE_POLICIES:
        raise ValueError(f"ties must be one of {TIE_POLICIES}, got {ties!r}")
    if ties == "clip_benchmark":  # CLIP_benchmark's logits, bit for bit: 100 * x @ W with W as [D, C]
        images, weights = normalize_once(image_embeddings), normalize_once(classifier)
        return clip_benchmark_classification_metrics(100.0 * images @ weights.T.contiguous(), labels)
    images = F.normalize(image_embeddings.float(), dim=-1)
    weights = F.normalize(classifier.float(), dim=-1)
    logits = images @ weights.T
    num_classes = logits.shape[1]
    return {
        "top1": top_k_accuracy(logits, labels, 1),
        "top5": top_k_accuracy(logits, labels, 5) if num_classes >= 5 else None,
        "mean_per_class_recall": mean_per_class_recall(logits, labels),
    }


def chance_accuracy(num_classes: int) -> dict[str, float | None]:
    """Expected metrics of a uniformly random classifier over ``num_classes`` classes: top-k ``k / C``,
    mean per-class recall ``1 / C`` (keys as :func:`classification_metrics`)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return {"top1": 1 / num_classes, "top5": 5 / num_classes if num_classes >= 5 else None,
            "mean_per_class_recall": 1 / num_classes}
