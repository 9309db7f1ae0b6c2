"""A stage's progress on the console: a line at most every EVERY_S seconds when stderr is not a
terminal (a log file, a pipe, a job's log), nothing on a terminal (Ray Data draws its bar there),
and nothing when the `imgpipe` logger is quieter than INFO (`-q`)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("imgpipe")

EVERY_S = 10.0
# Read once, at import: a job may later route file descriptor 2 through a pipe (jobs.console).
TERMINAL = sys.stderr.isatty()


class StageProgress:
    """`update(n)` as inputs finish; logs `<stage>: done of total (pct), rate/s` now and then."""

    def __init__(self, stage: str, total: int, unit: str = "inputs"):
        self.stage, self.total, self.unit = stage, total, unit
        self.done, self.started = 0, time.monotonic()
        self.last = self.started
        self.enabled = log.isEnabledFor(logging.INFO) and not TERMINAL

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.last >= EVERY_S and self.total < 0:  # not counted yet: foreign shards
            self.last = now
            log.info("%s: %d %s, %.1f/s", self.stage, self.done, self.unit, self.done / (now - self.started))
        elif self.enabled and now - self.last >= EVERY_S:
            self.last = now
            log.info(
                "%s: %d of %d %s (%.0f%%), %.1f/s",
                self.stage,
                self.done,
                self.total,
                self.unit,
                100 * self.done / max(self.total, 1),
                self.done / (now - self.started),
            )
