"""`features` throughput against a plain PyTorch loop on the same cores, side by side.

  (a) imgpipe `features.run`: ImageFolder on local disk -> Ray Data read + decode tasks ->
      one frozen-backbone actor pool -> Parquet parts (embedded Ray, started once, not timed)
  (b) plain PyTorch: torchvision `ImageFolder` + `DataLoader(num_workers=cores)` with the
      same preprocessing (Resize 256 bicubic, CenterCrop 224, ToTensor, Normalize) and the same
      model (`models.load_backbone`), fp32, `torch.inference_mode()`, embeddings kept in memory
  (c) as (b), with the model and input in channels-last (what (a) does), for reference

on generated photo-like JPEGs (500x375, quality 90). Each run is clocked end to end: model load,
worker or actor start, every image embedded, (a) also its Parquet written and verified; only
the embedded Ray's own start is left out (paid once per process, or never on a cluster). One
untimed warm-up of each variant on 64 images first (file cache, imports), then the variants run
interleaved, round after round, so that load from other processes hits them all alike; the
medians are compared.

    .venv/bin/python bench/bench_features.py                      # 1,000 images, 2 rounds: ~5 min
    .venv/bin/python bench/bench_features.py --images 3000 --rounds 3 --backbone resnet50
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

TARGET = 1.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="DEFAULT")
    parser.add_argument(
        "--actors", type=int, default=None, help="(a): model actors (default: sized by features.plan_actors)"
    )
    args = parser.parse_args()

    from pipeline import features, runtime
    from pipeline.config import ModelConfig, RayConfig

    work = Path(tempfile.mkdtemp(prefix="bench-features-"))
    t0 = time.perf_counter()
    make_imagefolder(work / "raw", args.images)
    print(f"generated {args.images} JPEGs (500x375) in {time.perf_counter() - t0:.0f}s")
    t0 = time.perf_counter()
    runtime.connect(RayConfig())
    plan = features.model_actor_plan(ModelConfig(), args.actors, args.images, 64)
    print(
        f"embedded Ray started in {time.perf_counter() - t0:.1f}s (not timed below): {runtime.cluster_cpus()} "
        f"logical CPUs on {os.cpu_count()} cores; "
        f"(a) runs {plan.size} actor(s) x {plan.threads} torch threads"
    )

    make_imagefolder(work / "warmup", 64)
    variants = {
        "a": (
            "imgpipe features (Ray Data, actor pool, channels-last)",
            lambda root, r: run_pipeline(args, root, work / f"features-{r}"),
        ),
        "b": (
            f"plain PyTorch loop (ImageFolder + DataLoader, {os.cpu_count()} workers)",
            lambda root, r: run_plain(args, root, channels_last=False),
        ),
        "c": ("plain PyTorch loop, channels-last", lambda root, r: run_plain(args, root, channels_last=True)),
    }
    for key, (_, fn) in variants.items():
        fn(work / "warmup", f"warmup-{key}")
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for key, (name, fn) in variants.items():
            t0 = time.perf_counter()
            fn(work / "raw", r)
            seconds[key].append(time.perf_counter() - t0)
            print(f"round {r + 1}: ({key}) {args.images / seconds[key][-1]:6.1f} img/s  {name}", flush=True)
    report(args.images, variants, seconds)
    shutil.rmtree(work, ignore_errors=True)


def run_pipeline(args, root: Path, out: Path) -> None:
    from pipeline import features
    from pipeline.config import FeaturesConfig, ModelConfig, StorageConfig

    cfg = FeaturesConfig(source=str(root), output=str(out), batch_size=args.batch_size, actors=args.actors)
    result = features.run(ModelConfig(backbone=args.backbone, weights=args.weights), cfg, StorageConfig())
    assert result["rows"] == len(list(root.rglob("*.jpg"))), result


def run_plain(args, root: Path, channels_last: bool) -> None:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from pipeline import models

    backbone = models.load_backbone(args.backbone, args.weights).eval()
    prep = backbone.preprocessing
    transform = transforms.Compose(
        [
            transforms.Resize(prep.resize_size, interpolation=transforms.InterpolationMode(prep.interpolation)),
            transforms.CenterCrop(prep.crop_size),
            transforms.ToTensor(),
            transforms.Normalize(prep.mean, prep.std),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=os.cpu_count() or 1)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    embeddings = []
    with torch.inference_mode():
        for x, _ in loader:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            embeddings.append(backbone(x).to(torch.float16))
    assert sum(len(e) for e in embeddings) == len(dataset)


def report(images: int, variants: dict, seconds: dict) -> None:
    rate = {k: statistics.median(images / s for s in v) for k, v in seconds.items()}
    print(f"\nmedians over {len(seconds['a'])} rounds, {images} images:")
    for key, (name, _) in variants.items():
        print(f"  ({key}) {rate[key]:6.1f} img/s  {name}")
    ratio = rate["a"] / rate["b"]
    print(
        f"\nRATIO features throughput / plain PyTorch loop (a/b): {ratio:.2f}x  (target >= {TARGET}x: "
        f"{'met' if ratio >= TARGET else 'NOT met'})"
    )
    print(f"      against the channels-last plain loop (a/c): {rate['a'] / rate['c']:.2f}x")


def make_imagefolder(root: Path, images: int, classes: int = 10) -> None:
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    jobs = [(root / f"class{i % classes:02d}" / f"img_{i:05d}.jpg", i) for i in range(images)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_photo, jobs, chunksize=32))


def _write_photo(job: tuple[Path, int]) -> None:
    from images import photo_jpeg

    path, i = job
    path.write_bytes(photo_jpeg(500, 375, seed=i, quality=90))


if __name__ == "__main__":
    main()
