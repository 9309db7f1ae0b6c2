"""Servers that tests start in their own processes: free ports, waiting for a listener, and a real
`ray start --head` that is stopped by its PID (never `ray stop`, which kills every Ray on the machine)."""

from __future__ import annotations

import ast
import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

RAY = str(Path(sys.executable).parent / "ray")
ROOT = Path(__file__).resolve().parent.parent
SIDE_PORTS = (
    "ray-client-server",
    "dashboard-agent-listen",
    "dashboard-agent-grpc",
    "runtime-env-agent",
    "metrics-export",
)


def modules_after(code: str, *packages: str) -> list[str]:
    """The modules of `packages` (torch by default) that a fresh interpreter holds after running `code` (from
    the project, `tests/` on its path): for the processes that must start without them, as an import of torch
    costs about 1.5 CPU-seconds and one of torchvision 1.3 more."""
    listing = f"print(sorted(m for m in sys.modules if m.split('.')[0] in {packages or ('torch',)!r}))"
    probe = f"import sys\nsys.path.insert(0, 'tests')\n{code}\n{listing}"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, what: str, timeout: float = 60.0) -> None:
    """Block until something accepts connections on 127.0.0.1:`port`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not open port {port} within {timeout:.0f} s")


def ray_env(**extra: str) -> dict[str, str]:
    """The test's environment for a Ray head or client: loopback only, no inherited cluster address,
    the venv's interpreter first on PATH (a submitted job's `python` is the head's)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_API_SERVER_ADDRESS")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # A test head need not drain gracefully on SIGTERM (Ray 2.60 waits up to 30 s by default).
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def ray_head(env: dict[str, str], num_cpus: int = 2, dashboard_port: int | None = None) -> Iterator[int]:
    """`ray start --head --block` on 127.0.0.1 (with the dashboard and Jobs API on `dashboard_port`,
    else none); yields the GCS port and stops the head by its PID."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard = (
        [f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1"]
        if dashboard_port
        else ["--include-dashboard=false"]
    )
    # Fixed default ports (the dashboard agent's 52365, the client server's 10001) collide with any
    # other Ray on the machine, and a head whose agent cannot bind never accepts a job.
    ports = [f"--{name}-port={free_port()}" for name in SIDE_PORTS]
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={temp}",
            "--node-ip-address=127.0.0.1",
            *dashboard,
            *ports,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        # 120 s: on a loaded 2-core machine a head's dashboard was seen to take over 60.
        wait_for_port(dashboard_port or port, "ray head", timeout=120.0)
        yield port
    finally:
        stop(head)
        shutil.rmtree(temp, ignore_errors=True)


@dataclass(frozen=True)
class Head:
    """A running head: its Jobs API URL, and the client environment that holds its token."""

    url: str
    env: dict[str, str]
    token: str
    port: int  # the GCS port, for `--address 127.0.0.1:<port>`


@contextlib.contextmanager
def started_head(home: Path, mode: str = "token", num_cpus: int = 4) -> Iterator[Head]:
    """A head with its token in <home>/.ray/auth_token, where Ray looks (made once per home).

    The head has S3 credentials (a node's own AWS chain) but not the endpoint: the jobs reach
    the local S3 server only because `submit` forwards AWS_ENDPOINT_URL from the submitter."""
    env = ray_env(HOME=str(home), TQDM_DISABLE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    token_file = home / ".ray" / "auth_token"
    if mode == "token" and not token_file.exists():
        subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, timeout=60, check=True)
    head_env = {k: v for k, v in env.items() if not k.startswith("AWS_ENDPOINT_URL")}
    if mode == "disabled":
        head_env["RAY_AUTH_MODE"] = "disabled"
    dashboard = free_port()
    with ray_head(head_env, num_cpus=num_cpus, dashboard_port=dashboard) as port:
        token = token_file.read_text().strip() if mode == "token" else ""
        yield Head(f"http://127.0.0.1:{dashboard}", env, token, port)


def stop(proc: subprocess.Popen) -> None:
    """Stop only what a test started: SIGTERM to `ray start --block` tears its cluster down; the
    process group is the fallback."""
    proc.terminate()
    try:
        proc.wait(45)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


REQUEST_LINE = re.compile(rb"(?m)^(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1")


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server, for tests that need a store that is far
    away or goes down.

    - `delay`: every answer is held that many seconds (a distant store); `most` is the most
      connections open at once (requests in flight).
    - `requests`: the requests passed on (method and path, in order of arrival).
    - `down()` refuses new connections (the listener closes) and resets the open ones; `up()`
      listens again on the same port."""

    def __init__(self, target_port: int, delay: float = 0.0):
        self.target, self.delay = target_port, delay
        self.port = free_port()
        self.open: set[socket.socket] = set()
        self.most = 0
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.up()

    def up(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        self.listener.close()
        with self.lock:
            for sock in self.open:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
                sock.close()
            self.open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.open.update((client, upstream))
                self.most = max(self.most, len(self.open) // 2)
            threading.Thread(target=self._pump, args=(client, upstream, 0.0, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.delay, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delay: float, asked: bool) -> None:
        try:
            while data := src.recv(65536):
                if asked:  # the client's side: request lines (reads send no body to mistake for one)
                    with self.lock:
                        self.requests += [(m.decode(), p.decode()) for m, p in REQUEST_LINE.findall(data)]
                time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self.lock:
                for sock in (src, dst):
                    if sock in self.open:
                        self.open.discard(sock)
                        sock.close()
