"""Connect to Ray: a cluster when an address is given, else an embedded local Ray.

The only module in `pipeline` that calls `ray.init`; jobs call `connect` once, first.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import ray

from pipeline.config import RayConfig

log = logging.getLogger("imgpipe")

# Passed to cluster workers so that they reach the same S3-compatible store as the driver.
# Credentials are not in this list: cluster nodes use their own AWS chain (instance roles).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


class ClusterUnreachable(ConnectionError):
    """The cluster address given cannot be joined; the message is one line that names it and what to check."""


def connect(cfg: RayConfig, *, log_to_driver: bool = True, on_timeout: Callable[[str], None] | None = None) -> str:
    """Start or join Ray and say which in the log; returns 'cluster <addr>' or 'embedded'.

    Joining a cluster is bounded by `cfg.connect_timeout_s`: a closed port fails at once; a
    listener that never answers as Ray would (Ray retries for minutes) calls `on_timeout` with the
    one-line reason when the bound passes, from another thread, while `ray.init` still waits (the
    caller ends the process there: `ray.init` cannot be interrupted)."""
    if ray.is_initialized():
        log.info("using the Ray runtime already started in this process")
        return "existing"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        join_cluster(address, cfg.connect_timeout_s, log_to_driver, on_timeout)
        log.info("connected to the Ray cluster at %s (%s CPUs, %s GPUs)", address, *_capacity())
        return f"cluster {address}"
    cores = os.cpu_count() or 1
    num_cpus = cfg.num_cpus or embedded_cpus()
    memory = cfg.object_store_memory_mb * 2**20 if cfg.object_store_memory_mb else None
    # address="local": never join a stale cluster that a killed head left in Ray's temp folder.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=memory,
        include_dashboard=False,
        log_to_driver=log_to_driver,
    )
    why = " (more than cores: model actors then never starve the read tasks)" if num_cpus > cores else ""
    log.info(
        "started an embedded local Ray: %d logical CPUs on %d cores%s; Ray's logs in %s; "
        "pass --address or set RAY_ADDRESS to use a cluster",
        num_cpus,
        cores,
        why,
        logs_dir() or "Ray's temp folder",
    )
    return "embedded"


def join_cluster(address: str, timeout: float, log_to_driver: bool, on_timeout: Callable[[str], None] | None) -> None:
    """`ray.init(address)` after a TCP check of host:port, under a watchdog of `timeout` seconds."""
    where = f"the Ray cluster at {address}"
    check = (
        "check --address / RAY_ADDRESS (ray://HEAD:10001 for Ray Client, HEAD:6379 for the head's GCS), "
        "that the head is running and that this machine reaches that port"
    )
    host, port = _host_port(address)
    if host is not None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
            raise ClusterUnreachable(f"cannot reach {where} ({reason}); {check}") from None
    watchdog = None
    if on_timeout is not None and timeout > 0:
        message = f"cannot join {where}: no Ray answered within {timeout:g} s (ray.connect_timeout_s); {check}"
        watchdog = threading.Timer(timeout, on_timeout, args=(message,))
        watchdog.daemon = True
        watchdog.start()
    # A submitted job's runtime env already reaches every worker; Ray refuses a ray.init
    # runtime env that names the same variables again.
    submitted = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    try:
        ray.init(address=address, runtime_env=None if submitted else client_runtime_env(), log_to_driver=log_to_driver)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, its own errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ClusterUnreachable(f"cannot join {where} ({first}); {check}") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()


def _host_port(address: str) -> tuple[str | None, int]:
    """(host, port) of `ray://host:port` or `host:port`; (None, 0) for what Ray resolves itself (auto)."""
    if "://" in address and not address.startswith("ray://"):
        return None, 0
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        port = parts.port
    except ValueError:
        return None, 0
    if not parts.hostname or port is None:
        return None, 0
    return parts.hostname, port


def logs_dir() -> str | None:
    """This node's Ray log folder (the session's `logs`), when this process started or joined a node."""
    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_logs_dir_path() if node is not None else None


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
