"""Cache features: a frozen backbone turns every image into its pooled penultimate embedding,
written to Parquet, one part per input unit, exactly once.

reader (sources) -> eval transform (Ray tasks) -> `Embedder` (Ray actor pool) -> `PartSink`
(driver; `parts`, which also decides what a rerun still has to write). `stream_units` is shared
with `predict`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import ray
import torch

from pipeline import augment, devices, placement, quantize, schema, startup, storage
from pipeline.config import FeaturesConfig, ModelConfig, StorageConfig, WebDatasetConfig, require
from pipeline.engine import OnnxBackbone, cached_onnx, compiled_backbone, onnx_export
from pipeline.engine import choose as choose_engine
from pipeline.errors import UserError
from pipeline.models import Backbone, ResolvedWeights, create_backbone, embedding_width, resolve_weights
from pipeline.parts import Batch, PartSink, plan_run, verify_parts, write_errors, write_run_file
from pipeline.placement import ActorPlan
from pipeline.preprocessing import DeviceNormalizer, readonly_tensor
from pipeline.progress import StageProgress
from pipeline.sources import ImageSource, Unit, open_images
from pipeline.startup import StartupClock
from pipeline.startup import timings as startup_timings

log = logging.getLogger("imgpipe")

RUN_FILE = "features.json"  # the run's identity, its parts, and (when complete) its counts
PASSTHROUGH = (schema.KEY, schema.LABEL, schema.SOURCE, schema.MEMBER, schema.SHARD, schema.ERROR, schema.UNIT_SIZE)


# ---------------------------------------------------------------- the model stage (Ray actors)


@dataclass(frozen=True)
class Shipped:
    """A value put once in Ray's object store, handed to actors as a reference inside this small
    container. Ray then inlines the constructor arguments: an actor that Ray may restart must not
    take them from the object store (Ray logs an ERROR for every such pool), and each actor still
    fetches the weights from the object store instead of resolving or downloading them again."""

    ref: ray.ObjectRef

    @staticmethod
    def put(value) -> "Shipped":
        return Shipped(ray.put(value))

    def get(self):
        return ray.get(self.ref)


class Embedder:
    """Ray Data actor: loads the frozen backbone once; image batch -> embedding batch.

    The device is the plan's (CUDA exactly when the actor was given GPUs, else CPU, even on a node
    whose GPUs Ray leaves visible), and so is the precision. On GPU, batches are padded to one
    fixed size (one shape: cuDNN tunes its kernels once) and staged through a pinned buffer made
    once. Rows that arrive with an error (unreadable, undecodable) are passed through with a zero
    embedding and their reason, so the sink can count and list them.
    """

    def __init__(
        self,
        weights,
        dtype: str = "float16",
        threads: int = 1,
        device: str = "cpu",
        precision: str = "fp32",
        batch_size: int = 64,
        engine: str = "eager",
        calibration=None,
        startup_log=None,
    ):
        clock = StartupClock()
        torch.set_num_threads(threads)
        if isinstance(weights, Shipped):  # resolved once on the driver, shipped through the object store
            weights = weights.get()
        clock.lap("weights")
        self.device = devices.worker_device(device == "cuda", devices.assigned_gpus())
        self.autocast = devices.autocast_dtype(precision) if self.device.type == "cuda" else None
        self.prep = weights.preprocessing
        self.normalize = DeviceNormalizer(self.prep, self.device)
        # int8's weight width when quantising: the plan's (`quantize.precision()` on the driver), else this CPU's.
        self.int8 = None
        if calibration is not None:
            self.int8 = precision if quantize.is_int8(precision) else quantize.precision()
        if engine == "onnxruntime" and self.device.type == "cpu":
            self.engine = engine if calibration is None else "onnxruntime int8"
            self.run_trunk = self.onnx_trunk(weights, max(1, threads), calibration, clock)
            clock.lap(engine)
        else:
            self.engine, self.model = "eager", self.build(weights)
            self.dim, self.classifier, self.run_trunk = self.model.dim, self.model.classifier, self.model
            clock.lap("model")
        self.dtype = np.dtype(dtype)
        self.batch_size, self.staging = batch_size, None
        if engine == "compile":  # one fixed batch shape, compiled now rather than on the first batch
            crop = self.prep.crop_size
            example = torch.zeros((batch_size, 3, crop, crop), device=self.device)
            self.engine = engine
            self.run_trunk = compiled_backbone(
                self.model, example.contiguous(memory_format=torch.channels_last), self.autocast
            )
            clock.lap(engine)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed batch shape: the fastest kernels, tuned once
            crop = self.prep.crop_size
            self.staging = torch.empty((batch_size, crop, crop, 3), dtype=torch.uint8).pin_memory()
            clock.lap("device")
        computed = precision if self.device.type == "cuda" else (self.int8 or "fp32")
        log.info("model actor on %s, %s", devices.describe(self.device, computed), self.engine)
        if startup_log is not None:
            try:  # waited for: the driver reads the log when the stream ends
                ray.get(startup_log.add.remote(clock.record()))
            except ray.exceptions.RayError as exc:  # bookkeeping: never the reason an actor fails
                log.warning("model actor: start-up not recorded (%s)", exc)

    def build(self, weights: ResolvedWeights) -> Backbone:
        """The PyTorch backbone on this actor's device, frozen."""
        model = create_backbone(weights).to(self.device, memory_format=torch.channels_last).eval()
        return model.requires_grad_(False)

    def onnx_trunk(self, weights: ResolvedWeights, threads: int, calibration, clock: StartupClock) -> OnnxBackbone:
        """The ONNX Runtime session: the node's cached export, loaded without building the PyTorch model (its
        imports and weights cost seconds of each actor's start), or made here if this actor is the node's first;
        quantised to int8 when calibration images came (`pipeline.quantize`)."""
        crop = self.prep.crop_size
        cached = cached_onnx(weights.backbone, weights.digest, crop)
        self.model = None
        if cached is None:
            self.model = self.build(weights)
            clock.lap("model")
            path, made = onnx_export(self.model, weights.backbone, weights.digest, crop)
            self.dim, self.classifier = self.model.dim, self.model.classifier
            clock.notes.append("ONNX exported" if made else "ONNX export cached")
        else:
            path, self.dim, self.classifier = cached
            clock.notes.append("ONNX export cached")
        if calibration is not None:
            pixels = calibration.get() if isinstance(calibration, Shipped) else calibration
            x = self.normalize(readonly_tensor(pixels)).contiguous().numpy()
            path, made = quantize.int8_model(path, x, quantize.calibration_digest(pixels), self.int8)
            bits = ", 7-bit weights" if self.int8 == "int8w7" else ""
            clock.notes.append(("int8 quantised" if made else "int8 cached") + bits)
        return OnnxBackbone(path, threads)

    def __call__(self, batch: Batch) -> Batch:
        good = np.asarray(batch[schema.ERROR]) == ""
        out = {c: batch[c] for c in PASSTHROUGH if c in batch}
        pixels = batch[schema.PIXELS] if good.all() else batch[schema.PIXELS][good]  # no copy when all are good
        emb = self.embed(pixels) if good.any() else None
        out.update(self.outputs(emb, good))
        return out

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, dim) embeddings on the model's device (fp32 on CPU, the
        precision's float on GPU)."""
        if self.staging is None and self.engine != "compile":
            return self.run_trunk(self.normalize(readonly_tensor(pixels))).float()
        if self.staging is None:  # compiled on CPU: every call padded to the one shape it was compiled for
            chunks = []
            for start in range(0, len(pixels), self.batch_size):
                part = readonly_tensor(pixels[start : start + self.batch_size])
                padded = torch.zeros((self.batch_size, *part.shape[1:]), dtype=part.dtype)
                padded[: len(part)] = part
                chunks.append(self.run_trunk(self.normalize(padded))[: len(part)].float())
            return torch.cat(chunks)
        chunks = []
        for start in range(0, len(pixels), self.batch_size):
            part = pixels[start : start + self.batch_size]
            self.staging[: len(part)].copy_(readonly_tensor(part))
            x = self.normalize(self.staging.to(self.device, non_blocking=True))  # the whole fixed-size batch
            with torch.autocast("cuda", dtype=self.autocast, enabled=self.autocast is not None):
                chunks.append(self.run_trunk(x)[: len(part)])
            torch.cuda.current_stream().synchronize()  # the staging buffer is reused by the next chunk
        return torch.cat(chunks)

    def outputs(self, emb: torch.Tensor | None, good: np.ndarray) -> Batch:
        """The stage's own columns for every row (zeros for rejected rows)."""
        full = np.zeros((len(good), self.dim), dtype=self.dtype)
        if emb is not None:
            full[good] = emb.to(torch.float16 if self.dtype == np.float16 else torch.float32).cpu().numpy()
        return {schema.EMBEDDING: full}


