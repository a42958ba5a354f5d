"""maskrcnn_benchmark's legacy conventions that torchvision does not share.

Pure functions: the Detectron cell anchors, the "+1" box coder, clipping to ``[0, w-1]``, the test-time
resize rule and the BGR-255 input normalisation. Boxes are ``Tensor[N, 4]`` as ``(x1, y1, x2, y2)`` in
pixels of the resized image, with the legacy inclusive convention (a box from 0 to 15 is 16 pixels wide).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "BBOX_XFORM_CLIP",
    "clip_boxes_legacy",
    "decode_boxes",
    "encode_boxes",
    "generate_cell_anchors",
    "image_to_tensor",
    "resize_image",
    "resized_size",
]

BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # clamp on dw, dh before exp (maskrcnn_benchmark box_coder.py)


def _ratio_enum(anchor: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    w, h = anchor[2] - anchor[0] + 1, anchor[3] - anchor[1] + 1
    x_ctr, y_ctr = anchor[0] + 0.5 * (w - 1), anchor[1] + 0.5 * (h - 1)
    ws = np.round(np.sqrt(w * h / ratios))
    hs = np.round(ws * ratios)
    return _mkanchors(ws, hs, x_ctr, y_ctr)


def _mkanchors(ws: np.ndarray, hs: np.ndarray, x_ctr: float, y_ctr: float) -> np.ndarray:
    ws, hs = ws[:, None], hs[:, None]
    return np.hstack((x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1), x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)))


def _scale_enum(anchor: np.ndarray, scales: np.ndarray) -> np.ndarray:
    w, h = anchor[2] - anchor[0] + 1, anchor[3] - anchor[1] + 1
    x_ctr, y_ctr = anchor[0] + 0.5 * (w - 1), anchor[1] + 0.5 * (h - 1)
    return _mkanchors(w * scales, h * scales, x_ctr, y_ctr)


def generate_cell_anchors(stride: int = 16, sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
                          aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)) -> Tensor:
    """Detectron's ``generate_anchors``: ``Tensor[len(ratios)*len(sizes), 4]`` float32, ratio-major.

    The base window is ``(0, 0, stride-1, stride-1)``; widths are ``round(sqrt(area/ratio))`` (numpy's
    round-half-even), heights ``round(width*ratio)``, then scaled by ``size/stride`` about the centre.
    For VinVL's defaults the first row is ``[-15, -4, 30, 19]``.
    """
    anchor = np.array([1, 1, stride, stride], dtype=np.float64) - 1
    ratio_anchors = _ratio_enum(anchor, np.array(aspect_ratios, dtype=np.float64))
    scales = np.array(sizes, dtype=np.float64) / stride
    anchors = np.vstack([_scale_enum(ratio_anchors[i], scales) for i in range(ratio_anchors.shape[0])])
    return torch.from_numpy(anchors.astype(np.float32))


def decode_boxes(deltas: Tensor, boxes: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Legacy ``BoxCoder.decode``: apply ``deltas`` ``[N, 4k]`` to reference ``boxes`` ``[N, 4]``.

    ``w = x2 - x1 + 1``, ``cx = x1 + 0.5 w``; ``dw, dh`` are clamped at ``log(1000/16)``; the result is
    ``(cx' - 0.5 w', cy' - 0.5 h', cx' + 0.5 w' - 1, cy' + 0.5 h' - 1)``, shape ``[N, 4k]``.
    """
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0] + 1
    heights = boxes[:, 3] - boxes[:, 1] + 1
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=BBOX_XFORM_CLIP)
    dh = (deltas[:, 3::4] / wh).clamp(max=BBOX_XFORM_CLIP)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    out = torch.empty_like(deltas)
    out[:, 0::4] = pred_ctr_x - 0.5 * pred_w
    out[:, 1::4] = pred_ctr_y - 0.5 * pred_h
    out[:, 2::4] = pred_ctr_x + 0.5 * pred_w - 1
    out[:, 3::4] = pred_ctr_y + 0.5 * pred_h - 1
    return out


def encode_boxes(reference: Tensor, proposals: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Legacy ``BoxCoder.encode``: the deltas ``[N, 4]`` that turn ``proposals`` into ``reference``."""
    ex_w = proposals[:, 2] - proposals[:, 0] + 1
    ex_h = proposals[:, 3] - proposals[:, 1] + 1
    ex_x = proposals[:, 0] + 0.5 * ex_w
    ex_y = proposals[:, 1] + 0.5 * ex_h
    gt_w = reference[:, 2] - reference[:, 0] + 1
    gt_h = reference[:, 3] - reference[:, 1] + 1
    gt_x = reference[:, 0] + 0.5 * gt_w
    gt_y = reference[:, 1] + 0.5 * gt_h
    wx, wy, ww, wh = weights
    return torch.stack(
        (wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h, ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)),
        dim=1,
    )


def clip_boxes_legacy(boxes: Tensor, height: int, width: int) -> Tensor:
    """``BoxList.clip_to_image(remove_empty=False)``: x clamped to ``[0, width-1]``, y to ``[0, height-1]``.

    ``boxes`` is ``[..., 4k]``; every group of four coordinates is clipped.
    """
    out = boxes.clone()
    out[..., 0::4] = boxes[..., 0::4].clamp(0, width - 1)
    out[..., 1::4] = boxes[..., 1::4].clamp(0, height - 1)
    out[..., 2::4] = boxes[..., 2::4].clamp(0, width - 1)
    out[..., 3::4] = boxes[..., 3::4].clamp(0, height - 1)
    return out


def resized_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """maskrcnn_benchmark ``Resize.get_size`` at test time: the new ``(width, height)``.

    ``size = min_size``, lowered to ``int(round(max_size * short / long))`` when ``long/short * size``
    exceeds ``max_size``; the short side becomes ``size`` and the long side ``int(size * long / short)``
    (truncation). An image whose short side already equals ``size`` keeps its size.
    """
    size = min_size
    short, long = float(min(width, height)), float(max(width, height))
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return width, height
    if width < height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_image(image: Image.Image, min_size: int, max_size: int) -> Image.Image:
    """PIL bilinear resize to :func:`resized_size` (what ``torchvision.transforms.functional.resize`` does)."""
    new_size = resized_size(image.width, image.height, min_size, max_size)
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.BILINEAR)


def image_to_tensor(image: Image.Image, pixel_mean: tuple[float, float, float]) -> Tensor:
    """RGB PIL image to ``Tensor[3, H, W]`` float32: BGR order, 0-255, minus ``pixel_mean`` (BGR)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)[:, :, ::-1]
    tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    return tensor - torch.tensor(pixel_mean, dtype=torch.float32)[:, None, None]
