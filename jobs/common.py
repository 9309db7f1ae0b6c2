"""What every job does first: parse the shared flags, load the config, check, connect to Ray, and how
it fails: one line, prefixed `imgpipe <job>:`."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

import ray
from ray.exceptions import RayError, RayTaskError

from jobs import console, helptext
from pipeline import runtime, startup, storage
from pipeline.config import Config, ConfigError, dump_config, load_config
from pipeline.errors import UserError, user_error_names

log = logging.getLogger("imgpipe")
USER_ERRORS = (UserError, storage.StorageError)  # anything else is a bug: its traceback is kept
_RAISED = re.compile(r"^(?:[\w.]+\.)?(\w+): (.+)$", re.M)  # "module.Class: message" lines of a traceback's text


def parse_config(job: str, description: str, argv: list[str] | None, sections: tuple[str, ...] = ()) -> Config:
    """`--config FILE`, repeated `--set a.b=c`, `--address ADDR`, `-q`/`-v`; a bad config exits with one
    line; `--help` lists the config keys of `sections` (the ones the job reads) with their defaults."""
    parser = argparse.ArgumentParser(
        prog=f"imgpipe {job}",
        description=description,
        epilog=helptext.config_keys(sections, job),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("--quiet", "-q", action="store_true", help="print imgpipe's warnings and errors only")
    loud.add_argument("--verbose", "-v", action="store_true", help="also Ray's INFO lines and progress blocks")
    args = parser.parse_args(argv)
    console.configure("quiet" if args.quiet else "verbose" if args.verbose else "normal")
    overrides = list(args.set) + ([f"ray.address={args.address}"] if args.address else [])
    try:
        return load_config(args.config, overrides)
    except ConfigError as exc:
        sys.exit(f"imgpipe {job}: {exc}")


def start(job: str, cfg: Config, output: str, key: str, uses_ray: bool = True) -> storage.Location:
    """Check the output (config key `key`) can be written, without creating it; connect to Ray (a cluster
    within ray.connect_timeout_s) when the job `uses_ray`; write the resolved config there. Call it after
    the job's own checks."""
    if not output:
        sys.exit(f"imgpipe {job}: no output given; set {key} (a local path or s3:// / gs:// URI)")
    try:
        out = storage.resolve(output, cfg.storage)
        storage.check_writable(out)
        # Quiet: what Ray workers print (stderr of tasks and actors) stays in Ray's log files.
        log_to_driver = console.verbosity() != "quiet"
        if uses_ray and console.verbosity() != "verbose" and not ray.is_initialized():  # not in a test's process
            console.drop_native_noise()
        if uses_ray:
            runtime.connect(cfg.ray, log_to_driver=log_to_driver, on_timeout=lambda message: _end(job, message))
        elif cfg.ray.address:
            log.info("%s runs in this process alone: no Ray is joined (ray.address is not used)", job)
        storage.write_bytes(out.join("config.yaml"), dump_config(cfg).encode())
    except (storage.StorageError, runtime.ClusterUnreachable) as exc:
        sys.exit(f"imgpipe {job}: {exc}")
    return out


def _end(job: str, message: str) -> None:
    """End the process from any thread with one line (a `ray.init` that waits cannot be interrupted)."""
    console.restore_stderr()
    sys.stderr.write(f"imgpipe {job}: {message}\n")
    sys.stderr.flush()
    os._exit(1)


def plural(count: int, word: str) -> str:
    """`1 part`, `3 parts`."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def written_text(written: int) -> str:
    """How many parts this run wrote; a resume that found everything there says so."""
    return f"{plural(written, 'part')} written this run" if written else "nothing to write: every part was there"


def timings_text(result: dict) -> str:
    """The run's timings, with the model actors' start-up (weights, model, engine) when actors ran."""
    text = "timings (s): " + ", ".join(f"{k} {v:g}" for k, v in result["timings"].items())
    return text + ("\n" + startup.describe(result["startup"]) if result["startup"].get("actors") else "")


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
    if not isinstance(exc, RayError):
        return None
    names = user_error_names() | {cls.__name__ for cls in _subclasses(storage.StorageError)}
    raised = [message for name, message in _RAISED.findall(str(exc)) if name in names]
    return raised[-1] if raised else None


def _subclasses(cls: type) -> list[type]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _subclasses(sub))]
