"""`imgpipe submit` and `imgpipe jobs` against a real `ray start --head` (Jobs API on 127.0.0.1,
token authentication as Ray sets it up) and the local S3 server: jobs end SUCCEEDED with their
outputs in the bucket, are listed, followed and stopped, and a failure is one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from images import prepare_without_ray, upload_tree, write_imagefolder
from processes import Head, free_port, started_head

from pipeline import storage

ROOT = Path(__file__).parent.parent
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(480)]  # slow when the machine is shared


@pytest.fixture(scope="module")
def head(s3_endpoint, tmp_path_factory):
    """A 4-CPU head with token authentication (Ray's default)."""
    with started_head(tmp_path_factory.mktemp("home")) as running:
        yield running


def imgpipe(head: Head, *args: str, env: dict | None = None, timeout: float = 360) -> subprocess.CompletedProcess:
    """`imgpipe ARGS --address HEAD` as a user runs it (the console script is `jobs.cli:main`)."""
    cmd = [sys.executable, "-m", "jobs.cli", *args, "--address", head.url]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env or head.env, timeout=timeout)
    assert not head.token or head.token not in proc.stdout + proc.stderr  # the token is never printed
    return proc


def test_prepare_then_features_end_succeeded_with_outputs_in_s3(head, s3, bucket, tmp_path):
    write_imagefolder(tmp_path / "raw", {"a": 4, "b": 4, "c": 4}, size=(32, 32))
    upload_tree(s3, bucket, tmp_path / "raw", "raw")
    config = ROOT / "configs" / "prepare-imagefolder.yaml"  # absolute here; relative to the project there
    proc = imgpipe(
        head,
        "submit",
        "prepare",
        "--config",
        str(config),
        "--set",
        f"prepare.source=s3://{bucket}/raw",
        "--set",
        f"prepare.output=s3://{bucket}/prepared",
        "--set",
        "prepare.shard_max_samples=4",
        "--follow",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    prepare_id = proc.stdout.splitlines()[0]
    assert re.fullmatch(r"imgpipe-prepare-\d{8}-\d{6}-[0-9a-f]{6}", prepare_id)
    assert proc.stdout.count("inputs 12 = samples 12 + rejected 0") == 1  # the job's own output, streamed once
    assert proc.stderr.strip().splitlines()[-1] == f"imgpipe submit: {prepare_id} SUCCEEDED"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="prepared/manifest.json")["Body"].read())
    assert manifest["samples"] == 12 and manifest["source"] == f"s3://{bucket}/raw"

    proc = imgpipe(
        head,
        "submit",
        "features",
        "--set",
        f"features.source=s3://{bucket}/prepared",
        "--set",
        f"features.output=s3://{bucket}/feats",
        "--set",
        "model.backbone=efficientnet_lite0",
        "--set",
        "features.batch_size=4",
        "--follow",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    features_id = proc.stdout.splitlines()[0]
    assert proc.stdout.count("inputs 12 = embedded 12 + rejected 0") == 1
    shards = [s["path"] for split in manifest["splits"].values() for s in split["shards"]]
    out = storage.resolve(f"s3://{bucket}/feats")
    parts = sorted(f.path for f in storage.list_files(out) if f.path.endswith(".parquet"))
    assert len(parts) == len(shards) >= 3
    keys = [k for p in parts for k in pq.read_table(p, filesystem=out.fs, columns=["key"]).column("key").to_pylist()]
    assert len(keys) == len(set(keys)) == 12
    run = json.loads(storage.read_bytes(out.join("features.json")))
    assert run["complete"] is True and run["rows"] == 12 and run["written"] == len(shards)

    listing = imgpipe(head, "jobs", "list").stdout.splitlines()
    rows = {line.split()[0]: line.split()[1] for line in listing[1:]}
    assert rows[prepare_id] == rows[features_id] == "SUCCEEDED"
    assert "python -m jobs.prepare --config configs/prepare-imagefolder.yaml" in "\n".join(listing)
    assert imgpipe(head, "jobs", "status", features_id).stdout.startswith(f"{features_id}: SUCCEEDED")
    logs = imgpipe(head, "jobs", "logs", features_id)
    assert logs.returncode == 0 and "inputs 12 = embedded 12 + rejected 0" in logs.stdout
    followed = imgpipe(head, "jobs", "logs", features_id, "--follow")  # an ended job: its whole log, once
    assert followed.returncode == 0 and followed.stdout == logs.stdout


def test_a_long_job_is_stopped(head, bucket):
    """The demo (minutes on 2 cores) is sent without --follow, then stopped while it works."""
    proc = imgpipe(head, "submit", "demo", "--set", f"demo.workdir=s3://{bucket}/demo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.strip()
    deadline = time.time() + 120
    while "connected to the Ray cluster" not in imgpipe(head, "jobs", "logs", job_id).stdout:
        assert time.time() < deadline, "the demo job never connected to the cluster"
        time.sleep(1)
    stopped = imgpipe(head, "jobs", "stop", job_id)
    assert (stopped.returncode, stopped.stdout.strip()) == (0, f"{job_id}: STOPPED")
    assert imgpipe(head, "jobs", "status", job_id).stdout.startswith(f"{job_id}: STOPPED")


def test_bad_requests_fail_in_one_line_before_anything_is_sent(head, tmp_path):
    cmd = [sys.executable, "-m", "jobs.cli", "jobs", "list", "--address", f"127.0.0.1:{free_port()}"]
    unreachable = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=head.env, timeout=60)
    assert unreachable.returncode == 2 and len(unreachable.stderr.strip().splitlines()) == 1
    assert re.match(
        r"imgpipe jobs: cannot reach the Ray Jobs API at http://127.0.0.1:\d+ \(Connection refused\)",
        unreachable.stderr,
    )
    no_token = imgpipe(head, "jobs", "list", env={**head.env, "HOME": str(tmp_path)})
    assert no_token.returncode == 2 and no_token.stderr.strip() == (
        f"imgpipe jobs: {head.url}: the cluster requires its authentication token and no token was found; set "
        "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or copy it to ~/.ray/auth_token (on the head: ray get-auth-token)"
    )
    from_env = imgpipe(head, "jobs", "list", env={**head.env, "HOME": str(tmp_path), "RAY_AUTH_TOKEN": head.token})
    assert from_env.returncode == 0 and from_env.stdout.startswith("SUBMISSION ID")
    bad_key = imgpipe(head, "submit", "prepare", "--set", "prepare.shard_size=3")
    assert bad_key.returncode == 2
    assert bad_key.stderr.startswith("imgpipe submit: unknown config key 'prepare.shard_size'")
    relative = imgpipe(head, "submit", "demo").stderr  # demo.workdir defaults to runs/demo
    assert relative.startswith("imgpipe submit: demo.workdir=runs/demo is a relative path, which on the cluster")
    unknown = imgpipe(head, "jobs", "status", "imgpipe-nope").stderr.strip()
    assert unknown == "imgpipe jobs: no job 'imgpipe-nope' on this cluster; `imgpipe jobs list` shows the ids"


def test_a_failing_job_exits_non_zero_with_its_error_on_a_cluster_without_auth(open_head, bucket):
    head = open_head
    proc = imgpipe(
        head,
        "submit",
        "features",
        "--set",
        f"features.source=s3://{bucket}/nothing-here",
        "--set",
        f"features.output=s3://{bucket}/feats",
        "--follow",
    )
    assert proc.returncode == 1
    job_id = proc.stdout.splitlines()[0]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"imgpipe submit: {job_id} FAILED: imgpipe features: s3://{bucket}/nothing-here: no such file or prefix; "
        "check the path"
    )
    assert imgpipe(head, "jobs", "status", job_id).stdout.startswith(f"{job_id}: FAILED")


