"""Tiny generated test data: real JPEG/PNG bytes, and the bad inputs a real bucket holds."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(
    width: int = 48, height: int = 32, seed: int = 0, color: tuple | None = None, quality: int = 90
) -> bytes:
    """A small JPEG: a colour (class signal) plus noise (so images differ)."""
    rng = np.random.default_rng(seed)
    base = np.array(color if color is not None else rng.integers(0, 256, 3), dtype=np.int16)
    noise = rng.integers(-30, 31, (height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(width: int = 32, height: int = 32, mode: str = "RGB", seed: int = 0) -> bytes:
    """A small PNG in any Pillow mode."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


CLASS_COLORS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40), (40, 220, 220)]


def bad_files() -> dict[str, bytes]:
    """One of each kind of bad input, by the reason prepare must give."""
    good = jpeg_bytes(64, 48, seed=99)
    return {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "not_an_image": b"this is a text file with a .jpg extension\n" * 4,
        "garbage_header": b"\xff\xd8\xff\xe0" + b"\x00" * 64,
    }


def bomb_png(width: int = 4000, height: int = 4000) -> bytes:
    """A PNG whose header promises many pixels but compresses to a few KB."""
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_imagefolder(root: Path, per_class: dict[str, int], size=(48, 32), seed: int = 0) -> list[Path]:
    """An ImageFolder tree `<root>/<class>/<class>_<i>.jpg`; class colour = class signal."""
    paths = []
    for c, (name, count) in enumerate(sorted(per_class.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            p = root / name / f"{name}_{i:04d}.jpg"
            p.write_bytes(
                jpeg_bytes(*size, seed=seed * 100_000 + c * 10_000 + i, color=CLASS_COLORS[c % len(CLASS_COLORS)])
            )
            paths.append(p)
    return paths


def upload_tree(s3, bucket: str, root: Path, prefix: str) -> int:
    """Upload every file under `root` to s3://bucket/prefix/..., keeping relative paths."""
    n = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}", Body=path.read_bytes())
        n += 1
    return n


def prepare_without_ray(source: str, output: str, shard_max_samples: int) -> dict:
    """`imgpipe prepare` of an ImageFolder (local or s3://) with its own shard writer, in this process and
    without Ray, for tests whose Ray is busy elsewhere; returns the manifest."""
    import json

    from pipeline import storage
    from pipeline.config import PrepareConfig
    from pipeline.layouts import discover
    from pipeline.prepare import assign_splits
    from pipeline.shards import build_manifest, plan_shards, write_shard

    cfg = PrepareConfig(source=source, output=output, shard_max_samples=shard_max_samples)
    src, out = storage.resolve(source), storage.resolve(output)
    found = discover(src, "imagefolder", cfg.extensions, cfg.label_pattern, None)
    splits = assign_splits(found.inputs, cfg.split, cfg.seed, False)
    plans = [
        p for split, items in splits.items() for p in plan_shards(split, items, shard_max_samples, 2**30, found.classes)
    ]
    results = [write_shard(p, src.fs, out, found.classes, cfg.max_pixels, None) for p in plans]
    rejected = sum(len(r["rejects"]) for r in results)
    manifest = build_manifest(
        source=src.uri,
        layout=found.layout,
        seed=cfg.seed,
        ratios=cfg.split,
        classes=found.classes,
        results=results,
        inputs=len(found.inputs),
        rejected=rejected,
        ignored=[],
    )
    storage.write_bytes(out.join("classes.json"), json.dumps({"classes": found.classes}).encode())
    storage.write_bytes(out.join("manifest.json"), json.dumps(manifest).encode())
    return manifest


def gradient_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth (H, W, 3) uint8 content, so resampling differences stay small and comparable."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    planes = [128 + 100 * np.sin(x / 7.0 + seed), 128 + 100 * np.cos(y / 5.0), 128 + 60 * np.sin((x + y) / 11.0)]
    return np.clip(np.stack(planes, -1) + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray | Image.Image, fmt: str = "PNG", mode: str | None = None, **save_args) -> bytes:
    """Encode an array or image in `fmt`, converted to `mode` first (e.g. "CMYK", "P", "LA")."""
    img = Image.fromarray(pixels) if isinstance(pixels, np.ndarray) else pixels
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def exif_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose stored pixels are `pixels` and whose EXIF says `orientation`."""
    img = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def write_shards(
    root: Path, splits: dict[str, list[tuple[str, bytes, int]]], per_shard: int, classes: list[str]
) -> dict:
    """A prepared dataset as `imgpipe prepare` lays it out: `<split>-NNNNNN.tar` WebDataset shards
    of (key, image bytes, label) samples, `<key>.jpg` + `<key>.cls`, and manifest.json."""
    import hashlib
    import json

    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    manifest = {"classes": classes, "splits": {}}
    for split, samples in splits.items():
        shards = []
        for n, start in enumerate(range(0, len(samples), per_shard)):
            name = f"{split}-{n:06d}.tar"
            chunk = samples[start : start + per_shard]
            with wds.TarWriter(str(root / name), encoder=False) as tar:
                for key, data, label in chunk:
                    tar.write({"__key__": key, "jpg": data, "cls": str(label).encode()})
            shards.append(
                {"path": name, "samples": len(chunk), "sha256": hashlib.sha256((root / name).read_bytes()).hexdigest()}
            )
        manifest["splits"][split] = {"shards": shards, "samples": len(samples)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def photo_jpeg(width: int = 500, height: int = 375, seed: int = 0, quality: int = 90) -> bytes:
    """A JPEG that compresses like a photo (smooth colour fields, texture, sensor noise), for
    benchmarks: pure noise decodes slower, and flat colour faster, than real photos."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    texture = rng.normal(0, 40, (height // 4 + 1, width // 4 + 1, 3)) + 128
    texture = Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    pixels = (
        np.asarray(field, np.float32) + np.asarray(texture, np.float32) - 128 + rng.normal(0, 4, (height, width, 3))
    )
    return encode(np.clip(pixels, 0, 255).astype(np.uint8), "JPEG", quality=quality)


IMAGENET_WNIDS = ("n01440764", "n01443537", "n02102040")  # tench, goldfish, English springer


def write_imagenet(root: Path, train_per_class: int = 6, val_per_class: int = 4) -> dict:
    """ImageNet as distributed (Kaggle's ILSVRC layout), tiny: `ILSVRC/Data/CLS-LOC/train/<wnid>/<wnid>_<n>.JPEG`,
    a flat `.../val/ILSVRC2012_val_<n>.JPEG`, `LOC_val_solution.csv` (`ImageId,PredictionString`: the wnid, then a
    box, repeated) and `LOC_synset_mapping.txt`. Three val rows are broken on purpose: one names a missing file,
    one an unknown wnid, and one file has no row. Returns the paths and the val image ids by wnid."""
    data = root / "ILSVRC" / "Data" / "CLS-LOC"
    for c, wnid in enumerate(IMAGENET_WNIDS):
        (data / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class):
            jpeg = jpeg_bytes(40, 32, seed=c * 1000 + i, color=CLASS_COLORS[c])
            (data / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg)
    (data / "val").mkdir(parents=True)
    rows, by_wnid = [], {w: [] for w in IMAGENET_WNIDS}
    for n in range(val_per_class * len(IMAGENET_WNIDS)):
        c = n % len(IMAGENET_WNIDS)
        image_id = f"ILSVRC2012_val_{n + 1:08d}"
        (data / "val" / f"{image_id}.JPEG").write_bytes(jpeg_bytes(40, 32, seed=50_000 + n, color=CLASS_COLORS[c]))
        wnid = IMAGENET_WNIDS[c]
        rows.append(f"{image_id},{wnid} 3 4 30 28 {wnid} 1 1 20 20 ")
        by_wnid[wnid].append(image_id)
    rows.append("ILSVRC2012_val_00000090,n01440764 1 2 3 4 ")  # names a file that is not there
    (data / "val" / "ILSVRC2012_val_00000091.JPEG").write_bytes(jpeg_bytes(40, 32, seed=91))
    rows.append("ILSVRC2012_val_00000091,n09999999 1 2 3 4 ")  # a wnid that is no class
    (data / "val" / "ILSVRC2012_val_00000092.JPEG").write_bytes(jpeg_bytes(40, 32, seed=92))  # no row names it
    rows = sorted(rows)  # the distributed file is not in id order either; sorting is as good a shuffle
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    names = ("tench, Tinca tinca", "goldfish, Carassius auratus", "English springer, English springer spaniel")
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(IMAGENET_WNIDS, names)))
    return {"train": data / "train", "val": data / "val", "val_ids": by_wnid}


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _flip(data: bytes, start: int, count: int = 24) -> bytes:
    """`data` with `count` bytes from `start` inverted: a corrupt stretch inside the compressed data."""
    out = bytearray(data)
    for i in range(start, min(start + count, len(out))):
        out[i] ^= 0xFF
    return bytes(out)


