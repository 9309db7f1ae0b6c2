"""Runtime: the same job runs on an embedded local Ray or joins a cluster given by --address."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from images import write_imagefolder

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.timeout(240)


def run_prepare(src: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jobs.prepare", "--set", f"prepare.source={src}", "--set", f"prepare.output={out}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=180, env=env or _env())


def test_embedded_by_default(tmp_path):
    write_imagefolder(tmp_path / "raw", {"a": 3, "b": 3})
    proc = run_prepare(tmp_path / "raw", tmp_path / "out", "--set", "ray.num_cpus=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "started an embedded local Ray (2 logical CPUs)" in proc.stderr
    assert "inputs 6 = samples 6 + rejected 0" in proc.stdout


def test_joins_a_cluster_given_by_address(tmp_path):
    """A real `ray start --head` in its own process; the job connects to it by --address."""
    write_imagefolder(tmp_path / "raw", {"a": 3, "b": 3})
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", f"--temp-dir={temp}", "--node-ip-address=127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), start_new_session=True,
    )
    try:
        _wait_for_port(port)
        proc = run_prepare(tmp_path / "raw", tmp_path / "out", "--address", f"127.0.0.1:{port}")
    finally:
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(rf"connected to the Ray cluster at 127.0.0.1:{port} \(2 CPUs, 0 GPUs\)", proc.stderr)
    assert "inputs 6 = samples 6 + rejected 0" in proc.stdout


def test_missing_output_and_bad_bucket_are_one_line(tmp_path, s3_endpoint):
    proc = subprocess.run([sys.executable, "-m", "jobs.prepare"], capture_output=True, text=True, cwd=ROOT, timeout=60, env=_env())
    assert proc.returncode != 0 and proc.stderr.strip() == "imgpipe: no output given; set prepare.output (a local path or s3:// / gs:// URI)"
    proc = run_prepare(tmp_path, "s3://no-such-bucket-zz/out", env=_env())
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "imgpipe: s3://no-such-bucket-zz/out: bucket 'no-such-bucket-zz' does not exist; create it or fix the URI"


def _stop(head: subprocess.Popen) -> None:
    """Stop only what this test started (never `ray stop`): SIGTERM to `ray start --block`
    tears its cluster down; the process group is the fallback."""
    head.terminate()
    try:
        head.wait(45)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(10)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A test head need not drain gracefully on SIGTERM (Ray 2.60 waits up to 30 s by default).
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"ray head did not open port {port}")
