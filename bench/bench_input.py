"""Training input throughput per core, side by side: how fast JPEG bytes become augmented batches.

  (a) decode only, Pillow (`Image.open(...).convert("RGB")`): the practical limit
  (b) torchvision `ImageFolder` + `DataLoader` (RandomResizedCrop 224, flip, ToTensor, Normalize)
  (c) imgpipe's train transform (`augment.build_train_transform`) in a plain loop
  (d) imgpipe's pipeline end to end: prepared shards on local disk -> Ray Data read tasks ->
      decode + augment (`--pool tasks`, the default, or `actors`) -> local shuffle -> batches of 64

on generated ImageNet-sized JPEGs (photo-like content, 500x375 and 375x500, quality 90). The
variants run interleaved, round after round, so that load from other processes hits them all
alike. Each is measured two ways: images per wall-clock second per core in use, and images per
CPU-second (user + system time of every process involved, Ray's included, from /proc), which a
busy machine disturbs far less. (a)-(c) run on one thread (`torch.set_num_threads(1)`,
`num_workers=0`); (d) keeps `--actors` cores busy (single-threaded tasks or actors, default one per
core); it runs one epoch over half the shards and one over all of them, each clocked from the
start of its iteration to its last batch, and counts the difference: the steady-state cost of the
other half, without the pool's start-up (a fixed few seconds per epoch), which both epochs pay
alike. Both clocks include the fill of the shuffle buffer, so the difference stays honest at any
size; sizes whose half epoch is under two shuffle buffers are refused, as the difference is then
mostly noise. (An earlier version clocked from the first batch: the buffer's fill, most of a small
epoch, fell outside the clock, and --images 2000 printed an impossible 3.3x.) Linux only (/proc).

    .venv/bin/python bench/bench_input.py                   # 4,000 images, 3 rounds: ~4 min
    .venv/bin/python bench/bench_input.py --images 8000 --rounds 5
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

BATCH = 64
SHUFFLE_BUFFER = 1000
TRAIN_SHARE = 1.0  # prepare_shards puts every image in the train split
TARGETS = (("c/b", 1.5), ("d/c", 0.95), ("c/a", 0.8))


@dataclass
class Run:
    """One variant's measurement in one round."""

    images: int
    wall: float  # seconds
    cpu: float  # CPU-seconds, all processes involved
    cores: int  # cores the variant keeps busy

    @property
    def per_core(self) -> float:
        return self.images / (self.wall * self.cores)

    @property
    def per_cpu_second(self) -> float:
        return self.images / self.cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 1, help="(d): augmentation actors, 1 CPU each")
    parser.add_argument("--pool", choices=("tasks", "actors"), default="tasks", help="(d): where decode + augment run")
    parser.add_argument("--any-order", action="store_true", help="(d): loader.deterministic=false")
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    if args.images * TRAIN_SHARE / 2 < 2 * SHUFFLE_BUFFER:
        parser.error(
            f"--images {args.images}: (d)'s half epoch must hold two shuffle buffers ({2 * SHUFFLE_BUFFER} rows); "
            f"use --images {int(4 * SHUFFLE_BUFFER / TRAIN_SHARE)} or more"
        )

    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-input-"))
    t0 = time.perf_counter()
    raw = make_imagefolder(work / "raw", args.images, args.classes)
    blobs = [p.read_bytes() for p in sorted(raw.rglob("*.jpg"))]
    print(
        f"generated {len(blobs)} JPEGs (avg {sum(map(len, blobs)) / len(blobs) / 1024:.0f} KiB) in "
        f"{time.perf_counter() - t0:.0f}s"
    )
    shards = prepare_shards(raw, work / "shards")

    variants = {
        "a": ("decode only, Pillow", lambda r: run_pillow_decode(blobs)),
        "b": ("torchvision ImageFolder + DataLoader", lambda r: run_torchvision(raw)),
        "c": ("imgpipe train transform, plain loop", lambda r: run_transform(blobs, epoch=r)),
        "d": (
            f"imgpipe Ray Data pipeline, {args.actors} {args.pool}",
            lambda r: run_pipeline(shards, args.actors, args.pool, not args.any_order, epoch=r),
        ),
    }
    runs: dict[str, list[Run]] = {k: [] for k in variants}
    run_pillow_decode(blobs[:200]), run_transform(blobs[:200], epoch=0)  # warm caches and allocators
    for r in range(args.rounds):
        for key, (_, fn) in variants.items():
            runs[key].append(fn(r))
        print(
            f"round {r + 1}/{args.rounds}: "
            + "  ".join(f"{k} {runs[k][-1].per_cpu_second:5.0f}" for k in variants)
            + "  img/CPU-s"
        )
    report(variants, runs)
    stage_profile(blobs[:300])