def model_actor_plan(
    model_cfg: ModelConfig,
    requested: int | None,
    rows: int | None,
    batch_size: int,
    cpu_only: str | None = None,
    digest: str = "",
) -> ActorPlan:
    """The connected cluster's plan for `rows` inputs (None: not counted yet) in model batches of
    `batch_size`, logged in one line; `cpu_only` names the setting that keeps CPU work off GPU
    nodes, when it is on; `digest` (the weights') keys a cached engine export."""
    nodes = ray.nodes()
    single_node = len([n for n in nodes if n["Alive"]]) == 1
    cores = (os.cpu_count() or 1) if single_node else None
    batches = math.ceil(rows / batch_size) if rows is not None else None
    plan = placement.plan_actors(model_cfg, requested, batches, cores, cpu_only)
    engine = choose_engine(model_cfg.engine, plan.device, digest, model_cfg.quantize)
    int8 = model_cfg.quantize == "int8"
    plan = replace(plan, engine=engine, precision=quantize.precision() if int8 else plan.precision)
    where = "CPU-only nodes" if plan.cpu_selector else "any node"
    log.info(
        "plan: %s; %s, batch %d; reads + decode: tasks of 1 CPU on %s",
        placement.describe_cluster(nodes),
        plan.describe(),
        batch_size,
        where,
    )
    return plan


