"""Test-time post-processing: RPN proposals, the NMS_FILTER 1/2 detection filters, attribute top-k.

Boxes are ``Tensor[N, 4]`` ``(x1, y1, x2, y2)`` in resized-image pixels. IoU is torchvision's (no +1), as
scene_graph_benchmark uses since 2021 when torchvision is importable.

:func:`multiclass_nms_keep` computes the per-class greedy NMS of every class at once. Greedy NMS keeps
box ``i`` iff no *kept* box ranked before ``i`` overlaps it; the keep vector is therefore the unique fixed
point of ``keep[i] = not any_j(before[j, i] and overlap[j, i] and keep[j])``. Iterating that map from
"keep everything" is exact after at most ``N`` rounds (rank ``r`` is final after ``r + 1``), and in
practice converges in a handful, each round one vectorised step over all (class, overlapping pair)
entries. No Python loop over classes is involved.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou, nms

from softclip.extract.detector.legacy import clip_boxes_legacy, decode_boxes

__all__ = [
    "best_surviving_class",
    "filter_detections",
    "multiclass_nms_keep",
    "postprocess_attributes",
    "rpn_proposals",
    "select_top_detections",
]

_MAX_CHUNK_ELEMENTS = 1 << 24  # class-chunking bound on (classes x pairs) work tensors


def rpn_proposals(objectness_per_image: list[Tensor], deltas_per_image: list[Tensor],
                  anchors_per_image: list[Tensor], image_sizes: list[tuple[int, int]], *,
                  pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float) -> list[Tensor]:
    """maskrcnn ``RPNPostProcessor`` at test time, per image: sigmoid, top ``pre_nms_top_n``, +1 decode,
    clip to ``[0, w-1]``, NMS at ``nms_thresh``, the first ``post_nms_top_n`` in NMS's own order.

    One NMS call per image, as the original (``boxlist_nms`` per image): a batched NMS would re-sort the kept
    boxes of all images together, and torchvision's CPU path does so with an unstable sort, which reorders
    proposals whose scores tie exactly.

    Returns proposals ``Tensor[P_i, 4]`` per image, sorted by decreasing objectness.
    """
    proposals = []
    for logits, deltas, anchors, (h, w) in zip(objectness_per_image, deltas_per_image, anchors_per_image,
                                               image_sizes):
        scores, top = logits.float().sigmoid().topk(min(pre_nms_top_n, logits.numel()))
        boxes = clip_boxes_legacy(decode_boxes(deltas[top].float(), anchors[top], (1.0, 1.0, 1.0, 1.0)), h, w)
        proposals.append(boxes[nms(boxes, scores, nms_thresh)[:post_nms_top_n]])
    return proposals


def _ranked_before(s_src: Tensor, s_dst: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """``src`` comes before ``dst`` in a class's greedy order: higher score, ties by lower index."""
    return (s_src > s_dst) | ((s_src == s_dst) & (src < dst))


def _fixed_point(suppressors: callable, keep: Tensor) -> Tensor:
    for _ in range(max(keep.shape) + 1):
        new_keep = ~suppressors(keep)
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep
    raise AssertionError("greedy NMS fixed point did not converge")  # impossible: rank r is final at r + 1