def report(variants: dict, runs: dict[str, list[Run]]) -> None:
    """Medians over the rounds, and the three target ratios."""
    wall = {k: statistics.median(r.per_core for r in v) for k, v in runs.items()}
    cpu = {k: statistics.median(r.per_cpu_second for r in v) for k, v in runs.items()}
    print(f"\nimages per second per core (median of {len(next(iter(runs.values())))} rounds; {os.cpu_count()} cores):")
    print(f"  {'':<48} {'wall x cores':>13} {'CPU-seconds':>12}")
    for key, (name, _) in variants.items():
        print(f"  ({key}) {name:<44} {wall[key]:13.0f} {cpu[key]:12.0f}")
    print("\nratios (target):     wall x cores   CPU-seconds")
    for name, target in TARGETS:
        top, bottom = name.split("/")
        w, c = wall[top] / wall[bottom], cpu[top] / cpu[bottom]
        verdict = "ok" if c >= target else "MISSED"
        print(f"  ({top})/({bottom}) >= {target:<4}      {w:10.2f}   {c:11.2f}   {verdict}")


def run_pillow_decode(blobs: list[bytes]) -> Run:
    from PIL import Image

    def decode_all() -> None:
        for b in blobs:  # keep nothing: a list of 1,000 decoded images would time page faults
            Image.open(io.BytesIO(b)).convert("RGB")

    return measured(len(blobs), 1, decode_all)


def run_torchvision(raw: Path) -> Run:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    recipe = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    loader = DataLoader(datasets.ImageFolder(str(raw), transform=recipe), batch_size=BATCH, shuffle=True, num_workers=0)
    count = []
    run = measured(len(loader.dataset), 1, lambda: count.extend(len(y) for _, y in loader))
    assert sum(count) == len(loader.dataset)
    return run


def run_transform(blobs: list[bytes], epoch: int) -> Run:
    import numpy as np

    from pipeline import schema
    from pipeline.augment import build_train_transform
    from pipeline.config import AugmentConfig
    from pipeline.preprocessing import Preprocessing

    fn = build_train_transform(Preprocessing(), AugmentConfig(), epoch=epoch)
    batches = [
        {
            schema.KEY: np.array([f"k{i}" for i in range(s, min(s + BATCH, len(blobs)))], dtype=object),
            schema.IMAGE: np.array(blobs[s : s + BATCH], dtype=object),
            schema.ERROR: np.array([""] * len(blobs[s : s + BATCH]), dtype=object),
        }
        for s in range(0, len(blobs), BATCH)
    ]
    outs = []
    run = measured(len(blobs), 1, lambda: outs.extend(fn(b)[schema.PIXELS].shape[0] for b in batches))
    assert sum(outs) == len(blobs)
    return run


