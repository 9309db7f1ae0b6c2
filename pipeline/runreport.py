"""One self-contained `report.html` per run: config, counts and rejects, curves, confusion,
per-class precision/recall/F1, top-k, galleries, embedding map and timings.

Pictures are inline (PNG data URIs), so the file is whole on its own, opens from a bucket
download and fetches nothing. Its size is bounded whatever the class count: the confusion matrix
is a picture up to `MAX_MATRIX_CLASSES` and a table of the top confusions beyond, and the
per-class table lists at most `MAX_CLASS_ROWS` classes (the worst F1 first; the run's JSON has all).
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pipeline import report, storage

REPORT_FILE = "report.html"
MAX_MATRIX_CLASSES = 50
MAX_CLASS_ROWS = 100
TOP_CONFUSIONS = 30
MAX_REJECT_REASONS = 20

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.gal{display:flex;flex-wrap:wrap;gap:14px 28px}.gal figure{margin:0}.gal figcaption{font-weight:600;margin:4px 0}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:.85em}.note{color:#666;font-size:.9em}
"""


@dataclass
class RunReport:
    """What a run's report shows; every part is optional but the title."""

    title: str
    subtitle: str = ""
    config: dict = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    rejects: list[dict] = field(default_factory=list)  # {"source", "reason"} per rejected input
    metrics: dict[str, dict] = field(default_factory=dict)  # split -> report.classification_metrics
    detail: str = ""  # the split whose confusion and per-class scores are shown (default: the last one)
    history: list[dict] = field(default_factory=list)
    galleries: list[tuple[str, bytes]] = field(default_factory=list)  # (title, PNG)
    figures: list[tuple[str, bytes, str]] = field(default_factory=list)  # (title, PNG, caption)
    timings: dict[str, float] = field(default_factory=dict)


def per_class_scores(cm: np.ndarray | list) -> list[dict]:
    """Precision, recall, F1 (None where undefined) and support of each class, from a (true, predicted) matrix."""
    cm = np.asarray(cm, dtype=np.int64)
    hits, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    rows = []
    for i in range(len(cm)):
        p = hits[i] / predicted[i] if predicted[i] else None
        r = hits[i] / support[i] if support[i] else None
        f1 = 2 * hits[i] / (support[i] + predicted[i]) if support[i] + predicted[i] else None
        rows.append(
            {
                "precision": None if p is None else float(p),
                "recall": None if r is None else float(r),
                "f1": None if f1 is None else float(f1),
                "support": int(support[i]),
            }
        )
    return rows


def confusion_pairs(cm: np.ndarray | list, n: int = TOP_CONFUSIONS) -> list[tuple[int, int, int]]:
    """The `n` largest off-diagonal cells (true, predicted, count), largest first."""
    cm = np.array(cm, dtype=np.int64)
    np.fill_diagonal(cm, 0)
    flat = np.argsort(-cm, axis=None, kind="stable")[:n]
    return [(int(i), int(j), int(cm[i, j])) for i, j in zip(*np.unravel_index(flat, cm.shape)) if cm[i, j]]


def reject_reasons(rejects: Sequence[dict]) -> list[tuple[str, int, str]]:
    """(reason, count, an example source) per kind of reason, most frequent first; a reason's kind
    is its text with numbers and quoted or parenthesised details taken out."""
    kinds: Counter = Counter()
    example: dict[str, str] = {}
    for r in rejects:
        kind = re.sub(r"\d+", "N", re.sub(r"'[^']*'|\([^)]*\)", "…", str(r.get("reason", "")).split(": ", 2)[0]))
        kinds[kind] += 1
        example.setdefault(kind, str(r.get("source", "")))
    return [(k, c, example[k]) for k, c in kinds.most_common()]


