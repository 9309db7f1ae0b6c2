"""`imgpipe submit` and `imgpipe jobs`: send a job to a Ray cluster through the Ray Jobs API, then
list, follow, and stop what was sent.

The project folder travels as the job's `working_dir` (code and configs only); the packages come
from the cluster's image, so nothing is reinstalled per job. The cluster's token (Ray's token
authentication) is read from Ray's standard places and sent as a header; it is never printed.
This module knows job names only as the caller passes them: `cluster` does not import `jobs`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

from pipeline.config import ConfigError, load_config
from pipeline.runtime import FORWARDED_ENV

ROOT = Path(__file__).resolve().parent.parent  # the project folder that becomes the working_dir
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded: environments, outputs, caches, version control (Ray also skips .gitignore'd paths).
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "data",
    "out",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.pyc",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 60  # how long a just-started head may take to accept jobs
PATH_KEYS = ("source", "output", "features", "head", "workdir")  # config keys that name data locations


class SubmitError(RuntimeError):
    """A submission or job query that cannot go ahead; the message is one line and says what to do."""


# ---------------------------------------------------------------- connecting


def resolve_address(address: str | None) -> str:
    """The Jobs API URL: --address, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS, else local."""
    env_http = os.environ.get("RAY_ADDRESS", "") if "://" in os.environ.get("RAY_ADDRESS", "") else ""
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS") or env_http or DEFAULT_ADDRESS).rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")) or not urlsplit(address).hostname:
        raise SubmitError(
            f"address {address!r} is not the Ray Jobs API; give the head's dashboard URL, "
            "e.g. --address http://HEAD:8265 (not ray:// or the GCS port)"
        )
    return address


def auth_headers() -> dict[str, str]:
    """The cluster token as an HTTP header, from where Ray looks (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token), whatever RAY_AUTH_MODE says here; empty when there is none."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    return dict(loader.get_token_for_http_header(ignore_auth_mode=True))


def connect(address: str | None):
    """A `JobSubmissionClient` for the cluster; an unreachable or refusing head is one `SubmitError`."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # The SDK's modules set INFO on their own loggers (upload, websocket chatter); warnings stay.
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    url = resolve_address(address)
    _check_reachable(url)
    headers = auth_headers()
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError:
        found = "the token found was refused" if headers else "no token was found"
        raise SubmitError(
            f"{url}: the cluster requires its authentication token and {found}; set RAY_AUTH_TOKEN "
            "or RAY_AUTH_TOKEN_PATH, or copy it to ~/.ray/auth_token (on the head: ray get-auth-token)"
        ) from None
    except Exception as exc:  # the SDK raises ConnectionError, RuntimeError or a JSON error for a non-Ray server
        raise SubmitError(f"{url}: not a Ray Jobs API ({_first_line(exc)}); give the head's dashboard URL") from None


def _check_reachable(url: str, timeout: float = 10.0) -> None:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SubmitError(
            f"cannot reach the Ray Jobs API at {url} ({reason}); check --address "
            "(the head's dashboard, port 8265 by default) and that the head is running"
        ) from None


# ---------------------------------------------------------------- building a submission


def job_module(job: str, jobs: Iterable[str]) -> str:
    """`train-head` -> `train_head`, checking the job is known and its module is in the project."""
    known = sorted(jobs)
    if job not in known:
        raise SubmitError(f"unknown job {job!r}; known: {', '.join(known)}")
    module = job.replace("-", "_")
    if not (ROOT / "jobs" / f"{module}.py").is_file():
        raise SubmitError(f"jobs/{module}.py is missing under {ROOT}; submit from a full checkout of imgpipe")
    return module


def job_arguments(args: list[str], section: str, cwd: Path | None = None) -> list[str]:
    """The job's own flags, with `--config FILE` made relative to the project (the working_dir on
    the cluster); checks the config loads here, so a bad key fails before anything is sent, and
    that the paths in the job's config `section` mean the same on the cluster."""
    out, config, is_value = [], None, False
    for arg in args:
        if is_value:
            config = arg = _project_path(Path(arg), cwd or Path.cwd())
        elif arg.startswith("--config="):
            config = _project_path(Path(arg.partition("=")[2]), cwd or Path.cwd())
            arg = f"--config={config}"
        is_value = arg in ("--config", "-c")
        out.append(arg)
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--set", "-s", action="append", default=[])
    try:
        cfg = load_config(ROOT / config if config else None, parser.parse_known_args(out)[0].set)
    except ConfigError as exc:
        raise SubmitError(str(exc)) from None
    for key, value in getattr(cfg, section).model_dump().items():
        # A relative path on the cluster lands in the job's temporary working_dir copy, then vanishes.
        if key in PATH_KEYS and value and "://" not in value and not value.startswith("/"):
            raise SubmitError(
                f"{section}.{key}={value} is a relative path, which on the cluster means a folder in "
                "the job's temporary copy of the project; give an s3:// or gs:// URI, or an absolute "
                "path on a disk every node shares"
            )
    return out