def run_pipeline(shards: Path, actors: int, pool: str, ordered: bool, epoch: int) -> Run:
    """(d) on half the shards, then on all of them: the difference is the steady-state cost
    of the other half, without the actor pool's start-up and the pipeline's fill and drain."""
    from dataclasses import replace

    from pipeline.sources import open_images

    source = open_images(str(shards), splits=["train"])
    half = replace(source, units=source.units[: len(source.units) // 2])
    small = pipeline_epoch(half, actors, pool, ordered, epoch)
    full = pipeline_epoch(source, actors, pool, ordered, epoch)
    return Run(full.images - small.images, full.wall - small.wall, full.cpu - small.cpu, actors)


def pipeline_epoch(source, actors: int, pool: str, ordered: bool, epoch: int) -> Run:
    """One epoch of (d), clocked from the start of the iteration to its last batch."""
    from pipeline import schema
    from pipeline.config import AugmentConfig, LoaderConfig
    from pipeline.loader import TrainInput, iter_train_batches
    from pipeline.preprocessing import Preprocessing

    cfg = LoaderConfig(
        batch_size=BATCH,
        shuffle_buffer=SHUFFLE_BUFFER,
        pool=pool,
        deterministic=ordered,
        actors=actors,
        actor_cpus=1.0,
        prefetch_batches=4,
    )
    train_input = TrainInput(source, Preprocessing(), AugmentConfig(), cfg)
    last = source.count // BATCH - 1
    images, t1, c1 = 0, 0.0, 0.0
    t0, c0 = time.perf_counter(), tree_cpu_seconds()
    for i, batch in enumerate(iter_train_batches(train_input.dataset(epoch), cfg, epoch)):
        assert batch[schema.PIXELS].shape[1:] == (224, 224, 3)
        images += len(batch[schema.KEY])
        if i == last:  # before the actors exit and take their CPU counters with them
            t1, c1 = time.perf_counter(), tree_cpu_seconds()
    return Run(images, t1 - t0, c1 - c0, actors)


def measured(images: int, cores: int, fn) -> Run:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return Run(images, time.perf_counter() - t0, time.process_time() - c0, cores)


def tree_cpu_seconds() -> float:
    """User + system CPU-seconds of this process and every descendant (Ray's GCS, raylet, workers)."""
    parents, times = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(times.get(p, 0.0) for p in tree)


def stage_profile(blobs: list[bytes]) -> None:
    """Where (c)'s time goes, per image, stage by stage on the same images."""
    import numpy as np

    from pipeline.augment import flip_in_place, random_resized_crop_box, sample_rng
    from pipeline.decode import crop_region, read_header, resize_into

    boxes = []
    for i, b in enumerate(blobs):
        head = read_header(b)
        boxes.append(
            random_resized_crop_box(head.width, head.height, (0.08, 1.0), (3 / 4, 4 / 3), sample_rng(0, 0, f"k{i}"))
        )
    out = np.empty((224, 224, 3), np.uint8)
    regions = [crop_region(read_header(b), box, 224) for b, box in zip(blobs, boxes)]

    def each(fn):
        def loop() -> None:
            for i in range(len(blobs)):
                fn(i)  # results dropped at once, as in the transform

        return loop

    stages = {
        "seed the sample's generator": each(lambda i: sample_rng(0, 0, f"k{i}")),
        "parse the header (Pillow, EXIF)": each(lambda i: read_header(blobs[i])),
        "decode (simplejpeg, DCT-scaled if >= 2x)": each(lambda i: crop_region(read_header(blobs[i]), boxes[i], 224)),
        "crop + resize to 224 (torch, antialias)": each(lambda i: resize_into(regions[i], out)),
        "horizontal flip (torch)": each(lambda i: flip_in_place(out, True, False)),
    }
    print("\nwhere (c)'s time goes, per image (one core):")
    for name, fn in stages.items():
        run = measured(len(blobs), 1, fn)
        print(f"  {name:<44} {run.cpu / len(blobs) * 1000:6.3f} ms")
    print("  (the decode line includes the header parse)")


def make_imagefolder(root: Path, images: int, classes: int) -> Path:
    """`root/classNN/img_NNNNN.jpg`; one in five is portrait (375x500)."""
    jobs = [(root / f"class{i % classes:02d}" / f"img_{i:05d}.jpg", i) for i in range(images)]
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_photo, jobs, chunksize=32))
    return root


def _write_photo(job: tuple[Path, int]) -> None:
    from images import photo_jpeg

    path, i = job
    size = (375, 500) if i % 5 == 4 else (500, 375)
    path.write_bytes(photo_jpeg(*size, seed=i, quality=90))


def prepare_shards(raw: Path, out: Path) -> Path:
    """`imgpipe prepare` on the raw tree (embedded Ray), all of it into the train split."""
    from pipeline import runtime
    from pipeline.config import PrepareConfig, RayConfig, StorageConfig
    from pipeline.prepare import run

    runtime.connect(RayConfig())
    t0 = time.perf_counter()
    manifest = run(
        PrepareConfig(source=str(raw), output=str(out), split={"train": 1.0}, shard_max_samples=250), StorageConfig()
    )
    print(
        f"prepared {manifest['samples']} samples into {len(manifest['splits']['train']['shards'])} shards in "
        f"{time.perf_counter() - t0:.0f}s"
    )
    return out


if __name__ == "__main__":
    main()
