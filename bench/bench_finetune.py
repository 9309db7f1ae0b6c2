"""Fine-tuning throughput, side by side, same data, model, epochs and cores:

  (a) `imgpipe finetune` on Ray Train: prepared shards -> Ray Data decode + augment -> one Ray
      Train worker holding every core's worth of torch threads (DDP needs no peer on one node)
  (b) the plain single-process loop of torchvision's reference training script: `ImageFolder` +
      `DataLoader` (one loader process per core) + RandomResizedCrop / flip / ToTensor / Normalize,
      NCHW fp32, the model with as many torch threads as cores
  (c) imgpipe's model step (`trainloop.FinetuneRunner.train_epoch`) fed by `TrainInput` in this
      process, without Ray Train: (a) against (c) is Ray Train's own overhead

on generated photo-like JPEGs (500x375 and 375x500). Throughput is images per second over each
epoch, clocked per epoch (the first epoch of each variant includes its start-up; the table takes
the last epoch, the steady state); the wall-clock of the whole run, start-up included, is printed
beside it. EfficientNet-Lite0 (offline ImageNet weights) at 128 px by default.

    .venv/bin/python bench/bench_finetune.py                      # 2,000 images, 2 epochs: ~6 min
    .venv/bin/python bench/bench_finetune.py --images 4000 --size 160 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from bench_input import make_imagefolder  # noqa: E402

TARGETS = (("a/b", ">=", 1.1), ("a/c", ">=", 0.9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=128, help="crop size (RandomResizedCrop)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--gpu", action="store_true", help="(a) alone, on one GPU (bench/gpu_finetune.sh)")
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    raw = make_imagefolder(work / "raw", args.images, 10)
    # On CPU, more logical CPUs than cores, so the pool never starves reads (docs/ARCHITECTURE.md, section 6); on a GPU
    # machine one per core: the trainer's share plus decode tasks fill the cores exactly.
    ray.init(
        address="local",
        num_cpus=args.cores if args.gpu else max(4, 2 * args.cores),
        include_dashboard=False,
        log_to_driver=False,
    )
    shards = prepare(raw, work / "shards")
    cfg = config(args, shards, work / "run")
    if args.gpu:
        report_gpu(run_ray_train(cfg), args)
        return
    results = {
        "b": run_plain(raw, args, cfg),
        "c": run_in_process(cfg, args.epochs),
        "a": run_ray_train(cfg),
    }
    report(results, args)


def prepare(raw: Path, out: Path) -> Path:
    """`imgpipe prepare`: 90% train, 10% val (fine-tuning validates every epoch)."""
    from pipeline.config import PrepareConfig, StorageConfig
    from pipeline.prepare import run

    run(
        PrepareConfig(source=str(raw), output=str(out), split={"train": 0.9, "val": 0.1}, shard_max_samples=250),
        StorageConfig(),
    )
    return out


def config(args, shards: Path, output: Path):
    from pipeline.config import build_config

    gpu = {"use_gpu": True, "cpus_per_worker": 2.0, "precision": "auto"} if args.gpu else {}
    return build_config(
        {
            "model": {"backbone": args.backbone, "weights": "none" if args.gpu else "DEFAULT"},
            "augment": {"hflip": 0.5},
            "loader": {
                "batch_size": args.batch,
                "shuffle_buffer": 500,
                "pool": "tasks",
                "actor_cpus": 1.0,
                "prefetch_batches": 2,
            },
            "finetune": {
                "source": str(shards),
                "output": str(output),
                "image_size": args.size,
                "epochs": args.epochs,
                "test_split": None,
                "num_workers": 1,
                "cpus_per_worker": float(args.cores),
                "optimizer": "sgd",
                "lr": 0.01,
                "channels_last": True,
                **gpu,
            },
        }
    )


def run_ray_train(cfg) -> dict:
    """(a): the whole job, as `imgpipe finetune` runs it (validation, checkpoints and export included)."""
    from pipeline import finetune

    t0 = time.perf_counter()
    summary = finetune.run(cfg)
    wall = time.perf_counter() - t0
    per_epoch = [h["images_per_s"] for h in summary["history"]]
    return {
        "name": "imgpipe finetune (Ray Train, 1 worker)",
        "per_epoch": per_epoch,
        "wall": wall,
        "wait": summary["history"][-1]["data_wait"],
        "waits": [h["data_wait"] for h in summary["history"]],
    }


def run_in_process(cfg, epochs: int) -> dict:
    """(c): the same train step and input, in this process, without Ray Train."""
    import ray
    import torch

    from pipeline import loader, trainloop
    from pipeline.finetune import input_preprocessing
    from pipeline.models import resolve_weights
    from pipeline.sources import open_images

    ft = cfg.finetune
    torch.set_num_threads(int(ft.cpus_per_worker))
    weights = resolve_weights(cfg.model.backbone, cfg.model.weights)
    prep = input_preprocessing(weights.preprocessing, ft.image_size)
    source = open_images(ft.source, splits=["train"])
    train_input = loader.TrainInput(source, prep, cfg.augment, cfg.loader, held_cpus=ft.cpus_per_worker)
    steps = loader.batches_per_epoch(source.count, 1, cfg.loader.batch_size)
    spec = trainloop.LoopSpec(
        ray.put(weights),
        [str(i) for i in range(len(source.classes))],
        prep,
        ft,
        cfg.loader,
        loader.epoch_splits(train_input, 1),
        steps,
    )
    runner = trainloop.FinetuneRunner(spec)
    runner.enter_phase("full")
    t0, per_epoch, wait = time.perf_counter(), [], 0.0
    for epoch in range(epochs):
        row = runner.train_epoch(epoch)
        per_epoch.append(row["images_per_s"])
        wait = row["data_wait"]
    return {
        "name": "imgpipe step + TrainInput, no Ray Train",
        "per_epoch": per_epoch,
        "wall": time.perf_counter() - t0,
        "wait": wait,
    }


def run_plain(root: Path, args, cfg) -> dict:
    """(b): torchvision's reference loop: ImageFolder + DataLoader + standard transforms, NCHW fp32."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from pipeline.finetune import input_preprocessing
    from pipeline.models import resolve_weights
    from pipeline.transfer import FineTuneModel, create_optimizer

    torch.set_num_threads(args.cores)
    weights = resolve_weights(cfg.model.backbone, cfg.model.weights)
    prep = input_preprocessing(weights.preprocessing, args.size)
    recipe = transforms.Compose(
        [
            transforms.RandomResizedCrop(args.size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=list(prep.mean), std=list(prep.std)),
        ]
    )
    data = datasets.ImageFolder(str(root), transform=recipe)
    batches = DataLoader(
        data, batch_size=args.batch, shuffle=True, num_workers=args.cores, drop_last=True, persistent_workers=True
    )
    model = FineTuneModel(weights, len(data.classes)).train()
    optimizer = create_optimizer(model, cfg.finetune)
    t_start, per_epoch, wait = time.perf_counter(), [], 0.0
    for _ in range(args.epochs):
        t0, images, waited, mark = time.perf_counter(), 0, 0.0, time.perf_counter()
        for x, y in batches:
            waited += time.perf_counter() - mark
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += len(y)
            mark = time.perf_counter()
        per_epoch.append(images / (time.perf_counter() - t0))
        wait = waited / (time.perf_counter() - t0)
    return {
        "name": "torchvision ImageFolder + DataLoader, plain loop",
        "per_epoch": per_epoch,
        "wall": time.perf_counter() - t_start,
        "wait": wait,
    }


