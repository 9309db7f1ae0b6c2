"""Model actors' start-up, shown in the job's timings: each actor times its own (weights from the
object store, the model, the engine: export, quantisation or a cached file) and reports it to one
small Ray actor; the driver reads the first actor ready and the slowest one."""

from __future__ import annotations

import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


class StartupClock:
    """Times the phases of one actor's constructor; `record` is what it reports."""

    def __init__(self) -> None:
        self.entered_at = time.time()  # wall clock: compared with the driver's, on another process
        self.last = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.notes: list[str] = []

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round(now - self.last, 2)
        self.last = now

    def record(self) -> dict:
        return {"entered_at": self.entered_at, "phases": dict(self.phases), "notes": list(self.notes)}


@ray.remote(num_cpus=0)
class StartupLog:
    """Collects the start-up records of one job's model actors."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        self.records.append(record)

    def summary(self) -> dict:
        return summarize(self.records, self.started_at)


def new_log():
    """A `StartupLog` on the driver's own node: a worker node lost mid-job (its actors are restarted
    elsewhere) must not take the log, and the job's summary with it, down."""
    here = ray.get_runtime_context().get_node_id()
    return StartupLog.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote()


def read(log) -> dict:
    """The log's summary; a log that did not survive (its node lost all the same) is reported, not raised:
    start-up timings are bookkeeping, never the reason a job fails."""
    try:
        return ray.get(log.summary.remote())
    except ray.exceptions.RayError as exc:
        return {"actors": 0, "lost": type(exc).__name__}


def summarize(records: list[dict], started_at: float) -> dict:
    """The actor count, the first actor ready (from the model stage's start: scheduling, process start
    and imports included) and the slowest constructor, each with its phases."""
    if not records:
        return {"actors": 0}

    def load(r: dict) -> float:
        return sum(r["phases"].values())

    first = min(records, key=lambda r: r["entered_at"] + load(r))
    slowest = max(records, key=load)
    return {
        "actors": len(records),
        "first_ready_s": round(max(0.0, first["entered_at"] - started_at) + load(first), 1),
        "first": {"before_constructor_s": round(max(0.0, first["entered_at"] - started_at), 1), **first},
        "slowest_load_s": round(load(slowest), 1),
        "slowest": slowest,
    }


def timings(summary: dict) -> dict[str, float]:
    """The start-up entries of a job's timings (seconds)."""
    if not summary.get("actors"):
        return {}
    return {
        "model actors: first ready, from the stage's start": summary["first_ready_s"],
        "model actors: slowest load (weights, model, engine)": summary["slowest_load_s"],
    }


def describe(summary: dict) -> str:
    """One line for the console: how long the model actors took to start, and on what."""
    if summary.get("lost"):
        return f"model actor start-up: not recorded (the log was lost: {summary['lost']})"
    if not summary.get("actors"):
        return "model actors: none started (nothing to write)"
    first, slowest = summary["first"], summary["slowest"]
    before = {"scheduling, process start, imports": first["before_constructor_s"]}
    phases = _phases({**before, **first["phases"]}, first)
    ready = f"ready {summary['first_ready_s']:.1f} s after the stage began ({phases})"
    if summary["actors"] == 1:
        return f"model actor start-up: {ready}"
    return (
        f"model actor start-up ({summary['actors']} actors): the first {ready}; "
        f"the slowest load {summary['slowest_load_s']:.1f} s ({_phases(slowest['phases'], slowest)})"
    )


def _phases(phases: dict[str, float], record: dict) -> str:
    text = ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items())
    return text + (f"; {', '.join(record['notes'])}" if record["notes"] else "")