def stream_units(
    source: ImageSource,
    units: Sequence[Unit],
    weights: ResolvedWeights,
    actor: type,
    actor_kwargs: dict,
    plan: ActorPlan,
    batch_size: int,
    decode_batch: int,
    sink: PartSink,
    stage: str = "features",
) -> dict:
    """Read `units`, decode on tasks, run `actor` on an actor pool per `plan`, and feed the sink;
    the `stage`'s progress goes to the log off a terminal (`pipeline.progress`). Returns the model
    actors' start-up (`startup.summarize`)."""
    # A unit leaves its read task in decode-sized blocks as it is read, so that decoding spreads over
    # tasks and the model actors start on a unit's first batch, not after its last file is read.
    cpu_work = plan.cpu_remote_args
    ds = source.dataset(units, decode_batch, **cpu_work).repartition(target_num_rows_per_block=decode_batch)
    ds = ds.map_batches(
        augment.build_eval_transform(weights.preprocessing), batch_size=decode_batch, batch_format="numpy", **cpu_work
    )
    kwargs = {
        "weights": Shipped.put(weights),
        "threads": plan.threads,
        "device": plan.device,
        "precision": plan.precision,
        "batch_size": batch_size,
        "engine": plan.engine,
        "startup_log": startup.new_log(),
    }
    ds = ds.map_batches(
        actor,
        fn_constructor_kwargs={**actor_kwargs, **kwargs},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_size, max_size=plan.max_size),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        **(cpu_work if plan.device == "cpu" else {}),
    )
    # GPU actors that cannot be placed (a node with too few CPUs for them, GPUs that never come)
    # end the job after a bound instead of leaving it pending for ever.
    ds.context.wait_for_min_actors_s = int(plan.start_wait_s) if plan.start_wait_s > 0 else -1
    counted = all(u.count >= 0 for u in units)  # foreign shards are counted as they are read
    progress = StageProgress(stage, sum(u.count for u in units) if counted else -1)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        sink.add(batch)
        progress.update(len(batch[schema.KEY]))
    sink.close()
    return startup.read(kwargs["startup_log"])


def calibration_kwargs(plan: ActorPlan, source: ImageSource, prep) -> dict:
    """The model actors' `calibration` argument: with int8, the first `quantize.CALIBRATION_IMAGES`
    decodable images of `source` as the model sees them (uint8 NHWC), read here in unit order, so
    that a resumed run calibrates on the same images; shipped through the object store."""
    if not quantize.is_int8(plan.precision):
        return {}
    rows = source.head_rows(2 * quantize.CALIBRATION_IMAGES)
    pixels = np.zeros((0,))
    if rows:
        batch = {c: np.asarray([r[c] for r in rows], dtype=object) for c in (schema.KEY, schema.IMAGE, schema.ERROR)}
        decoded = augment.build_eval_transform(prep)(batch)
        pixels = decoded[schema.PIXELS][decoded[schema.ERROR] == ""]
    if not len(pixels):
        raise UserError(
            f"model.quantize=int8 calibrates on the input's first images, and none of the first {len(rows)} "
            f"of {source.location.uri} decodes"
        )
    log.info(
        "int8: calibrating on the first %d images of %s",
        min(len(pixels), quantize.CALIBRATION_IMAGES),
        source.location.uri,
    )
    return {"calibration": Shipped.put(np.ascontiguousarray(pixels[: quantize.CALIBRATION_IMAGES]))}


# ---------------------------------------------------------------- the features job


