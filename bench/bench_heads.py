"""Head training on cached features against training through the frozen backbone, side by side.

Speed: `train-head` on 100,000 cached 1,280-d embeddings (Parquet on local disk -> trained,
early-stopped head, metrics and plots written), against one epoch of the frozen backbone over
100,000 images, the cost that every epoch of training without a cache pays. The backbone epoch is
extrapolated from the measured rate of the end-to-end run below (decode + Lite0 forward + head
step, per image); the 100,000 embeddings are real digit embeddings from the features job,
resampled with noise (sigma = 0.3 x each dimension's std), so the head sees realistic geometry.

Accuracy: the same linear head, same seed, same minibatch order, same epochs, no augmentation,
trained (1) on the float16 embeddings cached by `imgpipe features`, and (2) end to end: every
step decodes its images and runs the frozen backbone (fp32) again. Test accuracy of both, on
scikit-learn's digits written as PNG files (as the demo does).

    .venv/bin/python bench/bench_heads.py                           # ~5 min on 2 cores
    .venv/bin/python bench/bench_heads.py --train 600 --test 600 --epochs 15 --embeddings 200000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

SPEED_TARGET, ACCURACY_TARGET_PP = 100.0, 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=300, help="digits to train the two heads on")
    parser.add_argument("--test", type=int, default=300, help="digits to test them on")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--embeddings", type=int, default=100_000, help="cached embeddings for the speed run")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import numpy as np

    from pipeline import runtime
    from pipeline.config import RayConfig

    work = Path(tempfile.mkdtemp(prefix="bench-heads-"))
    runtime.connect(RayConfig())
    files, labels, is_train = write_digit_subset(work / "digits", args.train, args.test)
    t0 = time.perf_counter()
    x = cache_features(work, files)
    print(f"features job over {len(files)} digits: {time.perf_counter() - t0:.0f}s", flush=True)
    train, test = np.flatnonzero(is_train), np.flatnonzero(~is_train)

    head_times = [time_head_training(work, x, labels, is_train, args.embeddings, 0)]
    cached_head, _ = fit(torch_rows(x[train]), labels[train], x[train], args)
    embed = backbone_on_images(files)
    train_stats = np.concatenate([embed(train[i : i + 256]).numpy() for i in range(0, len(train), 256)])
    e2e_head, epoch_seconds = fit(OnTheFly(embed, train), labels[train], train_stats, args, verbose=True)
    test_embeddings = np.concatenate([embed(test[i : i + 256]).numpy() for i in range(0, len(test), 256)])
    head_times.append(time_head_training(work, x, labels, is_train, args.embeddings, 1))

    acc_cached, acc_e2e = (
        accuracy(cached_head, x[test], labels[test]),
        accuracy(e2e_head, test_embeddings, labels[test]),
    )
    rate = len(train) / statistics.median(epoch_seconds)
    epoch_big, head_time = args.embeddings / rate, statistics.median(head_times)
    print(
        f"\nend to end through the frozen backbone: {rate:.1f} img/s (median of {len(epoch_seconds)} epochs "
        f"over {len(train)} images)"
    )
    print(f"  -> one epoch over {args.embeddings:,} images: {epoch_big:,.0f}s (extrapolated)")
    print(
        f"train-head on {args.embeddings:,} cached embeddings, read to written: {head_time:.1f}s (median of "
        f"{len(head_times)})"
    )
    ratio = epoch_big / head_time
    print(
        f"\nRATIO one backbone epoch / whole head training: {ratio:.0f}x  (target >= {SPEED_TARGET:.0f}x: "
        f"{'met' if ratio >= SPEED_TARGET else 'NOT met'})"
    )
    diff = 100 * abs(acc_cached - acc_e2e)
    print(
        f"ACCURACY on {len(test)} test digits: cached-features head {acc_cached:.2%}, end-to-end head {acc_e2e:.2%}, "
        f"difference {diff:.2f} pp (target <= {ACCURACY_TARGET_PP} pp: "
        f"{'met' if diff <= ACCURACY_TARGET_PP else 'NOT met'})"
    )
    shutil.rmtree(work, ignore_errors=True)


def write_digit_subset(root: Path, n_train: int, n_test: int):
    """A stratified subset of the digits as PNG files (the demo's writer); returns the files,
    their labels, and which are for training."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    from pipeline import demo, storage

    demo.write_digits(storage.resolve(str(root)))
    files = sorted(root.rglob("*.png"))
    labels = np.array([int(p.parent.name) for p in files])
    train, rest = train_test_split(np.arange(len(files)), train_size=n_train, stratify=labels, random_state=0)
    test = train_test_split(rest, train_size=n_test, stratify=labels[rest], random_state=0)[0]
    for i in set(range(len(files))) - set(train) - set(test):
        files[i].unlink()
    keep = sorted(set(train) | set(test))
    return [files[i] for i in keep], labels[keep], np.isin(keep, train)


def cache_features(work: Path, files: list[Path]):
    """`imgpipe features` over the digit files; returns their float16 embeddings in file order."""
    import numpy as np

    from pipeline import features, schema, storage
    from pipeline.config import FeaturesConfig, ModelConfig, StorageConfig

    out = storage.resolve(str(work / "features"))
    features.run(ModelConfig(), FeaturesConfig(source=str(work / "digits"), output=out.uri), StorageConfig())
    parts = json.loads(storage.read_bytes(out.join(features.RUN_FILE)))["parts"]
    table = parts.read_parts(out, parts, [schema.KEY, schema.EMBEDDING])
    emb = table.column(schema.EMBEDDING).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, 1280)
    row = {k: i for i, k in enumerate(table.column(schema.KEY).to_pylist())}
    return np.stack([emb[row[f"{p.parent.name}/{p.stem}"]] for p in files])