def _keep_shared_boxes(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    overlap = box_iou(boxes, boxes) > iou_threshold
    overlap.fill_diagonal_(False)
    src, dst = overlap.nonzero(as_tuple=True)
    if src.numel() == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    before = _ranked_before(scores[src], scores[dst], src[:, None], dst[:, None])  # [E, C]

    def suppressors(keep: Tensor) -> Tensor:
        hits = (before & keep[src]).to(torch.float32)
        return torch.zeros(keep.shape, device=keep.device).index_add_(0, dst, hits) > 0

    return _fixed_point(suppressors, torch.ones_like(scores, dtype=torch.bool))


def _keep_per_class_boxes(boxes: Tensor, scores_t: Tensor, iou_threshold: float) -> Tensor:
    n = boxes.shape[0]
    keep_t = torch.ones_like(scores_t, dtype=torch.bool)
    index = torch.arange(n, device=boxes.device)
    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(1, n * n))
    for c0 in range(0, scores_t.shape[0], chunk):
        b = boxes[:, c0 : c0 + chunk].transpose(0, 1)  # [c, N, 4]
        s = scores_t[c0 : c0 + chunk]
        area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
        lt = torch.maximum(b[:, :, None, :2], b[:, None, :, :2])
        rb = torch.minimum(b[:, :, None, 2:], b[:, None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        iou = inter / (area[:, :, None] + area[:, None, :] - inter)
        blocking = (iou > iou_threshold) & _ranked_before(s[:, :, None], s[:, None, :], index[:, None], index[None])
        blocking.diagonal(dim1=1, dim2=2).fill_(False)

        def suppressors(keep: Tensor, blocking: Tensor = blocking) -> Tensor:
            return (blocking & keep[:, :, None]).any(dim=1)

        keep_t[c0 : c0 + chunk] = _fixed_point(suppressors, torch.ones_like(s, dtype=torch.bool))
    return keep_t


def multiclass_nms_keep(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS run independently for every class, all classes at once.

    Args:
        boxes: ``[N, 4]`` shared by all classes, or ``[N, C, 4]`` one box per class.
        scores: ``[N, C]``; within a class boxes are visited by decreasing score (ties: lower index first).
        iou_threshold: a box is suppressed by a kept, earlier box with IoU strictly above this.

    Returns:
        ``Tensor[N, C]`` bool, True where proposal ``n`` survives the NMS of class ``c``. Equal to running
        ``torchvision.ops.nms(boxes_c, scores[:, c], iou_threshold)`` for each ``c``.
    """
    if boxes.dim() == 2:
        return _keep_shared_boxes(boxes.float(), scores.float(), iou_threshold)
    return _keep_per_class_boxes(boxes.float(), scores.float().t().contiguous(), iou_threshold).t()


def best_surviving_class(boxes: Tensor, scores: Tensor, iou_threshold: float) -> tuple[Tensor, Tensor]:
    """Per proposal, the best class whose per-class greedy NMS keeps it: ``(score, label)``, each ``[N]``.

    Same result as ``(scores * multiclass_nms_keep(boxes, scores, iou_threshold)).max(1)`` for shared
    ``boxes [N, 4]``, computed with less work: a box scoring above all its overlapping boxes in a class is
    surely kept there, which gives each proposal a lower bound ``LB`` on its answer; only classes where
    some proposal scores above its ``LB`` can change an answer, and only those run the exact NMS.
    """
    scores = scores.float()
    overlap = box_iou(boxes.float(), boxes.float()) > iou_threshold
    overlap.fill_diagonal_(False)
    dst, src = overlap.nonzero(as_tuple=True)
    neighbour_max = torch.zeros_like(scores)
    if src.numel():
        neighbour_max.scatter_reduce_(0, dst[:, None].expand(-1, scores.shape[1]), scores[src], "amax")
    lower_bound = torch.where(scores > neighbour_max, scores, torch.zeros_like(scores)).max(dim=1).values
    active = (scores > lower_bound[:, None]).any(dim=0).nonzero().squeeze(1)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[scores > neighbour_max] = True
    keep[:, active] = _keep_shared_boxes(boxes.float(), scores[:, active].contiguous(), iou_threshold)
    return (scores * keep).max(dim=1)


def select_top_detections(scores: Tensor, score_thresh: float, min_detections: int,
                          max_detections: int) -> Tensor:
    """Indices of the detections to keep, by decreasing score: every ``score >= score_thresh``, at least
    ``min_detections`` (lower scores fill up), at most ``max_detections``; ``scores`` must be positive."""
    order = scores.argsort(descending=True, stable=True)
    n_above = int((scores >= score_thresh).sum())
    return order[: min(max(n_above, min_detections), max_detections, scores.numel())]


def filter_detections(boxes: Tensor, scores: Tensor, *, nms_filter: int, score_thresh: float,
                      filter1_nms_thresh: float, nms_thresh: float, min_detections: int,
                      max_detections: int) -> tuple[Tensor, Tensor, Tensor]:
    """VinVL's ``NMS_FILTER`` post-processing of one image's proposals.

    Args:
        boxes: ``[N, 4]`` (IGNORE_BOX_REGRESSION: every class uses the proposal) or ``[N, C, 4]``.
        scores: ``[N, C]`` softmax class probabilities, column 0 = background.
        nms_filter: 1 = per-class NMS at ``filter1_nms_thresh`` for every class >= 1 (no score threshold),
            each proposal keeps its best surviving class; 2 = best class per proposal, scores above
            ``0.01 * score_thresh``, one class-agnostic NMS at ``nms_thresh``.

    Returns:
        ``(proposal_index, label, score)``, each ``[K]``, sorted by decreasing score, with
        :func:`select_top_detections` deciding ``K``.
    """
    if nms_filter == 1:
        if boxes.dim() == 2:
            best, labels = best_surviving_class(boxes, scores[:, 1:], filter1_nms_thresh)
        else:
            best, labels = (scores[:, 1:].float() * multiclass_nms_keep(boxes[:, 1:], scores[:, 1:],
                                                                       filter1_nms_thresh)).max(dim=1)
        labels = labels + 1
        candidates = best.nonzero().squeeze(1)
    elif nms_filter == 2:
        best, labels = scores[:, 1:].float().max(dim=1)
        labels = labels + 1
        pre = (best > score_thresh * 0.01).nonzero().squeeze(1)
        per_box = boxes if boxes.dim() == 2 else boxes[torch.arange(len(boxes)), labels]
        candidates = pre[nms(per_box[pre].float(), best[pre], nms_thresh)]
    else:
        raise ValueError(f"nms_filter must be 1 or 2, got {nms_filter}")
    chosen = candidates[select_top_detections(best[candidates], score_thresh, min_detections, max_detections)]
    return chosen, labels[chosen], best[chosen]


def postprocess_attributes(logits: Tensor, *, threshold: float, top_k: int) -> tuple[Tensor, Tensor]:
    """VinVL ``AttributePostProcessor``: softmax, column 0 set to 0, scores ``<= threshold`` zeroed, top ``top_k``.

    Returns ``(labels, scores)``, each ``[R, top_k]`` by decreasing score; entries with score 0 (none) have
    label 0, and fewer than ``top_k`` attribute classes are padded with zeros.
    """
    probs = logits.float().softmax(dim=1)
    probs[:, 0] = 0
    probs = torch.where(probs > threshold, probs, torch.zeros_like(probs))
    k = min(top_k, probs.shape[1])
    scores, labels = probs.topk(k, dim=1)
    labels = torch.where(scores > 0, labels, torch.zeros_like(labels))
    if k < top_k:
        scores = torch.nn.functional.pad(scores, (0, top_k - k))
        labels = torch.nn.functional.pad(labels, (0, top_k - k))
    return labels, scores
