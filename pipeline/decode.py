"""Encoded bytes -> RGB uint8 arrays; bad input becomes `ImageRejected` with a reason.

A bad image is data, not a crash: callers catch `ImageRejected`, record `str(exc)` as the
reject reason, count it, and move on.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Our own pixel limit (max_pixels) replaces Pillow's global one, which only warns below 2x.
Image.MAX_IMAGE_PIXELS = None

DEFAULT_MAX_PIXELS = 89_478_485


class ImageRejected(ValueError):
    """An input that is not a usable image; str() is the reason written to errors.jsonl."""


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Identify an image from its header and check its size; pixels are not decoded yet."""
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not an image: no known image format in the bytes") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a reject reason
        raise ImageRejected(f"unreadable image header: {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(decompression-bomb guard; raise max_pixels if the image is genuine)"
        )
    return img


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Prove the image decodes end to end and return its (width, height) as stored."""
    img = open_image(data, max_pixels)
    size = img.size
    # A 1/8-scale DCT decode still reads every coefficient, so truncation is caught cheaply.
    img.draft(img.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
    _load(img)
    return size


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None) -> np.ndarray:
    """Decode to an (H, W, 3) uint8 RGB array, EXIF-upright.

    With `min_size`, JPEGs are decoded at the smallest DCT scale whose short side is still at
    least `min_size`, which skips most of the decode work for thumbnails and crops.
    """
    img = open_image(data, max_pixels)
    if min_size is not None:
        img.draft("RGB", (min_size, min_size))
    _load(img)
    img = ImageOps.exif_transpose(img)
    return to_rgb_array(img)


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any Pillow mode (L, LA, P, PA, RGBA, CMYK, I;16, I, F) -> (H, W, 3) uint8 RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels go on white, as a viewer shows them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _load(img: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data of any format
        raise ImageRejected(f"undecodable image: {exc}") from None
