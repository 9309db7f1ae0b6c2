"""Runtime: a job joins a cluster given by --address or RAY_ADDRESS (the embedded default is in test_cli_jobs)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from images import write_imagefolder
from processes import ray_env

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.timeout(240)


def run_prepare(src: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "jobs.prepare",
        "--set",
        f"prepare.source={src}",
        "--set",
        f"prepare.output={out}",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=180, env=env or _env())


@pytest.mark.timeout(360)  # three drivers, on a loaded 2-core machine
def test_joins_a_cluster_given_by_address_or_ray_address(open_head, tmp_path):
    """A real `ray start --head` in its own process; a job connects to it by --address, and another by
    RAY_ADDRESS alone (both drivers are then in that cluster's job table, so neither started its own Ray)."""
    write_imagefolder(tmp_path / "raw", {"a": 3, "b": 3})
    port = open_head.port
    proc = run_prepare(tmp_path / "raw", tmp_path / "out", "--address", f"127.0.0.1:{port}")
    by_env = run_prepare(tmp_path / "raw", tmp_path / "out-env", env=_env() | {"RAY_ADDRESS": f"127.0.0.1:{port}"})
    # The workers import the driver's checkout of `pipeline`, shipped with the job, not
    # whatever the nodes have installed; the job table lists every driver that joined.
    probe = (
        "import json, ray; from pipeline import runtime; from pipeline.config import RayConfig; "
        f"runtime.connect(RayConfig(address='127.0.0.1:{port}')); "
        "print(ray.get(ray.remote(lambda: __import__('pipeline').__file__).remote())); "
        "print(json.dumps([j['Entrypoint'] for j in ray._private.state.jobs()]))"
    )
    # Run from elsewhere: Ray puts the driver's folder on the workers' path, which on one
    # machine would hide whether the package travelled.
    where = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={**_env(), "PYTHONPATH": str(ROOT)},
    )
    assert where.returncode == 0 and "runtime_resources" in where.stdout, (where.stdout, where.stderr[-2000:])
    drivers = [d.split() for d in json.loads(where.stdout.splitlines()[-1])]
    for run, out in ((proc, "out"), (by_env, "out-env")):
        assert run.returncode == 0, run.stderr[-2000:]
        assert re.search(rf"connected to the Ray cluster at 127.0.0.1:{port} \(2 CPUs, 0 GPUs\)", run.stderr)
        assert "started an embedded local Ray" not in run.stderr
        assert "inputs 6 = samples 6 + rejected 0" in run.stdout
        assert any("jobs.prepare" in d and f"prepare.output={tmp_path / out}" in d for d in drivers), drivers


def test_missing_output_and_bad_bucket_are_one_line(tmp_path, s3_endpoint):
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.prepare"], capture_output=True, text=True, cwd=ROOT, timeout=60, env=_env()
    )
    assert (
        proc.returncode != 0
        and proc.stderr.strip()
        == "imgpipe prepare: prepare needs prepare.source and prepare.output (URIs or local paths); "
        "set them with --set or -c"
    )
    write_imagefolder(tmp_path / "raw", {"a": 1})
    proc = run_prepare(tmp_path / "raw", "s3://no-such-bucket-zz/out", env=_env())
    assert proc.returncode != 0
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "imgpipe prepare: s3://no-such-bucket-zz/out: bucket 'no-such-bucket-zz' does not exist; "
        "create it or fix the URI"
    )


def _env() -> dict:
    return ray_env(RAY_AUTH_MODE="disabled")


def test_gpu_assignment_is_read_only_inside_ray_workers(ray_session):
    """A driver (or a plain script) has no assignment: None, so asking for CUDA there uses the
    machine's GPU; a task given no GPU sees [], which makes use_gpu fail loudly, not run on CPU."""
    from pipeline import devices

    assert devices.assigned_gpus() is None
    remote = ray_session.remote(num_cpus=0.1, num_gpus=0)(devices.assigned_gpus)
    assert ray_session.get(remote.remote(), timeout=60) == []


def test_asking_for_the_gpu_assignment_never_starts_ray():
    code = "import ray; from pipeline import devices; print(devices.assigned_gpus(), ray.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.split() == ["None", "False"], out.stderr
