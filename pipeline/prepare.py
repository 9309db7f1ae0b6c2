"""The prepare stage: raw images -> split, stratified, counted WebDataset shards.

Driver: discover and label inputs, split them per class by seed, cut each split into shard
plans. Ray Data: one task per shard reads, checks and writes it. Driver: errors.jsonl,
classes.json and, last, manifest.json (its presence marks a finished dataset).
"""

from __future__ import annotations

import json
import logging
import pickle
from collections import defaultdict

import numpy as np
import ray

from pipeline import labelfile, schema, storage
from pipeline.config import PrepareConfig, StorageConfig, require
from pipeline.errors import UserError
from pipeline.layouts import SPLIT_FREE, Discovery, RawInput, discover
from pipeline.progress import StageProgress
from pipeline.shards import ShardPlan, build_manifest, plan_shards, write_shard

log = logging.getLogger("imgpipe")
SPLITS = ("train", "val", "test")


class PrepareError(UserError):
    """The job ran but its result must not be used (too many rejects); the message says why."""


def run(cfg: PrepareConfig, storage_cfg: StorageConfig) -> dict:
    """Prepare `cfg.source` into `cfg.output`; returns the manifest. Ray must be connected."""
    if not cfg.source or not cfg.output:
        raise UserError("prepare needs prepare.source and prepare.output (URIs or local paths)")
    src, out = storage.resolve(cfg.source, storage_cfg), storage.resolve(cfg.output, storage_cfg)
    found = discover_inputs(src, cfg, storage_cfg)
    log.info(
        "prepare: %s layout, %d inputs in %d classes, %d non-image files ignored",
        found.layout,
        len(found.inputs),
        len(found.classes),
        len(found.ignored),
    )
    if found.counts:
        log.info("prepare: label file %s", labelfile.describe(found.counts))
    inputs = found.inputs
    unusable = [{"source": i.source, "reason": i.problem} for i in inputs if i.problem]
    splits = assign_splits([i for i in inputs if not i.problem], cfg.split, cfg.seed, cfg.keep_source_test)
    plans = [
        plan
        for split, items in splits.items()
        for plan in plan_shards(split, items, cfg.shard_max_samples, int(cfg.shard_max_mb * 2**20), found.classes)
    ]
    _unmark_finished(out)
    results = write_all(plans, src.fs, out, found.classes, cfg.max_pixels, found.images)
    rejects = sorted(unusable + [r for res in results for r in res["rejects"]], key=lambda r: r["source"])
    storage.write_bytes(out.join("errors.jsonl"), "".join(json.dumps(r) + "\n" for r in rejects).encode())
    manifest = build_manifest(
        source=src.uri,
        layout=found.layout,
        seed=cfg.seed,
        ratios=cfg.split,
        classes=found.classes,
        results=results,
        inputs=len(inputs),
        rejected=len(rejects),
        ignored=found.ignored,
    )
    if found.counts:
        manifest["label_file"] = found.counts
    _check_counts(manifest, cfg.max_reject_fraction, out)
    _remove_stale_shards(out, manifest)
    storage.write_bytes(out.join("classes.json"), json.dumps({"classes": found.classes}, indent=1).encode())
    storage.write_bytes(out.join("manifest.json"), json.dumps(manifest, indent=1).encode())
    return manifest


def discover_inputs(src: storage.Location, cfg: PrepareConfig, storage_cfg: StorageConfig) -> Discovery:
    """The layout's inputs and classes; `classes` or `classes_file` fix the class list and its order."""
    if cfg.classes is not None and cfg.classes_file:
        raise UserError("set prepare.classes or prepare.classes_file, not both")
    classes = cfg.classes
    if cfg.classes_file:
        classes = labelfile.read_classes_file(storage.resolve(cfg.classes_file, storage_cfg))
    extensions = [e.lower() for e in cfg.extensions]
    if cfg.layout == "labels" or (cfg.layout == "auto" and cfg.labels.file):
        return labelfile.discover(src, cfg.labels, extensions, classes, storage_cfg)
    return discover(src, cfg.layout, extensions, cfg.label_pattern, classes)


