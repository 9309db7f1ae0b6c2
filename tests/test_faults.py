"""Batch jobs on a multi-node cluster (`ray.cluster_utils.Cluster`: head + two workers) that loses a
worker node mid-job: Ray retries the lost work and the output still holds every input exactly once.

The jobs run as their own driver processes joined to the cluster by address (as `imgpipe submit` runs
them), so this module never connects the test process to Ray and coexists with the session's local Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from images import prepare_without_ray, write_imagefolder
from processes import ray_env

ROOT = Path(__file__).parent.parent
# cluster_utils runs its nodes from this process and resets its Ray state on shutdown: these
# tests get a pytest process of their own (`pytest -m multinode`, the second half of `make test`).
pytestmark = [pytest.mark.multinode, pytest.mark.timeout(240)]

# Fast failure detection (docs/ARCHITECTURE.md, section 6): a node that stops answering is dead after ~1.5 s, not 30 s.
HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_timeout_ms": 500}
CLASSES = {"a": 74, "b": 73, "c": 73}  # 220 images
SHARD = 18  # 14 shards over train/val/test


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU: reads and decode) + two 2-CPU worker nodes (one 2-CPU model actor each)."""
    from ray.cluster_utils import Cluster

    made = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": HEALTH_CHECKS},
    )
    try:
        workers = [made.add_node(num_cpus=2) for _ in range(2)]
        made.wait_for_nodes()
        yield made, workers
    finally:
        made.shutdown()


def _job(address: str, name: str, *settings: str) -> subprocess.Popen:
    """`python -m jobs.<name> --address ADDR --set ...`: a driver of its own on the cluster."""
    env = ray_env(TQDM_DISABLE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    cmd = [sys.executable, "-m", f"jobs.{name}", "--address", address, *(f"--set={s}" for s in settings)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(job: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        out, err = job.communicate()
        pytest.fail(f"the job did not finish within {timeout:.0f} s; its log ends:\n{err[-3000:]}")
    assert job.returncode == 0, err[-3000:]
    return out, err


def _kill_when_a_part_lands(cluster, node, output: Path, job: subprocess.Popen, seen: dict) -> None:
    """From a thread: once the job has written its first part, take `node` away without warning."""
    deadline = time.time() + 150
    while not list(output.glob("*/part-*.parquet")) and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    seen["parts_before"] = len(list(output.glob("*/part-*.parquet")))
    seen["running"] = job.poll() is None
    if seen["running"]:
        cluster.remove_node(node, allow_graceful=False)
        seen["removed_at"] = time.time()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict]:
    """220 small JPEGs in 14 shards on local disk (every node sees it), prepared in this process:
    the cluster is for the job under test."""
    root = tmp_path_factory.mktemp("faults")
    write_imagefolder(root / "raw", CLASSES, size=(32, 32))
    manifest = prepare_without_ray(str(root / "raw"), str(root / "prepared"), SHARD)
    assert manifest["samples"] == sum(CLASSES.values()) and manifest["rejected"] == 0
    return root, manifest


def _keys_of(output: Path) -> tuple[list[str], list[str]]:
    parts = sorted(str(p.relative_to(output)) for p in output.glob("*/part-*.parquet"))
    keys = [k for p in parts for k in pq.read_table(output / p, columns=["key"]).column("key").to_pylist()]
    return parts, keys


@pytest.mark.parametrize(
    ("name", "verb", "run_file"),
    [("features", "embedded", "features.json"), ("classify", "classified", "predictions.json")],
)
def test_a_job_loses_a_worker_node_mid_job_and_writes_every_input_once(cluster, prepared, name, verb, run_file):
    made, workers = cluster
    while len(workers) < 2:  # an earlier test took one away: the cluster is back to two workers
        workers.append(made.add_node(num_cpus=2))
    made.wait_for_nodes()
    root, manifest = prepared
    output = root / name
    settings = [f"source={root / 'prepared'}", f"output={output}", "batch_size=8", "decode_batch=8", "actors=2"]
    job = _job(made.address, name, *(f"{name}.{s}" for s in settings))
    seen: dict = {}
    victim = workers.pop(0)
    killer = threading.Thread(target=_kill_when_a_part_lands, args=(made, victim, output, job, seen))
    killer.start()
    out, _ = _finish(job, 180)
    killer.join(10)
    shards = [s["path"] for info in manifest["splits"].values() for s in info["shards"]]
    assert len(shards) >= 12
    assert seen["running"] and "removed_at" in seen, "the job ended before the node could be taken away"
    assert seen["parts_before"] < len(shards)  # the node went while parts were still to come
    n = manifest["samples"]
    assert f"inputs {n} = {verb} {n} + rejected 0; {len(shards)} parts written this run" in out
    parts, keys = _keys_of(output)
    assert parts == sorted(f"{p.split('-')[0]}/part-{p.split('-')[1].removesuffix('.tar')}.parquet" for p in shards)
    assert len(keys) == len(set(keys)) == n
    run = json.loads((output / run_file).read_text())
    assert run["complete"] is True and (run["inputs"], run["rows"], run["rejected"]) == (n, n, 0)
    # The job ran on, after the loss, on what was left of the cluster.
    assert len([x for x in made.list_all_nodes() if x is not made.head_node]) == 1
