"""Reader throughput, side by side: prepared shards vs WebDataset shards of another tool, plain and gzipped.

The same generated photo-like JPEGs, written as `imgpipe prepare` lays them out and by the webdataset
package's `ShardWriter` (`.tar` and `.tar.gz`), read from local disk through `open_images(...).dataset()`
(Ray Data read tasks, no decode) on an embedded Ray of 2 CPUs; rounds interleave the three, the first is
warm-up. Prints samples/s and the ratio to prepared shards.

    .venv/bin/python bench/bench_webshards.py            # 2,000 JPEGs in 8 shards, 5 rounds: ~1.5 min
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import ray  # noqa: E402
import webdataset as wds  # noqa: E402
from images import photo_jpeg, write_shards  # noqa: E402

from pipeline.sources import open_images  # noqa: E402

IMAGES, PER_SHARD, ROUNDS = 2000, 250, 5


def write_inputs(root: Path, images: list[bytes]) -> None:
    """The same samples as prepared shards and as foreign shards, plain and gzipped."""
    samples = [(f"k{i:05d}", data, i % 3) for i, data in enumerate(images)]
    write_shards(root / "prepared", {"train": samples}, PER_SHARD, ["a", "b", "c"])
    for name, ext in (("plain", "tar"), ("gz", "tar.gz")):
        (root / name).mkdir()
        with wds.ShardWriter(str(root / name / f"s-%06d.{ext}"), maxcount=PER_SHARD, verbose=0) as writer:
            for key, data, label in samples:
                writer.write({"__key__": key, "jpg": data, "cls": label})


def read_rate(uri: str) -> float:
    """Samples per second through the source's Ray Dataset."""
    started = time.perf_counter()
    rows = sum(len(b["key"]) for b in open_images(uri).dataset().iter_batches(batch_size=None, batch_format="numpy"))
    if rows != IMAGES:
        raise RuntimeError(f"{uri}: read {rows} rows, expected {IMAGES}")
    return rows / (time.perf_counter() - started)


def main() -> None:
    images = [photo_jpeg(320, 240, seed=i) for i in range(IMAGES)]
    root = Path(tempfile.mkdtemp(prefix="bench-webshards-"))
    write_inputs(root, images)
    print(f"{IMAGES} JPEGs 320x240, {sum(map(len, images)) / IMAGES / 1024:.0f} KiB each, {IMAGES // PER_SHARD} shards")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rates: dict[str, list[float]] = {}
    for round_ in range(ROUNDS):
        for name in ("prepared", "plain", "gz"):
            rate = read_rate(str(root / name))
            if round_:
                rates.setdefault(name, []).append(rate)
    base = statistics.median(rates["prepared"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:>8}: median {median:6.0f} samples/s, best {max(values):6.0f}; {median / base:.2f}x prepared")
    ray.shutdown()
    import shutil

    shutil.rmtree(root)


if __name__ == "__main__":
    main()
