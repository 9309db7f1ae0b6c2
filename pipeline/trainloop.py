"""The per-worker fine-tuning loop that Ray Train runs on every rank (DDP over gloo or NCCL).

Each epoch: the rank's equal share of the augmented train rows (`loader.worker_batches`),
train steps with gradient accumulation, then its part of the val rows, metrics reduced over
the ranks, a checkpoint (rank 0 writes it; every rank reports), early stopping. Everything
random is a function of (seed, epoch, step, rank): the data order (the loader), dropout (seeded
per step) and the LR (a pure function of progress), so a run resumed from a checkpoint goes on
exactly as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from pipeline import devices, loader, report, schema, transfer
from pipeline.config import FinetuneConfig, LoaderConfig
from pipeline.preprocessing import DeviceNormalizer, Preprocessing, readonly_tensor

log = logging.getLogger("imgpipe")

STATE_FILE = "state.json"
TENSORS_FILE = "state.pt"
TOPK = 5


@contextlib.contextmanager
def checkpoint_folder(checkpoint) -> Iterator[Path]:
    """The checkpoint's files in a folder of this process's own, removed afterwards. Not `as_directory`: it shares
    one folder per node between the ranks that restore the same checkpoint, and a rank done with it deletes it
    under another still reading (Ray 2.60 counts the other readers before it takes the lock, and one can arrive
    in between: a restarted worker group then fails on a missing state.pt)."""
    with tempfile.TemporaryDirectory(prefix="imgpipe-checkpoint-") as folder:
        checkpoint.to_directory(folder)
        yield Path(folder)


@dataclass
class LoopSpec:
    """What every rank needs, built once on the driver and shipped in `train_loop_config`."""

    weights: object  # ObjectRef of models.ResolvedWeights: fetched once, no download on any node
    classes: list[str]
    prep: Preprocessing
    cfg: FinetuneConfig
    loader: LoaderConfig
    splits: object  # the loader.EpochSplits actor
    steps_per_epoch: int  # optimizer steps per epoch, for the LR schedule
    fault: str = ""  # tests only: "epoch:batch:rank:marker-file" raises once there


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on each rank: carry on from the run's latest checkpoint, if any."""
    ctx = ray.train.get_context()
    runner = FinetuneRunner(config["spec"], ctx.get_world_rank(), ctx.get_world_size())
    runner.restore(ray.train.get_checkpoint())
    runner.run()


