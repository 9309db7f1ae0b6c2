"""Connect to Ray: a cluster when an address is given, else an embedded local Ray.

The only module in `pipeline` that calls `ray.init`; jobs call `connect` once, first.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

from pipeline.config import RayConfig

log = logging.getLogger("imgpipe")

# Passed to cluster workers so that they reach the same S3-compatible store as the driver.
# Credentials are not in this list: cluster nodes use their own AWS chain (instance roles).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def connect(cfg: RayConfig) -> str:
    """Start or join Ray and say which in the log; returns 'cluster <addr>' or 'embedded'."""
    if ray.is_initialized():
        log.info("using the Ray runtime already started in this process")
        return "existing"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        # A submitted job's runtime env already reaches every worker; Ray refuses a ray.init
        # runtime env that names the same variables again.
        submitted = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(address=address, runtime_env=None if submitted else client_runtime_env(), log_to_driver=True)
        log.info("connected to the Ray cluster at %s (%s CPUs, %s GPUs)", address, *_capacity())
        return f"cluster {address}"
    num_cpus = cfg.num_cpus or embedded_cpus()
    memory = cfg.object_store_memory_mb * 2**20 if cfg.object_store_memory_mb else None
    # address="local": never join a stale cluster that a killed head left in Ray's temp folder.
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=memory, include_dashboard=False)
    log.info(
        "started an embedded local Ray (%d logical CPUs); pass --address or set RAY_ADDRESS to use a cluster", num_cpus
    )
    return "embedded"


def client_runtime_env() -> dict:
    """What a driver joining a cluster by address sends along: the store's endpoint variables,
    and this checkout's `pipeline` package, so that workers unpickle tasks with the code the
    driver runs (a node with imgpipe not installed, or another version of it, would fail with
    ModuleNotFoundError or worse). A submitted job has both already (its working_dir)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    package = str(Path(__file__).resolve().parent)
    return {"py_modules": [package], "excludes": ["__pycache__", "*.pyc"], **({"env_vars": env} if env else {})}


def embedded_cpus() -> int:
    """Logical CPUs for the embedded Ray: at least 4, so that an actor pool never starves the
    read tasks on a 2-core machine (Ray then waits forever, silently)."""
    return max(os.cpu_count() or 1, 4)


def cluster_gpus() -> int:
    """GPUs the connected cluster has in total."""
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    """CPUs the connected cluster has in total."""
    return int(ray.cluster_resources().get("CPU", 0))


def _capacity() -> tuple[int, int]:
    return cluster_cpus(), cluster_gpus()
