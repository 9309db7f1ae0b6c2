"""Shared test fixtures: one S3-compatible server on 127.0.0.1 (moto, over real HTTP) and one
local Ray for the whole session, sized so that actor pools never starve read tasks."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
import uuid

import boto3
import pytest

# Before anything imports pyarrow's S3 or starts Ray: workers inherit the environment.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TQDM_DISABLE"] = "1"
# Ray Train's controller looks at its workers every 2 s by default, and a short run waits on that
# poll at each step (start, finish, a fault): 0.5 s saves 3-6 s per fine-tuning run on 2 cores.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The session's own cache for ONNX exports, int8 files and inductor artefacts, inherited by every process it
# starts (Ray workers, jobs, heads): a run starts cold, as on a clean CI machine, and leaves the developer's
# ~/.cache/imgpipe alone. IMGPIPE_CACHE set by hand wins.
if "IMGPIPE_CACHE" not in os.environ:
    os.environ["IMGPIPE_CACHE"] = tempfile.mkdtemp(prefix="imgpipe-test-cache-")
    atexit.register(shutil.rmtree, os.environ["IMGPIPE_CACHE"], ignore_errors=True)
# Offline, as our users' clusters often are: no process of the session may reach beyond this
# machine (tests/offline/sitecustomize.py, loaded by every Python process started from here).
OFFLINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "offline")
os.environ["IMGPIPE_OFFLINE"] = "1"
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (OFFLINE, os.environ.get("PYTHONPATH")) if p)
# This process started before the variables were set: install the guard here by hand.
_spec = importlib.util.spec_from_file_location("imgpipe_offline", os.path.join(OFFLINE, "sitecustomize.py"))
_offline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_offline)


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """Start moto's S3 server on loopback and point the standard AWS variables at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def s3(s3_endpoint):
    """A boto3 client for arranging test data (the code under test uses pyarrow.fs)."""
    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def bucket(s3) -> str:
    """A fresh, empty bucket per test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the session: 4 logical CPUs on 2 cores (see docs/ARCHITECTURE.md, section 6)."""
    import ray
    from ray.data import DataContext

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=512 * 2**20,
        log_to_driver=False,
    )
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_session) -> str:
    """The session Ray's GCS address, for job subprocesses that join it instead of starting their own
    (a Ray start costs about 4 CPU-seconds on this 2-core machine)."""
    return ray_session.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def open_head(s3_endpoint, tmp_path_factory):
    """One `ray start --head` without authentication (RAY_AUTH_MODE=disabled), 2 CPUs, its Jobs API on, for
    the tests that join a cluster by address (test_runtime) or submit to one without auth (test_submit): a
    head costs about 10 s to start and stop on this 2-core machine."""
    from processes import started_head

    with started_head(tmp_path_factory.mktemp("open-head"), "disabled", num_cpus=2) as running:
        yield running
