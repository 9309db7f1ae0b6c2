"""The CUDA paths, on a machine with a GPU: they run with the suite (`pytest -m gpu` runs them alone). Without
a usable GPU they are skipped, the reason in the summary; with IMGPIPE_REQUIRE_GPU=1 they fail instead."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline import devices
from pipeline.config import ModelConfig, StorageConfig


def _no_gpu_reason() -> str:
    """Why CUDA is unusable here: no driver at all, or the product's message (a CPU-only torch, an old driver)."""
    driver = devices.driver_version()
    if driver is None and torch.version.cuda is not None:
        return "no usable CUDA GPU on this machine: no NVIDIA driver found (/proc/driver/nvidia/version)"
    why = devices.cuda_missing_message(driver)  # a worker's words: "a GPU was assigned but ..."
    return f"no usable CUDA GPU on this machine: {why.partition('CUDA is not usable: ')[2] or why}"


REQUIRED = os.environ.get("IMGPIPE_REQUIRE_GPU") == "1"
# Skipped at collection (before the session's Ray is started for a test that would only skip); required, they
# reach the fixture below and fail there.
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not REQUIRED and not torch.cuda.is_available(), reason=_no_gpu_reason()),
]


@pytest.fixture(autouse=True)
def cuda_or_fail():
    if not torch.cuda.is_available():
        pytest.fail(_no_gpu_reason())


def pixels(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_a_worker_given_a_gpu_computes_on_it_in_the_precision_of_its_capability():
    device = devices.worker_device(True, [0])
    assert device.type == "cuda"
    major, _ = torch.cuda.get_device_capability(device)
    assert devices.resolve_precision("auto", device) == ("bf16" if major >= 8 else "fp16")
    assert "sm_" in devices.describe(device, "bf16") and "driver" in devices.describe(device, "bf16")


def test_the_gpu_embedder_pads_to_a_fixed_batch_through_a_pinned_buffer_and_matches_the_cpu():
    from pipeline.features import Embedder
    from pipeline.models import resolve_weights

    weights = resolve_weights("efficientnet_lite0", "DEFAULT")
    gpu = Embedder(weights, "float32", device="cuda", precision="bf16", batch_size=8)
    cpu = Embedder(weights, "float32", device="cpu")
    assert gpu.staging.is_pinned() and gpu.staging.shape == (8, 224, 224, 3)
    batch = pixels(11)  # one full batch and one padded
    on_gpu, on_cpu = gpu.embed(batch).float().cpu(), cpu.embed(batch)
    assert on_gpu.shape == on_cpu.shape == (11, 1280)
    cosine = torch.nn.functional.cosine_similarity(on_gpu, on_cpu, dim=1)
    assert float(cosine.min()) > 0.99  # bf16 against fp32


@pytest.mark.timeout(300)
def test_a_short_features_run_on_the_gpu(ray_session, tmp_path):
    from images import write_imagefolder

    from pipeline import features
    from pipeline.config import FeaturesConfig

    write_imagefolder(tmp_path / "images", {"a": 20, "b": 20})
    cfg = FeaturesConfig(source=str(tmp_path / "images"), output=str(tmp_path / "features"), batch_size=16)
    result = features.run(ModelConfig(device="cuda", gpu_wait_s=60), cfg, StorageConfig())
    assert (result["rows"], result["rejected"], result["dim"]) == (40, 0, 1280)
    import json

    identity = json.loads((tmp_path / "features" / "features.json").read_text())["identity"]
    assert identity["compute"] in ("cuda/bf16", "cuda/fp16")


@pytest.mark.timeout(600)
def test_one_epoch_of_fine_tuning_on_the_gpu(ray_session, tmp_path):
    from images import CLASS_COLORS, jpeg_bytes, write_shards

    from pipeline import finetune
    from pipeline.config import build_config

    def samples(split: str, n: int, offset: int) -> list:
        return [
            (f"{split}{i:03d}", jpeg_bytes(64, 48, seed=offset + i, color=CLASS_COLORS[i % 3]), i % 3) for i in range(n)
        ]

    write_shards(
        tmp_path / "prepared", {"train": samples("train", 64, 0), "val": samples("val", 16, 100)}, 16, ["r", "g", "b"]
    )
    cfg = build_config(
        {
            "model": {"backbone": "efficientnet_lite0"},
            "loader": {"batch_size": 16, "shuffle_buffer": 32},
            "finetune": {
                "source": str(tmp_path / "prepared"),
                "output": str(tmp_path / "run"),
                "epochs": 1,
                "test_split": None,
                "num_workers": 1,
                "use_gpu": True,
                "cpus_per_worker": 1,
                "image_size": 128,
            },
        }
    )
    result = finetune.run(cfg)
    assert result["epochs_run"] == 1 and result["history"][0]["images_per_s"] > 0
