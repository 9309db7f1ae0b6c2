"""`model.engine`: ONNX Runtime agrees with eager PyTorch on real photographs (top-1 agreement,
embedding cosine), the export is cached per node and reused, and the choice follows the device."""

from __future__ import annotations

import pytest
import torch
from photos import compare, describe, photo_crops

from pipeline import engine
from pipeline.features import Embedder
from pipeline.models import resolve_weights


@pytest.fixture(scope="module")
def lite0():
    return resolve_weights("efficientnet_lite0", "DEFAULT")


def test_onnxruntime_agrees_with_eager_on_real_photos(lite0, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGPIPE_CACHE", str(tmp_path))
    eager = Embedder(lite0, "float32", engine="eager")
    ort = Embedder(lite0, "float32", engine="onnxruntime")
    assert (eager.engine, ort.engine) == ("eager", "onnxruntime")
    result = compare(eager, ort, photo_crops())
    print(f"onnxruntime against eager, {describe(result)}")
    assert result["cosine_min"] >= 0.999, result
    assert result["top1_agreement"] >= 0.999, result  # every one of the 57, in practice
    # the photographs are recognised, so the comparison is over meaningful predictions
    assert result["classes"] >= 5, result


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
    eager = Embedder(lite0, "float32", engine="eager")
    compiled = Embedder(lite0, "float32", engine="compile", batch_size=8)
    assert compiled.engine == "compile"
    result = compare(eager, compiled, photo_crops())
    print(f"torch.compile against eager, {describe(result)}")
    assert result["cosine_min"] >= 0.999 and result["top1_agreement"] >= 0.999, result
    assert [p for p in (tmp_path / "inductor").rglob("*") if p.is_file()]  # compiled artefacts in the node's cache


def test_an_actor_that_finds_the_export_cached_does_not_build_the_model(lite0, tmp_path, monkeypatch):
    """The node's first actor exports; the others load the export and its trunk facts (width, the backbone's
    own classifier) and never build the PyTorch model: seconds of each actor's start. Same outputs."""
    monkeypatch.setenv("IMGPIPE_CACHE", str(tmp_path))
    first = Embedder(lite0, "float32", engine="onnxruntime")
    assert first.model is not None  # built to export
    (facts,) = (tmp_path / "onnx").glob("*.facts.pt")
    later = Embedder(lite0, "float32", engine="onnxruntime")
    assert later.model is None and later.dim == first.dim == 1280
    pixels = photo_crops()[:4]
    assert torch.equal(later.embed(pixels), first.embed(pixels))
    with torch.inference_mode():
        assert torch.equal(later.classifier(later.embed(pixels)), first.classifier(first.embed(pixels)))
    # an export cached without its facts (an older imgpipe's): the model is built once more, and the facts written
    facts.unlink()
    again = Embedder(lite0, "float32", engine="onnxruntime")
    assert again.model is not None and facts.exists()
    assert Embedder(lite0, "float32", engine="onnxruntime").model is None
