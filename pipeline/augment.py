"""Train/eval transform presets: the batch functions that augmentation actors run.

A preset is built once from config (`build_train_transform`, `build_eval_transform`) and maps a
reader batch (`schema.IMAGE_SCHEMA` columns) to the same rows with `schema.PIXELS`, uint8
(N, crop, crop, 3), in place of the encoded bytes. Pixels stay uint8 all the way to the training
device, where `preprocessing.to_model_input` converts and normalises them.

Both presets decide where to crop from the image header alone, then decode only what the crop
needs (`decode.crop_region`: DCT-domain downscaling) and resample it straight into its batch
row (`decode.resize_into`). Every random choice comes from a generator seeded by (seed, epoch,
sample key), so a sample gets the same augmentation in the same epoch on any worker, in any
order, and a different one next epoch.
A sample that does not decode becomes an error row (zero pixels, `error` = the reason).
"""

from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from pipeline import schema
from pipeline.config import AugmentConfig
from pipeline.decode import (
    DEFAULT_MAX_PIXELS,
    Box,
    ImageRejected,
    crop_region,
    decode_scaled,
    jpeg_scale,
    read_header,
    resize_array,
    resize_into,
)

Batch = dict[str, np.ndarray]


class EvalTransform:
    """Eval preset: resize the short side to `resize_size`, then centre-crop `crop_size`.

    Exactly the geometry of torchvision's `Resize` + `CenterCrop` that pretrained weights were
    evaluated with (the whole image is resized, then cropped on the integer grid), with the
    JPEG decoded at the coarsest DCT scale that still covers the resized size.
    """

    def __init__(self, crop_size: int, resize_size: int, interpolation: str, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.interpolation = interpolation
        self.max_pixels = max_pixels

    def image(self, data: bytes, out: np.ndarray) -> None:
        """One encoded image -> `out`, a (crop, crop, 3) uint8 array."""
        head = read_header(data, self.max_pixels)
        new_w, new_h = resized_size(head.width, head.height, self.resize_size)
        arr = decode_scaled(head, jpeg_scale(head, min(head.width / new_w, head.height / new_h)))
        arr = resize_array(arr, (new_h, new_w), self.interpolation)
        top = int(round((new_h - self.crop_size) / 2.0))
        left = int(round((new_w - self.crop_size) / 2.0))
        out[...] = arr[top : top + self.crop_size, left : left + self.crop_size]

    def __call__(self, batch: Batch, epoch: int | None = None) -> Batch:
        return map_images(batch, self.crop_size, lambda data, key, out: self.image(data, out))


class TrainTransform:
    """Train preset: RandomResizedCrop, flips, affine (rotate/shear/zoom), colour jitter and
    optionally RandAugment or TrivialAugment, on uint8, seeded per (seed, epoch, key).

    The crop box is drawn from the header size (torchvision's RandomResizedCrop algorithm), so
    the decode can skip what the crop does not need. Pixel ops run on the small crop.
    """

    def __init__(
        self,
        crop_size: int,
        interpolation: str,
        cfg: AugmentConfig,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        epoch: int = 0,
    ):
        self.crop_size = crop_size
        self.interpolation = interpolation
        self.cfg = cfg
        self.max_pixels = max_pixels
        self.epoch = epoch
        self.pixel_ops = _pixel_ops(cfg)

    def image(self, data: bytes, key: str, epoch: int, out: np.ndarray) -> None:
        """One encoded image -> `out`, a (crop, crop, 3) uint8 array, augmented."""
        cfg = self.cfg
        rng = sample_rng(cfg.seed, epoch, key)
        head = read_header(data, self.max_pixels)
        box = random_resized_crop_box(head.width, head.height, cfg.scale, cfg.ratio, rng)
        resize_into(crop_region(head, box, self.crop_size), out, self.interpolation)
        flip_in_place(out, rng.random() < cfg.hflip, rng.random() < cfg.vflip)
        if self.pixel_ops:
            img = Image.fromarray(out)
            for op in self.pixel_ops:
                img = op(img, rng)
            out[...] = np.asarray(img)

    def __call__(self, batch: Batch, epoch: int | None = None) -> Batch:
        epoch = self.epoch if epoch is None else epoch
        return map_images(batch, self.crop_size, lambda data, key, out: self.image(data, key, epoch, out))


def build_eval_transform(prep, max_pixels: int = DEFAULT_MAX_PIXELS) -> EvalTransform:
    """The eval batch function for a model's `Preprocessing` (crop, resize, interpolation)."""
    return EvalTransform(prep.crop_size, prep.resize_size, prep.interpolation, max_pixels)


def build_train_transform(
    prep, cfg: AugmentConfig, max_pixels: int = DEFAULT_MAX_PIXELS, epoch: int = 0
) -> TrainTransform | EvalTransform:
    """The train batch function: `cfg.preset` "standard" augments, "none" is the eval transform.

    Output size and interpolation come from the model's `Preprocessing`. Call it as
    `fn(batch)` (its own `epoch`) or `fn(batch, epoch=e)`.
    """
    if cfg.preset == "none":
        return build_eval_transform(prep, max_pixels)
    return TrainTransform(prep.crop_size, prep.interpolation, cfg, max_pixels, epoch)


def map_images(batch: Batch, size: int, transform: Callable[[bytes, str, np.ndarray], None]) -> Batch:
    """Apply `transform(bytes, key, out)`, writing (size, size, 3) uint8 into `out`, to every
    good row of a batch.

    Rows that arrive with an error keep it; a row whose image is rejected gets the reason.
    Either way its pixels are zeros, and consumers count and skip it. The bytes are dropped.
    """
    images, keys = batch[schema.IMAGE], batch[schema.KEY]
    n = len(images)
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    errors = [str(e) for e in batch[schema.ERROR]] if schema.ERROR in batch else [""] * n
    for i in range(n):
        if errors[i]:
            continue
        try:
            transform(images[i], str(keys[i]), pixels[i])
        except ImageRejected as exc:
            errors[i] = str(exc)
            pixels[i] = 0
    out = {k: v for k, v in batch.items() if k != schema.IMAGE}
    out[schema.PIXELS] = pixels
    out[schema.ERROR] = np.array(errors, dtype=object)
    return out


def flip_in_place(pixels: np.ndarray, horizontal: bool, vertical: bool) -> None:
    """Mirror an (H, W, 3) uint8 array left-right and/or top-bottom, in place.

    torch's flip is vectorised; NumPy's copy of a reversed 3-byte-pixel view is ~30x slower.
    """
    dims = [d for d, on in ((1, horizontal), (0, vertical)) if on]
    if dims:
        import torch

        view = torch.from_numpy(pixels)
        view.copy_(view.flip(dims))


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The generator of one sample's random choices: the same for the same (seed, epoch, key)
    in any process (str seeds hash with SHA-512, not Python's salted hash)."""
    return random.Random(f"{seed}/{epoch}/{key}")


def resized_size(width: int, height: int, resize_size: int) -> tuple[int, int]:
    """torchvision's `Resize(int)`: the short side becomes `resize_size`, the long side keeps
    the aspect ratio, truncated. Returns (width, height)."""
    if width <= height:
        return resize_size, int(resize_size * height / width)
    return int(resize_size * width / height), resize_size


def random_resized_crop_box(width: int, height: int, scale, ratio, rng: random.Random) -> Box:
    """torchvision's `RandomResizedCrop.get_params`, drawing from `rng`; returns (l, t, r, b)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    # Fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    w, h = width, height
    if in_ratio < min(ratio):
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        w = int(round(h * max(ratio)))
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


# ---- pixel ops on the crop (Pillow, uint8), each `op(img, rng) -> img` ----


def _pixel_ops(cfg: AugmentConfig) -> list[Callable[[Image.Image, random.Random], Image.Image]]:
    ops = []
    if cfg.rotate > 0 or cfg.shear > 0 or tuple(cfg.zoom) != (1.0, 1.0):
        ops.append(lambda img, rng: random_affine(img, rng, cfg.rotate, cfg.shear, cfg.zoom))
    if cfg.color_jitter > 0:
        ops.append(lambda img, rng: color_jitter(img, rng, cfg.color_jitter))
    if cfg.auto_augment == "randaugment":
        ops.append(lambda img, rng: rand_augment(img, rng, cfg.auto_augment_ops, cfg.auto_augment_magnitude))
    elif cfg.auto_augment == "trivialaugment":
        ops.append(trivial_augment)
    return ops


def random_affine(img: Image.Image, rng: random.Random, degrees: float, shear: float, zoom) -> Image.Image:
    """torchvision's `RandomAffine(degrees, shear=shear, scale=zoom)`, about the centre, black fill."""
    angle = rng.uniform(-degrees, degrees)
    shear_x = rng.uniform(-shear, shear)
    scale = rng.uniform(zoom[0], zoom[1])
    center = (img.size[0] * 0.5, img.size[1] * 0.5)
    return _affine(img, center, angle, (0.0, 0.0), scale, (shear_x, 0.0), Image.Resampling.BILINEAR)


def color_jitter(img: Image.Image, rng: random.Random, strength: float) -> Image.Image:
    """torchvision's `ColorJitter(b, c, s)` with b = c = s = `strength`, in random order."""
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    rng.shuffle(enhancers)
    for enhancer in enhancers:
        img = enhancer(img).enhance(rng.uniform(max(0.0, 1 - strength), 1 + strength))
    return img


_BINS = 31  # torchvision's num_magnitude_bins


def rand_augment(img: Image.Image, rng: random.Random, num_ops: int, magnitude: int) -> Image.Image:
    """torchvision's `RandAugment(num_ops, magnitude)`: ops drawn from the RandAugment space."""
    for _ in range(num_ops):
        name = rng.choice(list(_RANDAUGMENT))
        img = _apply_op(img, name, _RANDAUGMENT[name](img.size)[magnitude], rng)
    return img


def trivial_augment(img: Image.Image, rng: random.Random) -> Image.Image:
    """torchvision's `TrivialAugmentWide`: one op, at a random magnitude, from the wide space."""
    name = rng.choice(list(_TRIVIAL))
    return _apply_op(img, name, _TRIVIAL[name](img.size)[rng.randrange(_BINS)], rng)


def _linspace(top: float) -> np.ndarray:
    return np.linspace(0.0, top, _BINS)


def _posterize_bits(span: int) -> np.ndarray:
    return 8 - np.round(np.arange(_BINS) / ((_BINS - 1) / span)).astype(int)


# Magnitude tables by op, from torchvision's `_augmentation_space` (size = (width, height)).
_RANDAUGMENT = {
    "Identity": lambda size: np.zeros(_BINS),
    "ShearX": lambda size: _linspace(0.3),
    "ShearY": lambda size: _linspace(0.3),
    "TranslateX": lambda size: _linspace(150.0 / 331.0 * size[0]),
    "TranslateY": lambda size: _linspace(150.0 / 331.0 * size[1]),
    "Rotate": lambda size: _linspace(30.0),
    "Brightness": lambda size: _linspace(0.9),
    "Color": lambda size: _linspace(0.9),
    "Contrast": lambda size: _linspace(0.9),
    "Sharpness": lambda size: _linspace(0.9),
    "Posterize": lambda size: _posterize_bits(4),
    "Solarize": lambda size: np.linspace(255.0, 0.0, _BINS),
    "AutoContrast": lambda size: np.zeros(_BINS),
    "Equalize": lambda size: np.zeros(_BINS),
}
_TRIVIAL = {
    **_RANDAUGMENT,
    "ShearX": lambda size: _linspace(0.99),
    "ShearY": lambda size: _linspace(0.99),
    "TranslateX": lambda size: _linspace(32.0),
    "TranslateY": lambda size: _linspace(32.0),
    "Rotate": lambda size: _linspace(135.0),
    "Brightness": lambda size: _linspace(0.99),
    "Color": lambda size: _linspace(0.99),
    "Contrast": lambda size: _linspace(0.99),
    "Sharpness": lambda size: _linspace(0.99),
    "Posterize": lambda size: _posterize_bits(6),
}
_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


def _apply_op(img: Image.Image, name: str, magnitude: float, rng: random.Random) -> Image.Image:
    if name in _SIGNED and rng.random() < 0.5:
        magnitude = -magnitude
    near = Image.Resampling.NEAREST  # torchvision's default for the auto-augment policies
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return _affine(img, (0.0, 0.0), 0.0, (0.0, 0.0), 1.0, (shear, 0.0) if name == "ShearX" else (0.0, shear), near)
    if name in ("TranslateX", "TranslateY"):
        shift = (int(magnitude), 0.0) if name == "TranslateX" else (0.0, int(magnitude))
        return _affine(img, (img.size[0] * 0.5, img.size[1] * 0.5), 0.0, shift, 1.0, (0.0, 0.0), near)
    if name == "Rotate":
        return img.rotate(magnitude, resample=near, fillcolor=(0, 0, 0))
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return getattr(ImageEnhance, name)(img).enhance(1.0 + magnitude)
    if name == "Posterize":
        return ImageOps.posterize(img, int(magnitude))
    if name == "Solarize":
        return ImageOps.solarize(img, magnitude)  # a float threshold, as torchvision (212.5 keeps 212)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    return img  # Identity


def _affine(img: Image.Image, center, angle: float, translate, scale: float, shear, resample) -> Image.Image:
    # torchvision's _get_inverse_affine_matrix: output pixel -> input pixel, for Pillow.
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [v / scale for v in (d, -b, 0.0, -c, a, 0.0)]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return img.transform(img.size, Image.Transform.AFFINE, m, resample=resample, fillcolor=(0, 0, 0))
