"""CIFAR-10 and MNIST, built from known pictures (not noise): every sample that `prepare` writes
comes back pixel-equal under its own key, with its own label. A wrong CHW->HWC transpose, a
swapped channel, a shifted index or a misread label each fails here."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import PrepareConfig, StorageConfig
from pipeline.prepare import run

pytestmark = pytest.mark.timeout(240)


def known_pictures(n: int, size: int, channels: int) -> np.ndarray:
    """n distinct, asymmetric pictures: a bright bar whose place and colour encode the index, on
    a gradient, so that any transpose, flip, channel swap or off-by-one changes the pixels."""
    y, x = np.mgrid[0:size, 0:size]
    out = np.zeros((n, size, size, channels), dtype=np.uint8)
    for i in range(n):
        base = (x * 5 + y * 2 + i * 7) % 200
        for c in range(channels):
            plane = (base + 40 * c).astype(np.uint8)
            plane[i % size, : 1 + i % (size - 1)] = 255 - 30 * c  # a bar in row i, i+1 pixels long
            out[i, ..., c] = plane
    return out


def samples(output: Path, manifest: dict) -> dict[str, tuple[np.ndarray, int]]:
    """key -> (pixels, label) of every sample in the prepared shards."""
    found: dict[str, dict] = {}
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            with tarfile.open(output / shard["path"]) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {
        key: (np.asarray(Image.open(io.BytesIO(m["png"]))), int(m["cls"]))
        for key, m in found.items()
        if "png" in m  # every sample has one; a missing one fails the count below
    }


def test_cifar10_samples_come_back_pixel_equal_with_their_labels(ray_session, tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    pictures = known_pictures(30, 32, 3)
    labels = [(7 * i + 3) % 10 for i in range(30)]  # not the index modulo 10
    batches = {"data_batch_1": range(0, 20), "test_batch": range(20, 30)}
    for name, rows in batches.items():
        # CIFAR-10's row layout: 1024 red, then 1024 green, then 1024 blue values (CHW, row-major).
        data = pictures[list(rows)].transpose(0, 3, 1, 2).reshape(len(rows), 3072)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [labels[i] for i in rows]}, f, protocol=2)
    manifest = run(PrepareConfig(source=str(root), output=str(tmp_path / "out"), split={"train": 1.0}), StorageConfig())
    got = samples(tmp_path / "out", manifest)
    assert len(got) == 30 == manifest["samples"]
    for name, rows in batches.items():
        for offset, i in enumerate(rows):
            pixels, label = got[f"{name}_{offset:05d}"]
            assert label == labels[i], f"{name}_{offset:05d}"
            assert np.array_equal(pixels, pictures[i]), f"{name}_{offset:05d}: pixels differ"


def test_mnist_samples_come_back_pixel_equal_with_their_labels(ray_session, tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    pictures = known_pictures(24, 28, 1)[..., 0]
    labels = np.array([(3 * i + 1) % 10 for i in range(24)], dtype=np.uint8)  # every digit
    parts = {"train": range(0, 16), "t10k": range(16, 24)}
    for prefix, rows in parts.items():
        n = len(rows)
        header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + pictures[list(rows)].tobytes()))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(  # one gzipped, one plain: both are read
            bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels[list(rows)].tobytes()
        )
    manifest = run(PrepareConfig(source=str(root), output=str(tmp_path / "out"), split={"train": 1.0}), StorageConfig())
    got = samples(tmp_path / "out", manifest)
    assert len(got) == 24 == manifest["samples"] and manifest["splits"]["test"]["samples"] == 8
    for prefix, rows in parts.items():
        for offset, i in enumerate(rows):
            pixels, label = got[f"{prefix}_{offset:05d}"]
            assert label == labels[i]
            # grey pictures may come back as L or as RGB with three equal channels
            grey = pixels if pixels.ndim == 2 else pixels[..., 0]
            assert pixels.ndim == 2 or (np.array_equal(pixels[..., 0], pixels[..., 1]))
            assert np.array_equal(grey, pictures[i]), f"{prefix}_{offset:05d}: pixels differ"
