"""The train-time pixel ops against torchvision's own functional ops, on the same crop with the
same parameters: rotate/shear/zoom (`RandomAffine`), colour jitter (`ColorJitter`), and every
RandAugment/TrivialAugment op at fixed magnitudes (`autoaugment._apply_op`). imgpipe runs these
ops on Pillow images itself, seeded per sample, so the draws are replayed here from a twin of the
sample's random generator. Tolerance: Pillow against Pillow, so the images must be equal up to
one grey level on a handful of pixels (rounding of the inverse matrix); a wrong angle, sign,
centre or factor moves thousands of pixels by tens of levels.

Also the odd input modes (CMYK, palette, 16-bit, EXIF-rotated) through the *train* path, against a
reference conversion with Pillow and numpy."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from images import encode, exif_jpeg, gradient_array
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.autoaugment import _apply_op as torchvision_op

from pipeline import augment, schema
from pipeline.augment import build_train_transform
from pipeline.config import AugmentConfig
from pipeline.preprocessing import Preprocessing

CROP = gradient_array(64, 48, seed=3)  # an asymmetric crop: rotations and shears show


def pil() -> Image.Image:
    return Image.fromarray(CROP)


def assert_close(ours: Image.Image, reference: Image.Image, moved_at_least: float = 0.0) -> None:
    a, b = np.asarray(ours).astype(int), np.asarray(reference).astype(int)
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert diff.max() <= 1 or (diff > 1).mean() < 0.002, f"max {diff.max()}, {(diff > 1).mean():.4f} of values off"
    # and the op did something, by about the amount asked for
    assert np.abs(a - CROP.astype(int)).mean() >= moved_at_least


@pytest.mark.parametrize(
    ("degrees", "shear", "zoom"),
    [(30.0, 0.0, (1.0, 1.0)), (0.0, 20.0, (1.0, 1.0)), (0.0, 0.0, (0.7, 0.8)), (25.0, 10.0, (1.1, 1.3))],
)
def test_random_affine_is_torchvisions_affine_with_the_drawn_parameters(degrees, shear, zoom):
    for seed in range(5):
        ours = augment.random_affine(pil(), random.Random(seed), degrees, shear, zoom)
        twin = random.Random(seed)
        angle, shear_x, scale = twin.uniform(-degrees, degrees), twin.uniform(-shear, shear), twin.uniform(*zoom)
        reference = F.affine(pil(), angle, [0, 0], scale, [shear_x, 0.0], InterpolationMode.BILINEAR, fill=[0, 0, 0])
        assert_close(ours, reference, moved_at_least=3.0)


def test_color_jitter_is_torchvisions_in_the_drawn_order_and_factors():
    adjust = {"Brightness": F.adjust_brightness, "Contrast": F.adjust_contrast, "Color": F.adjust_saturation}
    for seed in range(6):
        ours = augment.color_jitter(pil(), random.Random(seed), 0.4)
        twin = random.Random(seed)
        order = ["Brightness", "Contrast", "Color"]
        twin.shuffle(order)
        reference = pil()
        factors = []
        for name in order:
            factors.append(twin.uniform(0.6, 1.4))
            reference = adjust[name](reference, factors[-1])
        assert_close(ours, reference)
        assert all(0.6 <= f <= 1.4 for f in factors)
    # the configured strength is what moves the pixels: 0.4 moves them, 0.0 leaves them
    assert np.array_equal(np.asarray(augment.color_jitter(pil(), random.Random(0), 0.0)), CROP)


class Keep:
    """A generator whose coin never flips a magnitude's sign (imgpipe flips with p=0.5)."""

    def random(self) -> float:
        return 0.9


SPACES = {"randaugment": augment._RANDAUGMENT, "trivialaugment": augment._TRIVIAL}


