"""The detector's parts, named so their ``state_dict`` keys are exactly VinVL's (after ``module.``).

- :class:`ResNetC4Body` (``backbone.body``): torchvision ``Bottleneck`` stages 1-3 on a 7x7 stem, stride 16.
- :class:`RegionProposalNetwork` (``rpn``): legacy cell anchors and a single-conv head on the C4 map.
- :class:`RoIBoxHead` (``roi_heads.box``): ROIAlign 14x14 (adaptive sampling, ``aligned=False``), the res5
  stage, average pooling to the box feature, class scores and class-specific regression.
- :class:`AttributeHead` (``attribute``): shares the box head's feature extractor; class embedding of the
  label concatenated with the box feature, then ``fc_attr`` and ``attr_score``.

Batches of differently sized images are zero-padded bottom/right. So that a batched run equals running
each image alone, every spatial operation sees zeros outside each image's valid region (``valid_masks``)
and ROIAlign reads each image's own crop of the feature map.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FrozenBatchNorm2d, roi_align

from softclip.extract.detector.config import DetectorArch
from softclip.extract.detector.legacy import generate_cell_anchors

__all__ = [
    "AttributeHead",
    "AttributePredictor",
    "BoxPredictor",
    "CellAnchorGenerator",
    "RPNHead",
    "RegionProposalNetwork",
    "ResNetC4Body",
    "RoIBoxHead",
    "RoIFeatureExtractor",
    "feature_size",
    "frozen_bn",
    "make_stage",
    "valid_masks",
]

frozen_bn = partial(FrozenBatchNorm2d, eps=0.0)
"""maskrcnn_benchmark's ``FrozenBatchNorm2d``: ``scale = weight * running_var.rsqrt()`` with no eps."""


def feature_size(size: int, stride: int) -> int:
    """Valid extent of a map at ``stride`` (a power of 2) for an image side ``size``: ceil halvings."""
    for _ in range(int(math.log2(stride))):
        size = (size + 1) // 2
    return size


def valid_masks(image_sizes: list[tuple[int, int]], height: int, width: int, stride: int,
                device: torch.device) -> Tensor | None:
    """``Tensor[N, 1, height, width]`` with 1 inside each image's valid region at ``stride``, or None if all full."""
    extents = [(feature_size(h, stride), feature_size(w, stride)) for h, w in image_sizes]
    if all(e == (height, width) for e in extents):
        return None
    mask = torch.zeros(len(image_sizes), 1, height, width, device=device)
    for i, (h, w) in enumerate(extents):
        mask[i, :, :h, :w] = 1
    return mask


def make_stage(inplanes: int, planes: int, blocks: int, stride: int, arch: DetectorArch) -> nn.Sequential:
    """A ResNeXt stage of torchvision ``Bottleneck`` blocks with FrozenBN (eps 0); stride on the 3x3."""
    downsample = None
    if stride != 1 or inplanes != planes * Bottleneck.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
            frozen_bn(planes * Bottleneck.expansion),
        )
    layers = [Bottleneck(inplanes, planes, stride, downsample, arch.groups, arch.width_per_group, 1, frozen_bn)]
    layers += [
        Bottleneck(planes * Bottleneck.expansion, planes, 1, None, arch.groups, arch.width_per_group, 1, frozen_bn)
        for _ in range(blocks - 1)
    ]
    return nn.Sequential(*layers)


def _bottleneck_masked(block: Bottleneck, x: Tensor, mask: Tensor) -> Tensor:
    """``Bottleneck.forward`` with the 3x3 conv's input zeroed outside the valid region."""
    out = block.relu(block.bn1(block.conv1(x))) * mask
    out = block.relu(block.bn2(block.conv2(out)))
    out = block.bn3(block.conv3(out))
    identity = x if block.downsample is None else block.downsample(x)
    return block.relu(out + identity)


def run_stage(stage: nn.Sequential, x: Tensor, image_sizes: list[tuple[int, int]], stride: int) -> Tensor:
    """Run a stage whose input is at ``stride``, masking padding when the batch mixes image sizes."""
    for block in stage:
        mask = valid_masks(image_sizes, x.shape[-2], x.shape[-1], stride, x.device)
        x = block(x) if mask is None else _bottleneck_masked(block, x, mask.to(x.dtype))
        stride *= block.conv2.stride[0]
    return x