def report_gpu(result: dict, args) -> None:
    """(a) on one GPU: images/s per epoch and the share of step time spent waiting for data."""
    print(
        f"\n{args.backbone} at {args.size} px, batch {args.batch}, one GPU, {args.cores} CPU cores for decode + augment"
    )
    for epoch, (rate, wait) in enumerate(zip(result["per_epoch"], result["waits"]), 1):
        print(f"  epoch {epoch}: {rate:8.0f} img/s   GPU waiting for data {100 * wait:4.0f}% of the epoch")
    print(
        "  goal on one H100: >= 2,500 img/s with < 10% waiting: "
        + ("ok" if result["per_epoch"][-1] >= 2500 and result["waits"][-1] < 0.1 else "MISSED")
    )


def report(results: dict, args) -> None:
    print(
        f"\n{args.backbone} at {args.size} px, batch {args.batch}, "
        f"{args.epochs} epochs of ~{int(args.images * 0.9)} train images, "
        f"{args.cores} cores"
    )
    print(f"  {'':<52} {'img/s (last epoch)':>18} {'each epoch':>18} {'run wall s':>10} {'data wait':>9}")
    for key in ("a", "b", "c"):
        r = results[key]
        epochs = " ".join(f"{v:.0f}" for v in r["per_epoch"])
        print(
            f"  ({key}) {r['name']:<48} {r['per_epoch'][-1]:18.1f} {epochs:>18} "
            f"{r['wall']:10.1f} {100 * r['wait']:8.0f}%"
        )
    print("\nratios (target):")
    for name, op, target in TARGETS:
        top, bottom = name.split("/")
        ratio = results[top]["per_epoch"][-1] / results[bottom]["per_epoch"][-1]
        print(f"  ({top})/({bottom}) {op} {target}: {ratio:.2f}  {'ok' if ratio >= target else 'MISSED'}")
    overhead = 1 - results["a"]["per_epoch"][-1] / results["c"]["per_epoch"][-1]
    print(f"  Ray Train overhead, 1 - (a)/(c): {overhead:+.1%} (target <= 10%)")


if __name__ == "__main__":
    main()
