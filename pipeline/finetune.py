"""Fine-tune a backbone on Ray Train: check the run, start the trainer, export the best model.

    prepared or WebDataset shards -> `trainsets`: train / val / test sources, the train shards counted
      -> TrainInput (augmentation actors, equal per-worker batches)
      -> TorchTrainer(trainloop.train_loop_per_worker) x num_workers   checkpoints -> <output>/ray/
      -> best checkpoint -> model.pt + model.json (what `classify` and `features` load)
      -> test split through `classify` -> metrics.json, curves.png, confusion.png, run.json

The run folder is the unit of resume: the same config into the same output carries on from the
last checkpoint (Ray Train finds it under the run's storage); a finished run is not run again.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass, replace

import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
from ray.train.torch import TorchTrainer

from pipeline import demo, gallery, loader, predict, report, runreport, runtime, storage, trainloop, trainsets, transfer
from pipeline.config import ClassifyConfig, Config, FinetuneConfig, ModelConfig, require
from pipeline.errors import UserError
from pipeline.models import ResolvedWeights, resolve_weights
from pipeline.preprocessing import Preprocessing
from pipeline.trainsets import TrainSets

log = logging.getLogger("imgpipe")

RUN_FILE = "run.json"
MODEL_FILE = "model.pt"
MODEL_FORMAT = "imgpipe.model/1"
TEST_PREDICTIONS = "predictions-test"  # classify's output over the test source, in the run folder
TRAIN_DIR = "ray"  # Ray Train's storage for this run: <output>/ray/train/checkpoint_*
READ_HEADROOM_CPUS = 1.0  # CPUs the workers must leave to read tasks (docs/ARCHITECTURE.md, section 6)
FAULT_ENV = "IMGPIPE_TEST_FAULT"  # tests only: epoch:batch:rank:marker-file


class TrainingFailed(UserError):
    """The workers failed past `finetune.max_failures`; the message is the first failure's last line
    (a ValueError, so that jobs print it in one line)."""


@dataclass(frozen=True)
class Checked:
    """What `check` found: the input, the run folder, the run's identity and previous run file, the weights."""

    sets: TrainSets
    out: storage.Location
    identity: dict
    previous: dict | None
    weights: ResolvedWeights


def check(cfg: Config) -> Checked | None:
    """Everything that can fail before a worker starts, short of the cluster's size: the prepared
    input and its splits, another run in the output, the backbone, its weights and the mode.
    Writes nothing and needs no Ray. None for the demo's digits, prepared on first use (with Ray)."""
    if cfg.finetune.source == demo.DIGITS_SOURCE:
        return None
    ft = cfg.finetune
    require("finetune", "finetune", ft, ("source", "output"), "prepared or WebDataset shards and the run folder")
    sets, out = trainsets.resolve(cfg), storage.resolve(ft.output, cfg.storage)
    identity = run_identity(cfg, sets)
    previous = read_run_file(out)
    if previous and previous.get("identity") != identity and not ft.overwrite:
        raise UserError(
            f"{out.uri} holds a fine-tuning run of another config or input "
            f"({_first_difference(previous.get('identity', {}), identity)}); "
            "choose another finetune.output, or set finetune.overwrite=true to replace it"
        )
    weights = resolve_weights(cfg.model.backbone, cfg.model.weights, cfg.storage)
    transfer.check_mode(weights.backbone, ft, weights.state_dict is not None)
    return Checked(sets, out, identity, previous, weights)


