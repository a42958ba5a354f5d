"""Safe image decoding: bytes in, an RGB ``PIL.Image`` out, or an :class:`ImageDecodeError` with a reason.

Every stage decodes through :func:`decode_image`, so they agree on EXIF orientation, colour conversion
(CMYK, palette, LA, 16-bit, alpha) and the decompression-bomb guard.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "ERROR_REASONS", "ImageDecodeError", "decode_image", "to_rgb"]

# Pillow's own guard (Image.MAX_IMAGE_PIXELS, ~89 Mpx) stays on; this is our stricter default, checked
# from the header before any pixel is decoded.
DEFAULT_MAX_PIXELS = 64_000_000
ERROR_REASONS = ("empty", "corrupt", "truncated", "too_large")
_REASONS = "|".join(ERROR_REASONS)
_OWN_MESSAGE = re.compile(rf"({_REASONS}): (.*)", re.S)
_TRACEBACK_LINE = re.compile(rf"ImageDecodeError: ({_REASONS}): (.*)$", re.M)


class ImageDecodeError(ValueError):
    """An image could not be decoded. ``reason`` is one of :data:`ERROR_REASONS`.

    Built as ``ImageDecodeError(reason, detail)``; the one-argument form ``ImageDecodeError(message)``
    takes a message holding ``"<reason>: <detail>"`` (its own ``str``, or the worker traceback text that
    PyTorch's ``DataLoader`` passes when it re-raises a worker's error), so the error survives pickling
    and ``num_workers > 0`` as an :class:`ImageDecodeError` rather than a ``RuntimeError``.
    """

    def __init__(self, reason: str, detail: str | None = None):
        if detail is None:
            message = reason
            own = _OWN_MESSAGE.fullmatch(message)
            found = own.groups() if own else (_TRACEBACK_LINE.findall(message) or [None])[-1]
            if found is None:
                raise TypeError(f"ImageDecodeError(message): no '<reason>: <detail>' with a reason in "
                                f"{ERROR_REASONS} in {message!r}")
            reason, detail = found
        else:
            if reason not in ERROR_REASONS:
                raise ValueError(f"ImageDecodeError: unknown reason {reason!r} (known: {ERROR_REASONS})")
            message = f"{reason}: {detail}"
        super().__init__(message)
        self.reason = reason
        self.detail = detail


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha is composited over white, 16-bit is rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        if values.size and values.max() > 255:
            values = values / 257.0  # 65535 -> 255
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes into an RGB image with EXIF orientation applied.

    Args:
        data: the encoded file (JPEG, PNG, WebP, ...).
        max_pixels: images with more pixels than this are refused from the header, before decoding.

    Raises:
        ImageDecodeError: with ``reason`` "empty", "corrupt", "truncated" or "too_large".
    """
    if not data:
        raise ImageDecodeError("empty", "zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    "too_large", f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError("too_large", str(err)) from err
    except UnidentifiedImageError as err:
        raise ImageDecodeError("corrupt", "not a recognised image format") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = "truncated" if "truncated" in str(err).lower() else "corrupt"
        raise ImageDecodeError(reason, f"{type(err).__name__}: {err}") from err