def test_a_features_job_resumes_through_submit_after_the_whole_cluster_is_lost(head, s3, bucket, tmp_path):
    """The cluster goes away mid-job (head, workers and the job's driver, as when every machine is
    lost); the same `submit` to another cluster (the module's head, which never saw the job) writes
    only the parts still missing, and the output holds every input exactly once."""
    write_imagefolder(tmp_path / "raw", {"a": 20, "b": 20}, size=(32, 32))
    manifest = prepare_without_ray(str(tmp_path / "raw"), f"s3://{bucket}/loss-prepared", 2)
    n, shards = manifest["samples"], sum(len(split["shards"]) for split in manifest["splits"].values())
    output = f"s3://{bucket}/loss-feats"
    job = [
        "submit",
        "features",
        *("--set", f"features.source=s3://{bucket}/loss-prepared"),
        *("--set", f"features.output={output}"),
        *("--set", "features.batch_size=2"),
        *("--set", "features.decode_batch=2"),
    ]
    out = storage.resolve(output)
    home = tmp_path / "home"
    home.mkdir()

    def parts() -> list[str]:
        try:
            return sorted(f.path for f in storage.list_files(out) if f.path.endswith(".parquet"))
        except storage.StorageError:  # nothing written yet
            return []

    with started_head(home) as first:
        sent = imgpipe(first, *job)
        assert sent.returncode == 0, sent.stderr[-3000:]
        deadline = time.time() + 240
        while not parts():
            assert time.time() < deadline, "no part was written on the first cluster"
            time.sleep(0.2)
    _kill_drivers(output)  # the driver's machine is gone too
    before = parts()
    assert 0 < len(before) < shards, f"{len(before)} of {shards} parts before the loss"

    resumed = imgpipe(head, *job, "--follow")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    written = re.search(r"(\d+) parts to write, (\d+) already there", resumed.stdout)
    assert written and int(written.group(2)) >= len(before), resumed.stdout[-3000:]
    assert int(written.group(1)) + int(written.group(2)) == shards
    assert f"inputs {n} = embedded {n} + rejected 0" in resumed.stdout
    after = parts()
    assert len(after) == shards and set(before) <= set(after)
    keys = [k for p in after for k in pq.read_table(p, filesystem=out.fs, columns=["key"]).column("key").to_pylist()]
    assert len(keys) == len(set(keys)) == n
    run = json.loads(storage.read_bytes(out.join("features.json")))
    assert run["complete"] is True and (run["inputs"], run["rows"]) == (n, n)


def _kill_drivers(marker: str) -> None:
    """Kill any job driver left over from a stopped head (its command line names `marker`)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or []) and proc.pid != os.getpid():
            proc.kill()