def run(cfg: Config, checked: Checked | None = None) -> dict:
    """Fine-tune per `cfg.finetune` (model, augment, loader and storage sections too); returns
    the summary. Ray must be connected. Everything checkable is checked before a worker starts
    (`checked`: what `check` returned, when the caller checked first)."""
    if cfg.finetune.source == demo.DIGITS_SOURCE:
        cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"source": demo.prepared_digits(cfg)})})
    checked = checked or check(cfg)
    ft = cfg.finetune
    sets, out, identity, previous, weights = (
        checked.sets,
        checked.out,
        checked.identity,
        checked.previous,
        checked.weights,
    )
    if previous and previous.get("identity") == identity and previous.get("complete"):
        log.info(
            "finetune: the run in %s is already finished; nothing to do "
            "(a new finetune.output, or finetune.overwrite=true, trains again)",
            out.uri,
        )
        return {**previous["summary"], "already_finished": True}
    check_resources(ft)
    if previous and previous.get("identity") != identity:  # overwrite, now that the new run is known to start
        train_dir = out.join(TRAIN_DIR)
        train_dir.fs.delete_dir_contents(train_dir.path, missing_dir_ok=True)
    prep = input_preprocessing(weights.preprocessing, ft.image_size)
    storage.write_bytes(out.join(RUN_FILE), json.dumps({"identity": identity, "complete": False}).encode())
    started = time.perf_counter()
    sets = trainsets.count(sets, cfg, out)
    result = fit(cfg, sets, weights, prep, out)
    summary = finish(cfg, sets, weights, prep, out, result, time.perf_counter() - started)
    storage.write_bytes(
        out.join(RUN_FILE), json.dumps({"identity": identity, "complete": True, "summary": summary}, indent=1).encode()
    )
    return summary


def check_resources(ft: FinetuneConfig) -> None:
    """The workers fit the connected cluster, with room left for reads and augmentation; else
    one line now, not a placement group that waits for ever."""
    cpus, gpus = runtime.cluster_cpus(), runtime.cluster_gpus()
    if ft.use_gpu and ft.num_workers * ft.gpus_per_worker > gpus:
        raise UserError(
            f"finetune asks for {ft.num_workers} workers x {ft.gpus_per_worker} GPU, but the cluster has {gpus} GPUs; "
            "lower finetune.num_workers or set finetune.use_gpu=false"
        )
    need = ft.num_workers * ft.cpus_per_worker + READ_HEADROOM_CPUS
    if need > cpus:
        raise UserError(
            f"finetune asks for {ft.num_workers} workers x {ft.cpus_per_worker} CPU "
            f"plus {READ_HEADROOM_CPUS:g} for reading, "
            f"but the cluster has {cpus} CPUs; lower finetune.num_workers or finetune.cpus_per_worker"
        )


def input_preprocessing(prep: Preprocessing, image_size: int | None) -> Preprocessing:
    """The weights' preprocessing, or the same ratios at `image_size` (resize = size x 8/7, as 256/224)."""
    if image_size is None or image_size == prep.crop_size:
        return prep
    return replace(
        prep, crop_size=image_size, resize_size=max(image_size, round(image_size * prep.resize_size / prep.crop_size))
    )


def run_identity(cfg: Config, sets: TrainSets) -> dict:
    """What makes a run this run: the settings (but where and on how many workers it runs) and
    the input's content (its shards' checksums), so a re-prepared input never resumes an old run."""
    scaling = {"num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker", "max_failures", "overwrite"}
    loader_placement = {
        "pool",
        "actors",
        "actor_cpus",
        "reserved_cpus",
        "cpu_only_nodes",
        "actor_labels",
        "prefetch_batches",
    }
    return {
        "finetune": {k: v for k, v in cfg.finetune.model_dump(mode="json").items() if k not in scaling},
        "model": cfg.model.model_dump(mode="json"),
        "augment": cfg.augment.model_dump(mode="json"),
        "loader": {k: v for k, v in cfg.loader.model_dump(mode="json").items() if k not in loader_placement},
        "input": sets.identity(),
    }


