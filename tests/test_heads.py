"""Head training on cached features: it learns, stops early, and writes complete artefacts."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from pipeline import features, heads, parts, report, schema, storage
from pipeline.config import HeadConfig, StorageConfig
from pipeline.sources import Unit

pytestmark = pytest.mark.timeout(120)

CLASSES = ["ant", "bee", "cat"]


def _blobs(n_per_class: int, dim: int = 24, seed: int = 0, spread: float = 1.0):
    """Gaussian clusters around well-separated class centres (plus a dead dimension)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(0, 3, (len(CLASSES), dim))
    x = np.concatenate([c + spread * rng.normal(0, 1, (n_per_class, dim)) for c in centres]).astype(np.float32)
    x[:, -1] = 0.0
    y = np.repeat(np.arange(len(CLASSES)), n_per_class)
    return x, y


def _write_features(
    out: storage.Location,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    per_part: int = 40,
    classes: list[str] = CLASSES,
) -> None:
    """Parts and features.json exactly as `features.run` writes them (same sink), without Ray."""
    dim = next(iter(splits.values()))[0].shape[1]
    units, batches = [], []
    for split, (x, y) in splits.items():
        for n, start in enumerate(range(0, len(y), per_part)):
            unit = Unit(f"{split}-{n:06d}", split, len(y[start : start + per_part]), ())
            units.append(unit)
            keys = np.array([f"{split}/{i}" for i in range(start, start + unit.count)], dtype=object)
            batches.append(
                {
                    schema.KEY: keys,
                    schema.LABEL: y[start : start + unit.count],
                    schema.SOURCE: keys,
                    schema.SHARD: np.array([unit.name] * unit.count, dtype=object),
                    schema.ERROR: np.array([""] * unit.count, dtype=object),
                    schema.EMBEDDING: x[start : start + unit.count],
                }
            )
    prep = {"crop_size": 224, "resize_size": 256, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    meta = {
        "backbone": "efficientnet_lite0",
        "weights": "test",
        "preprocessing": json.dumps(prep),
        "dim": str(dim),
        "dtype": "float16",
        "classes": json.dumps(classes),
        "source": "test",
    }
    sink = parts.PartSink(out, units, features.features_table(dim, "float16"), meta)
    for batch in batches:
        sink.add(batch)
    sink.close()
    parts.write_run_file(out, features.RUN_FILE, meta, parts.verify_parts(out, units))


def test_linear_head_learns_separable_data():
    x, y = _blobs(60)
    seen = []
    cfg = HeadConfig(kind="linear", epochs=30, lr=1e-2, batch_size=32)
    head, spec, history, best = heads.train_head({"train": (x, y), "val": _blobs(20, seed=1)}, 3, cfg, seen.append)
    assert spec == {"kind": "linear", "in_dim": 24, "num_classes": 3, "hidden": 256, "dropout": 0.5}
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 5 and len(seen) == 30  # reported every epoch
    assert best["val_top1"] == 1.0 and "val_top5" not in best  # 3 classes: top-5 would be 100% by construction
    assert torch.allclose(head[0].std[-1], torch.tensor(float(np.median(x.std(0)))))  # the dead dim is floored
    _, topk = heads.evaluate(head, *_blobs(30, seed=2))
    assert (topk[:, 0] == np.repeat(np.arange(3), 30)).mean() == 1.0


def test_early_stopping_keeps_the_best_epoch():
    """Few, overlapping samples: the validation loss turns up, training stops `patience`
    epochs after its minimum, and the head returned is the one of that minimum."""
    rng = np.random.default_rng(0)

    def noisy(n: int):  # the class is the sign of feature 0, with a fifth of the labels flipped
        x = rng.normal(0, 1, (n, 32)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        flip = rng.random(n) < 0.2
        return x, np.where(flip, 1 - y, y)

    x, y = noisy(40)
    val = noisy(200)
    cfg = HeadConfig(kind="linear", epochs=500, patience=10, lr=3e-2, weight_decay=0.0, batch_size=8)
    head, _, history, best = heads.train_head({"train": (x, y), "val": val}, 2, cfg)
    assert len(history) == best["epoch"] + 10 < 100
    assert history[-1]["val_loss"] > best["val_loss"]
    loss, _ = heads.evaluate(head, *val, torch.nn.CrossEntropyLoss())
    assert loss == pytest.approx(best["val_loss"], rel=1e-5)


def test_mlp_head_with_class_weights_learns_imbalanced_data():
    x, y = _blobs(80, spread=2.5)
    keep = (y != 2) | (np.arange(len(y)) % 8 == 0)  # class 2 ten times rarer
    x, y = x[keep], y[keep]
    weights = heads.class_weights(y, 3)
    totals = weights.numpy() * np.bincount(y)
    assert np.allclose(totals, len(y) / 3) and weights[2] == pytest.approx(8 * weights[0])
    cfg = HeadConfig(
        kind="mlp", hidden=16, dropout=0.2, epochs=60, patience=60, lr=3e-3, batch_size=32, class_weighting=True
    )
    (xt, yt), (xv, yv) = heads.stratified_holdout(x, y, 0.2, seed=0)
    assert np.bincount(yv).tolist() == [16, 16, 2] and len(yt) + len(yv) == len(y)
    head, spec, history, _ = heads.train_head({"train": (xt, yt), "val": (xv, yv)}, 3, cfg)
    assert [type(m).__name__ for m in head] == ["Standardize", "Linear", "ReLU", "Dropout", "Linear"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 2
    xs, ys = _blobs(40, seed=5, spread=2.5)
    _, topk = heads.evaluate(head, xs, ys)
    metrics = report.classification_metrics(ys, topk, CLASSES)
    assert metrics["top1"] > 0.9 and metrics["per_class"]["cat"]["accuracy"] > 0.85


def test_train_head_job_on_s3_writes_head_metrics_and_plots(s3, bucket):
    x, y = _blobs(50)
    out = storage.resolve(f"s3://{bucket}/feats")
    _write_features(out, {"train": (x, y), "val": _blobs(15, seed=1), "test": _blobs(15, seed=2)})
    cfg = HeadConfig(features=out.uri, output=f"s3://{bucket}/head", epochs=50, patience=50, lr=1e-2)
    metrics = heads.run(cfg, StorageConfig())
    assert metrics["test"]["top1"] == 1.0 and metrics["test"]["samples"] == 45 and metrics["epochs_run"] == 50
    assert metrics["test"]["confusion_matrix"] == [[15, 0, 0], [0, 15, 0], [0, 0, 15]]
    assert metrics["test"]["top3"] == 1.0 and metrics["test"]["per_class"]["bee"] == {"accuracy": 1.0, "support": 15}

    objects = {o["Key"]: o for o in s3.list_objects_v2(Bucket=bucket, Prefix="head/")["Contents"]}
    assert set(objects) == {
        f"head/{n}"
        for n in ("head.pt", "head.json", "metrics.json", "curves.png", "confusion.png", "embedding.png", "report.html")
    }
    page = s3.get_object(Bucket=bucket, Key="head/report.html")["Body"].read().decode()
    assert metrics["report"] == f"s3://{bucket}/head/report.html" and page.startswith("<!DOCTYPE html>")
    # The features' counts (the run file's) and the splits' labelled rows, as the report shows them.
    assert "<td>embedded</td><td>240</td>" in page and "<td>test rows (labelled)</td><td>45</td>" in page
    assert page.count("<img ") == 3 and "PCA" in page and "Per class (test)" in page
    for png in ("curves.png", "confusion.png"):
        assert s3.get_object(Bucket=bucket, Key=f"head/{png}")["Body"].read()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads(s3.get_object(Bucket=bucket, Key="head/head.json")["Body"].read())
    assert (
        info["architecture"]["kind"] == "linear"
        and info["classes"] == CLASSES
        and info["backbone"] == "efficientnet_lite0"
    )
    assert info["preprocessing"]["interpolation"] == "bicubic" and info["features"]["dim"] == 24
    state = torch.load(io.BytesIO(s3.get_object(Bucket=bucket, Key="head/head.pt")["Body"].read()), weights_only=True)
    assert set(state) == {"0.mean", "0.std", "1.weight", "1.bias"} and tuple(state["1.weight"].shape) == (3, 24)
    saved = json.loads(s3.get_object(Bucket=bucket, Key="head/metrics.json")["Body"].read())
    assert [h["epoch"] for h in saved["history"]] == list(range(1, 51)) and {
        "train_loss",
        "val_loss",
        "val_top1",
    } <= set(saved["history"][0])
    assert not any("top5" in key or "top3" in key for key in saved["history"][0])  # 3 classes: no trivial top-k

    head, loaded = heads.load_head(f"s3://{bucket}/head")
    _, topk = heads.evaluate(head, *_blobs(10, seed=9))
    assert (topk[:, 0] == np.repeat(np.arange(3), 10)).all() and loaded["best_epoch"] == metrics["best_epoch"]


def test_incomplete_features_are_refused(tmp_path):
    out = storage.Location(pafs.LocalFileSystem(), str(tmp_path / "f"), str(tmp_path / "f"))
    parts.write_run_file(out, features.RUN_FILE, {"dim": "4"}, None)
    with pytest.raises(
        ValueError, match=r"these features are incomplete \(an interrupted run\); run `imgpipe features` again"
    ):
        heads.run(HeadConfig(features=str(tmp_path / "f"), output=str(tmp_path / "h")), StorageConfig())
    with pytest.raises(ValueError, match=r"no features.json; point head.features at the output of `imgpipe features`"):
        heads.run(HeadConfig(features=str(tmp_path), output=str(tmp_path / "h")), StorageConfig())


def test_a_split_is_never_both_trained_on_and_validated_on():
    x, y = _blobs(20)
    data = heads.FeatureSet({"val": x, "test": x[:6]}, {"val": y, "test": y[:6]}, CLASSES, {})
    chosen = heads.choose_splits(data, 0.25, seed=0)
    (xt, yt), (xv, yv) = chosen["train"], chosen["val"]
    assert len(yt) + len(yv) == 60 and len(yv) == 15 and np.bincount(yv).tolist() == [5, 5, 5]
    assert not {r.tobytes() for r in xt} & {r.tobytes() for r in xv}  # held out, not shared
    assert len(chosen["test"][1]) == 6


def test_a_head_still_improving_at_its_epoch_limit_says_to_raise_it(caplog):
    x, y = _blobs(30)
    with caplog.at_level("WARNING", logger="imgpipe"):
        heads.train_head({"train": (x, y), "val": _blobs(10, seed=1)}, 3, HeadConfig(epochs=1, lr=1e-2))
    assert "still improving at its last epoch (1 of head.epochs=1); raise head.epochs" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="imgpipe"):
        xv, yv = _blobs(10, seed=1)
        misfit = {"train": (x, y), "val": (xv, (yv + 1) % 3)}  # validation that only gets worse
        history = heads.train_head(misfit, 3, HeadConfig(epochs=60, lr=1e-1, patience=3))[2]
    assert len(history) < 60 and "still improving" not in caplog.text  # stopped early: nothing to say


def test_epoch_rows_name_their_top_k_and_leave_out_a_trivial_one():
    x, y = _blobs(30)
    _, _, history, _ = heads.train_head({"train": (x, y), "val": _blobs(10, seed=1)}, 3, HeadConfig(epochs=3, lr=1e-2))
    assert all(0 < h["train_top1"] <= 1 and not any("top5" in k for k in h) for h in history)  # 3 classes
    rng = np.random.default_rng(3)
    x7, y7 = rng.normal(size=(70, 8)).astype(np.float32), np.repeat(np.arange(7), 10)
    split = {"train": (x7, y7), "val": (x7[:35], y7[:35])}
    _, _, history7, _ = heads.train_head(split, 7, HeadConfig(epochs=2, lr=1e-2))
    assert all(h["val_top1"] <= h["val_top5"] <= 1 and h["train_top1"] <= h["train_top5"] for h in history7)
    top1_only = report.classification_metrics(np.array([0, 1, 2, 2]), np.array([[0], [1], [1], [2]]), CLASSES, k=1)
    assert set(k for k in top1_only if k.startswith("top")) == {"top1"}
    assert report.accuracy_text(top1_only) == "top-1 75.00%"
    assert (
        report.accuracy_text(report.classification_metrics(np.array([0, 1]), np.array([[0, 1], [0, 1]]), CLASSES, k=2))
        == "top-1 50.00%  top2 100.00%"
    )


def test_a_1000_class_run_writes_a_report_of_bounded_size(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (1000, 16))

    def split(per_class: int, seed: int):
        y = np.repeat(np.arange(1000), per_class)
        return (centres[y] + 0.3 * np.random.default_rng(seed).normal(0, 1, (len(y), 16))).astype(np.float32), y

    out = storage.resolve(str(tmp_path / "feats"))
    names = [f"class_{i:04d}" for i in range(1000)]
    _write_features(out, {"train": split(3, 1), "val": split(1, 2), "test": split(2, 3)}, 1000, names)
    cfg = HeadConfig(features=out.uri, output=str(tmp_path / "head"), epochs=3, lr=1e-2)
    metrics = heads.run(cfg, StorageConfig())
    page = (tmp_path / "head" / "report.html").read_text()
    assert metrics["test"]["samples"] == 2000 and "<td>test rows (labelled)</td><td>2,000</td>" in page
    # Curves and the embedding map as pictures; the confusions and the worst classes as bounded tables.
    assert page.count("<img ") == 2 and "Top confusions (test)" in page and "of lowest F1 of 1000" in page
    assert len(page.encode()) < 300_000, len(page.encode())  # 187 KB measured
