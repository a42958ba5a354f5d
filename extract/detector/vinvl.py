"""VinVL-compatible object-attribute detector (scene_graph_benchmark ``AttrRCNN``) from torchvision parts.

Example::

    detector = VinVLDetector.from_checkpoint("vinvl_vg_x152c4.pth", "VG-SGG-dicts-vgoi6-clipped.json",
                                             device="cuda", precision="bf16")
    for result in detector.detect([image_a, image_b]):   # PIL RGB images of any sizes
        print(result["tags"], result["features"].shape)  # "red car, wooden table, ..." (n, 2048)

The pipeline per batch: legacy resize and BGR-255 normalisation, zero padding, ResNeXt C4 body, RPN
(cell anchors, +1 decode, NMS 0.7, 300 proposals), ROIAlign + res5 box head (2048-d ``box_features`` of
each proposal), ``NMS_FILTER`` post-processing, and the attribute head on the final boxes.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from softclip.extract.detector.checkpoint import (
    ALIAS_PREFIX,
    BOX_EXTRACTOR_PREFIX,
    CheckpointError,
    check_state_dict,
    infer_arch,
    read_labelmap_for,
    read_state_dict,
)
from softclip.extract.detector.config import DetectorConfig, DetectorSettings
from softclip.extract.detector.legacy import (
    clip_boxes_legacy,
    decode_boxes,
    encode_boxes,
    image_to_tensor,
    resize_image,
)
from softclip.extract.detector.losses import attribute_loss, fastrcnn_loss, rpn_loss, sample_proposals
from softclip.extract.detector.modules import (
    AttributeHead,
    AttributePredictor,
    RegionProposalNetwork,
    ResNetC4Body,
    RoIBoxHead,
    _RoIHeads,
)
from softclip.extract.detector.postprocess import filter_detections, postprocess_attributes, rpn_proposals
from softclip.pipeline.config import config_hash, load_config
from softclip.pipeline.precision import autocast
from softclip.pipeline.shards import box_geometry

__all__ = ["BOX_REG_WEIGHTS", "DETECTOR_CONFIG_NAME", "CheckpointError", "DetectorSettingsWarning",
           "VinVLDetector", "format_tags", "resolve_detector_config"]

BOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


class _Backbone(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body


DETECTOR_CONFIG_NAME = "detector.yaml"  # written beside model.pth by `softclip detector train`


class DetectorSettingsWarning(UserWarning):
    """A detector config's test settings contradict the ``detector.yaml`` shipped beside the weights."""


def resolve_detector_config(weights: str | Path, config: DetectorConfig | str | Path | None
                            ) -> DetectorConfig | None:
    """The config to load ``weights`` with: ``config`` if given, else the ``detector.yaml`` beside them.

    A given config whose test settings differ from that file is used, with a
    :class:`DetectorSettingsWarning` listing each differing setting (``name: given vs shipped``).
    """
    beside = Path(weights).parent / DETECTOR_CONFIG_NAME
    shipped = load_config(DetectorConfig, beside) if beside.is_file() else None
    if config is None:
        return shipped
    if isinstance(config, (str, Path)):
        config = load_config(DetectorConfig, config)
    if shipped is not None:
        differ = [f"{f.name}: {getattr(config.test, f.name)!r} vs {getattr(shipped.test, f.name)!r}"
                  for f in fields(DetectorSettings) if getattr(config.test, f.name) != getattr(shipped.test, f.name)]
        if differ:
            warnings.warn(DetectorSettingsWarning(
                f"{weights}: the given detector config's test settings differ from {beside} (the settings the "
                f"weights were shipped with): {'; '.join(differ)}. Drop --config to use {beside}."), stacklevel=3)
    return config


def format_tags(class_names: list[str], attr_names: list[list[str]]) -> str:
    """Tags of one image: per box (in the given order, i.e. descending class score) its attribute names
    (descending attribute score) then its class name, space-separated; boxes joined by ``", "``.

    Example: ``format_tags(["circle", "star"], [["red"], ["large", "blue"]]) == "red circle, large blue star"``.
    """
    return ", ".join(" ".join([*attrs, name]) for name, attrs in zip(class_names, attr_names))


