"""The model registry: names, weights (package, torchvision, path on S3, none), preprocessing."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
from images import write_imagefolder
from PIL import Image
from processes import modules_after
from sklearn.datasets import load_sample_image

from pipeline import augment, models, schema
from pipeline.preprocessing import to_model_input

pytestmark = pytest.mark.timeout(120)


def _photo(name: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(load_sample_image(name)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_lite0_package_weights_classify_real_photos():
    """Lite0's tensors are mapped in order from the package's own names; a wrong mapping or the
    wrong preprocessing would not give ImageNet's labels for scikit-learn's sample photos."""
    backbone = models.load_backbone("efficientnet_lite0")
    assert backbone.dim == 1280 and backbone.classifier.out_features == 1000
    assert backbone.info.weights == models.LITE0_PACKAGE and backbone.info.digest == "efficientnet-lite0-57934424.pth"
    prep = backbone.preprocessing
    assert (prep.crop_size, prep.resize_size, prep.interpolation, prep.mean, prep.std) == (
        224,
        256,
        "bicubic",
        (0.5,) * 3,
        (0.5,) * 3,
    )
    batch = {
        schema.KEY: np.array(["china", "flower"], dtype=object),
        schema.IMAGE: np.array([_photo("china.jpg"), _photo("flower.jpg")], dtype=object),
        schema.ERROR: np.array(["", ""], dtype=object),
    }
    pixels = augment.build_eval_transform(prep)(batch)[schema.PIXELS]
    with torch.inference_mode():
        logits = backbone.classifier(backbone(to_model_input(pixels, prep, torch.device("cpu"))))
    top1 = logits.argmax(1).tolist()
    assert top1 == [698, 985]
    assert [backbone.info.categories[i] for i in top1] == ["palace", "daisy"]
    assert torch.softmax(logits, 1).max(1).values.min() > 0.2  # random weights: ~0.001


def test_unknown_names_list_the_known_ones():
    with pytest.raises(
        ValueError, match=r"unknown backbone 'resnet5'; known: .*efficientnet_lite0.*resnet18, resnet34, resnet50"
    ):
        models.resolve_weights("resnet5")
    with pytest.raises(
        ValueError, match=r"unknown weights 'IMAGENET1K_V9' for resnet50; known: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"
    ):
        models.resolve_weights("resnet50", "IMAGENET1K_V9")
    with pytest.raises(ValueError, match=r"unknown weights 'IMAGENET1K_V2' for efficientnet_lite0; known: DEFAULT"):
        models.resolve_weights("efficientnet_lite0", "IMAGENET1K_V2")


def test_preprocessing_comes_from_the_weights():
    b4, v2s, r18 = (models.default_preprocessing(n) for n in ("efficientnet_b4", "efficientnet_v2_s", "resnet18"))
    assert (b4.crop_size, b4.resize_size, b4.interpolation) == (380, 384, "bicubic")
    assert (v2s.crop_size, v2s.resize_size, v2s.interpolation) == (384, 384, "bilinear")
    assert (r18.crop_size, r18.resize_size, r18.interpolation, r18.mean) == (
        224,
        256,
        "bilinear",
        (0.485, 0.456, 0.406),
    )


def test_offline_download_fails_with_how_to_provide_the_weights(monkeypatch, tmp_path):
    """No silent fall-back to random weights: the error names the URL, torch's cache, and the
    two offline ways (a state-dict path, or Lite0 from its package). The download is real and
    refused: the test session is offline (tests/offline/sitecustomize.py)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(models.WeightsUnavailable) as err:
        models.resolve_weights("resnet18", "IMAGENET1K_V1")
    text = str(err.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in text
    assert f"{tmp_path}/hub/checkpoints/resnet18-f37072fd.pth" in text
    assert "model.weights" in text and "model.backbone=efficientnet_lite0" in text


def test_state_dict_from_object_storage_with_sidecar(s3, bucket):
    """A fine-tuned state dict (7 classes) on S3: the final layer is sized to it, and the JSON
    sidecar next to it gives the preprocessing and the class names."""
    arch = models._architecture("mobilenet_v3_small")
    arch.classifier[-1] = torch.nn.Linear(1024, 7)
    torch.nn.init.normal_(arch.classifier[-1].weight)
    buf = io.BytesIO()
    torch.save(arch.state_dict(), buf)
    s3.put_object(Bucket=bucket, Key="ft/model.pt", Body=buf.getvalue())
    sidecar = {
        "classes": list("abcdefg"),
        "preprocessing": {
            "crop_size": 192,
            "resize_size": 220,
            "interpolation": "bicubic",
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
        },
    }
    s3.put_object(Bucket=bucket, Key="ft/model.json", Body=json.dumps(sidecar).encode())

    loaded = models.load_backbone("mobilenet_v3_small", f"s3://{bucket}/ft/model.pt")
    assert loaded.info.weights == f"s3://{bucket}/ft/model.pt"
    assert loaded.info.digest == "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()
    assert loaded.info.categories == tuple("abcdefg")
    assert (loaded.preprocessing.crop_size, loaded.preprocessing.std) == (192, (0.25,) * 3)
    assert loaded.classifier.out_features == 7 and torch.equal(loaded.classifier.weight, arch.classifier[-1].weight)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(loaded.classifier(loaded(x)), arch.eval()(x), atol=1e-5)


def test_bad_weights_paths_say_what_to_do(s3, bucket, tmp_path):
    with pytest.raises(
        models.WeightsUnavailable, match=rf"weights file s3://{bucket}/nope.pt does not exist; give a local or s3://"
    ):
        models.resolve_weights("resnet18", f"s3://{bucket}/nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(models.WeightsUnavailable, match=r"junk.pt is not a loadable state dict"):
        models.resolve_weights("resnet18", str(tmp_path / "junk.pt"))
    other = io.BytesIO()
    torch.save(models._architecture("mobilenet_v3_small").state_dict(), other)
    (tmp_path / "other.pt").write_bytes(other.getvalue())
    with pytest.raises(ValueError, match=r"other.pt do not fit this architecture"):
        models.load_backbone("resnet18", str(tmp_path / "other.pt"))


def test_random_weights_only_when_asked_and_the_same_everywhere():
    a = models.load_backbone("mobilenet_v3_small", "none")
    b = models.load_backbone("mobilenet_v3_small", "none")
    assert a.classifier is None and a.info.categories is None and a.dim == 1024
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(a.eval()(x), b.eval()(x))


def test_every_backbones_embedding_width_is_the_built_ones():
    """Drivers size their output from `EMBEDDING_WIDTHS` instead of building the model: a wrong entry would
    write parts of one width from embeddings of another."""
    assert sorted(models.EMBEDDING_WIDTHS) == models.known_backbones()
    for name in models.known_backbones():
        with torch.device("meta"):  # the shapes without the tensors' memory or initialisation
            built = models._architecture(name)
        assert models.EMBEDDING_WIDTHS[name] == models._final_linear(built)[1].in_features, name
    assert models.embedding_width(models.resolve_weights("mobilenet_v3_small", "none")) == 1024


def test_a_driver_checks_a_lite0_job_without_importing_torchvision_or_timm(tmp_path):
    """A features driver with the default backbone reads its ImageNet classes and embedding width without
    torchvision (whose import brings torch._dynamo) or timm: 1.6 CPU-seconds of each job's start."""
    from torchvision.models import ResNet18_Weights

    assert models.imagenet_categories() == tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    write_imagefolder(tmp_path / "raw", {"a": 1}, size=(16, 16))
    cfg = f"FeaturesConfig(source={str(tmp_path / 'raw')!r}, output={str(tmp_path / 'out')!r})"
    code = (
        "from pipeline import features\nfrom pipeline.config import FeaturesConfig, ModelConfig, StorageConfig\n"
        f"checked = features.check(ModelConfig(), {cfg}, StorageConfig())\n"
        "assert (checked.dim, len(checked.weights.categories)) == (1280, 1000)"
    )
    assert modules_after(code, "torchvision", "timm") == []
