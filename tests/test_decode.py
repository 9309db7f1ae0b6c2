"""Decode: every input kind ends as upright RGB uint8; bad input is `ImageRejected`, never a crash."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from images import DAMAGED_ACCEPTED, bad_files, bomb_png, damaged_files, encode, exif_jpeg, gradient_array, jpeg_bytes
from PIL import Image, ImageOps

from pipeline import features, predict
from pipeline.augment import EvalTransform, TrainTransform
from pipeline.config import (
    AugmentConfig,
    ClassifyConfig,
    FeaturesConfig,
    LoaderConfig,
    ModelConfig,
    PrepareConfig,
    StorageConfig,
)
from pipeline.decode import (
    ImageRejected,
    crop_region,
    decode_crop,
    decode_rgb,
    decode_scaled,
    inspect_image,
    read_header,
    resize_array,
)
from pipeline.loader import TrainInput
from pipeline.prepare import run as prepare
from pipeline.preprocessing import Preprocessing
from pipeline.sources import open_images


def pillow_rgb(data: bytes) -> np.ndarray:
    """The reference: Pillow's full decode, EXIF-upright, as RGB."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def test_jpeg_fast_path_gives_pillows_pixels():
    data = encode(gradient_array(96, 64), "JPEG", quality=90)
    out = decode_rgb(data)
    assert out.shape == (64, 96, 3) and out.dtype == np.uint8
    assert np.array_equal(out, pillow_rgb(data))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    stored = gradient_array(40, 24, seed=orientation)
    data = exif_jpeg(stored, orientation)
    out = decode_rgb(data)
    expected = pillow_rgb(data)
    assert out.shape == expected.shape == ((24, 40, 3) if orientation < 5 else (40, 24, 3))
    assert np.array_equal(out, expected)
    head = read_header(data)
    assert (head.width, head.height) == (out.shape[1], out.shape[0])