@pytest.mark.parametrize("space", sorted(SPACES))
@pytest.mark.parametrize("bin_", [5, 17, 30])
def test_every_auto_augment_op_is_torchvisions_at_a_fixed_magnitude(space, bin_):
    size = pil().size
    for name, table in SPACES[space].items():
        magnitude = float(table(size)[bin_])
        ours = augment._apply_op(pil(), name, magnitude, Keep())
        reference = torchvision_op(pil(), name, magnitude, InterpolationMode.NEAREST, fill=None)
        assert_close(ours, reference)
        if name not in ("Identity", "AutoContrast", "Equalize") and magnitude not in (0.0, 8, 255.0):
            assert not np.array_equal(np.asarray(ours), CROP), f"{name} at {magnitude} changed nothing"


def test_the_magnitude_tables_are_torchvisions():
    from torchvision.transforms import RandAugment, TrivialAugmentWide

    for space, policy in (("randaugment", RandAugment()), ("trivialaugment", TrivialAugmentWide())):
        theirs = policy._augmentation_space(31, (48, 64)) if space == "randaugment" else policy._augmentation_space(31)
        ours = SPACES[space]
        assert set(theirs) == set(ours)
        for name, (values, signed) in theirs.items():
            assert np.allclose(ours[name]((64, 48)), values.numpy(), atol=1e-4), name
            assert signed == (name in augment._SIGNED), name


def _full_crop(data: bytes) -> np.ndarray:
    """The train path with the crop box forced to the whole image and no other randomness."""
    cfg = AugmentConfig(scale=(1.0, 1.0), ratio=(0.7, 1.45), hflip=0.0)
    batch = {
        schema.KEY: np.array(["k"], dtype=object),
        schema.IMAGE: np.array([data], dtype=object),
        schema.LABEL: np.zeros(1, dtype=np.int32),
        schema.SOURCE: np.array(["src"], dtype=object),
        schema.SHARD: np.array(["train-000000"], dtype=object),
        schema.ERROR: np.array([""], dtype=object),
    }
    out = build_train_transform(Preprocessing(crop_size=24, resize_size=28), cfg)(batch)
    assert list(out[schema.ERROR]) == [""]
    return out[schema.PIXELS][0].astype(int)


def _reference(img: Image.Image) -> np.ndarray:
    return np.asarray(img.resize((24, 24), Image.Resampling.BILINEAR)).astype(int)


def test_odd_modes_through_the_train_path_match_a_reference_conversion():
    pixels = gradient_array(40, 30, seed=5)
    as_16_bit = pixels[..., 0].astype(np.uint16) * 257
    cases = {
        "CMYK JPEG": (encode(pixels, "JPEG", mode="CMYK", quality=95), lambda b: Image.open(b).convert("RGB"), 4.0),
        "palette PNG": (encode(pixels, "PNG", mode="P"), lambda b: Image.open(b).convert("RGB"), 0.5),
        "16-bit PNG": (
            encode(Image.fromarray(as_16_bit), "PNG"),
            lambda b: Image.fromarray(np.repeat((as_16_bit / 257.0 + 0.5).astype(np.uint8)[..., None], 3, 2)),
            0.5,
        ),
        "EXIF orientation 6": (
            exif_jpeg(pixels, 6),
            lambda b: ImageOps.exif_transpose(Image.open(b)).convert("RGB"),
            3.0,
        ),
    }
    for name, (data, convert, tolerance) in cases.items():
        reference = _reference(convert(io.BytesIO(data)))
        ours = _full_crop(data)
        assert np.abs(ours - reference).mean() <= tolerance, f"{name}: {np.abs(ours - reference).mean():.2f}"
    # and the reference would catch a wrong turn or a dropped channel
    sideways = _reference(Image.open(io.BytesIO(cases["EXIF orientation 6"][0])).convert("RGB"))
    upright = _reference(ImageOps.exif_transpose(Image.open(io.BytesIO(cases["EXIF orientation 6"][0]))))
    assert np.abs(sideways - upright).mean() > 10
    assert torch.tensor(_full_crop(cases["CMYK JPEG"][0])).float().std(dim=(0, 1)).min() > 5
