"""Encoded bytes -> RGB uint8 arrays; bad input becomes `ImageRejected` with a reason.

A bad image is data, not a crash: callers catch `ImageRejected`, record `str(exc)` as the
reject reason, count it, and move on.

The fast path, measured on 500x375 photos (bench/bench_input.py): read the header first
(`read_header`: size, EXIF orientation, pixel limit), decide the crop from it, decode JPEGs
with simplejpeg at the coarsest DCT scale the crop allows (`crop_region`), and resample the
crop straight into its row of the batch with torch's uint8 kernels (`resize_into`). Every
mode (grayscale, CMYK, palette, alpha, 16-bit) ends as upright RGB uint8.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

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


# EXIF orientation -> the transpose that makes the stored pixels upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112
# JPEG colour spaces libjpeg-turbo turns into RGB exactly as Pillow does (CMYK/YCCK go via Pillow).
_SIMPLEJPEG_SPACES = ("YCbCr", "Gray", "RGB")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in upright source pixels


@dataclass
class Header:
    """An opened, not yet decoded image: its bytes, upright size and EXIF orientation."""

    data: bytes
    img: Image.Image
    orientation: int  # EXIF orientation, 1 = as stored
    width: int  # upright
    height: int  # upright


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    """Parse the header only (size, format, EXIF orientation), checking the pixel limit."""
    img = open_image(data, max_pixels)
    orientation = _orientation(img)
    w, h = img.size
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return Header(data, img, orientation, w, h)


def decode_scaled(head: Header, scale: int = 1) -> np.ndarray:
    """Decode to an upright (H, W, 3) uint8 RGB array, JPEGs at 1/`scale` (1, 2, 4 or 8).

    JPEG downscaling happens in the DCT domain, so a 1/2-scale decode does about half the
    work. YCbCr and grayscale JPEGs go through simplejpeg (libjpeg-turbo straight into a NumPy
    array: the same pixels as Pillow, ~0.75 ms where Pillow's decode + RGB copy takes ~1.1 ms);
    everything else through Pillow. A failure to decode raises `ImageRejected`.
    """
    img = head.img
    if img.format == "JPEG":
        arr = _decode_jpeg(head, scale)
        if arr is not None:
            return arr
        if scale > 1:
            img.draft("RGB", (math.ceil(img.size[0] / scale), math.ceil(img.size[1] / scale)))
    _load(img)
    if head.orientation in _UPRIGHT:
        img = img.transpose(_UPRIGHT[head.orientation])
    return to_rgb_array(img)


def jpeg_scale(head: Header, factor: float) -> int:
    """The coarsest DCT scale (1, 2, 4, 8) not above `factor` = source pixels per output pixel;
    1 for non-JPEGs."""
    if head.img.format != "JPEG":
        return 1
    return next((s for s in (8, 4, 2) if s <= factor), 1)


def crop_region(head: Header, box: Box, size: int) -> np.ndarray:
    """The upright `box` of the image as an (h, w, 3) uint8 view, decoded at the coarsest DCT
    scale that still leaves the box at least `size` pixels across (so at most 2x `size`)."""
    arr = decode_scaled(head, jpeg_scale(head, min(box[2] - box[0], box[3] - box[1]) / size))
    h, w = arr.shape[:2]
    # The scale the decoder really used (Pillow may pick a finer one than asked for).
    sx, sy = head.width / w, head.height / h
    left, top = min(int(box[0] / sx), w - 1), min(int(box[1] / sy), h - 1)
    right, bottom = max(round(box[2] / sx), left + 1), max(round(box[3] / sy), top + 1)
    return arr[top:bottom, left:right]


def decode_crop(head: Header, box: Box, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """The upright `box` of the image resampled to (size, size, 3) uint8."""
    out = np.empty((size, size, 3), dtype=np.uint8)
    resize_into(crop_region(head, box, size), out, interpolation)
    return out


def resize_into(src: np.ndarray, out: np.ndarray, interpolation: str = "bilinear") -> None:
    """Resample (H, W, 3) uint8 `src` into the (h, w, 3) uint8 array `out`, antialiased like
    Pillow's resize.

    torch's uint8 channels-last kernels (the ones behind torchvision's tensor transforms),
    writing straight into `out` (say, a row of the batch), take ~0.2 ms for a 224 crop where
    Pillow's resize takes ~0.7 ms; they agree with Pillow to +-1 (bilinear), +-2 (bicubic).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; known: {', '.join(INTERPOLATIONS)}")
    if src.shape[:2] == out.shape[:2]:
        out[...] = src
        return
    import torch  # lazily: the reject-checking users of this module never resize

    if min(src.strides) < 0 or not src.flags.writeable:  # torch takes a crop view, not a flip
        src = np.array(src)
    x = torch.from_numpy(src).permute(2, 0, 1).unsqueeze(0)
    y = torch.from_numpy(out).permute(2, 0, 1).unsqueeze(0)
    size = list(out.shape[:2])
    # The out= overloads keep y's channels-last strides; F.interpolate would return NCHW for a
    # batch of one and cost another 0.3 ms to interleave back.
    if interpolation == "nearest":  # Pillow's nearest samples pixel centres: torch's "nearest-exact"
        torch.ops.aten._upsample_nearest_exact2d.out(x, size, None, None, out=y)
    elif interpolation == "bilinear":
        torch.ops.aten._upsample_bilinear2d_aa.out(x, size, False, None, None, out=y)
    else:
        torch.ops.aten._upsample_bicubic2d_aa.out(x, size, False, None, None, out=y)


def resize_array(arr: np.ndarray, size: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """(H, W, 3) uint8 -> (size[0], size[1], 3) uint8, antialiased like Pillow's resize."""
    out = np.empty((size[0], size[1], 3), dtype=np.uint8)
    resize_into(arr, out, interpolation)
    return out


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None) -> np.ndarray:
    """Decode to an (H, W, 3) uint8 RGB array, EXIF-upright.

    With `min_size`, JPEGs are decoded at the smallest DCT scale whose short side is still at
    least `min_size`, which skips most of the decode work for thumbnails and crops.
    """
    head = read_header(data, max_pixels)
    scale = jpeg_scale(head, min(head.width, head.height) / min_size) if min_size else 1
    return np.ascontiguousarray(decode_scaled(head, scale))


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


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block leaves the pixels as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _decode_jpeg(head: Header, scale: int) -> np.ndarray | None:
    """simplejpeg's decode, or None where Pillow must decide (other colour spaces, and any data
    simplejpeg refuses: Pillow tolerates recoverable damage, and `inspect_image` accepted it)."""
    try:
        _, _, space, _ = simplejpeg.decode_jpeg_header(head.data)
        if space not in _SIMPLEJPEG_SPACES:
            return None
        w, h = head.img.size
        arr = simplejpeg.decode_jpeg(head.data, colorspace="RGB", min_width=-(-w // scale), min_height=-(-h // scale))
    except ValueError:
        return None
    return _upright(arr, head.orientation)


def _upright(arr: np.ndarray, orientation: int) -> np.ndarray:
    # Views, as ImageOps.exif_transpose does it with Pillow transposes.
    if orientation in (5, 6, 7, 8):
        arr = arr.transpose(1, 0, 2)  # TRANSPOSE: now orientation 5 is upright
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation in (2, 3):
        arr = arr[:, ::-1]
    if orientation in (3, 4):
        arr = arr[::-1]
    return arr


def _load(img: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data of any format
        raise ImageRejected(f"undecodable image: {exc}") from None