def backbone_on_images(files: list[Path]):
    """embed(indices) -> fp32 embeddings: read and decode those files, run the frozen backbone."""
    import numpy as np
    import torch

    from pipeline import augment, models, schema
    from pipeline.preprocessing import to_model_input

    backbone = models.load_backbone("efficientnet_lite0").to(memory_format=torch.channels_last).eval()
    transform = augment.build_eval_transform(backbone.preprocessing)

    def embed(indices) -> torch.Tensor:
        batch = {
            schema.KEY: np.array([str(i) for i in indices], dtype=object),
            schema.IMAGE: np.array([files[i].read_bytes() for i in indices], dtype=object),
            schema.ERROR: np.array([""] * len(indices), dtype=object),
        }
        with torch.inference_mode():
            return backbone(
                to_model_input(transform(batch)[schema.PIXELS], backbone.preprocessing, torch.device("cpu"))
            ).clone()

    return embed


class OnTheFly:
    """Stands in for the cached embeddings in `heads.train_epoch` (`x[idx].float()`), but runs
    the frozen backbone on the images each time it is indexed."""

    def __init__(self, embed, rows):
        self.embed, self.rows = embed, rows

    def __getitem__(self, idx):
        return self.embed(self.rows[idx.numpy()])


def torch_rows(x):
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def fit(x, y, stats, args, verbose: bool = False):
    """The linear head of `heads`, standardised by `stats`, trained by `heads.train_epoch` for a
    fixed number of epochs (no early stopping: both heads take the same steps, in the same
    order); returns the head and each epoch's seconds."""
    import torch

    from pipeline import heads

    torch.manual_seed(0)
    head = heads.create_head({"kind": "linear", "in_dim": 1280, "num_classes": 10})
    mean, std = heads.standardization(stats)
    head[0].mean.copy_(torch.from_numpy(mean))
    head[0].std.copy_(torch.from_numpy(std))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        loss, top1, _ = heads.train_epoch(
            head, x, torch.from_numpy(y), torch.nn.CrossEntropyLoss(), optimizer, args.batch_size, generator
        )
        seconds.append(time.perf_counter() - t0)
        if verbose:
            print(
                f"  end-to-end epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}, train top-1 {top1:.3f}, "
                f"{len(y) / seconds[-1]:.1f} img/s",
                flush=True,
            )
    return head.eval(), seconds


def accuracy(head, x, y) -> float:
    from pipeline import heads

    _, topk = heads.evaluate(head, x, y)
    return float((topk[:, 0] == y).mean())


def time_head_training(work: Path, x, y, is_train, n: int, run: int) -> float:
    """Write `n` embeddings resampled with noise (train 80% from the training digits, val and
    test 10% each from the two halves of the test digits, so no split shares a source) as a
    features output, with the features job's own sink; then time `heads.run` on it, default
    head config."""
    import numpy as np

    from pipeline import features, heads, parts, schema, storage
    from pipeline.config import HeadConfig, StorageConfig
    from pipeline.sources import Unit

    rng = np.random.default_rng(run)
    held = rng.permutation(np.flatnonzero(~is_train))
    sources = {
        "train": (np.flatnonzero(is_train), int(0.8 * n)),
        "val": (held[: len(held) // 2], n // 10),
        "test": (held[len(held) // 2 :], n - int(0.8 * n) - n // 10),
    }
    noise = 0.3 * x.astype(np.float32).std(0)
    out = storage.resolve(str(work / f"big-{run}"))
    meta = {
        "backbone": "efficientnet_lite0",
        "weights": "bench",
        "preprocessing": "{}",
        "dim": "1280",
        "dtype": "float16",
        "classes": json.dumps([str(d) for d in range(10)]),
        "source": "bench",
    }
    chunks = []
    for split, (rows, count) in sources.items():
        for k, start in enumerate(range(0, count, 5000)):
            pick = rng.choice(rows, min(5000, count - start))
            emb = (
                x[pick].astype(np.float32) + rng.normal(0, 1, (len(pick), x.shape[1])).astype(np.float32) * noise
            ).astype(np.float16)
            keys = np.array([f"{split}/{start + i}" for i in range(len(pick))], dtype=object)
            unit = Unit(f"{split}-{k:06d}", split, len(pick), ())
            chunks.append(
                (
                    unit,
                    {
                        schema.KEY: keys,
                        schema.LABEL: y[pick],
                        schema.SOURCE: keys,
                        schema.SHARD: np.array([unit.name] * len(pick), dtype=object),
                        schema.ERROR: np.array([""] * len(pick), dtype=object),
                        schema.EMBEDDING: emb,
                    },
                )
            )
    units = [u for u, _ in chunks]
    sink = parts.PartSink(out, units, features.features_table(1280, "float16"), meta)
    for _, batch in chunks:
        sink.add(batch)
    sink.close()
    parts.write_run_file(out, features.RUN_FILE, meta, parts.verify_parts(out, units))
    t0 = time.perf_counter()
    metrics = heads.run(HeadConfig(features=out.uri, output=str(work / f"head-{run}")), StorageConfig())
    seconds = time.perf_counter() - t0
    print(
        f"train-head on {n:,} cached embeddings: {seconds:.1f}s, {metrics['epochs_run']} epochs (best "
        f"{metrics['best_epoch']}), "
        f"test top-1 {metrics['test']['top1']:.2%}",
        flush=True,
    )
    return seconds


if __name__ == "__main__":
    main()