class _Stem(nn.Module):
    def __init__(self, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, out_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = frozen_bn(out_channels)


class ResNetC4Body(nn.Module):
    """Stem + stages 1-3: ``Tensor[N, 3, H, W]`` -> C4 ``Tensor[N, 4*res2_channels, ~H/16, ~W/16]``."""

    def __init__(self, arch: DetectorArch):
        super().__init__()
        self.stem = _Stem(arch.stem_channels)
        planes = arch.res2_channels // 4
        self.layer1 = make_stage(arch.stem_channels, planes, arch.blocks[0], 1, arch)
        self.layer2 = make_stage(planes * 4, planes * 2, arch.blocks[1], 2, arch)
        self.layer3 = make_stage(planes * 8, planes * 4, arch.blocks[2], 2, arch)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)

    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> Tensor:
        """``image_sizes`` are each image's ``(h, w)`` inside the zero-padded batch."""
        x = torch.relu(self.stem.bn1(self.stem.conv1(images)))
        mask = valid_masks(image_sizes, x.shape[-2], x.shape[-1], 2, x.device)
        if mask is not None:
            x = x * mask.to(x.dtype)  # after ReLU, 0 acts as the pool's -inf padding
        x = nn.functional.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        x = run_stage(self.layer1, x, image_sizes, 4)
        x = run_stage(self.layer2, x, image_sizes, 4)
        return run_stage(self.layer3, x, image_sizes, 8)


class _BufferList(nn.Module):
    def __init__(self, buffers: list[Tensor]):
        super().__init__()
        for i, buffer in enumerate(buffers):
            self.register_buffer(str(i), buffer)


class CellAnchorGenerator(nn.Module):
    """Legacy anchors: buffer ``cell_anchors.0`` ``[A, 4]`` shifted by ``stride`` over the grid, (H, W, A) order."""

    def __init__(self, arch: DetectorArch):
        super().__init__()
        self.stride = arch.anchor_stride
        self.cell_anchors = _BufferList(
            [generate_cell_anchors(arch.anchor_stride, arch.anchor_sizes, arch.aspect_ratios)]
        )

    def grid_anchors(self, height: int, width: int) -> Tensor:
        """``Tensor[height*width*A, 4]`` anchors of a ``height x width`` feature map."""
        cell = self.cell_anchors.get_buffer("0")
        ys = torch.arange(0, height * self.stride, self.stride, dtype=torch.float32, device=cell.device)
        xs = torch.arange(0, width * self.stride, self.stride, dtype=torch.float32, device=cell.device)
        shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
        return (shifts + cell.float()[None]).reshape(-1, 4)


class RPNHead(nn.Module):
    """3x3 conv (with bias) + ReLU, then 1x1 ``cls_logits`` (A) and ``bbox_pred`` (4A)."""

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Objectness logits ``[N, A, H, W]`` and deltas ``[N, 4A, H, W]``; ``mask`` zeroes padding first."""
        if mask is not None:
            features = features * mask.to(features.dtype)
        t = torch.relu(self.conv(features))
        return self.cls_logits(t), self.bbox_pred(t)


class RegionProposalNetwork(nn.Module):
    """Single-level RPN on C4: anchor generator + head; proposals are made in
    :mod:`softclip.extract.detector.postprocess`."""

    def __init__(self, arch: DetectorArch, *, anchor_generator: CellAnchorGenerator | None = None,
                 head: RPNHead | None = None):
        super().__init__()
        self.anchor_generator = anchor_generator or CellAnchorGenerator(arch)
        self.head = head or RPNHead(arch.backbone_channels, arch.num_anchors)

    def forward(self, features: Tensor, image_sizes: list[tuple[int, int]]
                ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per image: objectness logits ``[h*w*A]``, deltas ``[h*w*A, 4]`` and anchors ``[h*w*A, 4]``.

        ``h, w`` is the image's own valid extent of the feature map (padding cells are not anchors).
        """
        stride = self.anchor_generator.stride
        mask = valid_masks(image_sizes, features.shape[-2], features.shape[-1], stride, features.device)
        logits, deltas = self.head(features, mask)
        n, a, height, width = logits.shape
        deltas = deltas.view(n, a, 4, height, width)
        objectness_per_image, deltas_per_image, anchors_per_image = [], [], []
        for i, (h_img, w_img) in enumerate(image_sizes):
            h, w = feature_size(h_img, stride), feature_size(w_img, stride)
            objectness_per_image.append(logits[i, :, :h, :w].permute(1, 2, 0).reshape(-1))
            deltas_per_image.append(deltas[i, :, :, :h, :w].permute(2, 3, 0, 1).reshape(-1, 4))
            anchors_per_image.append(self.anchor_generator.grid_anchors(h, w))
        return objectness_per_image, deltas_per_image, anchors_per_image


