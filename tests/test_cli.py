"""The `imgpipe` command as a user runs it (a subprocess each time): help and usage conventions, a
cluster that cannot be reached failing in one line within its bound, failed validation leaving
the output untouched (locally and in a bucket), and a quiet run printing nothing to stderr."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from images import write_imagefolder
from processes import free_port, ray_env

ROOT = Path(__file__).parent.parent


def imgpipe(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`imgpipe ARGS` (the console script is `jobs.cli:main`), from the project folder."""
    cmd = [sys.executable, "-m", "jobs.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env or ray_env(), timeout=timeout)


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------- help, usage, version


@pytest.mark.timeout(120)
def test_help_goes_to_stdout_and_exits_0():
    top = imgpipe("--help")
    assert (top.returncode, top.stderr) == (0, "")
    assert top.stdout.startswith("usage: imgpipe ")
    for text in ("train-head", "submit", "imgpipe <job> --help", "--quiet", "--verbose", "--version"):
        assert text in top.stdout
    job = imgpipe("features", "--help")
    assert (job.returncode, job.stderr) == (0, "")
    assert job.stdout.startswith("usage: imgpipe features ")
    # The config keys the job reads, with defaults and meanings taken from pipeline/config.py.
    assert '  features.dtype = "float16"  # of the stored embeddings\n' in job.stdout
    assert "  ray.connect_timeout_s = 15.0  # joining a cluster" in job.stdout
    assert "  model.backbone = " in job.stdout and "head.epochs" not in job.stdout
    assert "example:\n  imgpipe features " in job.stdout
    head = imgpipe("train-head", "-h")
    assert head.returncode == 0 and "  head.epochs = 200" in head.stdout and "features.dtype" not in head.stdout


@pytest.mark.timeout(120)
def test_usage_errors_exit_2_with_the_usage_on_stderr():
    unknown = imgpipe("prepair")
    assert (unknown.returncode, unknown.stdout) == (2, "")
    usage, error = unknown.stderr.strip().splitlines()
    assert usage.startswith("usage: imgpipe ")
    assert error.startswith("imgpipe: error: unknown job 'prepair' (choose from prepare, features, train-head")
    bare = imgpipe()
    assert bare.returncode == 2 and "imgpipe: error: a job is required" in bare.stderr
    flag = imgpipe("prepare", "--no-such-flag")
    assert flag.returncode == 2 and flag.stderr.startswith("usage: imgpipe prepare ")
    both = imgpipe("prepare", "-q", "-v")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


@pytest.mark.timeout(60)
def test_version_and_a_bad_value_named_once():
    proc = imgpipe("--version")
    assert (proc.returncode, proc.stderr) == (0, "")
    from importlib.metadata import version

    assert proc.stdout == f"imgpipe {version('imgpipe')}\n"
    folder = imgpipe("prepare", "-c", "configs")
    assert (
        one_line(folder) == "imgpipe prepare: config file configs is a folder; pass a YAML file, e.g. one from configs/"
    )
    half = imgpipe("classify", "--set", "classify.source=s3://b/x")
    assert one_line(half) == (
        "imgpipe classify: classify needs classify.output (URIs or local paths); set it with --set or -c"
    )
    bad = imgpipe("prepare", "--set", "prepare.split={train: 0.5}")
    assert bad.returncode == 1
    assert one_line(bad) == (
        "imgpipe prepare: config key 'prepare.split': split ratios must be >= 0 and sum to 1, got {'train': 0.5}"
    )


# ---------------------------------------------------------------- an unreachable cluster


def _prepare_args(tmp_path: Path) -> list[str]:
    write_imagefolder(tmp_path / "raw", {"a": 2, "b": 2}, size=(16, 16))
    return ["prepare", "--set", f"prepare.source={tmp_path / 'raw'}", "--set", f"prepare.output={tmp_path / 'out'}"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("form", ["ray://127.0.0.1:{port}", "127.0.0.1:{port}", "RAY_ADDRESS=127.0.0.1:{port}"])
def test_a_closed_port_fails_in_one_line_at_once(tmp_path, form):
    address = form.format(port=free_port()).removeprefix("RAY_ADDRESS=")
    by_env = form.startswith("RAY_ADDRESS=")
    args = _prepare_args(tmp_path) + ([] if by_env else ["--address", address])
    started = time.monotonic()
    proc = imgpipe(*args, env=ray_env(RAY_ADDRESS=address) if by_env else None)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1
    assert one_line(proc) == (
        f"imgpipe prepare: cannot reach the Ray cluster at {address} (connection refused); check --address / "
        "RAY_ADDRESS (ray://HEAD:10001 for Ray Client, HEAD:6379 for the head's GCS), that the head is running "
        "and that this machine reaches that port"
    )
    assert elapsed < 60, elapsed  # interpreter + imports on a loaded 2-core machine; no connection wait
    assert not (tmp_path / "out").exists()


@pytest.fixture
def silent_listener():
    """A TCP port that accepts connections and never says a word (not Ray, nor anything else)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server.getsockname()[1]
    server.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scheme", ["ray://", ""])
def test_a_port_that_never_answers_fails_within_the_bound(tmp_path, silent_listener, scheme):
    address = f"{scheme}127.0.0.1:{silent_listener}"
    started = time.monotonic()
    proc = imgpipe(*_prepare_args(tmp_path), "--address", address, "--set", "ray.connect_timeout_s=4")
    elapsed = time.monotonic() - started
    assert proc.returncode == 1
    line = one_line(proc)
    assert line.startswith(f"imgpipe prepare: cannot join the Ray cluster at {address}: no Ray answered within 4 s")
    assert "ray.connect_timeout_s" in line
    assert 4 <= elapsed < 60, elapsed
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- nothing written before validation


@pytest.mark.timeout(180)
def test_failed_validation_leaves_a_local_output_untouched(tmp_path):
    out = tmp_path / "deep" / "out"
    missing = imgpipe("features", "--set", f"features.source={tmp_path / 'nothing'}", "--set", f"features.output={out}")
    assert missing.returncode == 1
    assert one_line(missing) == f"imgpipe features: {tmp_path / 'nothing'}: no such file or prefix; check the path"
    write_imagefolder(tmp_path / "raw", {"a": 2, "b": 2}, size=(16, 16))
    typo = imgpipe(
        "features",
        "--set",
        f"features.source={tmp_path / 'raw'}",
        "--set",
        f"features.output={out}",
        "--set",
        "model.backbone=resnet5",
    )
    assert typo.returncode == 1 and one_line(typo).startswith("imgpipe features: unknown backbone 'resnet5'; known: ")
    no_head = imgpipe(
        "classify",
        "--set",
        f"classify.source={tmp_path / 'raw'}",
        "--set",
        f"classify.output={out}",
        "--set",
        f"classify.head={tmp_path / 'nohead'}",
    )
    assert no_head.returncode == 1 and "no head.json" in one_line(no_head)
    cifar = imgpipe("prepare", "-c", "configs/cifar10.yaml", "--set", f"prepare.output={out}")
    assert cifar.returncode == 1 and "data/cifar-10-batches-py: no such file or prefix" in one_line(cifar)
    assert not (tmp_path / "deep").exists()  # not even the parent folder
    for proc in (missing, typo, no_head, cifar):
        assert "Ray" not in proc.stderr  # failed before Ray started


@pytest.mark.timeout(180)
def test_failed_validation_writes_nothing_to_the_bucket(s3, bucket, tmp_path):
    write_imagefolder(tmp_path / "raw", {"a": 2, "b": 2}, size=(16, 16))
    env = ray_env()  # the session's AWS_* variables point at the local S3 server
    typo = imgpipe(
        "features",
        "--set",
        f"features.source={tmp_path / 'raw'}",
        "--set",
        f"features.output=s3://{bucket}/features",
        "--set",
        "model.backbone=resnet5",
        env=env,
    )
    assert typo.returncode == 1 and one_line(typo).startswith("imgpipe features: unknown backbone 'resnet5'; known: ")
    empty = imgpipe(
        "prepare",
        "--set",
        f"prepare.source=s3://{bucket}/raw",
        "--set",
        f"prepare.output=s3://{bucket}/prepared",
        env=env,
    )
    assert empty.returncode == 1
    assert one_line(empty) == f"imgpipe prepare: s3://{bucket}/raw: no such file or prefix; check the path"
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


@pytest.mark.timeout(120)
def test_an_output_that_cannot_be_written_says_so(tmp_path):
    write_imagefolder(tmp_path / "raw", {"a": 2, "b": 2}, size=(16, 16))
    (tmp_path / "file").write_text("x")
    proc = imgpipe(
        "prepare",
        "--set",
        f"prepare.source={tmp_path / 'raw'}",
        "--set",
        f"prepare.output={tmp_path / 'file' / 'out'}",
    )
    assert proc.returncode == 1
    assert one_line(proc) == (
        f"imgpipe prepare: {tmp_path / 'file' / 'out'}: cannot be written: {tmp_path / 'file'} is a file, not a folder"
    )