def assign_splits(
    inputs: list[RawInput], ratios: dict[str, float], seed: int, keep_source_test: bool
) -> dict[str, list[RawInput]]:
    """Split each class by `ratios` (seeded, largest split first), then shuffle each split so
    shards mix classes. Inputs whose split the dataset fixes (a source test set) keep it."""
    fixed = [i for i in inputs if i.split != SPLIT_FREE and keep_source_test]
    free = [i for i in inputs if i.split == SPLIT_FREE or not keep_source_test]
    if fixed:
        ratios = {k: v for k, v in ratios.items() if k not in {i.split for i in fixed}}
        total = sum(ratios.values())
        if free and total <= 0:
            own = sorted({i.split for i in fixed})
            raise UserError(
                f"prepare.split gives every share to {own}, which the source fixes itself, so its other "
                f"{len(free)} inputs would go nowhere; give train/val a share (split={{train: 0.9, val: 0.1}}) "
                "or set prepare.keep_source_test=false"
            )
        ratios = {k: v / (total or 1.0) for k, v in ratios.items()}
    out: dict[str, list[RawInput]] = defaultdict(list)
    for item in fixed:
        out[item.split].append(item)
    by_class: dict[int, list[RawInput]] = defaultdict(list)
    for item in free:
        by_class[item.label].append(item)
    names = [s for s in SPLITS if ratios.get(s, 0) > 0]
    fractions = np.cumsum([ratios[s] for s in names])
    for label, items in sorted(by_class.items()):
        items = sorted(items, key=lambda i: i.key)
        order = np.random.default_rng([seed, label]).permutation(len(items))
        bounds = [0, *np.rint(fractions * len(items)).astype(int)]
        for name, lo, hi in zip(names, bounds, bounds[1:]):
            out[name].extend(items[j] for j in order[lo:hi])
    for n, name in enumerate(SPLITS):
        if name in out:
            items = sorted(out[name], key=lambda i: i.key)
            out[name] = [items[j] for j in np.random.default_rng([seed, 1000 + n]).permutation(len(items))]
    return {name: out[name] for name in SPLITS if out.get(name)}


def write_all(
    plans: list[ShardPlan], src_fs, out: storage.Location, classes: list[str], max_pixels: int, images
) -> list[dict]:
    """Write every shard as Ray Data work, one task per shard, logging progress in inputs."""
    images_ref = ray.put(images) if images is not None else None
    rows = [{"plan": pickle.dumps(p)} for p in plans]

    def write(row: dict) -> dict:
        plan = pickle.loads(row["plan"])
        arrays = ray.get(images_ref) if images_ref is not None else None
        return {"result": json.dumps(write_shard(plan, src_fs, out, classes, max_pixels, arrays))}

    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows))).map(write)
    results = []
    progress = StageProgress("prepare", sum(len(p.inputs) for p in plans))
    for row in ds.iter_rows():
        result = json.loads(row["result"])
        results.append(result)
        progress.update(result["samples"] + len(result["rejects"]))
    return results


def _check_counts(manifest: dict, max_reject_fraction: float, out: storage.Location) -> None:
    inputs, samples, rejected = manifest["inputs"], manifest["samples"], manifest["rejected"]
    if samples + rejected != inputs:
        raise PrepareError(f"internal count mismatch: {samples} samples + {rejected} rejected != {inputs} inputs")
    if inputs and rejected / inputs > max_reject_fraction:
        raise PrepareError(
            f"{rejected} of {inputs} inputs ({rejected / inputs:.1%}) were rejected, over "
            f"prepare.max_reject_fraction={max_reject_fraction}; see {out.join('errors.jsonl').uri} "
            "for each file and reason, fix or remove them, or raise the limit"
        )


def _unmark_finished(out: storage.Location) -> None:
    """Before any shard is (re)written: an earlier run's manifest would vouch for shards that
    this run is replacing, so a failed or interrupted rerun must leave no manifest behind."""
    for name in ("manifest.json", "classes.json"):
        loc = out.join(name)
        if storage.exists(loc):
            out.fs.delete_file(loc.path)


def _remove_stale_shards(out: storage.Location, manifest: dict) -> None:
    """A rerun with fewer shards must not leave an earlier run's shards beside the new ones; a
    listing that fails fails the job (before the manifest is written), never skips the cleanup."""
    keep = {s["path"] for info in manifest["splits"].values() for s in info["shards"]}
    for info in storage.list_files(out, missing_ok=True):
        name = info.path[len(out.path) :].lstrip("/")
        if schema.SHARD_FILE.fullmatch(name) and name not in keep:
            out.fs.delete_file(info.path)
            log.info("prepare: removed %s left by an earlier run", out.uri_of(info.path))


def check(cfg: PrepareConfig, storage_cfg: StorageConfig) -> None:
    """What can fail before work starts: source and output given, the source there and not empty.
    Writes nothing and needs no Ray (the layout is read by `run`)."""
    require("prepare", "prepare", cfg, ("source", "output"))
    storage.list_files(storage.resolve(cfg.source, storage_cfg))
