"""Training losses of the detector, as maskrcnn_benchmark / scene_graph_benchmark define them.

Pure functions, no I/O. Boxes are ``Tensor[N, 4]`` ``(x1, y1, x2, y2)`` in resized-image pixels; targets
per image are ``boxes [G, 4]``, ``labels [G]`` (1..C-1) and ``attributes [G, k]`` (0-padded indices).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.ops import box_iou

from softclip.extract.detector.legacy import encode_boxes

__all__ = ["attribute_loss", "attribute_soft_targets", "fastrcnn_loss", "rpn_loss", "sample_proposals"]


def rpn_loss(objectness_per_image: list[Tensor], deltas_per_image: list[Tensor], anchors_per_image: list[Tensor],
             gt_boxes_per_image: list[Tensor], *, fg_iou_thresh: float, bg_iou_thresh: float,
             batch_size_per_image: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """RPN losses ``(loss_objectness, loss_rpn_box_reg)``.

    Anchors with IoU >= ``fg_iou_thresh`` (and each ground truth's best anchors) are positive, below
    ``bg_iou_thresh`` negative; ``batch_size_per_image`` are sampled. Objectness is binary cross-entropy;
    regression is smooth-L1 (beta 1/9) on legacy deltas (weights 1), summed and divided by the sample count.
    """
    matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
    sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
    labels, targets = [], []
    for anchors, gt in zip(anchors_per_image, gt_boxes_per_image):
        if len(gt) == 0:
            labels.append(torch.zeros(len(anchors), device=anchors.device))
            targets.append(torch.zeros_like(anchors))
            continue
        matched = matcher(box_iou(gt, anchors))
        label = (matched >= 0).float()
        label[matched == Matcher.BETWEEN_THRESHOLDS] = -1
        labels.append(label)
        targets.append(encode_boxes(gt[matched.clamp(min=0)], anchors, (1.0, 1.0, 1.0, 1.0)))
    pos, neg = sampler([lab.long().clamp(min=-1) for lab in labels])
    pos = torch.cat(pos).bool()
    sampled = pos | torch.cat(neg).bool()
    objectness = torch.cat(objectness_per_image)
    deltas = torch.cat(deltas_per_image)
    count = max(int(sampled.sum()), 1)
    box_loss = F.smooth_l1_loss(deltas[pos], torch.cat(targets)[pos], beta=1 / 9, reduction="sum") / count
    cls_loss = F.binary_cross_entropy_with_logits(objectness[sampled], torch.cat(labels)[sampled])
    return cls_loss, box_loss


def sample_proposals(proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor], *,
                     fg_iou_thresh: float, batch_size_per_image: int, positive_fraction: float
                     ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """``select_training_samples``: add the ground truth to the proposals, match at ``fg_iou_thresh``
    (below is background), sample. Returns per image the sampled boxes, their labels (0 = background) and
    the index of the matched ground truth (meaningful where the label is positive)."""
    matcher = Matcher(fg_iou_thresh, fg_iou_thresh, allow_low_quality_matches=False)
    sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
    boxes_out, labels_out, matched_out = [], [], []
    all_boxes, all_labels, all_matched = [], [], []
    for props, gt, gl in zip(proposals, gt_boxes, gt_labels):
        props = torch.cat([props, gt])
        matched = matcher(box_iou(gt, props)) if len(gt) else torch.full((len(props),), -1, device=props.device)
        labels = torch.where(matched >= 0, gl[matched.clamp(min=0)] if len(gt) else matched, 0)
        all_boxes.append(props)
        all_labels.append(labels)
        all_matched.append(matched.clamp(min=0))
    pos, neg = sampler(all_labels)
    for props, labels, matched, p, n in zip(all_boxes, all_labels, all_matched, pos, neg):
        keep = (p | n).bool().nonzero().squeeze(1)
        boxes_out.append(props[keep])
        labels_out.append(labels[keep])
        matched_out.append(matched[keep])
    return boxes_out, labels_out, matched_out


def fastrcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor
                  ) -> tuple[Tensor, Tensor]:
    """``(loss_classifier, loss_box_reg)``: cross-entropy over classes and smooth-L1 (beta 1) on the
    positive samples' class-specific deltas ``[R, 4C]``, summed and divided by the number of samples."""
    cls_loss = F.cross_entropy(class_logits, labels)
    pos = (labels > 0).nonzero().squeeze(1)
    deltas = box_regression.view(len(labels), -1, 4)[pos, labels[pos]]
    box_loss = F.smooth_l1_loss(deltas, regression_targets[pos], beta=1.0, reduction="sum") / max(len(labels), 1)
    return cls_loss, box_loss


def attribute_soft_targets(attributes: Tensor, num_attributes: int) -> Tensor:
    """VinVL's soft targets: ``1/k`` on each of a box's ``k`` ground-truth attributes (index 0 = padding,
    ignored). ``attributes`` is ``[R, m]``; the result ``[R, num_attributes]``; rows with none are all 0."""
    one_hot = F.one_hot(attributes, num_attributes).float().sum(dim=1)
    one_hot[:, 0] = 0
    return one_hot / one_hot.sum(dim=1, keepdim=True).clamp(min=1)


def attribute_loss(attr_logits: Tensor, attributes: Tensor) -> Tensor:
    """Soft-target softmax cross-entropy ``-sum_a t_a log softmax(z)_a`` averaged over boxes that have at
    least one attribute (VinVL: positive proposals only, ground-truth class embedding)."""
    targets = attribute_soft_targets(attributes, attr_logits.shape[1])
    has_any = targets.sum(dim=1) > 0
    if not has_any.any():
        return attr_logits.sum() * 0
    log_probs = attr_logits[has_any].float().log_softmax(dim=1)
    return -(targets[has_any] * log_probs).sum(dim=1).mean()