def fit(cfg: Config, sets: TrainSets, weights: ResolvedWeights, prep: Preprocessing, out: storage.Location):
    """Run (or resume) Ray Train; returns its Result."""
    ft = cfg.finetune
    held = ft.num_workers * ft.cpus_per_worker  # loader.reserved_cpus keeps the reads' share
    train_input = loader.TrainInput(sets.train, prep, cfg.augment, cfg.loader, val=sets.val, held_cpus=held)
    samples = trainsets.usable(sets, out)
    steps = loader.batches_per_epoch(samples, ft.num_workers, cfg.loader.batch_size) // ft.accumulate
    if steps < 1:
        raise UserError(
            f"{samples} train samples give no full optimizer step on {ft.num_workers} workers "
            f"x batch {cfg.loader.batch_size} "
            f"x accumulate {ft.accumulate}; lower loader.batch_size"
        )
    spec = trainloop.LoopSpec(
        ray.put(weights),
        list(sets.classes),
        prep,
        ft,
        cfg.loader,
        loader.epoch_splits(train_input, ft.num_workers),
        steps,
        os.environ.get(FAULT_ENV, ""),
    )
    resources = {"CPU": ft.cpus_per_worker, **({"GPU": ft.gpus_per_worker} if ft.use_gpu else {})}
    log.info(
        "finetune: %s (%s) on %d %s workers, %d classes, %d train samples, %d steps/epoch, mode %s%s",
        weights.backbone,
        weights.weights,
        ft.num_workers,
        "GPU" if ft.use_gpu else "CPU",
        len(sets.classes),
        samples,
        steps,
        ft.mode,
        f" after {ft.head_epochs} head epochs" if ft.head_epochs else "",
    )
    trainer = TorchTrainer(
        trainloop.train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=ft.num_workers, use_gpu=ft.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name="train",
            storage_path=out.join(TRAIN_DIR).path,
            storage_filesystem=out.fs,
            failure_config=FailureConfig(max_failures=ft.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=ft.keep_checkpoints, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
        ),
    )
    try:
        result = trainer.fit()
    except WorkerGroupError as exc:
        rank, error = min(exc.worker_failures.items())
        last = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        raise TrainingFailed(f"worker rank {rank} failed (after {ft.max_failures} restarts at most): {last}") from None
    dropped = train_input.dropped()
    if dropped["dropped"]:
        log.warning(
            "finetune: undecodable samples dropped per epoch %s, e.g. %s", dropped["dropped"], dropped["examples"][:3]
        )
    return result


def finish(
    cfg: Config,
    sets: TrainSets,
    weights: ResolvedWeights,
    prep: Preprocessing,
    out: storage.Location,
    result,
    seconds: float,
) -> dict:
    """Export the best checkpoint, score the test split through `classify`, write metrics and plots."""
    scoring_started = time.perf_counter()
    state = checkpoint_state(result.checkpoint)
    best_ckpt = min(result.best_checkpoints, key=lambda pair: pair[1]["val_loss"])[0]
    export_model(best_ckpt, weights, prep, list(sets.classes), state, out)
    test = score_test(cfg, sets, out) if sets.test is not None else None
    best = state["best"]
    metrics = {
        "best_epoch": best["epoch"],
        "epochs_run": len(state["history"]),
        "stopped_early": state.get("stopped_early", False),
        "history": state["history"],
        "val": state["best_val"],
        **({"test": test} if test else {}),
        "seconds": round(seconds, 1),
    }
    storage.write_bytes(out.join("metrics.json"), json.dumps(metrics, indent=1).encode())
    storage.write_bytes(out.join("curves.png"), report.plot_history(state["history"]))
    shown = "test" if test else "val"
    storage.write_bytes(
        out.join("confusion.png"),
        report.plot_confusion(
            metrics[shown]["confusion_matrix"], list(sets.classes), f"confusion matrix ({shown}, best epoch)"
        ),
    )
    scoring = round(time.perf_counter() - scoring_started, 1)
    write_report(cfg, sets, out, metrics, {"training": round(seconds, 1), "export and test scoring": scoring})
    return {
        "output": out.uri,
        "report": out.join(runreport.REPORT_FILE).uri,
        "model": out.join(MODEL_FILE).uri,
        "best_epoch": best["epoch"],
        "epochs_run": len(state["history"]),
        "val": _scores(state["best_val"]),
        "test": _scores(test) if test else None,
        "history": state["history"],
        "seconds": round(seconds, 1),
    }