def _project_path(path: Path, cwd: Path) -> str:
    full = (cwd / path).resolve()
    if not full.is_file():
        raise SubmitError(f"config file {path} does not exist; pass a YAML file from configs/")
    if not full.is_relative_to(ROOT):
        raise SubmitError(
            f"config file {path} is outside the project folder {ROOT}, which is all the cluster "
            "receives; copy it under configs/"
        )
    return full.relative_to(ROOT).as_posix()


def runtime_env(extra_env: dict[str, str]) -> dict:
    """The project as working_dir, the store's endpoint/region, and no packages: the image has them."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    return {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": {**env, **extra_env}}


def submit(client, job: str, module: str, args: list[str], extra_env: dict[str, str]) -> str:
    """Send `python -m jobs.<module> ARGS`; returns the submission id."""
    entrypoint = shlex.join(["python", "-m", f"jobs.{module}", *args])
    submission_id = f"imgpipe-{job}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env=runtime_env(extra_env),
                metadata={"imgpipe_job": job},
            )
        except RuntimeError as exc:
            # A head that has just started answers before its job agent is up.
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise SubmitError(f"the cluster did not take the job: {_first_line(exc)}") from None
            time.sleep(1)


# ---------------------------------------------------------------- following and querying


def follow(client, submission_id: str) -> str:
    """Stream the job's logs to stdout until it ends; returns its final status.

    Ray's log tail reads the file once every 2 s and sees a job's end only on a later read, 2-4 s after it;
    so the status is polled beside it, and once the job has ended the rest of its log is read whole: the
    same text, at the job's end."""
    shown = 0

    async def stream() -> None:
        nonlocal shown
        async for chunk in client.tail_job_logs(submission_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            shown += len(chunk)

    async def ended() -> None:
        while str(await asyncio.to_thread(client.get_job_status, submission_id)) not in TERMINAL:
            await asyncio.sleep(0.5)

    async def both() -> None:
        tail, end = asyncio.ensure_future(stream()), asyncio.ensure_future(ended())
        done, _ = await asyncio.wait((tail, end), return_when=asyncio.FIRST_COMPLETED)
        if end in done and end.exception() is not None:
            await tail  # the status could not be read: the tail alone, to the end Ray gives it
            return
        for task in (tail, end):
            task.cancel()
        await asyncio.gather(tail, end, return_exceptions=True)
        if tail in done:
            tail.result()  # a tail that failed says why

    asyncio.run(both())
    status = wait_terminal(client, submission_id, timeout=60)
    if status in TERMINAL:
        rest = client.get_job_logs(submission_id)[shown:]
        sys.stdout.write(rest)
        sys.stdout.flush()
    return status


def wait_terminal(client, submission_id: str, timeout: float) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (or `timeout` passes); returns the status."""
    deadline = time.monotonic() + timeout
    status = str(client.get_job_status(submission_id))
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(submission_id))
    return status


def failure_line(client, submission_id: str) -> str:
    """The job's own one-line error (its last `imgpipe ...:` log line), else its last log line."""
    lines = [line.strip() for line in client.get_job_logs(submission_id).splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("imgpipe")]
    if ours or lines:  # else the last line: the exception of a traceback
        return (ours or lines)[-1]
    return _first_line(client.get_job_info(submission_id).message) or "no logs"


def job_info(client, submission_id: str):
    """`get_job_info`, with an unknown id said in one line."""
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise SubmitError(f"no job {submission_id!r} on this cluster; `imgpipe jobs list` shows the ids") from None
        raise


def list_lines(client) -> list[str]:
    """One line per submitted job, oldest first: id, status, start time, entrypoint."""
    jobs = sorted((j for j in client.list_jobs() if j.submission_id), key=lambda j: j.start_time or 0)
    width = max([len(j.submission_id) for j in jobs] + [13])
    lines = [f"{'SUBMISSION ID':<{width}}  {'STATUS':<9}  {'STARTED':<19}  ENTRYPOINT"]
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        entry = j.entrypoint if len(j.entrypoint) <= 70 else j.entrypoint[:67] + "..."
        lines.append(f"{j.submission_id:<{width}}  {str(j.status):<9}  {started:<19}  {entry}")
    return lines


def _first_line(text: object) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


# ---------------------------------------------------------------- the two commands


def main(argv: list[str], jobs: Iterable[str]) -> int:
    """`submit <job> ...` or `jobs <list|status|logs|stop> ...`; returns the exit code."""
    command, rest = argv[0], argv[1:]
    try:
        return run_submit(rest, jobs) if command == "submit" else run_jobs(rest)
    except SubmitError as exc:
        print(f"imgpipe {command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"imgpipe {command}: stopped following; the job goes on (imgpipe jobs stop ID stops it)", file=sys.stderr)
        return 130


def run_submit(argv: list[str], jobs: Iterable[str]) -> int:
    """Validate, upload, submit; with --follow, stream logs and return 0 only on SUCCEEDED."""
    parser = argparse.ArgumentParser(
        prog="imgpipe submit", allow_abbrev=False, description="Send a job to a Ray cluster; other flags go to the job."
    )
    parser.add_argument("job", help=f"one of: {', '.join(sorted(jobs))}")
    parser.add_argument("--address", help=f"the head's Jobs API (default: RAY_API_SERVER_ADDRESS, {DEFAULT_ADDRESS})")
    parser.add_argument("--follow", "-f", action="store_true", help="stream the logs; exit 0 only if it SUCCEEDED")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set a variable for the job")
    args, job_args = parser.parse_known_args(argv)
    module = job_module(args.job, jobs)
    job_args = job_arguments(job_args, "head" if args.job == "train-head" else args.job)
    extra_env = dict(_key_value(item) for item in args.env)
    client = connect(args.address)
    submission_id = submit(client, args.job, module, job_args, extra_env)
    print(submission_id, flush=True)
    if not args.follow:
        print(f"follow it with: imgpipe jobs logs {submission_id} --follow", file=sys.stderr)
        return 0
    status = follow(client, submission_id)
    if status == "SUCCEEDED":
        print(f"imgpipe submit: {submission_id} SUCCEEDED", file=sys.stderr)
        return 0
    reason = failure_line(client, submission_id) if status == "FAILED" else status.lower()
    print(f"imgpipe submit: {submission_id} {status}: {reason}", file=sys.stderr)
    return 1


def run_jobs(argv: list[str]) -> int:
    """`list`, `status ID`, `logs ID [--follow]`, `stop ID`."""
    address = argparse.ArgumentParser(add_help=False)  # --address before or after the action
    address.add_argument("--address", default=argparse.SUPPRESS, help=f"the Jobs API (default: {DEFAULT_ADDRESS})")
    parser = argparse.ArgumentParser(
        prog="imgpipe jobs", allow_abbrev=False, parents=[address], description="Jobs sent to a Ray cluster."
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", parents=[address], help="every submitted job")
    actions = {"status": "a job's status", "logs": "a job's logs", "stop": "stop a job, wait till it has ended"}
    for name, text in actions.items():
        p = sub.add_parser(name, parents=[address], help=text)
        p.add_argument("id", help="the submission id that `imgpipe submit` printed")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="follow until the job ends")
    args = parser.parse_args(argv)
    client = connect(getattr(args, "address", None))
    if args.action == "list":
        print("\n".join(list_lines(client)))
        return 0
    info = job_info(client, args.id)
    if args.action == "status":
        message = f"  {_first_line(info.message)}" if info.message else ""
        print(f"{args.id}: {info.status}{message}")
    elif args.action == "logs" and args.follow:
        follow(client, args.id)
    elif args.action == "logs":
        sys.stdout.write(client.get_job_logs(args.id))
    else:
        client.stop_job(args.id)
        print(f"{args.id}: {wait_terminal(client, args.id, timeout=60)}")
    return 0


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SubmitError(f"--env {item!r} must look like KEY=VALUE")
    return key, value