def features_table(dim: int, dtype: str) -> Callable[[Batch], pa.Table]:
    """`make_table` for features parts: key, label, embedding as fixed_size_list<dtype>[dim]."""
    part_schema = schema.features_schema(dim, dtype)

    def make(rows: Batch) -> pa.Table:
        if not len(rows[schema.KEY]):
            return part_schema.empty_table()
        emb = np.asarray(rows[schema.EMBEDDING], dtype=dtype).reshape(-1, dim)
        return pa.table(
            {
                schema.KEY: pa.array(np.asarray(rows[schema.KEY]).astype(str), pa.string()),
                schema.LABEL: pa.array(np.asarray(rows[schema.LABEL]).astype(np.int32), pa.int32()),
                schema.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
                **origin_columns(rows),
            },
            schema=part_schema,
        )

    return make


def origin_columns(rows: Batch) -> dict[str, pa.Array]:
    """The `source` and `member` output columns: which object (and which shard member) each row is."""
    n = len(rows[schema.KEY])
    return {
        c: pa.array(np.asarray(rows[c]).astype(str) if c in rows else np.full(n, ""), pa.string())
        for c in (schema.SOURCE, schema.MEMBER)
    }


@dataclass(frozen=True)
class Checked:
    """What `check` found: the input, the output location, the model's weights and embedding size."""

    full: ImageSource
    source: ImageSource
    out: storage.Location
    weights: ResolvedWeights
    dim: int


def check(
    model_cfg: ModelConfig, cfg: FeaturesConfig, storage_cfg: StorageConfig, wds_cfg: WebDatasetConfig | None = None
) -> Checked:
    """Everything that can fail before work starts: the source is there and holds images, the
    backbone and its weights resolve. Writes nothing and needs no Ray."""
    require("features", "features", cfg, ("source", "output"))
    weights = resolve_weights(model_cfg.backbone, model_cfg.weights, storage_cfg)
    full = open_images(cfg.source, storage_cfg, kind=cfg.source_kind, wds=wds_cfg)
    out = storage.resolve(cfg.output, storage_cfg)
    return Checked(full, full.select(cfg.splits), out, weights, embedding_width(weights))


def run(
    model_cfg: ModelConfig,
    cfg: FeaturesConfig,
    storage_cfg: StorageConfig,
    wds_cfg: WebDatasetConfig | None = None,
    checked: Checked | None = None,
) -> dict:
    """Embed `cfg.source` into `cfg.output`, writing only missing parts; returns the counts.
    Ray must be connected. `checked`: what `check` returned, when the caller checked first."""
    started = time.perf_counter()
    checked = checked or check(model_cfg, cfg, storage_cfg, wds_cfg)
    full, source, out, weights, dim = checked.full, checked.source, checked.out, checked.weights, checked.dim
    cpu_only = "features.cpu_only_nodes" if cfg.cpu_only_nodes else None
    rows = source.count if source.counted else None
    plan = model_actor_plan(model_cfg, cfg.actors, rows, cfg.batch_size, cpu_only, weights.digest)
    metadata = {
        **{k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in weights.describe().items()},
        "dim": str(dim),
        "dtype": cfg.dtype,
        "classes": json.dumps(list(source.classes or [])),
        "source": source.location.uri,
        "compute": plan.compute,  # bf16 and fp32 embeddings differ: a resume elsewhere must not mix them
    }
    identity = {**metadata, **source.identity()}
    every, todo = plan_run(out, RUN_FILE, identity, source.units, full.units, cfg.overwrite, "features.overwrite")
    log.info(
        "features: %s inputs in %d parts; %d parts to write, %d already there",
        source.count if source.counted else "(counted as read)",
        len(source.units),
        len(todo),
        len(source.units) - len(todo),
    )
    startup = {"actors": 0}
    if todo:
        write_run_file(out, RUN_FILE, identity, None, every)
        sink = PartSink(out, todo, features_table(dim, cfg.dtype), metadata)
        actor_kwargs = {"dtype": cfg.dtype, **calibration_kwargs(plan, full, weights.preprocessing)}
        startup = stream_units(
            source, todo, weights, Embedder, actor_kwargs, plan, cfg.batch_size, cfg.decode_batch, sink
        )
    result = verify_parts(out, every)
    write_errors(out, result["rejects"])
    write_run_file(out, RUN_FILE, identity, {**result, "written": len(todo), "dim": dim}, every)
    timings = {"features (this run)": round(time.perf_counter() - started, 1), **startup_timings(startup)}
    return {**result, "written": len(todo), "dim": dim, "output": out.uri, "startup": startup, "timings": timings}
