"""Reading raw images from a distant object store: one GET at a time against READ_THREADS in flight.

`features` and `classify` over raw files (no `prepare`) read each unit (up to 1,000 files) in one Ray
task, one object per GET. Against a cloud store every GET waits a round trip (tens of ms), so a task that
reads one object at a time spends its unit waiting. This benchmark reads one unit of generated JPEGs
(`ImageSource.head_rows`: the read tasks' own code, no Ray) from the local S3 server (moto) through a
proxy that holds every answer for `--delay` seconds, with 1 request in flight and with
`pipeline.shards.READ_THREADS`, interleaved round after round; and the same without the proxy. Prints
the medians and the ratio.

    .venv/bin/python bench/bench_remote_read.py                  # 400 JPEGs, 20 ms, 3 rounds: ~1 min
    .venv/bin/python bench/bench_remote_read.py --images 1000 --delay 0.05
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench_prepare import start_s3  # noqa: E402
from images import photo_jpeg  # noqa: E402
from processes import SlowProxy  # noqa: E402

from pipeline import shards, sources  # noqa: E402
from pipeline.config import StorageConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--delay", type=float, default=0.02, help="seconds the proxy holds each answer")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import boto3

    endpoint = start_s3()
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="bench")
    sizes = []
    for i in range(args.images):
        data = photo_jpeg(320, 240, seed=i)
        sizes.append(len(data))
        s3.put_object(Bucket="bench", Key=f"raw/img_{i:05d}.jpg", Body=data)
    proxy = SlowProxy(int(endpoint.rsplit(":", 1)[1]), args.delay)
    stores = {"moto": endpoint, f"moto + {args.delay * 1000:.0f} ms a request": f"http://127.0.0.1:{proxy.port}"}
    print(f"{args.images} JPEGs of {statistics.mean(sizes) / 1024:.0f} KiB in one unit; {args.rounds} rounds")

    threads = {"1 GET at a time": 1, f"{shards.READ_THREADS} GETs in flight": shards.READ_THREADS}
    seconds: dict = {(s, t): [] for s in stores for t in threads}
    for _ in range(args.rounds):
        for store, url in stores.items():
            source = sources.open_images("s3://bench/raw", StorageConfig(endpoint_url=url), chunk_size=args.images)
            for name, count in threads.items():
                sources.READ_THREADS = count
                started = time.perf_counter()
                rows = source.head_rows(args.images)
                seconds[(store, name)].append(time.perf_counter() - started)
                assert len(rows) == args.images and not any(r["error"] for r in rows)

    for store in stores:
        one, many = (statistics.median(seconds[(store, t)]) for t in threads)
        print(f"\n{store}:")
        for name, value in zip(threads, (one, many)):
            print(f"  {name:20s} {value:6.2f} s  {args.images / value:7.0f} images/s")
        print(f"  ratio {one / many:.1f}x")


if __name__ == "__main__":
    main()
