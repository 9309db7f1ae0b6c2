"""What every job does first: parse the shared flags, load the config, log, connect to Ray."""

from __future__ import annotations

import argparse
import logging
import re
import sys

from ray.exceptions import RayError, RayTaskError

from pipeline import runtime, storage
from pipeline.config import Config, ConfigError, dump_config, load_config

log = logging.getLogger("imgpipe")
USER_ERRORS = (ConfigError, storage.StorageError, ValueError, FileNotFoundError)
_RAISED = re.compile(
    r"^(?:[\w.]+\.)?(?:ConfigError|Storage(?:Error|Unavailable|Refused)|ValueError|FileNotFoundError): (.+)$", re.M
)


def parse_config(job: str, description: str, argv: list[str] | None) -> Config:
    """`--config FILE`, repeated `--set a.b=c`, `--address ADDR`; exits with one line on a bad config."""
    parser = argparse.ArgumentParser(prog=f"imgpipe {job}", description=description)
    parser.add_argument("--config", "-c", help="YAML config file (see configs/)")
    parser.add_argument(
        "--set",
        "-s",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set prepare.seed=1",
    )
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    parser.add_argument("--quiet", "-q", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    overrides = list(args.set) + ([f"ray.address={args.address}"] if args.address else [])
    try:
        return load_config(args.config, overrides)
    except ConfigError as exc:
        sys.exit(f"imgpipe {job}: {exc}")


def start(cfg: Config, output: str, key: str) -> storage.Location:
    """Check the output (config key `key`) is writable, connect to Ray, write the resolved config there."""
    if not output:
        sys.exit(f"imgpipe: no output given; set {key} (a local path or s3:// / gs:// URI)")
    try:
        out = storage.resolve(output, cfg.storage)
        storage.check_writable(out)
        runtime.connect(cfg.ray)
        storage.write_bytes(out.join("config.yaml"), dump_config(cfg).encode())
    except storage.StorageError as exc:
        sys.exit(f"imgpipe: {exc}")
    return out


def run_job(job: str, fn, *args) -> object:
    """Call the job's pipeline entry; user-facing errors end the process with one line."""
    try:
        return fn(*args)
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        log.debug("failure", exc_info=True)
        sys.exit(f"imgpipe {job}: {message}")


def user_error(exc: BaseException) -> str | None:
    """The message of the config, storage or input error behind `exc`: its own, or that of what a Ray task
    raised (a RayTaskError's cause), or, when a Ray Data function raised it, the last such line of the
    traceback text, which is all that reaches the driver of the original error."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    if isinstance(cause, USER_ERRORS) and not isinstance(cause, RayError):
        # Our messages are one line; Ray Data appends its retry advice to a UDF's exception on lines of its own.
        return str(cause).split("\nFailed to apply UDF transform")[0]
    raised = _RAISED.findall(str(exc)) if isinstance(exc, RayError) else []
    return raised[-1] if raised else None
