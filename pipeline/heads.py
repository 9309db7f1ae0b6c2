"""Train a classifier head on cached features: linear (multinomial logistic regression) or MLP.

The head standardises its input with the training set's statistics, held as buffers, so
`head.pt` is complete on its own: backbone embedding in, class logits out. Training is plain
minibatch AdamW on the driver (the features of 100,000 images fit in memory), early-stopped
on the validation loss, with the best epoch's weights kept.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from pipeline import embedmap, gallery, report, runreport, schema, storage
from pipeline.config import HeadConfig, StorageConfig, require
from pipeline.errors import UserError
from pipeline.features import RUN_FILE
from pipeline.parts import ERRORS_FILE, read_parts

log = logging.getLogger("imgpipe")

HEAD_FORMAT = "imgpipe.head/1"
EVAL_CHUNK = 8192


def single_threaded(fn):
    """Run `fn` with one torch thread. A head's matrices are small (batch x dim x classes), so
    intra-op threads only add synchronisation; on a busy machine they cost 10x (measured: a
    100,000-row linear epoch 1.7 s on one thread, 22 s on two with other work running)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


class Standardize(nn.Module):
    """(x - mean) / std with the training set's statistics (`standardization`), saved in the state dict."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def create_head(spec: dict) -> nn.Sequential:
    """A head from its architecture record: {kind, in_dim, num_classes, hidden, dropout}."""
    dim, classes = int(spec["in_dim"]), int(spec["num_classes"])
    if spec["kind"] == "linear":
        return nn.Sequential(Standardize(dim), nn.Linear(dim, classes))
    if spec["kind"] == "mlp":
        hidden = int(spec["hidden"])
        return nn.Sequential(
            Standardize(dim),
            nn.Linear(dim, hidden),
            nn.ReLU(),
            nn.Dropout(float(spec["dropout"])),
            nn.Linear(hidden, classes),
        )
    raise UserError(f"unknown head kind {spec['kind']!r}; known: linear, mlp")


@dataclass
class FeatureSet:
    """Cached features read back: per split, embeddings (N, D) and labels; plus what made them."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    classes: list[str]
    identity: dict  # backbone, weights, preprocessing, dim, dtype, source (features.json)


def load_features(uri: str, storage_cfg: StorageConfig | None = None) -> FeatureSet:
    """Read a finished `features` output (local or object storage) into memory."""
    loc = storage.resolve(uri, storage_cfg)
    run_file = loc.join(RUN_FILE)
    if not storage.exists(run_file):
        raise UserError(f"{uri}: no {RUN_FILE}; point head.features at the output of `imgpipe features`")
    run = json.loads(storage.read_bytes(run_file))
    if not run.get("complete"):
        raise UserError(
            f"{uri}: these features are incomplete (an interrupted run); run `imgpipe features` again to finish them"
        )
    identity = run["identity"]
    if not json.loads(identity["classes"]):
        raise UserError(
            f"{uri}: these features have no class names (unlabelled images, or WebDataset shards without "
            "webdataset.classes or a classes.json / classes.txt beside them); a head needs labelled features"
        )
    x, y = {}, {}
    for split in run["splits"]:
        table = read_parts(
            loc, [p for p in run["parts"] if p.startswith(split + "/")], [schema.LABEL, schema.EMBEDDING]
        )
        dim = int(identity["dim"])
        emb = table.column(schema.EMBEDDING).combine_chunks()
        x[split] = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        y[split] = table.column(schema.LABEL).to_numpy().astype(np.int64)
    return FeatureSet(x, y, json.loads(identity["classes"]), identity)


