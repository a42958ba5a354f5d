"""Detector training through the model's own training forward: ``model(images, sizes, targets)`` returns
VinVL's loss dict, the same values the losses give when composed from the model's parts."""

from __future__ import annotations

import io
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from softclip.extract.detector.config import DetectorConfig
from softclip.extract.detector.legacy import encode_boxes
from softclip.extract.detector.losses import attribute_loss, fastrcnn_loss, rpn_loss, sample_proposals
from softclip.extract.detector.postprocess import rpn_proposals
from softclip.extract.detector.training import (
    calibrate_frozen_bn,
    collate,
    load_annotated_tars,
    shapes_vocabulary,
)
from softclip.extract.detector.vinvl import BOX_REG_WEIGHTS, VinVLDetector
from softclip.pipeline.config import load_config
from softclip.pipeline.shapes import ShapesConfig, generate

SHAPES_YAML = Path(__file__).parent.parent / "extract" / "configs" / "shapes.yaml"
LOSS_NAMES = ["loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_attribute"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list:
    data = tmp_path_factory.mktemp("shapes")
    generate(data, ShapesConfig(num_train=12, num_retrieval=0, num_classification_per_class=0, samples_per_shard=6,
                                seed=5), progress=False)
    return load_annotated_tars(data, *shapes_vocabulary())


def _model(seed: int = 0) -> VinVLDetector:
    cfg = load_config(DetectorConfig, SHAPES_YAML)
    torch.manual_seed(seed)
    return VinVLDetector(replace(cfg, train=replace(cfg.train, batch_size=3)), class_names=shapes_vocabulary()[0],
                         attribute_names=shapes_vocabulary()[1]).train()


def _losses_from_parts(model: VinVLDetector, images, sizes, targets) -> dict[str, torch.Tensor]:
    """The reference: VinVL's losses composed from the model's parts (how the trainer computed them before
    the model had a training forward)."""
    t = model.config.train
    gt_boxes = [x["boxes"] for x in targets]
    features = model.backbone.body(images, sizes)
    objectness, deltas, anchors = model.rpn(features, sizes)
    loss_objectness, loss_rpn_box_reg = rpn_loss(
        objectness, deltas, anchors, gt_boxes, fg_iou_thresh=t.rpn_fg_iou_thresh, bg_iou_thresh=t.rpn_bg_iou_thresh,
        batch_size_per_image=t.rpn_batch_size_per_image, positive_fraction=t.rpn_positive_fraction)
    with torch.no_grad():
        proposals = rpn_proposals([o.detach() for o in objectness], [d.detach() for d in deltas], anchors, sizes,
                                  pre_nms_top_n=t.rpn_pre_nms_top_n, post_nms_top_n=t.rpn_post_nms_top_n,
                                  nms_thresh=model.settings.rpn_nms_thresh)
    boxes, labels, matched = sample_proposals(
        proposals, gt_boxes, [x["labels"] for x in targets], fg_iou_thresh=t.roi_fg_iou_thresh,
        batch_size_per_image=t.roi_batch_size_per_image, positive_fraction=t.roi_positive_fraction)
    box_features = model.roi_heads.box.feature_extractor(features, boxes, sizes)
    predictor = model.roi_heads.box.predictor
    regression_targets = torch.cat([encode_boxes(g[m], b, BOX_REG_WEIGHTS) if len(g) else torch.zeros_like(b)
                                    for g, m, b in zip(gt_boxes, matched, boxes)])
    labels_all = torch.cat(labels)
    loss_classifier, loss_box_reg = fastrcnn_loss(predictor.cls_score(box_features), predictor.bbox_pred(box_features),
                                                  labels_all, regression_targets)
    attributes = torch.cat([x["attributes"][m] if len(x["labels"]) else torch.zeros(len(m), 2, dtype=torch.long)
                            for x, m in zip(targets, matched)])
    pos = labels_all > 0
    attr_logits = model.attribute.predictor(box_features[pos], labels_all[pos])
    return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg,
            "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg,
            "loss_attribute": t.attribute_loss_weight * attribute_loss(attr_logits, attributes[pos])}


def test_training_forward_gives_the_losses_of_the_parts_over_training_steps(samples) -> None:
    """Four AdamW steps as the trainer takes them (calibrated norms, mirrored images, an image without
    objects): at every step the training forward's losses equal the reference's, to 1e-6."""
    model = _model()
    rng = np.random.default_rng(0)
    images, sizes, targets = collate(model, samples[:4], np.zeros(4, bool))
    calibrate_frozen_bn(model, images, sizes, [x["boxes"] for x in targets])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(4):
        batch = collate(model, [samples[i] for i in rng.integers(0, len(samples), 3)], rng.random(3) < 0.5)
        if step == 2:  # an image without objects: background-only sampling, zero regression targets
            batch[2][0] = {k: v[:0] for k, v in batch[2][0].items()}
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(100 + step)
            expected = _losses_from_parts(model, *batch)
        torch.manual_seed(100 + step)
        losses = model(*batch)
        assert list(losses) == LOSS_NAMES
        for name in LOSS_NAMES:
            torch.testing.assert_close(losses[name], expected[name], atol=1e-6, rtol=0, msg=f"step {step} {name}")
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()


def test_the_training_forward_trains_every_part_but_the_frozen_norms(samples) -> None:
    model = _model(seed=1)
    losses = model(*collate(model, samples[:2], np.array([False, True])))
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_grad == []
    assert not any(b.requires_grad for b in model.buffers())  # FrozenBatchNorm2d: statistics are buffers


def test_without_targets_the_forward_detects(samples) -> None:
    model = _model().eval()
    images, sizes, _ = collate(model, samples[:2], np.zeros(2, bool))
    with torch.no_grad():
        out = model(images, sizes)
    assert len(out) == 2 and {"boxes", "labels", "scores", "features", "attr_labels", "attr_scores"} <= set(out[0])


def _copy_world(src: Path, dst: Path) -> Path:
    (dst / "train").mkdir(parents=True)
    for tar in (src / "train").glob("*.tar"):
        (dst / "train" / tar.name).write_bytes(tar.read_bytes())
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("world")
    generate(data, ShapesConfig(num_train=6, num_retrieval=0, num_classification_per_class=0, samples_per_shard=3,
                                seed=6), progress=False)
    return data


def test_a_truncated_training_shard_is_a_value_error_naming_it(world, tmp_path) -> None:
    data = _copy_world(world, tmp_path)
    shard = sorted((data / "train").glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:2000])  # inside the first sample's image
    with pytest.raises(ValueError, match=shard.name):
        load_annotated_tars(data, *shapes_vocabulary())


def test_a_duplicate_key_in_a_training_shard_is_a_value_error(world, tmp_path) -> None:
    data = _copy_world(world, tmp_path)
    shard = sorted((data / "train").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(shard, "w") as tar:
        for member, payload in members + members[:2]:  # the first sample's members again at the end
            tar.addfile(member, io.BytesIO(payload))
    with pytest.raises(ValueError, match="duplicate_key"):
        load_annotated_tars(data, *shapes_vocabulary())


def test_every_annotated_sample_is_read(world) -> None:
    samples = load_annotated_tars(world, *shapes_vocabulary())
    assert len(samples) == 6 and all(s.image.mode == "RGB" and len(s.boxes) == len(s.labels) >= 1 for s in samples)
