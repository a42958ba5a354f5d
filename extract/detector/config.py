"""Typed configs of the VinVL-compatible detector: architecture, test-time settings, training schedule.

One family: :class:`DetectorArch` describes both the released ResNeXt-152 32x8d C4 model
(``extract/configs/vinvl_x152c4.yaml``) and the small variants used in tests and for the shapes world
(``extract/configs/shapes.yaml``). The names follow maskrcnn_benchmark / scene_graph_benchmark
(``MODEL.RPN.PRE_NMS_TOP_N_TEST`` becomes ``pre_nms_top_n``, ``MODEL.ROI_HEADS.NMS_FILTER`` becomes
``nms_filter`` and so on), so a VinVL config line maps onto one field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from softclip.pipeline.config import from_dict, to_dict
from softclip.pipeline.precision import Precision

__all__ = ["DetectorArch", "DetectorConfig", "DetectorSettings", "DetectorTrainConfig"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DetectorArch:
    """Shapes of the network; everything here can be read back from a checkpoint's tensor shapes.

    Stage ``k`` (1..4; 4 is the res5 ROI head) has ``blocks[k-1]`` torchvision ``Bottleneck`` blocks with
    ``planes_k = res2_channels // 4 * 2**(k-1)``, bottleneck width ``planes_k * width_per_group // 64 *
    groups`` and ``4 * planes_k`` output channels. The C4 feature map (stride 16) has ``4 * res2_channels``
    channels and the pooled ROI feature ``8 * res2_channels`` (2048 for VinVL).
    """

    blocks: tuple[int, int, int, int] = (3, 8, 36, 3)
    groups: int = 32
    width_per_group: int = 8
    stem_channels: int = 64
    res2_channels: int = 256
    num_classes: int = 1595  # including background at index 0
    num_attributes: int = 525  # including "no attribute" at index 0
    cls_embed_dim: int = 256
    attr_embed_dim: int = 512
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_stride: int = 16
    pooler_resolution: int = 14

    def __post_init__(self) -> None:
        if any(b < 1 for b in self.blocks):
            raise ValueError(f"every stage needs at least one block, got blocks={self.blocks}")
        if self.res2_channels % 4 or self.res2_channels < 4:
            raise ValueError(f"res2_channels must be a positive multiple of 4, got {self.res2_channels}")
        planes = self.res2_channels // 4
        if (planes * self.width_per_group) % 64:
            raise ValueError(
                f"res2_channels/4 * width_per_group must be a multiple of 64 (torchvision Bottleneck width), "
                f"got {planes} * {self.width_per_group}"
            )
        if self.groups < 1 or self.stem_channels < 1:
            raise ValueError("groups and stem_channels must be positive")
        if self.num_classes < 2 or self.num_attributes < 2:
            raise ValueError("num_classes and num_attributes include index 0 and must be at least 2")
        if not self.anchor_sizes or not self.aspect_ratios:
            raise ValueError("anchor_sizes and aspect_ratios must not be empty")
        if self.anchor_stride != 16:
            raise ValueError(f"the C4 body has stride 16; anchor_stride={self.anchor_stride} cannot match it")

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map location (15 for VinVL)."""
        return len(self.anchor_sizes) * len(self.aspect_ratios)

    @property
    def backbone_channels(self) -> int:
        """Channels of the C4 feature map (1024 for VinVL)."""
        return 4 * self.res2_channels

    @property
    def feature_dim(self) -> int:
        """Dimension of the pooled res5 box feature (2048 for VinVL)."""
        return 8 * self.res2_channels


@dataclass(frozen=True, kw_only=True, slots=True)
class DetectorSettings:
    """Test-time settings (the official VinVL extraction command's values are the defaults).

    ``nms_filter`` 1 is the bottom-up ("Peter Anderson") per-class NMS at ``filter1_nms_thresh`` with one
    label per proposal; 2 is the fast class-agnostic NMS at ``nms_thresh``. ``precision`` is the
    project's one vocabulary (:mod:`pipeline.precision`: ``fp32``, or autocast to ``bf16``/``fp16`` on CUDA) and ``channels_last`` the memory format of the convolutions.
    """

    min_size: int = 600
    max_size: int = 1000
    pixel_mean: tuple[float, float, float] = (103.530, 116.280, 123.675)  # BGR, 0-255
    pre_nms_top_n: int = 6000
    post_nms_top_n: int = 300
    rpn_nms_thresh: float = 0.7
    score_thresh: float = 0.2
    nms_filter: Literal[1, 2] = 1
    nms_thresh: float = 0.5
    filter1_nms_thresh: float = 0.3
    detections_per_img: int = 100
    min_detections_per_img: int = 10
    ignore_box_regression: bool = True
    attr_thresh: float = 0.05
    max_attr_per_obj: int = 16
    precision: Precision = "fp32"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        if self.pre_nms_top_n < 1 or self.post_nms_top_n < 1:
            raise ValueError("pre_nms_top_n and post_nms_top_n must be positive")
        for name in ("rpn_nms_thresh", "score_thresh", "nms_thresh", "filter1_nms_thresh", "attr_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.min_detections_per_img <= self.detections_per_img:
            raise ValueError(
                f"need 0 <= min_detections_per_img <= detections_per_img, got "
                f"{self.min_detections_per_img}, {self.detections_per_img}"
            )
        if self.max_attr_per_obj < 1:
            raise ValueError(f"max_attr_per_obj must be positive, got {self.max_attr_per_obj}")

    def replace(self, source: str = "detector overrides", **overrides: object) -> DetectorSettings:
        """A copy with ``overrides`` applied, type-checked; an unknown name is a ``ConfigError`` (a
        ``ValueError``) naming it and listing the known settings."""
        return from_dict(DetectorSettings, {**to_dict(self), **overrides}, source=source)


@dataclass(frozen=True, kw_only=True, slots=True)
class DetectorTrainConfig:
    """Training schedule and sampling (maskrcnn_benchmark's names; defaults suit the shapes world on CPU)."""

    steps: int = 600
    batch_size: int = 8
    lr: float = 2e-3  # AdamW, after linear warmup, cosine decay to 0
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    rpn_batch_size_per_image: int = 64
    rpn_positive_fraction: float = 0.5
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_pre_nms_top_n: int = 600
    rpn_post_nms_top_n: int = 64
    roi_batch_size_per_image: int = 32
    roi_positive_fraction: float = 0.25
    roi_fg_iou_thresh: float = 0.5
    attribute_loss_weight: float = 0.5
    max_attributes_per_box: int = 4
    hflip: bool = True
    seed: int = 0
    num_threads: int = 0  # 0 = torch's default

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.rpn_bg_iou_thresh <= self.rpn_fg_iou_thresh <= 1:
            raise ValueError("need 0 <= rpn_bg_iou_thresh <= rpn_fg_iou_thresh <= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class DetectorConfig:
    """A detector variant: ``name`` (used in ``detector_id``), architecture, test settings, training."""

    name: str = "vinvl_x152c4"
    arch: DetectorArch = field(default_factory=DetectorArch)
    test: DetectorSettings = field(default_factory=DetectorSettings)
    train: DetectorTrainConfig = field(default_factory=DetectorTrainConfig)

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"name must be a non-empty string without spaces, got {self.name!r}")