def write_report(cfg: Config, sets: TrainSets, out: storage.Location, metrics: dict, timings: dict) -> None:
    """report.html: the input's counts and rejects, curves, val/test scores, confusion, per-class table,
    and the test split's error galleries (from predictions-test)."""
    manifest = sets.train.manifest
    counts = {f"prepared {k}": manifest[k] for k in ("inputs", "samples", "rejected") if k in manifest}
    for role, source in (("train", sets.train), ("val", sets.val), ("test", sets.test)):
        if source is not None:
            counts[f"{role} samples" if source.counted else f"{role} shards"] = (
                source.count if source.counted else len(source.units)
            )
    errors = sets.train.location.join("errors.jsonl")
    text = storage.read_bytes(errors).decode() if manifest and storage.exists(errors) else ""
    tested = "test" in metrics
    rep = runreport.RunReport(
        f"finetune: {cfg.model.backbone} ({cfg.finetune.mode})",
        f"{cfg.finetune.source} -> {out.uri}; best epoch {metrics['best_epoch']} of {metrics['epochs_run']}",
        config={"finetune": cfg.finetune.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json")},
        counts=counts,
        rejects=[json.loads(line) for line in text.splitlines() if line.strip()],
        metrics={s: metrics[s] for s in ("val", "test") if s in metrics},
        history=metrics["history"],
        galleries=gallery.prediction_galleries(out.join(TEST_PREDICTIONS), cfg.storage) if tested else [],
        timings=timings,
    )
    runreport.write(out, rep)


def checkpoint_state(checkpoint) -> dict:
    """The run state (history, best) saved in a checkpoint."""
    with trainloop.checkpoint_folder(checkpoint) as folder:
        return json.loads((folder / trainloop.STATE_FILE).read_text())


def export_model(
    checkpoint, weights: ResolvedWeights, prep: Preprocessing, classes: list[str], state: dict, out: storage.Location
) -> None:
    """model.pt (the architecture's own state dict names, the new classifier as its final layer)
    and model.json, which `model.weights=<output>/model.pt` reads back in classify and features."""
    with trainloop.checkpoint_folder(checkpoint) as folder:
        tensors = torch.load(folder / trainloop.TENSORS_FILE, map_location="cpu", weights_only=True)
    model = transfer.FineTuneModel(replace(weights, state_dict=None), len(classes))
    model.load_state_dict(tensors["model"])
    buf = io.BytesIO()
    torch.save(model.export_state(), buf)
    storage.write_bytes(out.join(MODEL_FILE), buf.getvalue())
    sidecar = {
        "format": MODEL_FORMAT,
        "backbone": weights.backbone,
        "pretrained": {"weights": weights.weights, "digest": weights.digest},
        "classes": classes,
        "preprocessing": prep.to_dict(),
        "best_epoch": state["best"]["epoch"],
        "metrics": {"val": _scores(state["best_val"])},
    }
    storage.write_bytes(out.join("model.json"), json.dumps(sidecar, indent=1).encode())


def score_test(cfg: Config, sets: TrainSets, out: storage.Location) -> dict:
    """The exported model over the test source, through `classify` (the same path users take); returns its
    metrics."""
    ft = cfg.finetune
    uri = ft.test_source or ft.source
    split = ft.test_split if sets.test.kind == "shards" else None
    classify_cfg = ClassifyConfig(
        source=uri, output=out.join(TEST_PREDICTIONS).uri, splits=[split] if split else None, top_k=5, overwrite=True
    )
    model_cfg = ModelConfig(backbone=cfg.model.backbone, weights=out.join(MODEL_FILE).uri)
    result = predict.run(model_cfg, classify_cfg, cfg.storage, trainsets.wds_config(cfg, sets))
    if result["rejected"]:
        log.warning("finetune: %d test images rejected while scoring; see %s/errors.jsonl", result["rejected"], uri)
    return result["metrics"][split] if split else result["metrics"]["all"]


def read_run_file(out: storage.Location) -> dict | None:
    """The run's record, or None for a new run folder."""
    loc = out.join(RUN_FILE)
    return json.loads(storage.read_bytes(loc)) if storage.exists(loc) else None


def _scores(metrics: dict | None) -> dict:
    return {k: v for k, v in (metrics or {}).items() if k.startswith("top") or k == "samples"}


def _first_difference(old: dict, new: dict, prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if a != b:
                return _first_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            return f"{prefix}{key}: {a!r} there, {b!r} now"
    return "same settings"
