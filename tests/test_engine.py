"""`model.engine`: ONNX Runtime agrees with eager PyTorch on real photographs (top-1 agreement,
embedding cosine), the export is cached per node and reused, and the choice follows the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from images import gradient_array
from PIL import Image
from sklearn.datasets import load_sample_image

from pipeline import engine
from pipeline.features import Embedder
from pipeline.models import resolve_weights


def photo_crops(size: int = 224) -> np.ndarray:
    """48 eval-size crops of the two photographs scikit-learn ships (a temple, a flower), at several
    places and scales, plus a few generated pictures: (N, size, size, 3) uint8."""
    crops = []
    for name in ("china.jpg", "flower.jpg"):
        photo = Image.fromarray(load_sample_image(name))  # 640 x 427
        for scale in (1.0, 0.8, 0.6, 0.45):
            w, h = int(photo.width * scale), int(photo.height * scale)
            for left, top in ((0, 0), (photo.width - w, photo.height - h), ((photo.width - w) // 2, 0)):
                crops.append(photo.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC))
            crops.append(photo.crop((0, 0, w, h)).transpose(Image.FLIP_LEFT_RIGHT).resize((size, size)))
            crops.append(photo.resize((size, size)).rotate(20 * scale))
    crops += [Image.fromarray(gradient_array(size, size, seed=s)) for s in range(8)]
    return np.stack([np.asarray(c.convert("RGB")) for c in crops])


@pytest.fixture(scope="module")
def lite0():
    return resolve_weights("efficientnet_lite0", "DEFAULT")


def test_onnxruntime_agrees_with_eager_on_real_photos(lite0, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGPIPE_CACHE", str(tmp_path))
    pixels = photo_crops()
    eager = Embedder(lite0, "float32", engine="eager")
    ort = Embedder(lite0, "float32", engine="onnxruntime")
    assert (eager.engine, ort.engine) == ("eager", "onnxruntime")
    a, b = eager.embed(pixels), ort.embed(pixels)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert float(cosine.min()) >= 0.999, float(cosine.min())
    with torch.inference_mode():
        top_a, top_b = eager.model.classifier(a).argmax(1), eager.model.classifier(b).argmax(1)
    agreement = float((top_a == top_b).float().mean())
    assert agreement >= 0.999, agreement  # every one of the 48, in practice
    # the photographs are recognised, so the comparison is over meaningful predictions
    assert len(set(top_a.tolist())) >= 5


def test_the_export_is_made_once_and_loaded_after(lite0, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGPIPE_CACHE", str(tmp_path))
    Embedder(lite0, "float32", engine="onnxruntime")
    (exported,) = (tmp_path / "onnx").glob("*.onnx")
    assert "efficientnet_lite0" in exported.name and "224px" in exported.name
    first = exported.stat().st_mtime_ns
    again = Embedder(lite0, "float32", engine="onnxruntime")
    assert exported.stat().st_mtime_ns == first and not list((tmp_path / "onnx").glob("*.partial"))
    assert again.embed(photo_crops()[:2]).shape == (2, 1280)


def test_the_engine_follows_the_device_and_what_is_installed():
    assert engine.choose("auto", "cpu", "sha256:ab") == "onnxruntime"
    assert engine.choose("auto", "cuda", "sha256:ab") == "eager"
    assert engine.choose("auto", "cpu", "") == "eager"  # random weights: nothing stable to cache
    assert engine.choose("eager", "cpu", "sha256:ab") == "eager"
    with pytest.raises(ValueError, match="model.engine=onnxruntime runs on CPUs only"):
        engine.choose("onnxruntime", "cuda", "sha256:ab")
    assert engine.choose("compile", "cpu", "") == engine.choose("compile", "cuda", "sha256:ab") == "compile"
    with pytest.raises(ValueError, match="model.engine must be one of auto, eager, onnxruntime, compile"):
        engine.choose("tensorrt", "cpu", "sha256:ab")


def test_compile_agrees_with_eager_on_real_photos(lite0, tmp_path, monkeypatch):
    """torch.compile at a fixed batch of 8: the crops go through as padded calls of one shape, and inductor's
    artefacts land in the node's cache, where the node's other actors find them."""
    monkeypatch.setenv("IMGPIPE_CACHE", str(tmp_path))
    pixels = photo_crops()
    eager = Embedder(lite0, "float32", engine="eager")
    compiled = Embedder(lite0, "float32", engine="compile", batch_size=8)
    assert compiled.engine == "compile"
    a, b = eager.embed(pixels), compiled.embed(pixels)
    assert b.shape == a.shape
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert float(cosine.min()) >= 0.999, float(cosine.min())
    with torch.inference_mode():
        agreement = float((eager.model.classifier(a).argmax(1) == eager.model.classifier(b).argmax(1)).float().mean())
    assert agreement >= 0.999, agreement
    assert [p for p in (tmp_path / "inductor").rglob("*") if p.is_file()]  # compiled artefacts in the node's cache
