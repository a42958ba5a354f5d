import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from softclip.pipeline.images import ImageDecodeError, decode_image


def _encode(image, fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("image", [
    Image.new("CMYK", (7, 5), (0, 255, 255, 0)),
    Image.new("P", (7, 5), 3),
    Image.new("LA", (7, 5), (128, 255)),
    Image.new("RGBA", (7, 5), (255, 0, 0, 0)),
    Image.new("L", (7, 5), 200),
    Image.new("1", (7, 5), 1),
    Image.fromarray(np.full((5, 7), 65535, dtype=np.uint16)),
    Image.new("RGB", (1, 1), (1, 2, 3)),
], ids=["cmyk", "palette", "la", "rgba", "grey", "bilevel", "16bit", "1x1"])
def test_odd_modes_become_rgb(image):
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    decoded = decode_image(_encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == image.size


def test_16bit_white_stays_white_and_transparent_is_white():
    assert decode_image(_encode(Image.fromarray(np.full((2, 2), 65535, np.uint16)))).getpixel((0, 0)) == (255,) * 3
    assert decode_image(_encode(Image.new("RGBA", (2, 2), (255, 0, 0, 0)))).getpixel((0, 0)) == (255,) * 3


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(_encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (10, 20)


def test_empty_corrupt_and_truncated():
    with pytest.raises(ImageDecodeError) as err:
        decode_image(b"")
    assert err.value.reason == "empty"
    with pytest.raises(ImageDecodeError) as err:
        decode_image(b"this is not an image at all")
    assert err.value.reason == "corrupt"
    data = _encode(Image.effect_noise((64, 64), 40).convert("RGB"), "JPEG")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.reason == "truncated"


def _png_header_only(width, height):
    """A PNG that claims width x height pixels: what a decompression bomb looks like from its header."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [9000, 30000])
def test_decompression_bomb_is_refused_from_the_header(side):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(_png_header_only(side, side))
    assert err.value.reason == "too_large"


def test_max_pixels_is_configurable():
    data = _encode(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageDecodeError, match="max_pixels=5000"):
        decode_image(data, max_pixels=5000)
    assert decode_image(data, max_pixels=10_000).size == (100, 100)


@pytest.mark.parametrize("reason", ["empty", "corrupt", "truncated", "too_large"])
def test_decode_error_survives_pickle(reason):
    import pickle

    err = ImageDecodeError(reason, "x.jpg: OSError: broken data stream\nsecond line")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is ImageDecodeError
    assert (again.reason, again.detail, str(again), again.args) == (err.reason, err.detail, str(err), err.args)


def test_decode_error_rebuilds_from_a_worker_traceback_message():
    # PyTorch's DataLoader re-raises a worker's error as exc_type(<its traceback text>).
    try:
        decode_image(b"not an image")
    except ImageDecodeError as err:
        import traceback

        text = "Caught ImageDecodeError in DataLoader worker process 0.\nOriginal " + "".join(
            traceback.format_exception(err))
    again = ImageDecodeError(text)
    assert (again.reason, again.detail) == ("corrupt", "not a recognised image format")
    assert str(again) == text
    with pytest.raises(TypeError, match="no '<reason>: <detail>'"):
        ImageDecodeError("something else went wrong")
    with pytest.raises(ValueError, match="unknown reason 'odd'"):
        ImageDecodeError("odd", "detail")