class FinetuneRunner:
    """One rank's model, optimizer and run state; `run` trains until the last epoch or early stop."""

    def __init__(self, spec: LoopSpec, rank: int = 0, world: int = 1):
        self.spec, self.cfg = spec, spec.cfg
        self.topk = report.meaningful_k(len(spec.classes), TOPK)  # None: top-5 would cover every class
        self.rank, self.world = rank, world
        self.device = devices.worker_device(self.cfg.use_gpu, devices.assigned_gpus())
        if self.device.type == "cuda":
            # Ray Train maps the worker's GPU to a local index; NCCL collectives need it current.
            self.device = ray.train.torch.get_device()
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # drop_last batches: one input shape, tuned once
        self.precision = devices.resolve_precision(self.cfg.precision, self.device)
        self.channels_last = self.cfg.channels_last
        self.normalize = DeviceNormalizer(spec.prep, self.device, self.channels_last)
        torch.manual_seed(self.cfg.seed)  # the new classifier starts the same on every rank
        self.model = transfer.FineTuneModel(ray.get(spec.weights), len(spec.classes)).to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = transfer.create_optimizer(self.model, self.cfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing, ignore_index=schema.UNLABELED)
        self.state = {
            "epoch": 0,
            "batch": 0,
            "history": [],
            "best": None,
            "best_val": None,
            "waited": 0,
            "done": False,
            "partial": None,
        }
        self.net, self.phase, self.frozen = self.model, None, []
        self.group = _all_gather(uuid.uuid4().hex)[0]  # this worker group's id, rank 0's (loader.EpochSplits)
        if self.rank == 0:
            log.info("finetune rank 0 of %d: %s", self.world, devices.describe(self.device, self.precision))

    def run(self) -> None:
        while not self.state["done"]:
            epoch = self.state["epoch"]
            self.enter_phase(transfer.phase_of(epoch, self.cfg))
            train = self.train_epoch(epoch)
            val = self.validate(epoch)
            self.end_epoch(epoch, train, val)

    def enter_phase(self, phase: str) -> None:
        """Set what trains; DDP is rebuilt when that changes (it registers trainable parameters once)."""
        if phase == self.phase:
            return
        self.phase = phase
        self.frozen = transfer.set_trainable(self.model, phase, self.cfg.unfreeze_stages)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if self.rank == 0:
            log.info(
                "phase %s: %d stages frozen, %d trainable parameters", phase, len(self.frozen), _trainable(self.model)
            )

    def train_epoch(self, epoch: int) -> dict:
        """One pass over this rank's batches; returns train loss, top-1, top-5, images/s, data wait share."""
        transfer.train_mode(self.model, self.frozen, self.cfg.freeze_bn_stats)
        self.optimizer.zero_grad(set_to_none=True)
        resume_at = self.state["batch"]
        sums = torch.tensor(self.state["partial"] or [0.0] * 4, dtype=torch.float64, device=self.device)
        batches = loader.worker_batches(self.spec.splits, self.spec.loader, epoch, self.rank, self.group)
        bar = _progress(
            self.rank, self.spec.steps_per_epoch * self.cfg.accumulate, f"epoch {epoch + 1}/{self.cfg.epochs}"
        )
        waited, started, mark = 0.0, time.perf_counter(), time.perf_counter()
        index = -1
        for index, batch in enumerate(batches):
            waited += time.perf_counter() - mark
            if index >= resume_at:
                sums += self.train_step(batch, epoch, index)
                self.inject_fault(epoch, index)
                self.maybe_checkpoint(epoch, index, sums)
            bar.update(1)
            mark = time.perf_counter()
        bar.close()
        sums = _all_reduce(sums)
        elapsed = time.perf_counter() - started
        # Batches skipped on a mid-epoch resume were not trained here: not counted in the rate.
        images = (index + 1 - resume_at) * self.spec.loader.batch_size * self.world
        share = (
            float(_all_reduce(torch.tensor([waited / max(elapsed, 1e-9)], dtype=torch.float64, device=self.device))[0])
            / self.world
        )
        return {**_rates(sums, "train", self.topk), "images_per_s": images / max(elapsed, 1e-9), "data_wait": share}

    def train_step(self, batch: dict, epoch: int, index: int) -> torch.Tensor:
        """Forward, backward (DDP all-reduces on the accumulation window's last batch), and an
        optimizer step every `accumulate` batches; returns [loss x n, top-1 hits, top-5 hits, n]."""
        torch.manual_seed(step_seed(self.cfg.seed, epoch, index, self.rank))  # dropout, the same after a resume
        x, y = self.inputs(batch)
        last = (index + 1) % self.cfg.accumulate == 0
        sync = contextlib.nullcontext() if last or self.net is self.model else self.net.no_sync()
        with sync:
            with self.autocast():
                logits = self.net(x)
            loss = self.loss_fn(logits.float(), y)
            self.scaler.scale(loss / self.cfg.accumulate).backward()
        if last:
            step = (index + 1) // self.cfg.accumulate
            transfer.set_lr(
                self.optimizer, transfer.lr_factor(epoch + step / max(self.spec.steps_per_epoch, 1), self.cfg)
            )
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        return _hits(logits.detach(), y, loss.detach())

    @torch.no_grad()
    def validate(self, epoch: int) -> dict:
        """This rank's part of the val rows with the plain module (ranks see different counts, and
        DDP's forward is collective); loss and top-k reduced, predictions gathered for metrics."""
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        labels, topk = [], []
        for batch in loader.worker_eval_batches(self.spec.splits, self.spec.loader, epoch, self.rank, self.group):
            x, y = self.inputs(batch)
            with self.autocast():
                logits = self.model(x).float()
            sums += _hits(logits, y, self.loss_fn(logits, y))
            labels.append(y.cpu().numpy())
            topk.append(logits.topk(min(TOPK, logits.shape[1]), dim=1).indices.cpu().numpy())
        sums = _all_reduce(sums)
        k = min(TOPK, len(self.spec.classes))
        parts = _all_gather(
            (
                np.concatenate(labels) if labels else np.zeros(0, np.int64),
                np.concatenate(topk) if topk else np.zeros((0, k), np.int64),
            )
        )
        all_labels, all_topk = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return {
            **_rates(sums, "val", self.topk),
            "metrics": report.classification_metrics(all_labels, all_topk, self.spec.classes, self.topk or 1),
        }

    def end_epoch(self, epoch: int, train: dict, val: dict) -> None:
        """Record the epoch, keep the best, decide on stopping, checkpoint and report."""
        metrics = val.pop("metrics")
        row = {"epoch": epoch + 1, "phase": self.phase, **train, **val, "lr": self.optimizer.param_groups[0]["lr"]}
        state = self.state
        state["history"].append(row)
        if state["best"] is None or row["val_loss"] < state["best"]["val_loss"]:
            state["best"], state["best_val"], state["waited"] = row, metrics, 0
        else:
            state["waited"] += 1
        stop = self.cfg.patience is not None and state["waited"] >= self.cfg.patience
        if stop and self.rank == 0:
            log.info("early stop after epoch %d: val loss has not improved for %d epochs", epoch + 1, self.cfg.patience)
        state.update(
            epoch=epoch + 1, batch=0, partial=None, done=stop or epoch + 1 >= self.cfg.epochs, stopped_early=stop
        )
        if self.rank == 0:
            log.info(
                "epoch %d: train loss %.4f top-1 %.3f | val loss %.4f top-1 %.3f | %.0f img/s, data wait %.0f%%",
                epoch + 1,
                row["train_loss"],
                row["train_top1"],
                row["val_loss"],
                row["val_top1"],
                row["images_per_s"],
                100 * row["data_wait"],
            )
        self.save_checkpoint({k: v for k, v in row.items() if k != "phase"})

    def maybe_checkpoint(self, epoch: int, index: int, sums: torch.Tensor) -> None:
        """A mid-epoch checkpoint every `checkpoint_every_steps` optimizer steps (scored as the
        worst, so retention keeps it only while it is the latest)."""
        every = self.cfg.checkpoint_every_steps
        if not every or (index + 1) % self.cfg.accumulate or ((index + 1) // self.cfg.accumulate) % every:
            return
        self.state.update(batch=index + 1, partial=sums.tolist())
        self.save_checkpoint(
            {
                "epoch": epoch + (index + 1) / max(self.spec.steps_per_epoch * self.cfg.accumulate, 1),
                "val_loss": float("inf"),
            }
        )

    def save_checkpoint(self, metrics: dict) -> None:
        """Rank 0 writes the tensors and the run state; every rank reports (a collective)."""
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            tensors = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
            }
            torch.save(tensors, Path(tmp) / TENSORS_FILE)
            (Path(tmp) / STATE_FILE).write_text(json.dumps(self.state))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def restore(self, checkpoint) -> None:
        """Carry on from a checkpoint (a restarted worker group, or the same run started again)."""
        if checkpoint is None:
            return
        with checkpoint_folder(checkpoint) as folder:
            tensors = torch.load(Path(folder) / TENSORS_FILE, map_location=self.device, weights_only=True)
            self.state = json.loads((Path(folder) / STATE_FILE).read_text())
        self.model.load_state_dict(tensors["model"])
        self.optimizer.load_state_dict(tensors["optimizer"])
        self.scaler.load_state_dict(tensors["scaler"])
        if self.rank == 0:
            log.info("resumed from a checkpoint: epoch %d, batch %d", self.state["epoch"], self.state["batch"])

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 pixels to the device (pinned, async on GPU), normalised there; labels as int64."""
        pixels = readonly_tensor(batch[schema.PIXELS])
        labels = readonly_tensor(np.asarray(batch[schema.LABEL], dtype=np.int64))
        if self.device.type == "cuda":
            pixels, labels = pixels.pin_memory(), labels.pin_memory()
        return self.normalize(pixels.to(self.device, non_blocking=True)), labels.to(self.device, non_blocking=True)

    def autocast(self):
        dtype = devices.autocast_dtype(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def inject_fault(self, epoch: int, index: int) -> None:
        """Tests only: raise once at (epoch, batch, rank) named in `spec.fault`, to exercise recovery."""
        if not self.spec.fault:
            return
        at_epoch, at_batch, at_rank, marker = self.spec.fault.split(":", 3)
        if (epoch, index, self.rank) == (int(at_epoch), int(at_batch), int(at_rank)) and not os.path.exists(marker):
            Path(marker).write_text("fired")
            raise RuntimeError(f"injected fault at epoch {epoch}, batch {index}, rank {self.rank}")


def step_seed(seed: int, epoch: int, index: int, rank: int) -> int:
    """The torch seed of one train step on one rank."""
    return random.Random(f"{seed}/{epoch}/{index}/{rank}/step").getrandbits(63)


def _hits(logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    labelled = y >= 0
    top = logits.topk(min(TOPK, logits.shape[1]), dim=1).indices
    hit1 = (top[:, 0] == y).sum()
    hit5 = (top == y[:, None]).any(dim=1).sum()
    n = labelled.sum()
    return torch.stack([loss.double() * n, hit1.double(), hit5.double(), n.double()])


def _rates(sums: torch.Tensor, prefix: str, k: int | None) -> dict:
    """Loss, top-1 and (when `k`: it says something for these classes) top-k rates."""
    loss, hit1, hitk, n = sums.tolist()
    n = max(n, 1.0)
    rates = {f"{prefix}_loss": loss / n, f"{prefix}_top1": hit1 / n}
    return {**rates, f"{prefix}_top{k}": hitk / n} if k else rates


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _all_gather(obj) -> list:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _progress(rank: int, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=rank != 0, leave=False, mininterval=5)
