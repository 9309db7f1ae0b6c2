"""Driver memory and planning time as the input grows: `prepare`, and the listing/planning of `features`.

For each size (10,000 and 100,000 tiny JPEGs in an ImageFolder on local disk by default), each step runs
in a fresh process, so that its peak RSS (`ru_maxrss`) is its own:

- prepare: embedded Ray + `prepare.run` (raw -> shards), wall seconds and the driver's peak RSS;
- plan: what `features.run` does on the driver before the first batch: `open_images` of the prepared
  shards and of the raw ImageFolder (a listing of every file), `plan_run` against an empty output;
- sink: the driver's end of the stream, `PartSink`, fed every row of the dataset as 1280-d float16
  embeddings in model-sized batches, shard by shard: its peak RSS shows it never holds them all.

    .venv/bin/python bench/bench_scale.py                       # 10,000 and 100,000 images
    .venv/bin/python bench/bench_scale.py --sizes 2000 20000    # quicker
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

CLASSES = 10
DIM = 1280  # EfficientNet-Lite0's embedding width
SHARD = 1000  # prepare.shard_max_samples default


def rss_mb() -> float:
    """This process's peak resident set so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_images(root: Path, n: int) -> None:
    """`n` tiny JPEGs (16x16, ~800 bytes) in `CLASSES` folders: a few encoded once, written many times."""
    import numpy as np
    from PIL import Image

    variants = []
    for seed in range(16):
        pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
        variants.append(buf.getvalue())
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"class{i % CLASSES}" / f"img{i:07d}.jpg").write_bytes(variants[i % len(variants)])


def step_prepare(work: Path) -> dict:
    """Embedded Ray, then `prepare` of work/raw into work/prepared."""
    from pipeline import runtime
    from pipeline.config import PrepareConfig, RayConfig, StorageConfig
    from pipeline.prepare import run

    runtime.connect(RayConfig())
    base = rss_mb()
    t0 = time.perf_counter()
    manifest = run(PrepareConfig(source=str(work / "raw"), output=str(work / "prepared")), StorageConfig())
    seconds = time.perf_counter() - t0
    assert manifest["samples"] + manifest["rejected"] == manifest["inputs"], manifest
    return {"seconds": seconds, "base_mb": base, "peak_mb": rss_mb(), "samples": manifest["samples"]}


def step_plan(work: Path) -> dict:
    """What `features.run` does on the driver before the first batch, timed piece by piece."""
    from pipeline import features, storage
    from pipeline.parts import plan_run
    from pipeline.sources import open_images

    base = rss_mb()
    t0 = time.perf_counter()
    shards = open_images(str(work / "prepared"))
    t1 = time.perf_counter()
    out = storage.resolve(str(work / "feats"))
    every, todo = plan_run(out, features.RUN_FILE, {"dim": str(DIM)}, shards.units, shards.units)
    t2 = time.perf_counter()
    raw = open_images(str(work / "raw"))
    t3 = time.perf_counter()
    assert len(todo) == len(every) == len(shards.units) and raw.count == shards.count
    return {
        "open_shards_s": t1 - t0,
        "plan_run_s": t2 - t1,
        "plan_s": t2 - t0,
        "open_raw_s": t3 - t2,
        "units": len(todo),
        "raw_units": len(raw.units),
        "base_mb": base,
        "peak_mb": rss_mb(),
    }


def step_sink(work: Path) -> dict:
    """Feed `PartSink` every row as a float16 embedding, 64 rows a batch, shard by shard; parts to work/sink."""
    import numpy as np

    from pipeline import features, schema, storage
    from pipeline.parts import PartSink
    from pipeline.sources import open_images

    source = open_images(str(work / "prepared"))
    out = storage.resolve(str(work / "sink"))
    sink = PartSink(out, source.units, features.features_table(DIM, "float16"), {"dim": str(DIM)})
    base = rss_mb()
    t0 = time.perf_counter()
    emb = np.ones((64, DIM), np.float16)
    for unit in source.units:
        for start in range(0, unit.count, 64):
            n = min(64, unit.count - start)
            keys = np.array([f"{unit.name}/{i}" for i in range(start, start + n)], dtype=object)
            sink.add(
                {
                    schema.KEY: keys,
                    schema.LABEL: np.zeros(n, np.int64),
                    schema.SOURCE: keys,
                    schema.SHARD: np.array([unit.name] * n, dtype=object),
                    schema.ERROR: np.array([""] * n, object),
                    schema.EMBEDDING: emb[:n],
                }
            )
    sink.close()
    held = source.count * DIM * 2 / 2**20
    return {
        "seconds": time.perf_counter() - t0,
        "base_mb": base,
        "peak_mb": rss_mb(),
        "all_embeddings_mb": held,
        "parts": len(list((work / "sink").rglob("*.parquet"))),
    }


STEPS = {"prepare": step_prepare, "plan": step_plan, "sink": step_sink}


def run_step(step: str, work: Path) -> dict:
    """One step in a fresh interpreter (its own peak RSS); its last stdout line is the JSON result."""
    cmd = [sys.executable, __file__, "--step", step, "--work", str(work)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{step} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(STEPS[args.step](args.work)))
        return
    results = {}
    for n in args.sizes:
        work = Path(tempfile.mkdtemp(prefix=f"bench-scale-{n}-"))
        try:
            t0 = time.perf_counter()
            make_images(work / "raw", n)
            print(f"{n:>7} images: generated in {time.perf_counter() - t0:.1f}s", flush=True)
            results[n] = {step: run_step(step, work) for step in ("prepare", "plan", "sink")}
            print(f"{n:>7} images: {json.dumps(results[n])}", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report(results)


def report(results: dict[int, dict]) -> None:
    """One table: each measure per size, and the ratio of the largest size to the smallest."""
    rows = [
        ("prepare: wall s", "prepare", "seconds"),
        ("prepare: driver peak RSS MiB", "prepare", "peak_mb"),
        ("prepare: driver RSS growth MiB (peak - after Ray start)", "prepare", "growth"),
        ("features planning s (open shards + plan_run)", "plan", "plan_s"),
        ("  open_images(prepared shards) s", "plan", "open_shards_s"),
        ("  plan_run s", "plan", "plan_run_s"),
        ("features listing of the raw ImageFolder s", "plan", "open_raw_s"),
        ("planning: driver peak RSS MiB", "plan", "peak_mb"),
        ("planning: driver RSS growth MiB (peak - after imports)", "plan", "growth"),
        ("PartSink over every row: peak RSS MiB", "sink", "peak_mb"),
        ("PartSink: RSS growth MiB", "sink", "growth"),
        ("  (all embeddings would be MiB)", "sink", "all_embeddings_mb"),
    ]
    sizes = sorted(results)
    print(f"\n{'':58}" + "".join(f"{n:>12,}" for n in sizes) + f"{'ratio':>9}")
    for label, step, key in rows:
        values = [_value(results[n][step], key) for n in sizes]
        ratio = values[-1] / values[0] if values[0] > 0 else float("nan")
        print(f"{label:58}" + "".join(f"{v:>12.3f}" for v in values) + f"{ratio:>8.1f}x")


def _value(result: dict, key: str) -> float:
    return result["peak_mb"] - result["base_mb"] if key == "growth" else result[key]


if __name__ == "__main__":
    main()
