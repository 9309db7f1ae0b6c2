"""Transform presets: torchvision-equal eval geometry, reproducible train randomness, error rows."""

from __future__ import annotations

import io

import numpy as np
import pytest
from images import encode, exif_jpeg, gradient_array, jpeg_bytes
from PIL import Image
from torchvision import transforms as T

from pipeline import schema
from pipeline.augment import build_eval_transform, build_train_transform, random_resized_crop_box, sample_rng
from pipeline.config import AugmentConfig
from pipeline.preprocessing import Preprocessing

PREP = Preprocessing(crop_size=24, resize_size=28)


def reader_batch(images: list[bytes], errors: list[str] | None = None) -> dict[str, np.ndarray]:
    """A batch as `sources.open_images` yields it."""
    n = len(images)
    return {
        schema.KEY: np.array([f"k{i}" for i in range(n)], dtype=object),
        schema.IMAGE: np.array(images, dtype=object),
        schema.LABEL: np.arange(n, dtype=np.int32),
        schema.SOURCE: np.array([f"src{i}" for i in range(n)], dtype=object),
        schema.SHARD: np.array(["train-000000"] * n, dtype=object),
        schema.ERROR: np.array(errors or [""] * n, dtype=object),
    }


def torchvision_eval(data: bytes, prep: Preprocessing) -> np.ndarray:
    mode = getattr(T.InterpolationMode, prep.interpolation.upper())
    pipe = T.Compose([T.Resize(prep.resize_size, interpolation=mode), T.CenterCrop(prep.crop_size)])
    return np.asarray(pipe(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize(
    "width,height,crop,resize,interp",
    [
        (120, 90, 56, 64, "bilinear"),
        (90, 120, 56, 64, "bicubic"),
        (97, 61, 32, 36, "bilinear"),
        (20, 15, 32, 36, "bilinear"),
    ],
)
def test_eval_matches_torchvision_resize_then_centre_crop(width, height, crop, resize, interp):
    data = encode(gradient_array(width, height), "PNG")
    prep = Preprocessing(crop_size=crop, resize_size=resize, interpolation=interp)
    out = build_eval_transform(prep)(reader_batch([data]))
    assert out[schema.PIXELS].shape == (1, crop, crop, 3)
    assert out[schema.PIXELS].dtype == np.uint8
    assert list(out[schema.ERROR]) == [""]
    diff = np.abs(out[schema.PIXELS][0].astype(int) - torchvision_eval(data, prep).astype(int))
    assert diff.max() <= 1  # same geometry and filter; only rounding differs


def test_eval_draft_decode_stays_close_to_full_decode():
    # 8x the output: the JPEG decodes at 1/4 scale, and the result still matches torchvision's.
    data = encode(gradient_array(512, 384), "JPEG", quality=95)
    prep = Preprocessing(crop_size=48, resize_size=56)
    out = build_eval_transform(prep)(reader_batch([data]))
    diff = np.abs(out[schema.PIXELS][0].astype(int) - torchvision_eval(data, prep).astype(int))
    assert diff.mean() < 3.0


def test_eval_keeps_rows_drops_bytes_and_marks_bad_samples():
    good = jpeg_bytes(96, 64, seed=1)
    batch = reader_batch([good, good[: len(good) * 2 // 3], b"", good], errors=["", "", "", "cannot read: gone"])
    out = build_eval_transform(Preprocessing(crop_size=16, resize_size=20))(batch)
    assert schema.IMAGE not in out
    assert list(out[schema.KEY]) == ["k0", "k1", "k2", "k3"]
    assert list(out[schema.LABEL]) == [0, 1, 2, 3]
    errors = list(out[schema.ERROR])
    assert errors[0] == ""
    assert errors[1].startswith("undecodable image")
    assert errors[2] == "empty file (0 bytes)"
    assert errors[3] == "cannot read: gone"
    assert out[schema.PIXELS][0].max() > 0
    assert not out[schema.PIXELS][1:].any()


def photo_batch(n: int = 6, size=(64, 48)) -> dict[str, np.ndarray]:
    return reader_batch([encode(gradient_array(*size, seed=i), "JPEG", quality=90) for i in range(n)])


PRESETS = {
    "standard": AugmentConfig(),
    "affine": AugmentConfig(rotate=20, shear=10, zoom=(0.8, 1.2), vflip=0.5),
    "jitter": AugmentConfig(color_jitter=0.4),
    "randaugment": AugmentConfig(auto_augment="randaugment", auto_augment_magnitude=15),
    "trivialaugment": AugmentConfig(auto_augment="trivialaugment"),
    "none": AugmentConfig(preset="none"),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_gives_fixed_size_uint8(name):
    fn = build_train_transform(PREP, PRESETS[name])
    out = fn(photo_batch())
    assert out[schema.PIXELS].shape == (6, 24, 24, 3)
    assert out[schema.PIXELS].dtype == np.uint8
    assert list(out[schema.ERROR]) == [""] * 6
    if PRESETS[name].auto_augment == "none":
        assert out[schema.PIXELS].reshape(6, -1).std(axis=1).min() > 1  # real image content
    else:  # the same crops as the standard preset, then changed by the policy's ops
        standard = build_train_transform(PREP, AugmentConfig())(photo_batch())[schema.PIXELS]
        assert sum(not np.array_equal(a, b) for a, b in zip(out[schema.PIXELS], standard)) >= 4


@pytest.mark.parametrize("name", ["standard", "affine", "jitter", "randaugment", "trivialaugment"])
def test_same_seed_epoch_key_gives_the_same_pixels_in_any_order(name):
    batch = photo_batch()
    first = build_train_transform(PREP, PRESETS[name])(batch, epoch=3)[schema.PIXELS]
    order = np.array([5, 3, 1, 0, 2, 4])
    shuffled = {k: v[order] for k, v in batch.items()}
    again = build_train_transform(PREP, PRESETS[name])(shuffled, epoch=3)[schema.PIXELS]
    assert np.array_equal(first[order], again)
    other_epoch = build_train_transform(PREP, PRESETS[name])(batch, epoch=4)[schema.PIXELS]
    assert sum(not np.array_equal(a, b) for a, b in zip(first, other_epoch)) >= 5
    other_seed = build_train_transform(PREP, PRESETS[name].model_copy(update={"seed": 1}))(batch, epoch=3)[
        schema.PIXELS
    ]
    assert sum(not np.array_equal(a, b) for a, b in zip(first, other_seed)) >= 5


def test_epoch_can_be_fixed_at_build_time():
    batch = photo_batch(3)
    fixed = build_train_transform(PREP, AugmentConfig(), epoch=7)(batch)[schema.PIXELS]
    assert np.array_equal(fixed, build_train_transform(PREP, AugmentConfig())(batch, epoch=7)[schema.PIXELS])


def test_horizontal_flip_really_mirrors():
    batch = photo_batch(4)
    plain = build_train_transform(PREP, AugmentConfig(hflip=0.0))(batch, epoch=0)[schema.PIXELS]
    mirrored = build_train_transform(PREP, AugmentConfig(hflip=1.0))(batch, epoch=0)[schema.PIXELS]
    assert np.array_equal(mirrored, plain[:, :, ::-1])
    flipped = build_train_transform(PREP, AugmentConfig(hflip=0.0, vflip=1.0))(batch, epoch=0)[schema.PIXELS]
    assert np.array_equal(flipped, plain[:, ::-1])


def test_full_crop_without_augmentation_is_the_resized_image():
    # scale = ratio = whole image, no flip: the train crop is the image resized, as torchvision.
    data = encode(gradient_array(60, 60), "PNG")
    cfg = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    out = build_train_transform(PREP, cfg)(reader_batch([data]))[schema.PIXELS][0]
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((24, 24), Image.Resampling.BILINEAR))
    assert np.abs(out.astype(int) - reference).max() <= 1


def test_random_resized_crop_box_follows_torchvision_bounds():
    rng = sample_rng(0, 0, "k")
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(500, 375, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        assert 0.08 * 0.9 <= w * h / (500 * 375) <= 1.0
    # Impossible aspect ratios fall back to the centred, ratio-clamped whole image.
    assert random_resized_crop_box(100, 10, (0.9, 1.0), (1.0, 1.0), rng) == (45, 0, 55, 10)


@pytest.mark.parametrize("size", [(8, 6), (24, 24), (30, 10)])
def test_images_smaller_than_the_crop_are_upscaled(size):
    batch = reader_batch([encode(gradient_array(*size), "PNG")])
    for fn in (build_train_transform(PREP, AugmentConfig()), build_eval_transform(PREP)):
        out = fn(batch)
        assert out[schema.PIXELS].shape == (1, 24, 24, 3)
        assert list(out[schema.ERROR]) == [""]
        assert out[schema.PIXELS].std() > 1


def test_odd_inputs_all_end_as_rgb_crops():
    pixels = gradient_array(40, 30)
    inputs = [
        encode(pixels, "JPEG", mode="L"),
        encode(pixels, "JPEG", mode="CMYK"),
        encode(pixels, "PNG", mode="RGBA"),
        encode(pixels, "PNG", mode="P"),
        encode(Image.fromarray((pixels[..., 0].astype(np.uint16) * 257)), "PNG"),  # 16-bit
        exif_jpeg(pixels, 6),
    ]
    for fn in (build_train_transform(PREP, AugmentConfig()), build_eval_transform(PREP)):
        out = fn(reader_batch(inputs))
        assert list(out[schema.ERROR]) == [""] * len(inputs)
        assert out[schema.PIXELS].shape == (len(inputs), 24, 24, 3)
        gray = out[schema.PIXELS][0]
        assert np.array_equal(gray[..., 0], gray[..., 2])
        assert all(out[schema.PIXELS][i].std() > 1 for i in range(len(inputs)))


def test_exif_rotated_input_is_cropped_upright():
    # A portrait stored as landscape + orientation 6: the eval crop must see the portrait.
    upright = gradient_array(30, 60, seed=2)  # 30 wide, 60 tall
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # rotated 90 degrees counter-clockwise
    rotated = build_eval_transform(PREP)(reader_batch([exif_jpeg(stored, 6)]))[schema.PIXELS][0]
    plain = build_eval_transform(PREP)(reader_batch([encode(upright, "JPEG", quality=95)]))[schema.PIXELS][0]
    assert np.abs(rotated.astype(int) - plain.astype(int)).mean() < 4


def test_a_corrupt_sample_mid_batch_becomes_an_error_row():
    batch = photo_batch(5)
    images = list(batch[schema.IMAGE])
    images[2] = images[2][: len(images[2]) // 2]
    batch[schema.IMAGE] = np.array(images, dtype=object)
    out = build_train_transform(PREP, AugmentConfig())(batch, epoch=0)
    errors = list(out[schema.ERROR])
    assert [bool(e) for e in errors] == [False, False, True, False, False]
    assert "undecodable" in errors[2]
    assert not out[schema.PIXELS][2].any()
    clean = build_train_transform(PREP, AugmentConfig())(photo_batch(5), epoch=0)[schema.PIXELS]
    assert np.array_equal(out[schema.PIXELS][[0, 1, 3, 4]], clean[[0, 1, 3, 4]])
