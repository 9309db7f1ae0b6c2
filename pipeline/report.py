"""Classification metrics (top-k, per-class accuracy, confusion matrix) and PNG plots.

Plots are drawn with matplotlib's Agg canvas directly (no pyplot, no global backend), rendered to
bytes, and written through `storage`, so they land on local disk or object storage alike.
"""

from __future__ import annotations

import io
import re
from typing import Sequence

import numpy as np


def meaningful_k(num_classes: int, k: int = 5) -> int | None:
    """`k` when top-k says something for `num_classes` classes, None when k covers them all
    (top-5 of 3 classes is 100% by construction, so it is left out, not reported)."""
    return k if k < num_classes else None


def topk_accuracy(labels: np.ndarray, topk: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the first `k` columns of `topk` (N, >=k)."""
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(np.any(topk[:, :k] == np.asarray(labels)[:, None], axis=1)))


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(true, predicted) counts, int64 (num_classes, num_classes)."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(preds, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(labels: np.ndarray, topk: np.ndarray, classes: Sequence[str], k: int = 5) -> dict:
    """Top-1, top-k, per-class accuracy and the confusion matrix of labelled rows.

    `topk` holds predicted class indices, best first; rows with a negative label are skipped.
    """
    labels = np.asarray(labels)
    keep = labels >= 0
    labels, topk = labels[keep], np.asarray(topk)[keep].reshape(int(keep.sum()), -1)
    k = min(k, topk.shape[1], len(classes))
    cm = (
        confusion_matrix(labels, topk[:, 0], len(classes))
        if len(labels)
        else np.zeros((len(classes),) * 2, dtype=np.int64)
    )
    support = cm.sum(axis=1)
    per_class = {
        name: {"accuracy": (float(cm[i, i] / support[i]) if support[i] else None), "support": int(support[i])}
        for i, name in enumerate(classes)
    }
    return {
        "samples": int(len(labels)),
        "top1": topk_accuracy(labels, topk, 1),
        f"top{k}": topk_accuracy(labels, topk, k),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }


def accuracy_text(metrics: dict) -> str:
    """`top-1 97.50%  top5 99.80%` from `classification_metrics` (top-k only when k > 1)."""
    extra = [k for k in metrics if k.startswith("top") and k != "top1"]
    return f"top-1 {metrics['top1']:.2%}" + "".join(f"  {k} {metrics[k]:.2%}" for k in extra)


def plot_history(history: list[dict]) -> bytes:
    """Loss and top-1 accuracy per epoch, train vs validation, as a PNG."""
    epochs = [h["epoch"] for h in history]
    fig = figure(figsize=(10, 4), dpi=100)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        loss_ax.plot(epochs, [h[key] for h in history], label=label)
    curves = [("train_top1", "train top-1"), ("val_top1", "validation top-1")]
    curves += [(key, f"validation top-{key[7:]}") for key in history[0] if re.fullmatch(r"val_top([2-9]|\d\d+)", key)]
    for key, label in curves:
        acc_ax.plot(epochs, [h[key] for h in history], label=label)
    best = min(history, key=lambda h: h["val_loss"])["epoch"]
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.axvline(best, color="grey", linestyle=":", label=f"best epoch ({best})")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig)


def plot_confusion(cm: np.ndarray | list, classes: Sequence[str], title: str = "confusion matrix") -> bytes:
    """The confusion matrix, rows = true class, normalised per row, counts printed when few."""
    cm = np.asarray(cm)
    n = len(classes)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.45 * n, 30)
    fig = figure(figsize=(side + 1.5, side), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _png(fig)


def figure(**kwargs):
    """A matplotlib Figure drawn by Agg. matplotlib is imported here, when a figure is drawn: the model
    actors import the modules that plot (through `heads` and `predict`) and never draw, and its import
    would be a quarter of a second of each actor's start."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()