def render(rep: RunReport) -> str:
    """The report as one HTML document."""
    body = [f"<h1>{_e(rep.title)}</h1>"]
    if rep.subtitle:
        body.append(f"<p>{_e(rep.subtitle)}</p>")
    body += _counts(rep) + _scores(rep) + _curves(rep)
    if rep.metrics:
        split = rep.detail or list(rep.metrics)[-1]
        body += _confusion(split, rep.metrics[split]) + _class_table(split, rep.metrics[split])
    if rep.galleries:
        body.append("<h2>Galleries</h2>")
        figures = "".join(
            f"<figure><figcaption>{_e(t)}</figcaption>{_img(png, t)}</figure>" for t, png in rep.galleries
        )
        body.append(f"<div class=gal>{figures}</div>")
    for title, png, caption in rep.figures:
        body.append(f"<h2>{_e(title)}</h2>{_img(png, title)}<p class=note>{_e(caption)}</p>")
    if rep.timings:
        body.append("<h2>Timings</h2>" + _table(["step", "seconds"], [[k, f"{v:g}"] for k, v in rep.timings.items()]))
    if rep.config:
        body.append(f"<h2>Config</h2><pre>{_e(json.dumps(rep.config, indent=1, default=str))}</pre>")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(rep.title)}</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write(out: storage.Location, rep: RunReport) -> storage.Location:
    """Write `report.html` under `out`; returns where."""
    loc = out.join(REPORT_FILE)
    storage.write_bytes(loc, render(rep).encode())
    return loc


def _counts(rep: RunReport) -> list[str]:
    parts = []
    if rep.counts:
        parts.append("<h2>Counts</h2>" + _table(["", "count"], [[k, f"{v:,}"] for k, v in rep.counts.items()]))
    if rep.rejects:
        reasons = reject_reasons(rep.rejects)
        rows = [[r, f"{c:,}", s] for r, c, s in reasons[:MAX_REJECT_REASONS]]
        parts.append("<h3>Rejected inputs by reason</h3>" + _table(["reason", "count", "for example"], rows))
        if len(reasons) > MAX_REJECT_REASONS:
            parts.append(f"<p class=note>{len(reasons) - MAX_REJECT_REASONS} more kinds in errors.jsonl</p>")
    return parts


def _scores(rep: RunReport) -> list[str]:
    if not rep.metrics:
        return []
    ks = sorted({k for m in rep.metrics.values() for k in m if re.fullmatch(r"top\d+", k)}, key=lambda k: int(k[3:]))
    rows = [[s, f"{m['samples']:,}", *[_pct(m.get(k)) for k in ks]] for s, m in rep.metrics.items()]
    return ["<h2>Accuracy</h2>" + _table(["split", "samples", *[f"top-{k[3:]}" for k in ks]], rows)]


def _curves(rep: RunReport) -> list[str]:
    if not rep.history:
        return []
    return ["<h2>Training curves</h2>" + _img(report.plot_history(rep.history), "loss and accuracy per epoch")]


def _confusion(split: str, m: dict) -> list[str]:
    classes, cm = m["classes"], m["confusion_matrix"]
    if len(classes) <= MAX_MATRIX_CLASSES:
        png = report.plot_confusion(cm, classes, f"confusion matrix ({split})")
        return [f"<h2>Confusion matrix ({_e(split)})</h2>" + _img(png, f"confusion matrix {split}")]
    support = np.asarray(cm).sum(axis=1)
    rows = [
        [classes[i], classes[j], f"{c:,}", _pct(c / support[i] if support[i] else None)]
        for i, j, c in confusion_pairs(cm)
    ]
    note = f"<p class=note>{len(classes)} classes: the {TOP_CONFUSIONS} largest confusions instead of the matrix</p>"
    head = ["true class", "predicted", "count", "share of the true class"]
    return [f"<h2>Top confusions ({_e(split)})</h2>{note}" + _table(head, rows)]


def _class_table(split: str, m: dict) -> list[str]:
    classes = m["classes"]
    scores = per_class_scores(m["confusion_matrix"])
    order = list(range(len(classes)))
    note = ""
    if len(classes) > MAX_CLASS_ROWS:
        order = sorted(order, key=lambda i: (scores[i]["f1"] if scores[i]["f1"] is not None else 2.0, i))
        order = order[:MAX_CLASS_ROWS]
        note = (
            f"<p class=note>the {MAX_CLASS_ROWS} classes of lowest F1 of {len(classes)}; "
            "the run's JSON (metrics.json, predictions.json) has them all</p>"
        )
    rows = [
        [classes[i], *[_num(scores[i][k]) for k in ("precision", "recall", "f1")], f"{scores[i]['support']:,}"]
        for i in order
    ]
    head = ["class", "precision", "recall", "F1", "support"]
    return [f"<h2>Per class ({_e(split)})</h2>{note}" + _table(head, rows)]


def _table(head: list[str], rows: list[list]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _pct(value) -> str:
    return "–" if value is None or value != value else f"{value:.2%}"


def _num(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _e(text) -> str:
    return html.escape(str(text), quote=True)
