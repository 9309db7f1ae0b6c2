"""How long `prepare` takes per 1,000 images, and where the time goes.

Generates ImageNet-sized JPEGs (500x375, quality 90) plus bad files, puts them in a local
S3-compatible bucket (moto's server, over HTTP) and on local disk, runs prepare on both, then
times each step of a shard task in isolation on the same images, side by side.

    .venv/bin/python bench/bench_prepare.py            # 2,000 images + 20 bad files
    .venv/bin/python bench/bench_prepare.py --images 500
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--bad", type=int, default=20)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # ~350 MB of images and shards at the defaults


def measure(args, work: Path) -> None:
    endpoint = start_s3()
    t0 = time.perf_counter()
    raw = make_dataset(work / "raw", args.images, args.bad, args.classes)
    print(f"generated {args.images} JPEGs + {args.bad} bad files in {time.perf_counter() - t0:.1f}s")

    import boto3
    from images import upload_tree

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="bench")
    t0 = time.perf_counter()
    upload_tree(s3, "bench", raw, "raw")
    print(f"uploaded to the local S3 server in {time.perf_counter() - t0:.1f}s")

    import ray

    from pipeline import runtime, storage
    from pipeline.config import PrepareConfig, RayConfig, StorageConfig
    from pipeline.prepare import run

    t0 = time.perf_counter()
    runtime.connect(RayConfig())
    print(
        f"embedded Ray started in {time.perf_counter() - t0:.1f}s ({runtime.cluster_cpus()} logical CPUs on "
        f"{os.cpu_count()} cores)"
    )

    n = args.images + args.bad
    # The first Ray Data execution starts the worker processes: time it apart from prepare.
    warm = work / "warm"
    make_dataset(warm, 20, 0, 2)
    t0 = time.perf_counter()
    run(PrepareConfig(source=str(warm), output=str(work / "warm-out")), StorageConfig())
    print(f"first prepare (20 images; starts Ray's workers) {time.perf_counter() - t0:.1f}s")
    rows = []
    for name, src, out in (
        ("S3 -> S3 (moto)", "s3://bench/raw", "s3://bench/prepared"),
        ("local -> local", str(raw), str(work / "prepared")),
    ):
        t0 = time.perf_counter()
        manifest = run(PrepareConfig(source=src, output=out, shard_max_samples=250), StorageConfig())
        wall = time.perf_counter() - t0
        assert manifest["samples"] + manifest["rejected"] == manifest["inputs"] == n, manifest
        assert manifest["rejected"] == args.bad
        errors = storage.read_bytes(storage.resolve(out).join("errors.jsonl")).decode().splitlines()
        assert sorted(json.loads(e)["source"].rsplit("/", 1)[1] for e in errors) == sorted(
            p.name for p in raw.rglob("bad_*")
        )
        rows.append((name, wall, manifest))
        print(
            f"prepare {name:<16} {wall:6.1f}s  = {wall / n * 1000:5.1f}s per 1,000 images  "
            f"({manifest['samples']} samples, {manifest['rejected']} rejected, "
            f"{sum(len(i['shards']) for i in manifest['splits'].values())} shards)"
        )
    ray.shutdown()
    steps(raw, endpoint, n)


def steps(raw: Path, endpoint: str, n: int) -> None:
    """Each step of a shard task alone, on the same files, in seconds per 1,000 images."""
    import pyarrow.fs as pafs
    import webdataset as wds
    from PIL import Image

    from pipeline import storage
    from pipeline.decode import ImageRejected, inspect_image
    from pipeline.layouts import discover

    loc = storage.resolve("s3://bench/raw")
    t0 = time.perf_counter()
    found = discover(loc, "auto", ["jpg"], r"^$", None)
    t_list = time.perf_counter() - t0
    paths = [i.path for i in found.inputs]

    def get(path: str) -> bytes:
        with loc.fs.open_input_stream(path, compression=None) as f:
            return f.read()

    t0 = time.perf_counter()
    blobs = [get(p) for p in paths[:300]]
    t_get1 = (time.perf_counter() - t0) / 300
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        blobs = list(pool.map(get, paths))
    t_get16 = (time.perf_counter() - t0) / len(paths)

    def check(data: bytes) -> None:
        try:
            inspect_image(data)
        except ImageRejected:
            pass

    def full_decode(data: bytes) -> None:
        try:
            Image.open(io.BytesIO(data)).load()
        except Exception:  # noqa: BLE001
            pass

    t_check = timed(lambda: [check(b) for b in blobs]) / len(blobs)
    t_full = timed(lambda: [full_decode(b) for b in blobs]) / len(blobs)

    def tar() -> bytes:
        buf = io.BytesIO()
        with wds.TarWriter(buf, user="", group="", mode=0o444, mtime=0, encoder=False) as w:
            for i, b in enumerate(blobs):
                w.write({"__key__": f"k{i}", "jpg": b, "cls": b"1", "json": b"{}"})
        return buf.getvalue()

    data = tar()
    t_tar = timed(tar) / len(blobs)
    t_sha = timed(lambda: hashlib.sha256(data).hexdigest()) / len(blobs)
    out = storage.resolve("s3://bench/upload-test.tar")
    t_put = timed(lambda: storage.write_bytes(out, data)) / len(blobs)
    local = pafs.LocalFileSystem()
    t_local = timed(
        lambda: [
            local.open_input_stream(p, compression=None).read()
            for p in [str(raw / i.path.split("/raw/", 1)[1]) for i in found.inputs]
        ]
    ) / len(blobs)

    print(
        "\nwhere the time goes (one core, seconds per 1,000 images; avg JPEG "
        f"{sum(map(len, blobs)) / len(blobs) / 1024:.0f} KiB):"
    )
    for name, per in (
        ("list the bucket (driver)", t_list / n),
        ("GET from moto, one at a time", t_get1),
        ("GET from moto, 16 threads (what prepare does)", t_get16),
        ("read from local disk", t_local),
        ("check: decode at 1/8 scale (what prepare does)", t_check),
        ("  vs. a full-size decode", t_full),
        ("tar the samples", t_tar),
        ("sha256 of the shard", t_sha),
        ("PUT the shard to moto", t_put),
    ):
        print(f"  {name:<50} {per * 1000:6.2f}s")
    print(f"  ratio full decode / 1/8-scale check: {t_full / t_check:.1f}x")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_dataset(root: Path, images: int, bad: int, classes: int) -> Path:
    from images import CLASS_COLORS, bad_files, jpeg_bytes

    per = images // classes
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(per + (1 if c < images % classes else 0)):
            data = jpeg_bytes(500, 375, seed=c * 100_000 + i, color=CLASS_COLORS[c % len(CLASS_COLORS)], quality=90)
            (root / f"class{c:02d}" / f"img_{i:05d}.jpg").write_bytes(data)
    kinds = list(bad_files().items())
    for j in range(bad):
        name, data = kinds[j % len(kinds)]
        (root / f"class{j % classes:02d}" / f"bad_{j:03d}_{name}.jpg").write_bytes(data)
    return root


def start_s3() -> str:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return endpoint


if __name__ == "__main__":
    main()
