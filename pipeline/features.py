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
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import ray
import torch

from pipeline import augment, runtime, schema, storage
from pipeline.parts import Batch, PartSink, plan_run, verify_parts, write_errors, write_run_file
from pipeline.config import FeaturesConfig, ModelConfig, StorageConfig
from pipeline.models import ResolvedWeights, create_backbone, resolve_weights
from pipeline.preprocessing import to_model_input
from pipeline.sources import ImageSource, Unit, open_images

log = logging.getLogger("imgpipe")

RUN_FILE = "features.json"  # the run's identity, its parts, and (when complete) its counts
PASSTHROUGH = (schema.KEY, schema.LABEL, schema.SOURCE, schema.SHARD, schema.ERROR)


# ---------------------------------------------------------------- the model stage (Ray actors)


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors, and what each holds."""

    size: int
    num_cpus: float
    num_gpus: float
    threads: int  # torch intra-op threads per actor


def plan_actors(requested: int | None, batches: int | None = None) -> ActorPlan:
    """`size_actors` for the connected cluster."""
    single_node = len([n for n in ray.nodes() if n["Alive"]]) == 1
    cpus = runtime.cluster_cpus()
    return size_actors(requested, batches, cpus, runtime.cluster_gpus(), (os.cpu_count() or 1) if single_node else cpus)


def size_actors(requested: int | None, batches: int | None, cpus: int, gpus: int, cores: int) -> ActorPlan:
    """One actor per GPU when the cluster has GPUs. On CPUs: single-threaded actors, one per
    CPU, after leaving a quarter of the CPUs (one at least) to the read and decode tasks, which
    otherwise starve while Ray waits for ever without an error (RAY-NOTES). Separate actors beat
    intra-op threads for these small convnets (measured on 2 cores, Lite0: 2 actors x 1 thread
    45 img/s, 1 actor x 2 threads 36 img/s). `cores` caps the CPU actors (on one machine,
    embedded Ray has more logical CPUs than cores); they never outnumber the `batches`."""
    if gpus:
        if requested and requested > gpus:
            raise ValueError(f"{requested} model actors asked for, but the cluster has {gpus} GPUs and each actor takes one "
                             "(the extra actors would wait for ever); set features.actors / classify.actors to at most "
                             f"{gpus}, or leave it unset")
        # The GPU does the work; the actor's CPU only pins and copies uint8 batches. A small
        # CPU share leaves the node's CPUs to the read and decode tasks that feed the GPU.
        return ActorPlan(requested or min(gpus, batches or gpus), max(0.1, min(1.0, cpus / gpus / 4)), 1.0, 1)
    free = max(1.0, cpus - max(1, cpus // 4))
    size = requested or max(1, min(int(free), cores, batches or cores))
    per_actor = max(0.25, free / size)
    # Intra-op threads only when asked for fewer, bigger actors; never more than the cores.
    threads = max(1, min(int(per_actor), cores))
    return ActorPlan(size, per_actor, 0.0, threads)


class Embedder:
    """Ray Data actor: loads the frozen backbone once; image batch -> embedding batch.

    Rows that arrive with an error (unreadable, undecodable) are passed through with a zero
    embedding and their reason, so the sink can count and list them.
    """

    def __init__(self, weights: ResolvedWeights | ray.ObjectRef, dtype: str = "float16", threads: int = 1):
        torch.set_num_threads(threads)
        if isinstance(weights, ray.ObjectRef):  # fetched once on the driver, shipped through the object store
            weights = ray.get(weights)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.backends.cudnn.benchmark = True  # one input size throughout: pick the fastest kernels once
        self.model = create_backbone(weights).to(self.device, memory_format=torch.channels_last).eval()
        self.model.requires_grad_(False)
        self.prep = weights.preprocessing
        self.dtype = np.dtype(dtype)

    def __call__(self, batch: Batch) -> Batch:
        good = np.asarray(batch[schema.ERROR]) == ""
        out = {c: batch[c] for c in PASSTHROUGH}
        # Boolean indexing copies, so the tensor gets a writable array of the good rows only.
        emb = self.embed(batch[schema.PIXELS][good]) if good.any() else None
        out.update(self.outputs(emb, good))
        return out

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, dim) float32 embeddings, on the model's device."""
        x = to_model_input(pixels, self.prep, self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.model(x).float()

    def outputs(self, emb: torch.Tensor | None, good: np.ndarray) -> Batch:
        """The stage's own columns for every row (zeros for rejected rows)."""
        full = np.zeros((len(good), self.model.dim), dtype=self.dtype)
        if emb is not None:
            full[good] = emb.cpu().numpy().astype(self.dtype)
        return {schema.EMBEDDING: full}


def stream_units(
    source: ImageSource,
    units: Sequence[Unit],
    weights: ResolvedWeights,
    actor: type,
    actor_kwargs: dict,
    batch_size: int,
    actors: int | None,
    sink: PartSink,
) -> None:
    """Read `units`, decode on tasks, run `actor` on an actor pool, and feed the sink."""
    plan = plan_actors(actors, math.ceil(sum(u.count for u in units) / batch_size))
    log.info("model actors: %d x (%.2g CPU, %g GPU, %d torch threads), batch %d", plan.size, plan.num_cpus, plan.num_gpus, plan.threads, batch_size)
    # A unit is read as one block (up to a whole shard); cut it into batch-sized blocks, so that
    # decoding spreads over tasks and the model actors start on the first batch, not the last.
    ds = source.dataset(units).repartition(target_num_rows_per_block=batch_size)
    ds = ds.map_batches(augment.build_eval_transform(weights.preprocessing), batch_size=batch_size, batch_format="numpy")
    ds = ds.map_batches(
        actor,
        fn_constructor_kwargs={**actor_kwargs, "weights": ray.put(weights), "threads": plan.threads},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.size),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        sink.add(batch)
    sink.close()


# ---------------------------------------------------------------- the features job


def features_table(dim: int, dtype: str) -> Callable[[Batch], pa.Table]:
    """`make_table` for features parts: key, label, embedding as fixed_size_list<dtype>[dim]."""
    part_schema = schema.features_schema(dim, dtype)

    def make(rows: Batch) -> pa.Table:
        emb = np.asarray(rows[schema.EMBEDDING], dtype=dtype).reshape(-1, dim) if len(rows[schema.KEY]) else np.zeros((0, dim), dtype)
        return pa.table(
            {
                schema.KEY: pa.array(np.asarray(rows[schema.KEY]).astype(str), pa.string()),
                schema.LABEL: pa.array(np.asarray(rows[schema.LABEL]).astype(np.int32), pa.int32()),
                schema.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
            },
            schema=part_schema,
        )

    return make


def run(model_cfg: ModelConfig, cfg: FeaturesConfig, storage_cfg: StorageConfig) -> dict:
    """Embed `cfg.source` into `cfg.output`, writing only missing parts; returns the counts.
    Ray must be connected."""
    if not cfg.source or not cfg.output:
        raise ValueError("features needs features.source and features.output (URIs or local paths)")
    full = open_images(cfg.source, storage_cfg, kind=cfg.source_kind)
    source = full.select(cfg.splits)
    out = storage.resolve(cfg.output, storage_cfg)
    weights = resolve_weights(model_cfg.backbone, model_cfg.weights, storage_cfg)
    dim = create_backbone(weights).dim
    metadata = {
        **{k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in weights.describe().items()},
        "dim": str(dim), "dtype": cfg.dtype, "classes": json.dumps(list(source.classes or [])), "source": source.location.uri,
    }
    identity = {**metadata, "kind": source.kind}
    every, todo = plan_run(out, RUN_FILE, identity, source.units, full.units, cfg.overwrite)
    log.info("features: %d inputs in %d parts; %d parts to write, %d already there", source.count, len(source.units), len(todo), len(source.units) - len(todo))
    if todo:
        write_run_file(out, RUN_FILE, identity, None, every)
        sink = PartSink(out, todo, features_table(dim, cfg.dtype), metadata)
        stream_units(source, todo, weights, Embedder, {"dtype": cfg.dtype}, cfg.batch_size, cfg.actors, sink)
    result = verify_parts(out, every)
    write_errors(out, result["rejects"])
    write_run_file(out, RUN_FILE, identity, {**result, "written": len(todo), "dim": dim}, every)
    return {**result, "written": len(todo), "dim": dim, "output": out.uri}
