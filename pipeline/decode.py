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
import logging
import math
import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

# Our own pixel limit (max_pixels) replaces Pillow's global one, which only warns below 2x.
Image.MAX_IMAGE_PIXELS = None

DEFAULT_MAX_PIXELS = 89_478_485


class ImageRejected(ValueError):
    """An input that is not a usable image; str() is the reason written to errors.jsonl."""


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, notes: list[str] | None = None) -> Image.Image:
    """Identify an image from its header and check its size; pixels are not decoded yet. Pillow's
    warnings go to `notes` (a reject's reason carries them; they never reach the console)."""
    notes = [] if notes is None else notes
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    with _pillow("unreadable image header", notes):
        img = Image.open(io.BytesIO(data))
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(decompression-bomb guard; raise max_pixels if the image is genuine)"
        )
    return img


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """The verdict on an image: prove it decodes end to end; returns its (width, height) as stored.

    It decodes as every other path does (`read_header`, then `decode_scaled`), at the coarsest DCT
    scale: a 1/8-scale decode still reads every coefficient, so damage is caught cheaply, and a
    file rejected here is rejected by the transforms with the same reason, whatever their scale.
    """
    head = read_header(data, max_pixels)
    size = head.img.size
    decode_scaled(head, jpeg_scale(head, 8))
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
    notes: list[str] = field(default_factory=list)  # Pillow's warnings so far: a reject's reason carries them


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    """Parse the header only (size, format, EXIF orientation), checking the pixel limit."""
    notes: list[str] = []
    img = open_image(data, max_pixels, notes)
    if img.format == "PNG" and "exif" not in img.info:
        # Pillow reads a PNG's eXIf chunk by decoding the image first; decode it here, so that a
        # failure is a reject like any other rather than a missing orientation.
        _load(img, notes)
    orientation = _orientation(img, notes)
    w, h = img.size
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return Header(data, img, orientation, w, h, notes)


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
    _load(img, head.notes)
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


def _orientation(img: Image.Image, notes: list[str]) -> int:
    try:
        with _pillow("unreadable EXIF", notes):
            value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except ImageRejected as exc:  # a corrupt EXIF block leaves the pixels as stored
        _exif_damaged(str(exc), 1)
        return 1
    value = value if isinstance(value, int) and 1 <= value <= 8 else 1
    # Pillow warns ("Corrupt EXIF data", "Skipping tag 274"), when opening or here, and reads what it can.
    damaged = [note for note in notes if "EXIF" in note or "Skipping tag" in note]
    if damaged:
        _exif_damaged(damaged[0], value)
    return value


def _exif_damaged(reason: str, orientation: int) -> None:
    """Log a damaged EXIF block once per process: the image is kept, with what of the block could be read;
    more lines would flood the log."""
    global _EXIF_LOGGED
    if not _EXIF_LOGGED:
        _EXIF_LOGGED = True
        log.warning(
            "an image's EXIF block is damaged (%s); the image is kept, orientation %d (1: as stored) "
            "(logged once per process: further damaged EXIF blocks are not logged)",
            reason,
            orientation,
        )


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


def _load(img: Image.Image, notes: list[str]) -> None:
    with _pillow("undecodable image", notes):
        img.load()


# Parts of Pillow's messages that depend on how far a decoder got (its scale, its buffer), not on the file.
_UNSTABLE = re.compile(r" \(\d+ bytes not processed\)")


@contextmanager
def _pillow(what: str, notes: list[str]) -> Iterator[None]:
    """Run Pillow calls: an exception becomes `ImageRejected("<what>: <message>")` and the warnings
    they raise are collected in `notes`, once each, never printed. Every decode path goes through
    here, so a file gets one verdict and one reason text, whatever path or scale decoded it."""
    outer, _LIBTIFF.messages = getattr(_LIBTIFF, "messages", None), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except ImageRejected:
            raise
        except UnidentifiedImageError:
            _note(notes, caught)
            raise ImageRejected(_with_notes("not an image: no known image format in the bytes", notes)) from None
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data of any format
            _note(notes, caught)
            raise ImageRejected(_with_notes(f"{what}: {_UNSTABLE.sub('', str(exc))}", notes)) from None
        finally:
            _note(notes, caught)
            _LIBTIFF.messages = outer


def _note(notes: list[str], caught: list[warnings.WarningMessage]) -> None:
    texts = [str(w.message) for w in caught] + _LIBTIFF.messages
    for text in (" ".join(t.split()) for t in texts):
        if text not in notes:
            notes.append(text)
    caught.clear()
    _LIBTIFF.messages.clear()


# libtiff (Pillow's TIFF codec) prints its errors and warnings to stderr itself. Its handlers send them to
# the notes of the file being decoded in this thread instead; outside a decode they are dropped.
_LIBTIFF = threading.local()
_EXIF_LOGGED = False
log = logging.getLogger("imgpipe")


def _route_libtiff_messages() -> object | None:
    """Install the handlers; returns them (they must stay alive), or None where libtiff is not found."""
    import ctypes
    import glob
    import os

    import PIL

    libs = sorted(glob.glob(os.path.join(os.path.dirname(PIL.__file__), os.pardir, "pillow.libs", "libtiff-*.so*")))
    try:
        lib, libc = ctypes.CDLL(libs[0]), ctypes.CDLL(None)
    except (IndexError, OSError):  # not the wheel's bundled libtiff: leave its messages alone
        return None
    libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)

    def collect(module: bytes | None, fmt: bytes, args: int) -> None:
        buf = ctypes.create_string_buffer(512)
        libc.vsnprintf(buf, len(buf), fmt, args)  # args: the C va_list, passed on as is
        messages = getattr(_LIBTIFF, "messages", None)
        if messages is not None:
            messages.append(f"{(module or b'').decode(errors='replace')}: {buf.value.decode(errors='replace')}")

    handler = handler_type(collect)
    for name in ("TIFFSetErrorHandler", "TIFFSetWarningHandler"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [handler_type], ctypes.c_void_p
        getattr(lib, name)(handler)
    return handler


_LIBTIFF_HANDLER = _route_libtiff_messages()  # module-level: libtiff calls it for the process's life


def _with_notes(reason: str, notes: list[str]) -> str:
    return f"{reason} (decoder warnings: {'; '.join(notes)})" if notes else reason
