"""VinVL detector: legacy conventions, post-processing, strict checkpoint loading, batched detection."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.ops import FrozenBatchNorm2d, nms

from softclip.extract.detector.checkpoint import (
    CheckpointError,
    read_labelmap,
    read_state_dict,
    write_checkpoint,
    write_labelmap,
)
from softclip.extract.detector.config import DetectorArch, DetectorConfig, DetectorSettings
from softclip.extract.detector.legacy import (
    clip_boxes_legacy,
    decode_boxes,
    encode_boxes,
    generate_cell_anchors,
    resized_size,
)
from softclip.extract.detector.postprocess import (
    filter_detections,
    multiclass_nms_keep,
    postprocess_attributes,
    rpn_proposals,
)
from softclip.extract.detector.vinvl import VinVLDetector, format_tags
from softclip.pipeline.config import ConfigError
from softclip.pipeline.torchio import CorruptCheckpointError

KEYS_FILE = Path(__file__).parent / "fixtures" / "vinvl-checkpoint-keys.txt"
TINY_ARCH = DetectorArch(blocks=(1, 1, 1, 1), groups=2, width_per_group=16, stem_channels=8, res2_channels=32,
                         num_classes=9, num_attributes=11, cls_embed_dim=8, attr_embed_dim=16)
TINY = DetectorConfig(name="tiny", arch=TINY_ARCH,
                      test=DetectorSettings(min_size=96, max_size=160, pre_nms_top_n=300, post_nms_top_n=50))
CLASSES = ["__background__"] + [f"class{i}" for i in range(1, 9)]
ATTRIBUTES = ["__no_attribute__"] + [f"attr{i}" for i in range(1, 11)]


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial FrozenBN statistics and predictor weights so detections vary."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        for name, p in model.named_parameters():
            if "predictor" in name or "rpn.head" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = _randomise(VinVLDetector(TINY, class_names=CLASSES, attribute_names=ATTRIBUTES))
    folder = tmp_path_factory.mktemp("tiny")
    write_checkpoint(folder / "model.pth", model.state_dict())
    write_labelmap(folder / "labelmap.json", CLASSES, ATTRIBUTES)
    return folder / "model.pth", folder / "labelmap.json"


@pytest.fixture(scope="module")
def tiny(tiny_files: tuple[Path, Path]) -> VinVLDetector:
    return VinVLDetector.from_checkpoint(*tiny_files, config=TINY)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(64, 64), (50, 90), (120, 70)]]


# ---------------------------------------------------------------- legacy conventions
def test_cell_anchors_are_detectron_legacy() -> None:
    expected = [[-15, -4, 30, 19], [-38, -16, 53, 31], [-84, -40, 99, 55], [-176, -88, 191, 103],
                [-360, -184, 375, 199], [-8, -8, 23, 23], [-24, -24, 39, 39], [-56, -56, 71, 71],
                [-120, -120, 135, 135], [-248, -248, 263, 263], [-3, -14, 18, 29], [-14, -36, 29, 51],
                [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359]]
    assert generate_cell_anchors().tolist() == expected


def test_box_coder_uses_plus_one_and_round_trips() -> None:
    box = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    out = decode_boxes(torch.tensor([[0.0, 0.0, math.log(2), math.log(2)]]), box, (1.0, 1.0, 1.0, 1.0))
    assert torch.allclose(out, torch.tensor([[-5.0, -5.0, 14.0, 14.0]]))  # w 10 -> 20 about centre 5
    assert torch.equal(decode_boxes(torch.zeros(1, 4), box, (10.0, 10.0, 5.0, 5.0)), box)
    target = torch.tensor([[2.0, 3.0, 30.0, 17.0]])
    deltas = encode_boxes(target, box, (10.0, 10.0, 5.0, 5.0))
    assert torch.allclose(decode_boxes(deltas, box, (10.0, 10.0, 5.0, 5.0)), target, atol=1e-4)


def test_clip_is_to_width_minus_one() -> None:
    boxes = torch.tensor([[-3.0, -1.0, 120.0, 90.0]])
    assert clip_boxes_legacy(boxes, height=60, width=100).tolist() == [[0.0, 0.0, 99.0, 59.0]]


def test_resize_rule_matches_maskrcnn() -> None:
    assert resized_size(640, 480, 600, 1000) == (800, 600)
    assert resized_size(2000, 500, 600, 1000) == (1000, 250)  # long side capped, short = round(1000/4)
    assert resized_size(333, 1000, 600, 1000) == (333, 1000)  # short side already equals round(333)
    assert resized_size(500, 375, 600, 1000) == (800, 600)


def test_frozen_batchnorm_has_no_eps() -> None:
    with torch.device("meta"):
        model = VinVLDetector(TINY, class_names=CLASSES, attribute_names=ATTRIBUTES)
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and all(m.eps == 0.0 for m in norms)
    bn = FrozenBatchNorm2d(1, eps=0.0)
    bn.running_var.fill_(0.25)
    assert bn(torch.ones(1, 1, 1, 1)).item() == 2.0  # 1 / sqrt(0.25), exactly


# ---------------------------------------------------------------- post-processing
def _filter(boxes, scores, **kw):
    args = dict(nms_filter=1, score_thresh=0.2, filter1_nms_thresh=0.3, nms_thresh=0.5,
                min_detections=0, max_detections=100)
    return filter_detections(boxes, scores, **{**args, **kw})


def test_nms_filter1_hand_built_case() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    # columns: background, cat, dog
    scores = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.5, 0.25, 0.25]])
    idx, labels, best = _filter(boxes, scores)
    # boxes 0 and 1 overlap but win different classes: both kept; box 2's "cat" survives at 0.25
    assert idx.tolist() == [0, 1, 2] and labels.tolist() == [1, 2, 1]
    assert torch.allclose(best, torch.tensor([0.8, 0.7, 0.25]))
    same_class = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.7, 0.2], [0.5, 0.25, 0.25]])
    idx, labels, best = _filter(boxes, same_class)
    # box 1 loses "cat" to box 0 and falls back to its surviving "dog" score, 0.2 >= thresh
    assert idx.tolist() == [0, 2, 1] and labels.tolist() == [1, 1, 2]
    idx, _, _ = _filter(boxes, same_class, score_thresh=0.5)
    assert idx.tolist() == [0]
    idx, _, _ = _filter(boxes, same_class, score_thresh=0.5, min_detections=2)
    assert idx.tolist() == [0, 2]  # the minimum fills up with lower scores
    idx, _, _ = _filter(boxes, same_class, score_thresh=0.0, max_detections=1)
    assert idx.tolist() == [0]


def _loop_reference(boxes: torch.Tensor, scores: torch.Tensor, thresh: float) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for c in range(1, scores.shape[1]):
        class_boxes = boxes if boxes.dim() == 2 else boxes[:, c]
        keep[nms(class_boxes, scores[:, c], thresh), c] = True
    return (scores * keep).max(dim=1)


@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_vectorised_filter1_equals_per_class_loop(temperature: float) -> None:
    gen = torch.Generator().manual_seed(1)
    n, c = 120, 60
    xy = torch.rand(n, 2, generator=gen) * 200
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 80 + 5], dim=1)
    scores = (torch.randn(n, c, generator=gen) * temperature).softmax(dim=1)
    best, labels = _loop_reference(boxes, scores, 0.3)
    for candidate in (boxes, boxes[:, None].expand(n, c, 4) + torch.rand(n, c, 4, generator=gen) * 4):
        ref_best, ref_labels = _loop_reference(candidate, scores, 0.3)
        idx, got_labels, got_best = _filter(candidate, scores, score_thresh=0.0, max_detections=n)
        order = ref_best.argsort(descending=True)
        order = order[ref_best[order] > 0]
        assert idx.tolist() == order.tolist()
        assert got_labels.tolist() == ref_labels[order].tolist() and torch.equal(got_best, ref_best[order])
    keep = multiclass_nms_keep(boxes, scores, 0.3)
    for j in range(c):
        assert keep[:, j].nonzero().squeeze(1).tolist() == sorted(nms(boxes, scores[:, j], 0.3).tolist())
    assert torch.equal(_loop_reference(boxes, scores, 0.3)[1], labels)


def test_rpn_keeps_each_images_nms_order_when_scores_tie() -> None:
    """The original runs NMS per image and keeps its order; tied objectness must not be reordered (a batched
    NMS over 2 x 1000 proposals re-sorted them with an unstable sort on CPU)."""
    grid = torch.arange(40, dtype=torch.float32) * 10
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    anchors = torch.stack([xs.flatten(), ys.flatten(), xs.flatten() + 7, ys.flatten() + 7], 1)  # disjoint boxes
    logits = torch.zeros(len(anchors))
    logits[::7] = 1.0  # two score levels, each shared by hundreds of boxes
    proposals = rpn_proposals([logits, logits], [torch.zeros(len(anchors), 4)] * 2, [anchors] * 2, [(400, 400)] * 2,
                              pre_nms_top_n=1000, post_nms_top_n=300, nms_thresh=0.7)
    scores, top = logits.sigmoid().topk(1000)
    expected = anchors[top][nms(anchors[top], scores, 0.7)][:300]
    assert all(torch.equal(p, expected) for p in proposals)


def test_nms_filter2_is_one_class_agnostic_nms() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.5, 0.25, 0.25]])
    idx, labels, _ = _filter(boxes, scores, nms_filter=2)
    assert idx.tolist() == [0, 2] and labels.tolist() == [1, 1]


def test_attributes_threshold_and_top16() -> None:
    logits = torch.full((2, 40), -10.0)
    logits[0, 0] = 5.0  # "no attribute" is dropped, not kept
    logits[0, 3] = 4.0
    logits[1, 1:21] = 3.0  # 20 equal attributes of 1/20 each: above 0.05 -> no, exactly 0.05 is dropped
    logits[1, 1:19] = 3.1
    labels, scores = postprocess_attributes(logits, threshold=0.05, top_k=16)
    assert labels.shape == (2, 16) and scores.shape == (2, 16)
    assert labels[0, 0] == 3 and (labels[0, 1:] == 0).all() and (scores[0, 1:] == 0).all()
    assert (scores[1] > 0.05).all() and set(labels[1].tolist()) <= set(range(1, 19))
    padded_labels, padded_scores = postprocess_attributes(logits[:, :5], threshold=0.05, top_k=16)
    assert padded_labels.shape == (2, 16) and (padded_scores[:, 4:] == 0).all()


def test_format_tags() -> None:
    assert format_tags(["circle", "star"], [["red"], ["large", "blue"]]) == "red circle, large blue star"
    assert format_tags([], []) == ""


# ---------------------------------------------------------------- checkpoints
def _reference_keys() -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            keys[name] = tuple(int(x) for x in shape.strip("[]").split(",") if x.strip())
    return keys


def test_x152_state_dict_matches_all_841_vinvl_keys_and_shapes() -> None:
    with torch.device("meta"):
        model = VinVLDetector(DetectorConfig(), class_names=["c"] * 1595, attribute_names=["a"] * 525)
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(mine) == 841
    assert mine == _reference_keys()
    assert model.feature_dim == 2048


def test_from_checkpoint_strict_and_detects(tiny_files: tuple[Path, Path], tiny: VinVLDetector) -> None:
    assert tiny.config.arch == TINY_ARCH  # inferred from shapes
    out = tiny.detect(_images()[:1])[0]
    n = len(out["boxes"])
    assert 10 <= n <= 100 and out["features"].shape == (n, tiny.feature_dim)
    assert out["geometry"].shape == (n, 6) and out["attr_labels"].shape == (n, 16)
    assert (np.diff(out["scores"]) <= 0).all() and out["boxes"].dtype == np.float32
    assert (out["boxes"][:, 2] <= 95 * 64 / 96 + 1e-4).all() and (out["boxes"] >= 0).all()  # clip to w-1, rescaled
    assert out["class_names"] == [CLASSES[i] for i in out["labels"]]
    assert len(out["tags"].split(", ")) == n
    assert tiny.detector_id.startswith("tiny-w") and tiny.detector_id == VinVLDetector.from_checkpoint(
        *tiny_files, config=TINY).detector_id
    other = VinVLDetector.from_checkpoint(*tiny_files, config=TINY, score_thresh=0.5)
    assert other.detector_id != tiny.detector_id and other.settings.score_thresh == 0.5


def test_batched_equals_one_at_a_time(tiny: VinVLDetector) -> None:
    images = _images()
    batched = tiny.detect(images)
    for image, got in zip(images, batched):
        alone = tiny.detect([image])[0]
        assert np.array_equal(alone["labels"], got["labels"])
        np.testing.assert_allclose(alone["boxes"], got["boxes"], atol=1e-3)
        np.testing.assert_allclose(alone["features"], got["features"], atol=1e-3, rtol=1e-3)
        np.testing.assert_allclose(alone["attr_scores"], got["attr_scores"], atol=1e-4)


def test_roi_align_keeps_box_coordinates_in_float32_under_bf16(tiny: VinVLDetector) -> None:
    extractor = tiny.roi_heads.box.feature_extractor
    features = torch.randn(1, 4, 64, 64)  # a 1024 px image at 1/16
    boxes = [torch.tensor([[300.3, 410.7, 701.9, 777.2]])]
    expected = torchvision.ops.roi_align(features.bfloat16().float(), [boxes[0]], extractor.resolution,
                                         extractor.spatial_scale, 0, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = extractor.pool(features.bfloat16(), boxes, [(1024, 1024)])
    torch.testing.assert_close(pooled.float(), expected, atol=1e-2, rtol=1e-2)
    assert not torch.allclose(expected, torchvision.ops.roi_align(features, [boxes[0].bfloat16().float()],
                                                                  extractor.resolution, extractor.spatial_scale,
                                                                  0, False), atol=1e-2)  # rounding would show


def test_palette_and_rgba_images_are_converted_before_resizing(tiny: VinVLDetector) -> None:
    rgb = _images()[2]
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    batch, _ = tiny.preprocess([palette])
    expected, _ = tiny.preprocess([palette.convert("RGB")])
    assert torch.equal(batch, expected)


def test_accepts_model_wrapper_and_unprefixed(tiny_files: tuple[Path, Path], tmp_path: Path) -> None:
    state = read_state_dict(tiny_files[0])
    torch.save({"model": state}, tmp_path / "wrapped.pth")
    torch.save(state, tmp_path / "plain.pth")
    for name in ("wrapped.pth", "plain.pth"):
        assert VinVLDetector.from_checkpoint(tmp_path / name, tiny_files[1]).feature_dim == 256


@pytest.mark.parametrize("change", ["rename", "shape", "alias", "drop"])
def test_bad_checkpoints_name_the_key(tiny_files: tuple[Path, Path], tmp_path: Path, change: str) -> None:
    state = read_state_dict(tiny_files[0])
    key = "rpn.head.conv.bias"
    if change == "rename":
        state["rpn.head.conv.biass"] = state.pop(key)
        expected = ["1 missing key(s): rpn.head.conv.bias", "1 unexpected key(s): rpn.head.conv.biass"]
    elif change == "shape":
        state[key] = torch.zeros(3)
        expected = ["mis-shaped", key]
    elif change == "alias":
        key = "attribute.feature_extractor.head.layer4.0.conv1.weight"
        state[key] = state[key] + 1
        expected = ["differ", key]
    else:
        key = "attribute.predictor.fc_attr.bias"
        del state[key]
        expected = ["missing", key]
    bad = tmp_path / "bad.pth"
    write_checkpoint(bad, state)
    with pytest.raises(CheckpointError) as err:
        VinVLDetector.from_checkpoint(bad, tiny_files[1])
    assert str(bad) in str(err.value) and all(e in str(err.value) for e in expected)


def test_unknown_override_is_an_error(tiny_files: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="score_treshold"):
        VinVLDetector.from_checkpoint(*tiny_files, score_treshold=0.3)


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_payloads_are_refused(tmp_path: Path, tiny_files: tuple[Path, Path]) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"module.x": _Exploit()}, f)
    with pytest.raises(CorruptCheckpointError, match="weights-only"):
        VinVLDetector.from_checkpoint(path, tiny_files[1])


def test_labelmap_layout(tmp_path: Path) -> None:
    path = write_labelmap(tmp_path / "map.json", CLASSES, ATTRIBUTES)
    classes, attributes = read_labelmap(path)
    assert classes == CLASSES and attributes == ATTRIBUTES
    path.write_text('{"label_to_idx": {"cat": 0}, "attribute_to_idx": {}}')
    with pytest.raises(CheckpointError, match="1-based"):
        read_labelmap(path)


def test_configs_load() -> None:
    from softclip.pipeline.config import load_config

    configs = Path(__file__).parent.parent / "extract" / "configs"
    x152 = load_config(DetectorConfig, configs / "vinvl_x152c4.yaml")
    assert x152.arch == DetectorArch() and x152.test == DetectorSettings()  # the official extraction settings
    shapes = load_config(DetectorConfig, configs / "shapes.yaml")
    assert shapes.arch.num_classes == 9 and shapes.arch.num_attributes == 11
