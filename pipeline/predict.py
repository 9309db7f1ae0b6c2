"""Classify in bulk: backbone + trained head (or the backbone's own ImageNet classifier) over a
dataset or a bucket of images -> predictions Parquet with top-k, one part per input unit.

The same machinery as `features` (reader -> eval transform -> actor pool -> exactly-once part
sink), with `Classifier` in the actors. When the input has labels, the summary has accuracy.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline import gallery, report, runreport, schema, storage
from pipeline.config import ClassifyConfig, ModelConfig, StorageConfig, WebDatasetConfig, require
from pipeline.errors import UserError
from pipeline.features import (
    Embedder,
    Shipped,
    calibration_kwargs,
    model_actor_plan,
    origin_columns,
    stream_units,
)
from pipeline.heads import create_head, load_head
from pipeline.models import ResolvedWeights, resolve_weights
from pipeline.parts import Batch, PartSink, plan_run, read_parts, verify_parts, write_errors, write_run_file
from pipeline.preprocessing import Preprocessing
from pipeline.sources import ImageSource, open_images
from pipeline.startup import timings as startup_timings

log = logging.getLogger("imgpipe")

RUN_FILE = "predictions.json"
MAX_PLOTTED_CLASSES = 50


class Classifier(Embedder):
    """Ray Data actor: backbone embedding -> head (or the backbone's own classifier) -> top-k."""

    def __init__(self, weights: ResolvedWeights, head: tuple[dict, dict] | None, top_k: int, **placement):
        super().__init__(weights, "float32", **placement)
        head = head.get() if isinstance(head, Shipped) else head
        if head is not None:
            spec, state = head
            self.head = create_head(spec)
            self.head.load_state_dict(state)
        else:
            self.head = self.classifier
        self.head = self.head.to(self.device).eval()
        self.top_k = top_k

    def outputs(self, emb: torch.Tensor | None, good: np.ndarray) -> Batch:
        n, k = len(good), self.top_k
        topk, topk_prob = np.zeros((n, k), dtype=np.int32), np.zeros((n, k), dtype=np.float32)
        if emb is not None:
            with torch.inference_mode():
                prob, index = torch.softmax(self.head(emb.float()), dim=1).topk(k, dim=1)
            topk[good], topk_prob[good] = index.cpu().numpy(), prob.cpu().numpy()
        return {schema.TOPK: topk, schema.TOPK_PROB: topk_prob}


def predictions_table(classes: list[str], label_map: np.ndarray):
    """`make_table` for predictions parts; labels are mapped from the input's classes to the
    model's (-1 where unknown, or where the model has no such class)."""
    names = np.asarray(classes, dtype=object)
    part_schema = schema.predictions_schema()

    def make(rows: Batch) -> pa.Table:
        if not len(rows[schema.KEY]):
            return part_schema.empty_table()
        topk = np.asarray(rows[schema.TOPK], dtype=np.int32).reshape(len(rows[schema.KEY]), -1)
        topk_prob = np.asarray(rows[schema.TOPK_PROB], dtype=np.float32).reshape(topk.shape)
        source_labels = np.asarray(rows[schema.LABEL], dtype=np.int64)
        labels = np.where(source_labels >= 0, label_map[np.clip(source_labels, 0, None)] if len(label_map) else -1, -1)
        return pa.table(
            {
                schema.KEY: pa.array(np.asarray(rows[schema.KEY]).astype(str), pa.string()),
                schema.LABEL: pa.array(labels.astype(np.int32), pa.int32()),
                schema.PRED: pa.array(topk[:, 0] if topk.shape[1] else np.zeros(0, np.int32), pa.int32()),
                schema.PRED_CLASS: pa.array(names[topk[:, 0]] if len(topk) else [], pa.string()),
                schema.PROB: pa.array(topk_prob[:, 0] if len(topk) else np.zeros(0, np.float32), pa.float32()),
                schema.TOPK: pa.array(list(topk), pa.list_(pa.int32())),
                schema.TOPK_PROB: pa.array(list(topk_prob), pa.list_(pa.float32())),
                **origin_columns(rows),
            },
            schema=part_schema,
        )

    return make


def resolve_model(
    model_cfg: ModelConfig, head_uri: str | None, storage_cfg: StorageConfig
) -> tuple[ResolvedWeights, tuple | None, list[str], str, str]:
    """The backbone's weights, the head (spec, state) or None, the class names, a label for the
    model, and the head's sha256 (so that a rerun never mixes in predictions of an older head).
    With a head, the backbone is the one its features were computed with."""
    if head_uri:
        head, info = load_head(head_uri, storage_cfg)
        weights = head_weights(model_cfg, info, head_uri, storage_cfg)
        return (
            weights,
            (info["architecture"], head.state_dict()),
            list(info["classes"]),
            f"{info['backbone']} + head {head_uri}",
            info["sha256"],
        )
    weights = resolve_weights(model_cfg.backbone, model_cfg.weights, storage_cfg)
    if weights.categories is None:
        raise UserError(
            f"{model_cfg.backbone} with weights {weights.weights} has no trained classifier; set classify.head "
            "to a train-head output, or use pretrained weights"
        )
    return weights, None, list(weights.categories), f"{weights.backbone} ({weights.weights}) own classifier", ""


def head_weights(model_cfg: ModelConfig, info: dict, head_uri: str, storage_cfg: StorageConfig) -> ResolvedWeights:
    """The weights of the backbone a head's features were computed with (head.json), fetched.

    A head brings its backbone, so model.backbone and model.weights may be left unset; when set, they
    must name that backbone and weights: a head on other embeddings would give confident nonsense."""
    trained = f"{info['backbone']} (weights {info['weights']})"
    asked = model_cfg.model_fields_set  # what the config set, not the defaults
    if "backbone" in asked and model_cfg.backbone != info["backbone"]:
        raise UserError(
            f"{head_uri}: the head was trained on features of {trained}, but model.backbone is {model_cfg.backbone}; "
            f"leave model.backbone unset (a head brings its own) or train a head on {model_cfg.backbone} features"
        )
    other = "weights" in asked and model_cfg.weights != info["weights"]
    weights = resolve_weights(info["backbone"], model_cfg.weights if other else info["weights"], storage_cfg)
    recorded = info.get("weights_digest") or ""
    same = weights.digest == recorded if recorded else weights.weights == info["weights"]  # older heads: no digest
    if other and not same:
        raise UserError(
            f"{head_uri}: the head was trained on features of {trained}, {recorded or 'no digest'}; "
            f"model.weights {model_cfg.weights} gives {weights.weights}, {weights.digest or 'no digest'}; leave "
            "model.weights unset (a head brings its own) or train a head on features of those weights"
        )
    if model_cfg.backbone != info["backbone"]:
        log.info("classify: using the head's backbone %s; model.backbone is left at its default", trained)
    if (
        weights.preprocessing != Preprocessing.from_dict(info["preprocessing"])
        or (recorded or weights.digest) != weights.digest
    ):
        raise UserError(
            f"{head_uri}: the head was trained on features of {info['backbone']} {info['weights']} "
            f"({info.get('weights_digest')}, "
            f"{info['preprocessing']}); those weights now give {weights.digest}, {weights.preprocessing.to_dict()}"
        )
    return weights


@dataclass(frozen=True)
class Checked:
    """What `check` found: the input, the output location, and the model (`resolve_model`'s tuple)."""

    full: ImageSource
    source: ImageSource
    out: storage.Location
    model: tuple


def check(
    model_cfg: ModelConfig, cfg: ClassifyConfig, storage_cfg: StorageConfig, wds_cfg: WebDatasetConfig | None = None
) -> Checked:
    """Everything that can fail before work starts: the source is there and holds images, the
    model resolves, the head is there and matches its backbone. Writes nothing and needs no Ray."""
    require("classify", "classify", cfg, ("source", "output"))
    model = resolve_model(model_cfg, cfg.head, storage_cfg)
    full = open_images(cfg.source, storage_cfg, kind=cfg.source_kind, wds=wds_cfg)
    return Checked(full, full.select(cfg.splits), storage.resolve(cfg.output, storage_cfg), model)


def run(
    model_cfg: ModelConfig,
    cfg: ClassifyConfig,
    storage_cfg: StorageConfig,
    wds_cfg: WebDatasetConfig | None = None,
    checked: Checked | None = None,
) -> dict:
    """Classify `cfg.source` into `cfg.output`, writing only missing parts; returns counts and,
    when the input is labelled, accuracy. Ray must be connected. `checked`: what `check` returned."""
    started = time.perf_counter()
    checked = checked or check(model_cfg, cfg, storage_cfg, wds_cfg)
    full, source, out = checked.full, checked.source, checked.out
    weights, head, classes, model_name, head_digest = checked.model
    index = {name: i for i, name in enumerate(classes)}
    label_map = np.array([index.get(c, -1) for c in (source.classes or ())], dtype=np.int64)
    k = min(cfg.top_k, len(classes))
    cpu_only = "classify.cpu_only_nodes" if cfg.cpu_only_nodes else None
    rows = source.count if source.counted else None
    plan = model_actor_plan(model_cfg, cfg.actors, rows, cfg.batch_size, cpu_only, weights.digest)
    metadata = {
        "model": model_name,
        "compute": plan.compute,
        **{key: json.dumps(v) if isinstance(v, dict) else str(v) for key, v in weights.describe().items()},
        "head": cfg.head or "",
        "head_sha256": head_digest,
        "classes": json.dumps(classes),
        "top_k": str(k),
        "source": source.location.uri,
    }
    identity = {**metadata, **source.identity()}
    every, todo = plan_run(out, RUN_FILE, identity, source.units, full.units, cfg.overwrite, "classify.overwrite")
    log.info(
        "classify with %s: %s inputs in %d parts; %d parts to write",
        model_name,
        source.count if source.counted else "(counted as read)",
        len(source.units),
        len(todo),
    )
    startup = {"actors": 0}
    if todo:
        write_run_file(out, RUN_FILE, identity, None, every)
        sink = PartSink(out, todo, predictions_table(classes, label_map), metadata)
        head_kwargs = {"head": Shipped.put(head) if head else None, "top_k": k}
        startup = stream_units(
            source,
            todo,
            weights,
            Classifier,
            {**head_kwargs, **calibration_kwargs(plan, full, weights.preprocessing)},
            plan,
            cfg.batch_size,
            cfg.decode_batch,
            sink,
            "classify",
        )
    result = verify_parts(out, every)
    result["metrics"] = accuracy_summary(out, every, result["parts"], classes, k)
    write_errors(out, result["rejects"])
    if result["metrics"] and len(classes) <= MAX_PLOTTED_CLASSES:
        storage.write_bytes(
            out.join("confusion.png"),
            report.plot_confusion(
                result["metrics"]["all"]["confusion_matrix"], classes, "confusion matrix (every labelled row)"
            ),
        )
    write_run_file(out, RUN_FILE, identity, {**result, "written": len(todo)}, every)
    timings = {"classify (this run)": round(time.perf_counter() - started, 1), **startup_timings(startup)}
    summary = {**result, "written": len(todo), "output": out.uri, "model": model_name, "startup": startup}
    summary["timings"] = timings
    if result["metrics"]:
        config = {"model": model_cfg.model_dump(mode="json"), "classify": cfg.model_dump(mode="json")}
        summary["report"] = write_report(out, summary, config, timings, storage_cfg).uri
    return summary


def write_report(out: storage.Location, summary: dict, config: dict, timings: dict, storage_cfg) -> storage.Location:
    """report.html of a labelled classify output: counts, rejects, scores per split, galleries."""
    metrics = summary["metrics"]
    counts = {"inputs": summary["inputs"], "classified": summary["rows"], "rejected": summary["rejected"]}
    counts["labelled (model knows the class)"] = metrics["all"]["samples"]
    rep = runreport.RunReport(
        f"classify: {summary['model']}",
        f"{config['classify']['source']} -> {out.uri}",
        config=config,
        counts=counts,
        rejects=summary["rejects"],
        metrics={s: m for s, m in metrics.items() if s != "all" or len(metrics) == 1},
        galleries=gallery.prediction_galleries(out, storage_cfg),
        timings=timings,
    )
    return runreport.write(out, rep)


def accuracy_summary(out: storage.Location, units, parts: list[str], classes: list[str], k: int) -> dict | None:
    """Top-1/top-k, per-class accuracy and confusion, per split and overall, over the rows
    whose label the model knows; None when there are none."""
    rows = {}
    for split in dict.fromkeys(u.split for u in units):
        table = read_parts(out, [p for p, u in zip(parts, units) if u.split == split], [schema.LABEL, schema.TOPK])
        labels = table.column(schema.LABEL).to_numpy()
        topk = table.column(schema.TOPK).combine_chunks().flatten().to_numpy().reshape(len(labels), k)
        rows[split] = (labels, topk)
    rows["all"] = tuple(np.concatenate(arrays) for arrays in zip(*rows.values()))
    summary = {
        s: report.classification_metrics(labels, topk, classes, report.meaningful_k(len(classes), k) or 1)
        for s, (labels, topk) in rows.items()
        if (labels >= 0).any()
    }
    return summary or None
