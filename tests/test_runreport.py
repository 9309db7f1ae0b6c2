"""report.html: valid HTML, links only to files that exist, the run's counts, bounded with 1,000 classes."""

from __future__ import annotations

import os
from html.parser import HTMLParser

import numpy as np

from pipeline import report, runreport, storage


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.links, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v]

    def handle_data(self, data):
        self.text.append(data)


def _parse(text: str) -> _Collect:
    parser = _Collect()
    parser.feed(text)
    parser.close()
    return parser


def _metrics(n: int, rows_per_class: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n), rows_per_class)
    noisy = rng.random(len(labels)) < 0.3
    top1 = np.where(noisy, rng.integers(0, n, len(labels)), labels)
    topk = np.stack([top1, (top1 + 1) % n, (top1 + 2) % n], 1)
    return report.classification_metrics(labels, topk, [f"class_{i}" for i in range(n)], k=3)


def test_per_class_scores_and_top_confusions_from_a_matrix():
    cm = [[8, 2, 0], [1, 6, 3], [0, 0, 0]]
    scores = runreport.per_class_scores(cm)
    assert scores[0] == {"precision": 8 / 9, "recall": 0.8, "f1": 16 / 19, "support": 10}
    assert scores[1]["precision"] == 0.75 and scores[1]["recall"] == 0.6 and scores[1]["support"] == 10
    assert scores[2] == {"precision": 0.0, "recall": None, "f1": 0.0, "support": 0}
    assert runreport.confusion_pairs(cm) == [(1, 2, 3), (0, 1, 2), (1, 0, 1)]
    reasons = runreport.reject_reasons(
        [
            {"source": "a.jpg", "reason": "cannot decode: truncated (12 bytes)"},
            {"source": "b.jpg", "reason": "cannot decode: broken"},
            {"source": "c.png", "reason": "image of 40000000 pixels over prepare.max_pixels"},
        ]
    )
    assert reasons == [("cannot decode", 2, "a.jpg"), ("image of N pixels over prepare.max_pixels", 1, "c.png")]


def test_report_parses_links_only_to_existing_files_and_holds_the_counts(tmp_path):
    out = storage.resolve(str(tmp_path / "run"))
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "train_top1": 0.5, "val_top1": 0.5, "val_top5": 1}
        for e in range(1, 4)
    ]
    rep = runreport.RunReport(
        "classify: a <model>",
        counts={"inputs": 1234, "classified": 1200, "rejected": 34},
        rejects=[{"source": f"s3://b/{i}.jpg", "reason": "cannot decode: x"} for i in range(34)],
        metrics={"test": _metrics(5, 20)},
        history=history,
        galleries=[("most confident mistakes", report.plot_history(history))],
        timings={"classify": 12.5},
        config={"classify": {"source": "s3://b/in"}},
    )
    loc = runreport.write(out, rep)
    text = open(loc.path).read()
    parsed = _parse(text)
    assert parsed.tags[0] == "html" and parsed.tags.count("img") == 3  # curves, confusion, one gallery
    for link in parsed.links:
        assert link.startswith("data:image/png;base64,") or os.path.exists(os.path.join(out.path, link))
    words = " ".join(parsed.text)
    assert "1,234" in words and "1,200" in words and "34" in words and "cannot decode" in words
    assert "classify: a <model>" in words and "<model>" not in text  # escaped in the source, shown as text
    assert "top-3" in words and "Per class (test)" in words


def test_a_1000_class_report_stays_bounded():
    metrics = _metrics(1000, 5)
    text = runreport.render(runreport.RunReport("big", metrics={"test": metrics}, counts={"inputs": 5000}))
    parsed = _parse(text)
    assert len(text.encode()) < 20_000, len(text.encode())  # 11 KB measured
    assert parsed.tags.count("img") == 0  # no 1,000 x 1,000 picture: a table of the top confusions
    # counts (head + 1), accuracy (head + 1), top confusions, the lowest-F1 classes
    assert parsed.tags.count("tr") == 2 + 2 + (1 + runreport.TOP_CONFUSIONS) + (1 + runreport.MAX_CLASS_ROWS)
    assert "Top confusions (test)" in text