class _Res5(nn.Module):
    def __init__(self, arch: DetectorArch):
        super().__init__()
        planes = arch.res2_channels // 4
        self.layer4 = make_stage(planes * 16, planes * 8, arch.blocks[3], 2, arch)


class RoIFeatureExtractor(nn.Module):
    """ROIAlign 14x14 at 1/16 (sampling_ratio 0, aligned=False) then res5 (``head.layer4``), stride 2."""

    def __init__(self, arch: DetectorArch):
        super().__init__()
        self.head = _Res5(arch)
        self.resolution = arch.pooler_resolution
        self.spatial_scale = 1.0 / arch.anchor_stride
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)

    def pool(self, features: Tensor, boxes_per_image: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        """ROIAlign of each image's boxes on its own valid crop of ``features``: ``[R, C, 14, 14]``."""
        stride = round(1 / self.spatial_scale)
        crops = [(feature_size(h, stride), feature_size(w, stride)) for h, w in image_sizes]
        if all(c == tuple(features.shape[-2:]) for c in crops):
            rois = torch.cat(
                [torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes_per_image)]
            )
            return self._align(features, rois)
        pooled = []
        for i, (boxes, (h, w)) in enumerate(zip(boxes_per_image, crops)):
            crop = features[i : i + 1, :, :h, :w].contiguous()
            pooled.append(self._align(crop, torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1)))
        return torch.cat(pooled)

    def _align(self, features: Tensor, rois: Tensor) -> Tensor:
        """ROIAlign in float32 whatever the feature dtype: box coordinates in bfloat16 would move by up to
        4 px (their spacing between 512 and 1023), so they never take the feature map's dtype."""
        pooled = roi_align(features.float(), rois.float(), self.resolution, self.spatial_scale, 0, False)
        return pooled.to(features.dtype)

    def forward(self, features: Tensor, boxes_per_image: list[Tensor],
                image_sizes: list[tuple[int, int]]) -> Tensor:
        """Pooled box features ``[R, 8*res2_channels]`` (the res5 map averaged over its 7x7 cells)."""
        x = self.pool(features, boxes_per_image, image_sizes)
        return self.head.layer4(x).mean(dim=(2, 3))


class BoxPredictor(nn.Module):
    """``cls_score`` Linear(D, C) and class-specific ``bbox_pred`` Linear(D, 4C)."""

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(feature_dim, num_classes)
        self.bbox_pred = nn.Linear(feature_dim, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)


class RoIBoxHead(nn.Module):
    """``feature_extractor`` (ROIAlign + res5 + mean pool) and ``predictor`` (scores, regression)."""

    def __init__(self, arch: DetectorArch, *, feature_extractor: RoIFeatureExtractor | None = None,
                 predictor: BoxPredictor | None = None):
        super().__init__()
        self.feature_extractor = feature_extractor or RoIFeatureExtractor(arch)
        self.predictor = predictor or BoxPredictor(arch.feature_dim, arch.num_classes)


class _RoIHeads(nn.Module):
    def __init__(self, box: RoIBoxHead):
        super().__init__()
        self.box = box


class AttributePredictor(nn.Module):
    """``cat(box_feature, cls_embedding(label))`` -> ``fc_attr`` + ReLU -> ``attr_score`` logits ``[R, A]``."""

    def __init__(self, arch: DetectorArch):
        super().__init__()
        self.cls_embedding = nn.Embedding(arch.num_classes, arch.cls_embed_dim)
        self.fc_attr = nn.Linear(arch.feature_dim + arch.cls_embed_dim, arch.attr_embed_dim)
        self.attr_score = nn.Linear(arch.attr_embed_dim, arch.num_attributes)
        nn.init.normal_(self.cls_embedding.weight, std=0.01)
        nn.init.normal_(self.fc_attr.weight, std=0.01)
        nn.init.normal_(self.attr_score.weight, std=0.01)
        nn.init.zeros_(self.fc_attr.bias)
        nn.init.zeros_(self.attr_score.bias)

    def forward(self, box_features: Tensor, labels: Tensor) -> Tensor:
        """Attribute logits for features ``[R, D]`` and class labels ``[R]``."""
        x = torch.cat([box_features, self.cls_embedding(labels).to(box_features.dtype)], dim=1)
        return self.attr_score(torch.relu(self.fc_attr(x)))


class AttributeHead(nn.Module):
    """``feature_extractor`` (the box head's, shared: one module under two names) and ``predictor``."""

    def __init__(self, feature_extractor: RoIFeatureExtractor, predictor: AttributePredictor):
        super().__init__()
        self.feature_extractor = feature_extractor
        self.predictor = predictor