def choose_splits(data: FeatureSet, val_fraction: float, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train / val / (test): the prepared splits when there; else val (and no test) is a
    stratified, seeded holdout of the only split. Unlabelled rows are left out."""
    labelled = {s: (data.x[s][data.y[s] >= 0], data.y[s][data.y[s] >= 0]) for s in data.x}
    train_name = "train" if "train" in labelled else next(iter(labelled), None)
    if train_name is None or not len(labelled[train_name][1]):
        raise UserError(
            f"no labelled training rows in the features (splits: {sorted(data.x)}); train-head needs labels"
        )
    chosen = {"train": labelled[train_name]}
    # A split is never both trained on and used to stop or to score.
    if train_name != "val" and "val" in labelled and len(labelled["val"][1]):
        chosen["val"] = labelled["val"]
    else:
        log.info("no val split: holding out %.0f%% of %s, stratified, for validation", 100 * val_fraction, train_name)
        chosen["train"], chosen["val"] = stratified_holdout(*labelled[train_name], val_fraction, seed)
    if train_name != "test" and "test" in labelled and len(labelled["test"][1]):
        chosen["test"] = labelled["test"]
    return chosen


def stratified_holdout(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """Split rows into (kept, held out), `fraction` of each class held out (one at least,
    when the class has two or more rows)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        n = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        held[rows[:n]] = True
    return (x[~held], y[~held]), (x[held], y[held])


def standardization(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean, and std floored at the median dimension's std.

    Pooled post-ReLU embeddings have near-dead dimensions (std ~1e-4 on digits for Lite0);
    a plain z-score blows their noise up to unit variance and costs accuracy (measured on
    unframed digits, 3 splits: 93.5% plain z-score, 96.0% floored; sklearn's LogisticRegression
    on the raw embeddings 95.6%).
    """
    x64 = x.astype(np.float64)
    std = x64.std(axis=0)
    floor = max(float(np.median(std)), 1e-6)
    return x64.mean(axis=0).astype(np.float32), np.maximum(std, floor).astype(np.float32)


def standardized(x: np.ndarray, mean: np.ndarray, std: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """(x - mean) / std, in chunks, kept in x's float width (float16 stays float16)."""
    out = np.empty(x.shape, dtype=np.float16 if x.dtype == np.float16 else np.float32)
    for start in range(0, len(x), chunk):
        out[start : start + chunk] = (x[start : start + chunk].astype(np.float32) - mean) / std
    return out


def class_weights(y: np.ndarray, num_classes: int) -> torch.Tensor:
    """scikit-learn's "balanced" weights, n / (classes present x class count): every class then
    weighs the same in the loss in total (absent classes weigh 0)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(y) / (np.count_nonzero(counts) * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


@single_threaded
def train_head(splits: dict, num_classes: int, cfg: HeadConfig, progress: Callable[[dict], None] | None = None):
    """Train on splits["train"], early-stop on splits["val"]; returns (head, spec, history, best)."""
    torch.manual_seed(cfg.seed)
    x_train, y_train = splits["train"]
    spec = {
        "kind": cfg.kind,
        "in_dim": int(x_train.shape[1]),
        "num_classes": num_classes,
        "hidden": cfg.hidden,
        "dropout": cfg.dropout,
    }
    head = create_head(spec)
    mean, std = standardization(x_train)
    head[0].mean.copy_(torch.from_numpy(mean))
    head[0].std.copy_(torch.from_numpy(std))
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(y_train, num_classes) if cfg.class_weighting else None)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    # The train set is standardised once, and the layers after `Standardize` train on it: the
    # same function, a quarter less time per step than standardising every batch.
    xt, yt = torch.from_numpy(standardized(x_train, mean, std)), torch.from_numpy(y_train)
    history, best, best_state, waited = [], None, None, 0
    k = report.meaningful_k(num_classes)  # top-5, or none when 5 covers every class
    for epoch in range(1, cfg.epochs + 1):
        train_loss, train_top1, train_topk = train_epoch(
            head[1:], xt, yt, loss_fn, optimizer, cfg.batch_size, generator, k or 1
        )
        val_loss, val_topk = evaluate(head, *splits["val"], loss_fn)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_top1": train_top1,
            **({f"train_top{k}": train_topk} if k else {}),
            "val_loss": val_loss,
            "val_top1": report.topk_accuracy(splits["val"][1], val_topk, 1),
            **({f"val_top{k}": report.topk_accuracy(splits["val"][1], val_topk, k)} if k else {}),
        }
        history.append(row)
        if best is None or val_loss < best["val_loss"]:
            best, best_state, waited = row, {k: v.clone() for k, v in head.state_dict().items()}, 0
        else:
            waited += 1
        if progress:
            progress({**row, "best": best is row})
        if waited >= cfg.patience:
            log.info(
                "early stop: validation loss has not improved for %d epochs (best epoch %d)",
                cfg.patience,
                best["epoch"],
            )
            break
    if best["epoch"] == len(history) == cfg.epochs:
        log.warning(
            "train-head: the head was still improving at its last epoch (%d of head.epochs=%d); raise "
            "head.epochs (early stopping ends it once validation loss stops improving)",
            best["epoch"],
            cfg.epochs,
        )
    head.load_state_dict(best_state)
    return head.eval(), spec, history, best


def train_epoch(
    head: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, optimizer, batch_size: int, generator, k: int = 5
) -> tuple[float, float, float]:
    """One pass over shuffled minibatches; returns the mean loss, top-1 and top-k (dropout on)."""
    head.train()
    order = torch.randperm(len(y), generator=generator)
    total, correct, correct5 = 0.0, 0, 0
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        xb, yb = x[idx].float(), y[idx]
        logits = head(xb)
        loss = loss_fn(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
        top = logits.detach().topk(min(k, logits.shape[1]), dim=1).indices
        correct += int((top[:, 0] == yb).sum())
        correct5 += int((top == yb[:, None]).any(dim=1).sum())
    return total / len(y), correct / len(y), correct5 / len(y)


@single_threaded
@torch.inference_mode()
def evaluate(
    head: nn.Module, x: np.ndarray, y: np.ndarray | None, loss_fn=None, k: int = 5
) -> tuple[float, np.ndarray]:
    """Mean loss (nan without labels or loss) and the top-k class indices (N, k), in chunks."""
    head.eval()
    total, topk = 0.0, []
    for start in range(0, len(x), EVAL_CHUNK):
        logits = head(torch.from_numpy(np.ascontiguousarray(x[start : start + EVAL_CHUNK])).float())
        if loss_fn is not None and y is not None:
            total += loss_fn(logits, torch.from_numpy(y[start : start + EVAL_CHUNK])).item() * len(logits)
        topk.append(logits.topk(min(k, logits.shape[1]), dim=1).indices.numpy())
    loss = total / len(x) if loss_fn is not None and y is not None and len(x) else math.nan
    return loss, np.concatenate(topk) if topk else np.zeros((0, k), dtype=np.int64)


def load_head(uri: str, storage_cfg: StorageConfig | None = None) -> tuple[nn.Sequential, dict]:
    """A trained head (`head.pt` + `head.json` under `uri`), ready for inference, and its
    head.json with the sha256 of head.pt added."""
    loc = storage.resolve(uri, storage_cfg)
    if not storage.exists(loc.join("head.json")):
        raise UserError(f"{uri}: no head.json; point classify.head at the output of `imgpipe train-head`")
    info = json.loads(storage.read_bytes(loc.join("head.json")))
    if info.get("format") != HEAD_FORMAT:
        raise UserError(f"{uri}/head.json: format {info.get('format')!r}, expected {HEAD_FORMAT}")
    head = create_head(info["architecture"])
    data = storage.read_bytes(loc.join("head.pt"))
    head.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return head.eval(), {**info, "sha256": hashlib.sha256(data).hexdigest()}


def check(cfg: HeadConfig, storage_cfg: StorageConfig) -> FeatureSet:
    """The finished features that `cfg.features` names, read into memory; writes nothing."""
    require("train-head", "head", cfg, ("features", "output"))
    return load_features(cfg.features, storage_cfg)


def run(cfg: HeadConfig, storage_cfg: StorageConfig, data: FeatureSet | None = None) -> dict:
    """Train a head on `cfg.features` (`data`: what `check` read, when the caller checked first), write
    head.pt, head.json, metrics.json and plots to `cfg.output`; returns the metrics."""
    started = time.perf_counter()
    data = data or check(cfg, storage_cfg)
    loaded = time.perf_counter()  # ~0 when the caller checked (and loaded) first
    out = storage.resolve(cfg.output, storage_cfg)
    splits = choose_splits(data, cfg.val_fraction, cfg.seed)
    log.info(
        "train-head: %s head on %d-d %s features, %d classes; %s",
        cfg.kind,
        int(data.identity["dim"]),
        data.identity["backbone"],
        len(data.classes),
        ", ".join(f"{s} {len(v[1])}" for s, v in splits.items()),
    )
    every = max(1, cfg.epochs // 40)  # about 40 progress lines, however many epochs
    head, spec, history, best = train_head(splits, len(data.classes), cfg, lambda row: _log_epoch(row, every))
    log.info(
        "kept epoch %d of %d: val loss %.4f, top-1 %.3f",
        best["epoch"],
        len(history),
        best["val_loss"],
        best["val_top1"],
    )
    metrics = {"best_epoch": best["epoch"], "epochs_run": len(history), "history": history}
    for name in [s for s in ("train", "val", "test") if s in splits]:
        _, topk = evaluate(head, *splits[name])
        metrics[name] = report.classification_metrics(splits[name][1], topk, data.classes)
    write_head(out, head, spec, data, cfg, metrics)
    timings = {
        "load features": round(loaded - started, 1),
        "train, score, write": round(time.perf_counter() - loaded, 1),
    }
    written = write_head_report(out, cfg, storage_cfg, data, splits, metrics, timings, head)
    return {**metrics, "output": out.uri, "report": written.uri}


def write_head_report(
    out: storage.Location,
    cfg: HeadConfig,
    storage_cfg,
    data: FeatureSet,
    splits: dict,
    metrics: dict,
    timings: dict,
    head: nn.Module,
) -> storage.Location:
    """report.html: the features' counts and rejects, curves, scores, confusion, per-class table, the
    scored split's error galleries, embedding map."""
    feats = storage.resolve(cfg.features, storage_cfg)
    run = json.loads(storage.read_bytes(feats.join(RUN_FILE)))
    errors = feats.join(ERRORS_FILE)
    text = storage.read_bytes(errors).decode() if storage.exists(errors) else ""
    names = {"inputs": "images in (features)", "rows": "embedded", "rejected": "rejected"}
    counts = {names[k]: run[k] for k in names if k in run}
    counts.update({f"{s} rows (labelled)": len(v[1]) for s, v in splits.items()})
    started = time.perf_counter()
    x, y = (np.concatenate(arrays) for arrays in zip(*splits.values()))
    png, caption = embedmap.embedding_map(x, y, data.classes, seed=cfg.seed)
    rep = runreport.RunReport(
        f"train-head: {cfg.kind} head on {data.identity['backbone']} features",
        f"{cfg.features} -> {out.uri}; kept epoch {metrics['best_epoch']} of {metrics['epochs_run']}",
        config=cfg.model_dump(mode="json"),
        counts=counts,
        rejects=[json.loads(line) for line in text.splitlines() if line.strip()],
        metrics={s: metrics[s] for s in ("train", "val", "test") if s in metrics},
        history=metrics["history"],
        figures=[("Embedding map", png, caption)],
    )
    mapped = time.perf_counter()
    rep.galleries = head_galleries(feats, run, data, splits, head, storage_cfg)
    rep.timings = {
        **timings,
        "embedding map": round(mapped - started, 1),
        "galleries": round(time.perf_counter() - mapped, 1),
    }
    storage.write_bytes(out.join("embedding.png"), png)
    return runreport.write(out, rep)


def write_head(
    out: storage.Location, head: nn.Module, spec: dict, data: FeatureSet, cfg: HeadConfig, metrics: dict
) -> None:
    """head.pt (state dict), head.json (what it is), metrics.json, and the PNG plots."""
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    storage.write_bytes(out.join("head.pt"), buf.getvalue())
    ident = data.identity
    summary = {
        s: {k: metrics[s][k] for k in metrics[s] if k.startswith("top")}
        for s in ("train", "val", "test")
        if s in metrics
    }
    info = {
        "format": HEAD_FORMAT,
        "architecture": spec,
        "classes": data.classes,
        "backbone": ident["backbone"],
        "weights": ident["weights"],
        "weights_digest": ident.get("weights_digest", ""),
        "preprocessing": json.loads(ident["preprocessing"]),
        "features": {"source": ident["source"], "dim": int(ident["dim"]), "dtype": ident["dtype"]},
        "train": cfg.model_dump(mode="json"),
        "best_epoch": metrics["best_epoch"],
        "metrics": summary,
    }
    storage.write_bytes(out.join("head.json"), json.dumps(info, indent=1).encode())
    storage.write_bytes(out.join("metrics.json"), json.dumps(metrics, indent=1).encode())
    storage.write_bytes(out.join("curves.png"), report.plot_history(metrics["history"]))
    shown = "test" if "test" in metrics else "val"
    storage.write_bytes(
        out.join("confusion.png"),
        report.plot_confusion(metrics[shown]["confusion_matrix"], data.classes, f"confusion matrix ({shown})"),
    )


def head_galleries(
    feats: storage.Location, run: dict, data: FeatureSet, splits: dict, head: nn.Module, storage_cfg
) -> list[tuple[str, bytes]]:
    """Error galleries of the head on the scored split (test, else val), with the images the features
    came from; [] when that split is a holdout of another (its rows' keys are not at hand here)."""
    split = "test" if "test" in splits else "val"
    if split not in data.y or len(splits[split][1]) != int((data.y[split] >= 0).sum()):
        return []
    table = gallery.read_keyed(
        feats, [p for p in run["parts"] if p.startswith(split + "/")], [schema.KEY, schema.LABEL]
    )
    table = table.filter(pc.greater_equal(table.column(schema.LABEL), 0))
    pred, prob = top_probabilities(head, splits[split][0])
    table = table.append_column(schema.PRED, pa.array(pred, pa.int32())).append_column(schema.PROB, pa.array(prob))
    identity = run["identity"]
    return gallery.draw_galleries(table, data.classes, identity["source"], identity.get("kind", "auto"), storage_cfg)


@single_threaded
@torch.inference_mode()
def top_probabilities(head: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The top class and its softmax probability per row, in chunks."""
    preds, probs = [], []
    for start in range(0, len(x), EVAL_CHUNK):
        logits = head(torch.from_numpy(np.ascontiguousarray(x[start : start + EVAL_CHUNK])).float())
        prob, pred = torch.softmax(logits, dim=1).max(dim=1)
        preds.append(pred.numpy())
        probs.append(prob.numpy())
    return np.concatenate(preds).astype(np.int32), np.concatenate(probs).astype(np.float32)


def _log_epoch(row: dict, every: int = 1) -> None:
    if row["epoch"] % every and row["epoch"] != 1:
        return
    topk = {key.split("_top", 1)[1] for key in row if key.startswith("val_top") and key != "val_top1"}

    def rates(split: str) -> str:
        return f"top1 {row[f'{split}_top1']:.3f}" + "".join(f" top{k} {row[f'{split}_top{k}']:.3f}" for k in topk)

    best = "  *best" if row["best"] else ""
    log.info(
        "epoch %3d  train loss %.4f %s | val loss %.4f %s%s",
        row["epoch"],
        row["train_loss"],
        rates("train"),
        row["val_loss"],
        rates("val"),
        best,
    )
