"""What a job prints to the console: imgpipe's own log lines, Ray's (to its log files unless
--verbose), and Ray Data's progress (one bar per stage on a terminal; on a pipe or a file, the
stage's own lines, Ray Data's progress blocks going to Ray's `ray-data.log`)."""

from __future__ import annotations

import atexit
import logging
import os
import re
import select
import sys
import threading
import time
import warnings

# Ray notices that every run would print and that say nothing about this run: the embedded Ray's
# token authentication (imgpipe keeps it on; README "Run on a cluster"), and the progress settings
# that imgpipe itself chose.
RAY_NOTICES = (
    "Token authentication is enabled for this Ray cluster",
    "Progress bars disabled",
    "Progress bars for operators disabled",
    "A new progress UI is available",
    "Progress will be logged because",
)
LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.INFO}
OUR_LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}
_chosen = ["normal"]
RAY_LEVELS = {"quiet": logging.ERROR, "normal": logging.WARNING, "verbose": logging.INFO}


def _not_a_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(RAY_NOTICES)


def configure(verbosity: str) -> None:
    """`quiet`: imgpipe's warnings and errors only (Ray's errors too, which a successful run has
    none of); `normal`: imgpipe's INFO lines and Ray's warnings; `verbose`: Ray's INFO lines and
    progress blocks as well. Ray's console handlers are tuned, not removed: its log files keep
    everything."""
    _chosen[0] = verbosity
    logging.basicConfig(level=LEVELS[verbosity], format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("imgpipe").setLevel(OUR_LEVELS[verbosity])
    import ray._private.log
    import ray.data
    from ray.data import DataContext

    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, ray._private.log.PlainRayHandler):
                handler.setLevel(RAY_LEVELS[verbosity])
                if verbosity != "verbose":
                    handler.addFilter(_not_a_notice)
    # Python warnings: one log line each (with --quiet, only those raised by imgpipe's own code).
    logging.captureWarnings(True)
    warnings.formatwarning = _one_line_warning
    if verbosity == "quiet":
        warnings.simplefilter("ignore")
        warnings.filterwarnings("default", module=r"(pipeline|jobs|cluster)(\.|$)")
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbosity != "quiet"
    # One bar per stage on a terminal; --verbose adds one per operator (decode, model, ...).
    ctx.enable_operator_progress_bars = verbosity == "verbose"
    _ = ray.data  # imported for its logging setup, which must exist before its handlers are tuned


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {message} ({filename}:{lineno})"


def verbosity() -> str:
    """What `configure` was last given (`normal` before that)."""
    return _chosen[0]


# Ray Data passes its own object refs (the map function, the DataContext) to every actor-pool
# worker's constructor, and Ray core then logs an ERROR per actor pool from C++, straight to file
# descriptor 2: "Actor ... has constructor arguments in the object store and max_restarts > 0"
# (ray-project/ray#57733). It says nothing about this run: the refs live as long as the dataset
# does, so restarts work (the node-loss tests show it). Only `max_restarts=0` would silence it, at
# the price of actor restarts; so outside --verbose that one line is dropped here.
NATIVE_NOISE = re.compile(
    rb"[^\n]*core_worker\.cc:\d+: Actor with class name: [^\n]*has constructor arguments in the "
    rb"object store and max_restarts > 0[^\n]*\n?"
)


def drop_native_noise() -> None:
    """Route this process's file descriptor 2 through a thread that forwards everything but
    `NATIVE_NOISE`, chunk by chunk as it comes (so terminal progress bars still draw);
    `restore_stderr` (also run at exit) puts the real one back."""
    read_end, write_end = os.pipe()
    real = os.dup(2)
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        while chunk := os.read(read_end, 65536):
            os.write(real, NATIVE_NOISE.sub(b"", chunk))

    thread = threading.Thread(target=forward, name="imgpipe-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(real, 2)  # from here on, writes go straight out
        # Let the forwarder move what was written before (Ray's processes may keep the pipe open,
        # so it never sees its end): wait while the pipe still holds data, 1 s at most.
        deadline = time.monotonic() + 1.0
        while thread.is_alive() and time.monotonic() < deadline and select.select([read_end], [], [], 0)[0]:
            time.sleep(0.01)
        time.sleep(0.02)

    _restore.append(restore)
    atexit.register(restore_stderr)


_restore: list = []


def restore_stderr() -> None:
    """Undo `drop_native_noise` (once), after the lines already written have gone out."""
    while _restore:
        _restore.pop()()
