"""The training input pipeline: shards -> augmentation actors -> equal, shuffled per-worker batches.

    units (shards), in an order drawn from (seed, epoch)        shard-order shuffle
      -> read tasks (`sources.ImageSource.dataset`)               encoded bytes
      -> map_batches on an actor pool (`AugmentWorker`)         uint8 (N, crop, crop, 3)
      -> streaming_split(n, equal=True)                         same rows for every worker
      -> iter_batches(local_shuffle_buffer, drop_last)          same batches for every worker

Undecodable samples become error rows in the actors, are counted in an `ErrorLog` actor and
dropped there, before the split, so every worker still gets the same number of rows. Pixels
leave as uint8; `preprocessing.to_model_input` converts and normalises them on the device.

Epochs are explicit: `TrainInput.dataset(epoch)` is a pure function of (seed, epoch), so a
run resumed at epoch k sees what an uninterrupted run saw. Ray Train workers get their
epoch's iterator from one `EpochSplits` actor (`worker_batches`), which makes one
`streaming_split` of the train rows per epoch and hands rank r its part; the val rows are split
once per worker group and iterated again each epoch.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import ray

from pipeline import augment, placement, schema
from pipeline.config import AugmentConfig, LoaderConfig
from pipeline.decode import DEFAULT_MAX_PIXELS
from pipeline.preprocessing import Preprocessing
from pipeline.sources import ImageSource, Unit

log = logging.getLogger("imgpipe")

Batch = dict[str, np.ndarray]
OUTPUT_COLUMNS = (schema.KEY, schema.LABEL, schema.PIXELS)
ACTOR_BATCH = 32  # rows per actor call: large enough to amortise Ray's per-call cost
MAX_ERROR_EXAMPLES = 100


def shard_order(units: Sequence[Unit], seed: int, epoch: int) -> list[Unit]:
    """The epoch's unit order: a permutation drawn from (seed, epoch), the same on any machine."""
    order = list(units)
    random.Random(f"{seed}/{epoch}/shards").shuffle(order)
    return order


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of one worker's local shuffle buffer in one epoch."""
    return random.Random(f"{seed}/{epoch}/{rank}/buffer").getrandbits(32)