@pytest.mark.parametrize(
    "fmt,mode",
    [
        ("JPEG", "L"),  # grayscale JPEG: libjpeg-turbo expands it to RGB
        ("JPEG", "CMYK"),  # CMYK JPEG (Adobe-inverted): through Pillow
        ("PNG", "RGBA"),  # opaque alpha: the same as dropping it
        ("PNG", "LA"),
        ("PNG", "P"),
        ("PNG", "L"),
        ("WEBP", "RGB"),
    ],
)
def test_every_mode_ends_as_rgb(fmt, mode):
    data = encode(gradient_array(32, 20, seed=3), fmt, mode=mode)
    assert Image.open(io.BytesIO(data)).mode == mode
    out = decode_rgb(data)
    assert out.shape == (20, 32, 3) and out.dtype == np.uint8
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.abs(out.astype(int) - reference).max() <= 1
    if mode in ("L", "LA"):
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_transparent_pixels_go_on_white():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent
    out = decode_rgb(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (out[0, 0] == (255, 0, 0)).all()
    assert (out[7, 7] == (255, 255, 255)).all()


def test_palette_with_transparency_goes_on_white():
    img = Image.new("P", (6, 6), 1)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    out = decode_rgb(encode(img, "PNG", transparency=0))
    assert (out[0, 0] == (255, 255, 255)).all()
    assert (out[5, 5] == (0, 0, 255)).all()


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    out = decode_rgb(encode(img, "PNG"))
    assert out.shape == (4, 3, 3)
    assert list(out[0, :, 0]) == [0, 128, 255]


def test_jpeg_draft_decodes_at_a_coarser_dct_scale():
    data = encode(gradient_array(256, 128), "JPEG", quality=95)
    head = read_header(data)
    assert decode_scaled(head, 4).shape == (32, 64, 3)
    # min_size keeps the short side at least that big: 128 / 2 = 64 >= 50, 128 / 4 = 32 < 50.
    assert decode_rgb(data, min_size=50).shape == (64, 128, 3)
    assert decode_rgb(data, min_size=500).shape == (128, 256, 3)


def test_crop_region_decodes_at_the_scale_the_output_needs():
    data = encode(gradient_array(400, 240), "JPEG", quality=95)
    head = read_header(data)
    # A 200x200 box for a 48 output: 4x too many pixels -> 1/4 scale, a 50x50 region.
    assert crop_region(head, (100, 20, 300, 220), 48).shape == (50, 50, 3)
    # A 60x60 box for a 48 output: decoded at full scale.
    assert crop_region(head, (0, 0, 60, 60), 48).shape == (60, 60, 3)
    full = pillow_rgb(data)[20:220, 100:300]
    reference = np.asarray(Image.fromarray(full).resize((48, 48), Image.Resampling.BILINEAR))
    assert np.abs(decode_crop(head, (100, 20, 300, 220), 48).astype(int) - reference).mean() < 3


@pytest.mark.parametrize("interpolation,tolerance", [("bilinear", 1), ("bicubic", 2), ("nearest", 0)])
def test_resize_matches_pillow(interpolation, tolerance):
    src = gradient_array(70, 50, seed=5)
    resample = {
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "nearest": Image.Resampling.NEAREST,
    }
    for size in [(20, 30), (100, 90)]:  # down and up
        out = resize_array(src, size, interpolation)
        reference = np.asarray(Image.fromarray(src).resize((size[1], size[0]), resample[interpolation]))
        assert out.shape == (*size, 3)
        assert np.abs(out.astype(int) - reference).max() <= tolerance


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_inputs_are_rejected_with_a_reason(name):
    data = bad_files()[name]
    with pytest.raises(ImageRejected) as info:
        decode_rgb(data)
    assert str(info.value)
    with pytest.raises(ImageRejected):
        inspect_image(data)


def test_truncated_jpeg_body_is_rejected_by_both_decoders():
    data = encode(gradient_array(200, 150), "JPEG", quality=90)
    cut = data[: len(data) * 2 // 3]
    head = read_header(cut)  # the header is intact
    with pytest.raises(ImageRejected, match="undecodable image"):
        decode_scaled(head)
    with pytest.raises(ImageRejected, match="undecodable image"):
        inspect_image(cut)


def test_pixel_limit_guards_against_decompression_bombs():
    data = bomb_png(4000, 4000)
    with pytest.raises(ImageRejected, match="over the limit of 1000000"):
        read_header(data, max_pixels=1_000_000)
    assert inspect_image(encode(gradient_array(40, 30), "PNG"), max_pixels=1200) == (40, 30)


def test_recoverable_jpeg_damage_decodes_as_pillow_does():
    # libjpeg warns ("extraneous bytes before marker"); simplejpeg refuses, Pillow decodes:
    # what prepare's check accepted must not be rejected at training time.
    data = encode(gradient_array(64, 48), "JPEG", quality=90)
    scan = data.index(b"\xff\xda")
    damaged = data[:scan] + b"\x00\x00\x00" + data[scan:]
    inspect_image(damaged)
    assert np.array_equal(decode_rgb(damaged), pillow_rgb(damaged))


def test_crop_box_follows_the_scale_pillow_really_decoded_at():
    # CMYK goes through Pillow, whose draft keeps 375 rows at full scale where 1/2 was asked.
    data = encode(gradient_array(500, 375), "JPEG", mode="CMYK", quality=90)
    head = read_header(data)
    region = crop_region(head, (0, 0, 500, 375), 100)
    assert region.shape == (375, 500, 3)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((100, 100), Image.Resampling.BILINEAR))
    assert np.abs(decode_crop(head, (0, 0, 500, 375), 100).astype(int) - reference).max() <= 1


def verdict(decode, data: bytes) -> str:
    """ "ok", or the reject reason; a decoder warning that escapes to the console fails the test."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            decode(data)
            result = "ok"
        except ImageRejected as exc:
            result = str(exc)
    assert not caught, [str(w.message) for w in caught]
    return result


def decode_paths() -> dict:
    """Every way a job decodes an image: prepare's check, the eval transform (features, classify, validation) at
    the coarsest and at full DCT scale, the train transform (random crops: several scales), and plain decode."""

    def train(data: bytes) -> None:
        for key in ("a", "b", "c", "d"):
            TrainTransform(16, "bilinear", AugmentConfig(scale=(0.05, 1.0))).image(
                data, key, 0, np.empty((16, 16, 3), np.uint8)
            )

    return {
        "prepare": inspect_image,
        "eval 1/8": lambda d: EvalTransform(16, 16, "bilinear").image(d, np.empty((16, 16, 3), np.uint8)),
        "eval 1/1": lambda d: EvalTransform(120, 128, "bicubic").image(d, np.empty((120, 120, 3), np.uint8)),
        "train": train,
        "decode_rgb": decode_rgb,
        "decode_rgb 1/4": lambda d: decode_rgb(d, min_size=32),
    }


def test_every_decode_path_gives_a_damaged_file_the_same_verdict(capfd):
    files = damaged_files()
    verdicts = {name: {path: verdict(fn, data) for path, fn in decode_paths().items()} for name, data in files.items()}
    differ = {name: v for name, v in verdicts.items() if len(set(v.values())) != 1}
    assert not differ
    reasons = {name: v["prepare"] for name, v in verdicts.items()}
    assert {n for n, r in reasons.items() if r == "ok"} == DAMAGED_ACCEPTED
    assert len(files) == 35 and len(DAMAGED_ACCEPTED) == 7
    # Reasons name what went wrong, in words that do not depend on the decoder's scale or buffer.
    for ext in ("jpg", "progressive.jpg", "png", "gif"):
        assert reasons[f"cut50.{ext}"] == "undecodable image: image file is truncated"
    assert reasons["cut50.webp"] == "unreadable image header: could not create decoder object"
    assert reasons["corrupt.png"] == "undecodable image: unrecognized data stream contents when reading image file"
    assert reasons["corrupt.gif"] == "undecodable image: broken data stream when reading image file"
    assert reasons["bad_ihdr_crc.png"] == reasons["text.png"] == "not an image: no known image format in the bytes"
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["bomb.png"].startswith("image is 40000x40000 = 1600000000 pixels, over the limit of 89478485")
    # Pillow's warnings about a rejected file travel in its reason, once each, not to the console.
    assert reasons["corrupt.deflate.tif"] == (  # libtiff's own message, which it used to print to stderr
        "undecodable image: decoder error -2 (decoder warnings: ZIPDecode: Decoding error at scanline 0, "
        "incorrect data check)"
    )
    assert reasons["cut50.deflate.tif"] == (
        "not an image: no known image format in the bytes "
        "(decoder warnings: Corrupt EXIF data. Expecting to read 2 bytes but only got 0.)"
    )
    assert capfd.readouterr().err == ""  # nothing on the console, from Python or from the C decoders


@pytest.mark.timeout(300)
def test_every_job_rejects_the_damaged_set_with_the_same_reasons(ray_session, tmp_path):
    """prepare, features and classify over the raw files, and the training input (train and eval transforms):
    the same files rejected, each with the same reason, in errors.jsonl or the dropped-sample log."""
    raw = tmp_path / "raw"
    (raw / "x").mkdir(parents=True)
    damaged = damaged_files()
    for name, data in {**damaged, **{f"good{i}.jpg": jpeg_bytes(seed=i) for i in range(3)}}.items():
        (raw / "x" / name).write_bytes(data)
    expected = {name: verdict(inspect_image, data) for name, data in damaged.items()}
    expected = {name: reason for name, reason in expected.items() if reason != "ok"}
    assert len(expected) == 28

    def by_file(rows) -> dict[str, str]:
        return {r["source"].rsplit("/", 1)[1]: r["reason"] for r in rows}

    def errors(out) -> dict[str, str]:
        return by_file(json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines())

    storage_cfg = StorageConfig()
    manifest = prepare(
        PrepareConfig(source=str(raw), output=str(tmp_path / "prep"), split={"train": 1.0}, max_reject_fraction=1.0),
        storage_cfg,
    )
    assert (manifest["inputs"], manifest["samples"], manifest["rejected"]) == (38, 10, 28)
    assert errors(tmp_path / "prep") == expected

    feats = FeaturesConfig(
        source=str(raw), output=str(tmp_path / "feats"), source_kind="images", batch_size=8, actors=1
    )
    result = features.run(ModelConfig(), feats, storage_cfg)
    assert (result["inputs"], result["rows"], result["rejected"]) == (38, 10, 28)
    assert errors(tmp_path / "feats") == expected

    cfg = ClassifyConfig(source=str(raw), output=str(tmp_path / "preds"), source_kind="images", batch_size=8, actors=1)
    result = predict.run(ModelConfig(), cfg, storage_cfg)
    assert (result["inputs"], result["rows"], result["rejected"]) == (38, 10, 28)
    assert errors(tmp_path / "preds") == expected

    images = open_images(str(raw), kind="images")
    loader = LoaderConfig(batch_size=4, shuffle_buffer=0, actors=1, actor_cpus=0.5)
    train = TrainInput(images, Preprocessing(crop_size=16, resize_size=18), AugmentConfig(), loader, val=images)
    assert len(train.dataset(epoch=0).take_all()) == 10 and len(train.eval_dataset().take_all()) == 10
    dropped = train.dropped()
    assert dropped["dropped"] == {0: 28, -1: 28}
    pairs = [(e["source"].rsplit("/", 1)[1], e["reason"]) for e in dropped["examples"]]
    assert len(pairs) == 56 and set(pairs) == set(expected.items())  # each file twice, with one reason


def _with_app1(data: bytes, payload: bytes) -> bytes:
    return data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def test_a_damaged_exif_block_keeps_the_image_and_is_logged_once(caplog, monkeypatch):
    from pipeline import decode

    monkeypatch.setattr(decode, "_EXIF_LOGGED", False)
    stored = gradient_array(32, 16, seed=3)
    plain = encode(stored, "JPEG", quality=95)
    # A TIFF header whose first IFD lies past the end of the block: Pillow warns "Corrupt EXIF data".
    damaged = [_with_app1(plain, b"Exif\x00\x00MM\x00\x2a\xff\xff\xff" + bytes([0xF0 - n])) for n in range(3)]
    with caplog.at_level("WARNING", logger="imgpipe"):
        for data in damaged:
            assert np.array_equal(decode_rgb(data), decode_rgb(plain))  # kept, as stored
    lines = [r.getMessage() for r in caplog.records if "EXIF" in r.getMessage()]
    assert len(lines) == 1 and "Corrupt EXIF data" in lines[0] and "orientation 1 (1: as stored)" in lines[0]