class VinVLDetector(nn.Module):
    """Backbone, RPN, box head and attribute head with VinVL's module names, so ``state_dict()`` has
    exactly the 841 keys of ``vinvl_vg_x152c4.pth`` (without ``module.``) for the X152 architecture.

    Args:
        config: architecture, test-time settings and a ``name`` for :attr:`detector_id`.
        class_names: ``num_classes`` names, index 0 background. attribute_names: likewise, 0 = none.
        body, rpn, box_head, attribute_predictor: parts to inject instead of the defaults built from
            ``config.arch``.
    """

    def __init__(self, config: DetectorConfig, *, class_names: list[str], attribute_names: list[str],
                 body: nn.Module | None = None, rpn: RegionProposalNetwork | None = None,
                 box_head: RoIBoxHead | None = None, attribute_predictor: AttributePredictor | None = None):
        super().__init__()
        arch = config.arch
        if len(class_names) != arch.num_classes or len(attribute_names) != arch.num_attributes:
            raise ValueError(
                f"{len(class_names)} class names / {len(attribute_names)} attribute names do not match "
                f"num_classes={arch.num_classes} / num_attributes={arch.num_attributes} (index 0 included)"
            )
        self.config = config
        self.class_names = list(class_names)
        self.attribute_names = list(attribute_names)
        self.backbone = _Backbone(body or ResNetC4Body(arch))
        self.rpn = rpn or RegionProposalNetwork(arch)
        box = box_head or RoIBoxHead(arch)
        self.roi_heads = _RoIHeads(box)
        self.attribute = AttributeHead(box.feature_extractor, attribute_predictor or AttributePredictor(arch))
        self._weights_hash: str | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, weights: str | Path, labelmap: str | Path, *,
                        config: DetectorConfig | str | Path | None = None, device: str | torch.device = "cpu",
                        **overrides: object) -> VinVLDetector:
        """Load a VinVL checkpoint strictly; the architecture is read from the tensor shapes.

        Args:
            weights: flat state dict (``module.`` prefix optional, ``{"model": ...}`` accepted), read with
                ``torch.load(..., weights_only=True)``.
            labelmap: VinVL label map JSON (1-based ``label_to_idx`` / ``attribute_to_idx``).
            config: optional :class:`DetectorConfig` (or its YAML) for the name, the test settings and
                ``arch.pooler_resolution``; the rest of its ``arch`` must equal the checkpoint's. Without
                one, the ``detector.yaml`` beside the weights is used (the settings travel with them), else
                VinVL's test settings (pooler 14). A given config whose test settings differ from that
                ``detector.yaml`` loads with a :class:`DetectorSettingsWarning` naming the differences.
            device: where the model runs.
            **overrides: test-time settings (:class:`DetectorSettings` fields), e.g. ``score_thresh=0.3``.

        Raises:
            CheckpointError: missing, unexpected or mis-shaped keys (all listed), a differing attribute
                alias, a label map of the wrong size, or an arch that differs from ``config.arch``.
            ConfigError: an unknown or mistyped override.
        """
        source = str(weights)
        state = read_state_dict(weights)
        arch = infer_arch(state, source)
        config = resolve_detector_config(weights, config) or DetectorConfig(name="vinvl", arch=arch)
        arch = replace(arch, pooler_resolution=config.arch.pooler_resolution)  # not visible in the weights
        if config.arch != arch:
            raise CheckpointError(f"{source}: architecture {arch} differs from the given config's {config.arch}")
        class_names, attribute_names = read_labelmap_for(weights, labelmap)
        if (len(class_names), len(attribute_names)) != (arch.num_classes, arch.num_attributes):
            raise CheckpointError(
                f"{labelmap}: {len(class_names) - 1} classes / {len(attribute_names) - 1} attributes, but "
                f"{source} has {arch.num_classes - 1} / {arch.num_attributes - 1} (plus index 0)"
            )
        config = replace(config, test=config.test.replace(source="from_checkpoint overrides", **overrides))
        with torch.device("meta"):
            model = cls(config, class_names=class_names, attribute_names=attribute_names)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_state_dict(state, expected, source)
        for key in [k for k in state if k.startswith(ALIAS_PREFIX)]:
            state[key] = state[BOX_EXTRACTOR_PREFIX + key[len(ALIAS_PREFIX):]]
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device).eval()

    # ------------------------------------------------------------------ identity
    @property
    def settings(self) -> DetectorSettings:
        """The test-time settings in use."""
        return self.config.test

    def configure(self, **overrides: object) -> VinVLDetector:
        """Change test-time settings in place (typed, unknown names are errors); returns ``self``."""
        self.config = replace(self.config, test=self.config.test.replace(**overrides))
        return self

    @property
    def feature_dim(self) -> int:
        """Dimension of ``features`` (2048 for X152-C4)."""
        return self.config.arch.feature_dim

    @property
    def weights_hash(self) -> str:
        """SHA-256 over every state-dict entry's name, dtype, shape and bytes (computed once, cached)."""
        if self._weights_hash is None:
            digest = hashlib.sha256()
            for name, tensor in self.state_dict().items():
                t = tensor.detach().cpu().contiguous()
                digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._weights_hash = digest.hexdigest()
        return self._weights_hash

    @property
    def detector_id(self) -> str:
        """``<name>-w<12 hex of weights_hash>-s<8 hex of the test settings' config_hash>``."""
        return f"{self.config.name}-w{self.weights_hash[:12]}-s{config_hash(self.settings)[:8]}"

    # ------------------------------------------------------------------ stages
    def preprocess(self, images: list[Image.Image]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Legacy resize + normalisation, zero-padded bottom/right: ``(Tensor[N, 3, H, W], [(h, w)])``."""
        s = self.settings
        # RGB first, as VinVL's PIL loader does: resizing a palette or RGBA image in its own mode differs
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        tensors = [image_to_tensor(resize_image(im, s.min_size, s.max_size), s.pixel_mean) for im in rgb]
        sizes = [(t.shape[1], t.shape[2]) for t in tensors]
        batch = torch.zeros(len(tensors), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
        for i, t in enumerate(tensors):
            batch[i, :, : t.shape[1], : t.shape[2]] = t
        return batch, sizes

    def propose(self, features: Tensor, image_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """RPN proposals ``Tensor[P_i, 4]`` per image (resized-image pixels)."""
        s = self.settings
        objectness, deltas, anchors = self.rpn(features, image_sizes)
        return rpn_proposals(objectness, deltas, anchors, image_sizes, pre_nms_top_n=s.pre_nms_top_n,
                             post_nms_top_n=s.post_nms_top_n, nms_thresh=s.rpn_nms_thresh)

    def box_head(self, features: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]]
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``box_features`` ``[R, D]`` float32, class probabilities ``[R, C]`` and, unless
        ``ignore_box_regression``, clipped class-specific boxes ``[R, C, 4]`` (else None)."""
        box = self.roi_heads.box
        box_features = box.feature_extractor(features, proposals, image_sizes).float()
        scores = box.predictor.cls_score(box_features).softmax(dim=1)
        if self.settings.ignore_box_regression:
            return box_features, scores, None
        deltas = box.predictor.bbox_pred(box_features)
        regressed = [
            clip_boxes_legacy(decode_boxes(d, p, BOX_REG_WEIGHTS), h, w)
            for d, p, (h, w) in zip(deltas.split([len(p) for p in proposals]), proposals, image_sizes)
        ]
        return box_features, scores, torch.cat(regressed).view(len(box_features), -1, 4)

    def postprocess_detections(self, proposals: list[Tensor], scores: Tensor, boxes: Tensor | None
                               ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per image ``(row, box, label, score)``: ``row`` indexes the batch's proposals (and features)."""
        s, out, start = self.settings, [], 0
        for p in proposals:
            rows = slice(start, start + len(p))
            candidates = p if boxes is None else boxes[rows]
            idx, labels, best = filter_detections(
                candidates, scores[rows], nms_filter=s.nms_filter, score_thresh=s.score_thresh,
                filter1_nms_thresh=s.filter1_nms_thresh, nms_thresh=s.nms_thresh,
                min_detections=s.min_detections_per_img, max_detections=s.detections_per_img)
            det_boxes = p[idx] if boxes is None else boxes[rows][idx, labels]
            out.append((idx + start, det_boxes, labels, best))
            start += len(p)
        return out

    def attribute_head(self, features: Tensor, detections: list[tuple[Tensor, Tensor, Tensor, Tensor]],
                       box_features: Tensor, image_sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Attribute labels and scores ``[K, max_attr_per_obj]`` for all images' detections, in order.

        The res5 head is re-run on the final boxes; with ``ignore_box_regression`` those are proposals
        whose pooled features were already computed, so they are reused (identical values).
        """
        rows = torch.cat([d[0] for d in detections])
        labels = torch.cat([d[2] for d in detections])
        if self.settings.ignore_box_regression:
            feats = box_features[rows]
        else:
            feats = self.attribute.feature_extractor(features, [d[1] for d in detections], image_sizes).float()
        logits = self.attribute.predictor(feats, labels)
        return postprocess_attributes(logits, threshold=self.settings.attr_thresh,
                                      top_k=self.settings.max_attr_per_obj)

    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        """Detections per image (boxes in the resized image): ``boxes [K, 4]``, ``labels``, ``scores``,
        ``features [K, D]`` (of the proposal each detection came from), ``attr_labels``, ``attr_scores``.

        Given ``targets`` (training, as torchvision's detectors), the loss dict of :meth:`losses` instead.
        """
        features = self.backbone.body(images, image_sizes)
        if targets is not None:
            return self.losses(features, image_sizes, targets)
        proposals = self.propose(features, image_sizes)
        box_features, scores, boxes = self.box_head(features, proposals, image_sizes)
        detections = self.postprocess_detections(proposals, scores, boxes)
        attr_labels, attr_scores = self.attribute_head(features, detections, box_features, image_sizes)
        counts = [len(d[0]) for d in detections]
        return [
            {"boxes": d[1].float(), "labels": d[2], "scores": d[3].float(), "features": box_features[d[0]],
             "attr_labels": al, "attr_scores": sc}
            for d, al, sc in zip(detections, attr_labels.split(counts), attr_scores.split(counts))
        ]

    def losses(self, features: Tensor, image_sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]]
               ) -> dict[str, Tensor]:
        """VinVL's training losses on the body's ``features``: ``loss_objectness``, ``loss_rpn_box_reg`` (RPN),
        ``loss_classifier``, ``loss_box_reg`` (Fast R-CNN on sampled proposals) and ``loss_attribute``
        (positives, ground-truth class embedding; weighted by ``train.attribute_loss_weight``). ``targets``
        per image: ``boxes [G, 4]`` (resized pixels), ``labels [G]``, ``attributes [G, k]`` (0-padded)."""
        t, box = self.config.train, self.roi_heads.box
        gt_boxes = [x["boxes"] for x in targets]
        objectness, deltas, anchors = self.rpn(features, image_sizes)
        loss_objectness, loss_rpn_box_reg = rpn_loss(
            objectness, deltas, anchors, gt_boxes, fg_iou_thresh=t.rpn_fg_iou_thresh, bg_iou_thresh=t.rpn_bg_iou_thresh,
            batch_size_per_image=t.rpn_batch_size_per_image, positive_fraction=t.rpn_positive_fraction)
        with torch.no_grad():
            proposals = rpn_proposals([o.detach() for o in objectness], [d.detach() for d in deltas], anchors,
                                      image_sizes, pre_nms_top_n=t.rpn_pre_nms_top_n,
                                      post_nms_top_n=t.rpn_post_nms_top_n, nms_thresh=self.settings.rpn_nms_thresh)
        boxes, labels, matched = sample_proposals(
            proposals, gt_boxes, [x["labels"] for x in targets], fg_iou_thresh=t.roi_fg_iou_thresh,
            batch_size_per_image=t.roi_batch_size_per_image, positive_fraction=t.roi_positive_fraction)
        box_features = box.feature_extractor(features, boxes, image_sizes)
        regression_targets = torch.cat([encode_boxes(g[m], b, BOX_REG_WEIGHTS) if len(g) else torch.zeros_like(b)
                                        for g, m, b in zip(gt_boxes, matched, boxes)])
        labels_all = torch.cat(labels)
        loss_classifier, loss_box_reg = fastrcnn_loss(box.predictor.cls_score(box_features),
                                                      box.predictor.bbox_pred(box_features), labels_all,
                                                      regression_targets)
        attributes = torch.cat([x["attributes"][m] if len(x["labels"]) else x["attributes"].new_zeros(
            len(m), x["attributes"].shape[1]) for x, m in zip(targets, matched)])
        pos = labels_all > 0
        attr_logits = self.attribute.predictor(box_features[pos], labels_all[pos])
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg,
                "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg,
                "loss_attribute": t.attribute_loss_weight * attribute_loss(attr_logits, attributes[pos])}

    # ------------------------------------------------------------------ public entry point
    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        return autocast(device, self.settings.precision)

    @torch.inference_mode()
    def detect(self, images: list[Image.Image]) -> list[dict]:
        """Detect objects and attributes on RGB images of any sizes, in one forward pass.

        Returns one dict per image with numpy arrays: ``boxes`` ``[n, 4]`` float32 ``(x1, y1, x2, y2)``
        in original pixels; ``geometry`` ``[n, 6]`` (:func:`pipeline.shards.box_geometry`); ``features``
        ``[n, feature_dim]`` float32; ``labels`` ``[n]`` int64; ``scores`` ``[n]`` float32 (descending);
        ``class_names`` (list of str); ``attr_labels`` ``[n, max_attr_per_obj]`` int64 and ``attr_scores``
        float32 (0 = none); ``attr_names`` (per box, the names of its nonzero attributes, descending);
        ``tags`` (:func:`format_tags`).
        """
        if not images:
            return []
        device = next(self.parameters()).device
        batch, sizes = self.preprocess(images)
        batch = batch.to(device)
        if self.settings.channels_last:
            self.to(memory_format=torch.channels_last)
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._autocast(device):
            outputs = self(batch, sizes)
        return [self._to_numpy(o, im, size) for o, im, size in zip(outputs, images, sizes)]

    def _to_numpy(self, out: dict[str, Tensor], image: Image.Image, size: tuple[int, int]) -> dict:
        width, height = image.size
        scale = torch.tensor([width / size[1], height / size[0]] * 2, device=out["boxes"].device)
        boxes = (out["boxes"] * scale).cpu().numpy().astype(np.float32)
        labels = out["labels"].cpu().numpy().astype(np.int64)
        attr_labels = out["attr_labels"].cpu().numpy().astype(np.int64)
        attr_scores = out["attr_scores"].cpu().numpy().astype(np.float32)
        class_names = [self.class_names[i] for i in labels]
        attr_names = [[self.attribute_names[a] for a, sc in zip(al, sa) if sc > 0]
                      for al, sa in zip(attr_labels, attr_scores)]
        return {
            "boxes": boxes,
            "geometry": box_geometry(boxes, width, height),
            "features": out["features"].cpu().numpy().astype(np.float32),
            "labels": labels,
            "scores": out["scores"].cpu().numpy().astype(np.float32),
            "class_names": class_names,
            "attr_labels": attr_labels,
            "attr_scores": attr_scores,
            "attr_names": attr_names,
            "tags": format_tags(class_names, attr_names),
        }