def actor_count(cfg: LoaderConfig, nodes: list[dict], held_cpus: float = 0.0) -> int:
    """Augmentation actors to start: `cfg.actors`, else what the eligible nodes' CPUs hold
    after `reserved_cpus` and `held_cpus` (the training workers' and the reads' share: a pool
    that takes them all starves the read tasks, and Ray waits for ever), at `actor_cpus` each."""
    if cfg.actors is not None:
        return cfg.actors
    cpus = sum(n["Resources"].get("CPU", 0) for n in eligible_nodes(cfg, nodes))
    return max(1, int((cpus - cfg.reserved_cpus - held_cpus) // cfg.actor_cpus))


def eligible_nodes(cfg: LoaderConfig, nodes: list[dict]) -> list[dict]:
    """Alive nodes the actors may use: all, or those without GPUs when `cpu_only_nodes`."""
    alive = [n for n in nodes if n.get("Alive", True)]
    if not cfg.cpu_only_nodes:
        return alive
    placement.cpu_only_selector(alive, "loader.cpu_only_nodes")  # fails loudly when nothing is left
    return [n for n in alive if not n["Resources"].get("GPU", 0)]


def label_selector(cfg: LoaderConfig, nodes: list[dict]) -> dict[str, str]:
    """Ray node-label selector for the actors: `actor_labels`, plus "no GPU node" if asked."""
    if not cfg.cpu_only_nodes:
        return dict(cfg.actor_labels)
    return placement.cpu_only_selector(nodes, "loader.cpu_only_nodes", cfg.actor_labels)


@ray.remote(num_cpus=0)
class ErrorLog:
    """Counts the samples the actors dropped, per epoch, with the first reasons as examples."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.examples: list[dict] = []

    def add(self, epoch: int, rows: list[dict]) -> None:
        self.counts[epoch] = self.counts.get(epoch, 0) + len(rows)
        self.examples.extend(rows[: MAX_ERROR_EXAMPLES - len(self.examples)])

    def summary(self) -> dict:
        return {"dropped": dict(self.counts), "examples": list(self.examples)}


class AugmentWorker:
    """The actor's batch function: transform, then count and drop the error rows."""

    def __init__(self, transform, epoch: int, errors) -> None:
        import torch

        torch.set_num_threads(1)  # one actor = one core; torch's pool would oversubscribe
        self.transform, self.epoch, self.errors = transform, epoch, errors

    def __call__(self, batch: Batch) -> Batch:
        return augment_batch(batch, self.transform, self.epoch, self.errors)


def augment_batch(batch: Batch, transform, epoch: int, errors) -> Batch:
    """Transform a batch, send its error rows to the `ErrorLog`, return the good rows. Ray Data
    runs it in tasks (`loader.pool=tasks`) or through `AugmentWorker` actors."""
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)  # one task = one core, as for the actors
    out = transform(batch, epoch=epoch)
    bad = out[schema.ERROR] != ""
    if bad.any():
        members = out[schema.MEMBER][bad] if schema.MEMBER in out else [""] * int(bad.sum())
        rows = [
            {"key": str(k), "source": schema.located(str(s), str(m)), "reason": str(r)}
            for k, s, m, r in zip(out[schema.KEY][bad], out[schema.SOURCE][bad], members, out[schema.ERROR][bad])
        ]
        # Waited for (rare: only batches with bad rows), so that a count read after the epoch
        # already holds it: a task's fire-and-forget call may reach the actor after the reader's.
        ray.get(errors.add.remote(epoch, rows))
    return {c: out[c][~bad] for c in OUTPUT_COLUMNS}


@dataclass
class TrainInput:
    """The train (and eval) input of one fine-tuning run; cheap to pickle into Ray workers.

    `prep` is the model's `Preprocessing` (crop size, interpolation); `train` and `val` are
    image sources (prepared shards or raw images), `val` optional. Build it on the driver once
    Ray is connected: it starts the run's `ErrorLog` actor.
    """

    train: ImageSource
    prep: Preprocessing
    augment: AugmentConfig
    loader: LoaderConfig
    val: ImageSource | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    held_cpus: float = 0.0  # CPUs the training workers hold: not for the augmentation pool
    errors: object = field(default=None, repr=False)  # the ErrorLog actor, shared by every copy

    def __post_init__(self) -> None:
        if self.errors is None:
            self.errors = ErrorLog.remote()

    def dataset(self, epoch: int) -> ray.data.Dataset:
        """The augmented train rows of `epoch`: key, label, pixels (uint8 NHWC)."""
        transform = augment.build_train_transform(self.prep, self.augment, self.max_pixels, epoch)
        units = shard_order(self.train.units, self.loader.seed, epoch)
        return self._through_actors(self.train.dataset(units), transform, epoch)

    def eval_dataset(self) -> ray.data.Dataset:
        """The val rows, eval transform (resize + centre crop), in shard order."""
        if self.val is None:
            raise ValueError("no validation source: build TrainInput with val=open_images(..., splits=['val'])")
        transform = augment.build_eval_transform(self.prep, self.max_pixels)
        return self._through_actors(self.val.dataset(), transform, -1)

    def split(self, epoch: int, n: int) -> list:
        """`n` iterators over the epoch's rows, with the same number of rows each."""
        return self.dataset(epoch).streaming_split(n, equal=True)

    def eval_split(self, n: int) -> list:
        """`n` iterators over the val rows: every row exactly once, so parts may differ by a few."""
        return self.eval_dataset().streaming_split(n, equal=False)

    def dropped(self) -> dict:
        """Samples dropped as undecodable so far: {"dropped": {epoch: n}, "examples": [...]}
        (epoch -1 is the eval split)."""
        return ray.get(self.errors.summary.remote())

    def _through_actors(self, ds: ray.data.Dataset, transform, epoch: int) -> ray.data.Dataset:
        # Blocks leave in shard order, whichever task finishes first: the split then hands every
        # rank the same rows in every run, so a resumed run trains on what an uninterrupted one did.
        ds.context.execution_options.preserve_order = self.loader.deterministic
        nodes = ray.nodes()
        selector = label_selector(self.loader, nodes)
        placement = {"label_selector": selector} if selector else {}
        if self.loader.pool == "tasks":
            return ds.map_batches(
                augment_batch,
                fn_kwargs={"transform": transform, "epoch": epoch, "errors": self.errors},
                # Whole blocks (a shard) and the read's own resources (one CPU): Ray Data then
                # fuses read and augment into one task per shard, so no raw bytes cross the object
                # store and a task starts once per shard, not once per 32 rows.
                batch_size=None,
                batch_format="numpy",
                **placement,
            )
        size = actor_count(self.loader, nodes, self.held_cpus if not self.loader.cpu_only_nodes else 0.0)
        log.info(
            "augmentation actors: %d x %g CPU%s",
            size,
            self.loader.actor_cpus,
            f", on nodes {selector}" if selector else "",
        )
        return ds.map_batches(
            AugmentWorker,
            fn_constructor_kwargs={"transform": transform, "epoch": epoch, "errors": self.errors},
            batch_size=ACTOR_BATCH,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=self.loader.actor_cpus,
            **placement,
        )


def iter_train_batches(iterator, cfg: LoaderConfig, epoch: int, rank: int = 0) -> Iterator[Batch]:
    """One worker's batches of an epoch: full batches only, through a seeded local shuffle."""
    return iterator.iter_batches(
        batch_size=cfg.batch_size,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=cfg.shuffle_buffer or None,
        local_shuffle_seed=shuffle_seed(cfg.seed, epoch, rank) if cfg.shuffle_buffer else None,
        prefetch_batches=cfg.prefetch_batches,
    )


@ray.remote(num_cpus=0)
class EpochSplits:
    """Hands Ray Train workers their iterators, part r to rank r: a `streaming_split` of the train rows
    per epoch (each epoch has its own shard order and augmentation), and one of the val rows that every
    epoch iterates again (the same rows each time, so one split coordinator serves the whole run).

    Rounds belong to a worker group (`group`: an id rank 0 draws and every rank shares). A restarted
    group gets fresh splits: the old one may have left a split mid-epoch, or served some ranks of a round
    and not others, and a split's `start_epoch` barrier waits for every part's consumer.
    """

    def __init__(self, train_input: TrainInput, world_size: int) -> None:
        self.input, self.world = train_input, world_size
        self.rounds: dict[str, tuple[str, int, list, set]] = {}  # kind -> (group, epoch, parts, ranks served)

    def iterator(self, epoch: int, rank: int, kind: str = "train", group: str = ""):
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside the world of {self.world} workers")
        if kind not in ("train", "val"):
            raise ValueError(f"unknown split kind {kind!r}; known: train, val")
        current = self.rounds.get(kind)
        ours = current is not None and current[0] == group
        if ours and current[1] == epoch and rank not in current[3]:
            pass  # the round this group is in: the rank's part of it
        elif ours and kind == "val" and epoch > current[1] and len(current[3]) == self.world:
            # Every rank of this group went through the last val round (validation ends in an all-reduce
            # over the ranks, before the next epoch trains), so the split stands at an epoch boundary.
            current = self.rounds[kind] = (group, epoch, current[2], set())
        else:
            parts = self.input.split(epoch, self.world) if kind == "train" else self.input.eval_split(self.world)
            current = self.rounds[kind] = (group, epoch, parts, set())
        current[3].add(rank)
        return current[2][rank]


def epoch_splits(train_input: TrainInput, world_size: int):
    """The `EpochSplits` actor for a run with `world_size` workers: make it on the driver and
    pass it to the workers (in `train_loop_config`)."""
    return EpochSplits.remote(train_input, world_size)


def worker_batches(splits, cfg: LoaderConfig, epoch: int, rank: int, group: str = "") -> Iterator[Batch]:
    """Inside a training worker: its batches of `epoch`, as many as every other rank gets."""
    iterator = ray.get(splits.iterator.remote(epoch, rank, "train", group))
    return iter_train_batches(iterator, cfg, epoch, rank)


def worker_eval_batches(splits, cfg: LoaderConfig, epoch: int, rank: int, group: str = "") -> Iterator[Batch]:
    """Inside a training worker: its part of the val rows after `epoch`, in order, every row
    once across the ranks (the last batch may be short, and counts may differ by one)."""
    iterator = ray.get(splits.iterator.remote(epoch, rank, "val", group))
    return iterator.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", prefetch_batches=cfg.prefetch_batches)


def batches_per_epoch(samples: int, world_size: int, batch_size: int) -> int:
    """Batches each worker gets from `samples` good rows (the split and drop_last floor it)."""
    return math.floor(samples / world_size) // batch_size
