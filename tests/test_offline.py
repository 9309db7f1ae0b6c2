"""The offline promise: no process of the test session reaches beyond this machine (see
tests/offline/sitecustomize.py), so a regression that downloads at run time fails here; and
torchvision weights come from torch's own cache, placed where torch looks, with no download."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

from pipeline import models

FAR = "http://192.0.2.1:9/weights.pth"  # TEST-NET-1: not this machine, whatever the network
PROBE = f"""
import urllib.request
try:
    urllib.request.urlopen({FAR!r}, timeout=5)
except Exception as exc:
    print(type(getattr(exc, "reason", exc)).__name__, exc)
"""


def refused(text: str) -> bool:
    return text.startswith("NetworkRefused") and "offline tests: a connection to 192.0.2.1:9 was refused" in text


def test_the_test_process_cannot_reach_the_internet():
    with pytest.raises(urllib.error.URLError) as err:
        urllib.request.urlopen(FAR, timeout=5)
    assert refused(f"{type(err.value.reason).__name__} {err.value}")


def test_loopback_stays_open(s3_endpoint):  # the S3 server and Ray live there
    with urllib.request.urlopen(s3_endpoint, timeout=10) as answer:  # moto's S3 on 127.0.0.1
        assert answer.status == 200


def test_subprocesses_and_ray_workers_cannot_either(ray_session):
    child = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert refused(child.stdout.strip()), child.stdout + child.stderr

    @ray_session.remote(num_cpus=0.1)
    def probe() -> str:
        import io
        from contextlib import redirect_stdout

        out = io.StringIO()
        with redirect_stdout(out):
            exec(PROBE, {})
        return out.getvalue().strip()

    assert refused(ray_session.get(probe.remote(), timeout=60))


def test_torchvision_weights_load_from_torchs_cache_without_a_download(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = models._architecture("resnet18").state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference, cache / "resnet18-f37072fd.pth")  # the file name of IMAGENET1K_V1's URL
    weights = models.resolve_weights("resnet18", "IMAGENET1K_V1")
    assert weights.weights == "IMAGENET1K_V1" and len(weights.categories) == 1000
    backbone = models.create_backbone(weights)
    assert torch.equal(dict(backbone.named_parameters())["trunk.conv1.weight"], reference["conv1.weight"])