def damaged_files(width: int = 160, height: int = 128) -> dict[str, bytes]:
    """The shared set of damaged files, by name (the extension is what a bucket would show): JPEG, PNG, WebP, GIF
    and TIFF truncated at several points and with corrupt data, PNGs with bad CRCs, an empty file, text with an
    image extension, an image under another format's extension, and a decompression bomb's header. Every decode
    path must give each one the same verdict; `DAMAGED_ACCEPTED` are those the decoders conceal or repair."""
    import struct

    pixels = gradient_array(width, height, seed=5)
    good = {
        "jpg": encode(pixels, "JPEG", quality=90),
        "progressive.jpg": encode(pixels, "JPEG", quality=90, progressive=True),
        "png": encode(pixels, "PNG"),
        "webp": encode(pixels, "WEBP", quality=80),
        "gif": encode(pixels, "GIF"),
        "tif": encode(pixels, "TIFF"),
        "deflate.tif": encode(pixels, "TIFF", compression="tiff_adobe_deflate"),
    }
    files = {}
    for ext, data in good.items():
        for cut in (0.05, 0.5, 0.95):
            files[f"cut{int(cut * 100):02d}.{ext}"] = data[: int(len(data) * cut)]
        files[f"corrupt.{ext}"] = _flip(data, len(data) // 2)
    png = good["png"]
    idat = png.index(b"IDAT")
    (idat_len,) = struct.unpack(">I", png[idat - 4 : idat])
    files["bad_idat_crc.png"] = _flip(png, idat + 4 + idat_len, 4)
    files["bad_ihdr_crc.png"] = _flip(png, png.index(b"IHDR") + 4 + 13, 4)
    files["no_iend.png"] = png[: png.index(b"IEND") - 4]
    files["empty.jpg"] = b""
    files["text.png"] = b"this is a text file with a .png extension\n" * 4
    files["png_named.jpg"] = png  # another format than its extension says: decoders go by the bytes
    ihdr = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 0, 0, 0, 0)  # 1.6 G pixels promised, a few bytes given
    bomb_idat = __import__("zlib").compress(b"\x00" * 41)
    files["bomb.png"] = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", bomb_idat)
    files["bomb.png"] += _png_chunk(b"IEND", b"")
    return files


# What the decoders conceal or repair (and so every path accepts): flipped bytes inside JPEG, WebP and raw TIFF data
# (wrong pixels, no error), a bad CRC on PNG pixel data (Pillow checks CRCs only while reading the header), a PNG
# cut after its last pixel chunk, and a PNG named .jpg.
DAMAGED_ACCEPTED = frozenset(
    {"corrupt.jpg", "corrupt.progressive.jpg", "corrupt.webp", "corrupt.tif", "bad_idat_crc.png", "no_iend.png"}
    | {"png_named.jpg"}
)
