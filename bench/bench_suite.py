"""The test suite's wall-clock time, one process against two (pytest-xdist), interleaved round after round.

    .venv/bin/pip install pytest-xdist                  # not a dependency: `make test` does not use it
    .venv/bin/python bench/bench_suite.py               # 1 round of each: about 22 minutes on 2 cores
    .venv/bin/python bench/bench_suite.py --rounds 2

Runs the main half of `make test` (`pytest -q`; the multinode half is not timed) as `make test` runs it, in
one process, and in two worker processes, `-n 2 --dist loadfile` (each whole test file on one worker, each
worker with its own S3 server and session Ray). The two alternate, so that the machine's drift between rounds
falls on both. Each run is clocked from the outside and the whole machine's busy CPU time is read from
/proc/stat: a run that keeps the cores busier does not always finish sooner. Any failing run makes the script
exit non-zero: a faster suite that fails measures nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"serial": [], "xdist": ["-n", "2", "--dist", "loadfile"]}


def busy_cpu_seconds() -> float:
    """CPU time the whole machine spent outside idle and iowait, since boot."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / 100


def run(mode: str) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *MODES[mode]]
    cpu, start = busy_cpu_seconds(), time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall, cpu = time.monotonic() - start, busy_cpu_seconds() - cpu
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    print(f"  {mode:7s} {wall:7.1f} s wall  {cpu:7.1f} CPU-s busy  {last}", flush=True)
    if done.returncode:
        sys.exit(f"{mode} run failed (exit {done.returncode}): {done.stdout[-2000:]}")
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if importlib.util.find_spec("xdist") is None:
        sys.exit("bench_suite: pytest-xdist is not installed; run .venv/bin/pip install pytest-xdist")
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for n in range(args.rounds):
        print(f"round {n + 1}", flush=True)
        for mode in MODES:
            results[mode].append(run(mode))
    wall = {mode: statistics.median(w for w, _ in runs) for mode, runs in results.items()}
    cpu = {mode: statistics.median(c for _, c in runs) for mode, runs in results.items()}
    print(f"median wall: serial {wall['serial']:.1f} s, xdist {wall['xdist']:.1f} s")
    print(f"xdist / serial wall: {wall['xdist'] / wall['serial']:.2f}   busy CPU: {cpu['xdist'] / cpu['serial']:.2f}")


if __name__ == "__main__":
    main()
