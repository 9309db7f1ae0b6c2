"""The classify job on real S3 and local Ray: backbone + head on labelled shards, and the
backbone's own ImageNet classifier on a bare prefix of unlabelled photos with bad files mixed in."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from images import bad_files, upload_tree, write_imagefolder
from PIL import Image
from processes import ray_env
from sklearn.datasets import load_sample_image

from pipeline import features, heads, inspection, predict, schema, storage
from pipeline.config import ClassifyConfig, FeaturesConfig, HeadConfig, ModelConfig, PrepareConfig, StorageConfig
from pipeline.models import ResolvedWeights, resolve_weights
from pipeline.prepare import run as prepare

pytestmark = pytest.mark.timeout(300)


def _read_predictions(s3, bucket: str, prefix: str):
    loc = storage.resolve(f"s3://{bucket}")
    keys = sorted(
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"] if o["Key"].endswith(".parquet")
    )
    return [pq.read_table(loc.fs.open_input_file(f"{bucket}/{k}")) for k in keys]


def test_classify_labelled_shards_with_a_trained_head(ray_session, s3, bucket, tmp_path):
    write_imagefolder(tmp_path / "raw", {"blue": 10, "green": 10, "red": 10})
    upload_tree(s3, bucket, tmp_path / "raw", "raw")
    data, storage_cfg = f"s3://{bucket}/prepared", StorageConfig()
    prepare(
        PrepareConfig(
            source=f"s3://{bucket}/raw", output=data, split={"train": 0.6, "val": 0.2, "test": 0.2}, shard_max_samples=8
        ),
        storage_cfg,
    )
    features.run(
        ModelConfig(), FeaturesConfig(source=data, output=f"s3://{bucket}/feats", splits=["train", "val"]), storage_cfg
    )
    heads.run(
        HeadConfig(features=f"s3://{bucket}/feats", output=f"s3://{bucket}/head", epochs=40, lr=1e-2), storage_cfg
    )

    cfg = ClassifyConfig(
        source=data, output=f"s3://{bucket}/preds", head=f"s3://{bucket}/head", splits=["test"], batch_size=4, top_k=2
    )
    result = predict.run(ModelConfig(), cfg, storage_cfg)
    assert (result["inputs"], result["rows"], result["rejected"]) == (6, 6, 0)
    assert result["model"].startswith("efficientnet_lite0 + head")
    test = result["metrics"]["test"]
    assert test["samples"] == 6 and test["top1"] == 1.0 and test["top2"] == 1.0 and "top3" not in test
    assert test["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]

    (table,) = _read_predictions(s3, bucket, "preds/test/")
    assert table.schema.remove_metadata() == schema.predictions_schema()
    rows = table.to_pylist()
    assert all(r["pred_class"] == r["key"].split("/")[0] == ["blue", "green", "red"][r["label"]] for r in rows)
    assert all(len(r["topk"]) == 2 and r["topk"][0] == r["pred"] and r["topk_prob"][0] == r["prob"] for r in rows)
    assert all(r["label"] not in r["topk"][1:] for r in rows)  # right at top-1, so not again below it
    assert all(r["topk_prob"] == sorted(r["topk_prob"], reverse=True) and sum(r["topk_prob"]) <= 1 + 1e-4 for r in rows)
    summary = json.loads(s3.get_object(Bucket=bucket, Key="preds/predictions.json")["Body"].read())
    assert summary["complete"] and summary["metrics"]["test"]["top1"] == 1.0
    assert s3.get_object(Bucket=bucket, Key="preds/confusion.png")["Body"].read()[:4] == b"\x89PNG"
    page = s3.get_object(Bucket=bucket, Key="preds/report.html")["Body"].read().decode()
    assert result["report"] == f"s3://{bucket}/preds/report.html"
    for name, key in (("inputs", "inputs"), ("classified", "rows"), ("rejected", "rejected")):
        assert f"<td>{name}</td><td>{summary[key]}</td>" in page
    # No mistakes: the gallery of least confident correct rows only, with the confusion matrix.
    assert "least confident correct predictions" in page and "mistakes" not in page and page.count("<img ") == 2

    # A retrained head is another model: its predictions never mix with the old ones.
    heads.run(HeadConfig(features=f"s3://{bucket}/feats", output=f"s3://{bucket}/head", epochs=5, lr=1e-2), storage_cfg)
    with pytest.raises(ValueError, match=r"already holds the output of another run \(it differs in head_sha256\)"):
        predict.run(ModelConfig(), cfg, storage_cfg)


def test_classify_unlabelled_prefix_with_the_imagenet_classifier(ray_session, s3, bucket):
    for name in ("china", "flower"):
        buf = io.BytesIO()
        Image.fromarray(load_sample_image(f"{name}.jpg")).save(buf, format="JPEG", quality=95)
        s3.put_object(Bucket=bucket, Key=f"drop/2024/{name}.jpg", Body=buf.getvalue())
    for name, data in bad_files().items():
        s3.put_object(Bucket=bucket, Key=f"drop/{name}.jpg", Body=data)

    cfg = ClassifyConfig(source=f"s3://{bucket}/drop", output=f"s3://{bucket}/preds", top_k=5, batch_size=4)
    result = predict.run(ModelConfig(backbone="efficientnet_lite0"), cfg, StorageConfig())
    assert (result["inputs"], result["rows"], result["rejected"]) == (6, 2, 4) and result["metrics"] is None

    (table,) = _read_predictions(s3, bucket, "preds/")
    rows = {r["key"]: r for r in table.to_pylist()}
    assert (rows["2024/china"]["pred"], rows["2024/china"]["pred_class"]) == (698, "palace")
    assert (rows["2024/flower"]["pred"], rows["2024/flower"]["pred_class"]) == (985, "daisy")
    assert all(r["label"] == -1 and len(r["topk"]) == 5 for r in rows.values())
    errors = s3.get_object(Bucket=bucket, Key="preds/errors.jsonl")["Body"].read().decode().splitlines()
    assert sorted(json.loads(e)["key"] for e in errors) == ["empty", "garbage_header", "not_an_image", "truncated"]


def test_classify_refuses_a_backbone_without_a_classifier(ray_session, tmp_path):
    write_imagefolder(tmp_path / "raw", {"a": 1})
    cfg = ClassifyConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "out"))
    with pytest.raises(
        ValueError, match=r"mobilenet_v3_small with weights none has no trained classifier; set classify.head"
    ):
        predict.run(ModelConfig(backbone="mobilenet_v3_small", weights="none"), cfg, StorageConfig())
    assert not np.any([p.suffix == ".parquet" for p in tmp_path.rglob("*")])


def test_top_k_metrics_with_k_below_the_class_count():
    from pipeline import report

    classes = ["a", "b", "c", "d"]
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, -1])  # the last row is unlabelled: skipped
    topk = np.array([[0, 1], [2, 1], [3, 0], [1, 2], [0, 3], [1, 0], [2, 3], [0, 1], [3, 2]])
    metrics = report.classification_metrics(labels, topk, classes, k=2)
    assert metrics["samples"] == 8 and metrics["top1"] == 4 / 8 and metrics["top2"] == 5 / 8
    assert "top5" not in metrics and report.accuracy_text(metrics) == "top-1 50.00%  top2 62.50%"
    assert metrics["per_class"]["b"] == {"accuracy": 0.5, "support": 2}
    assert metrics["confusion_matrix"][3] == [1, 1, 0, 0]  # d taken for b once, for a once


def write_head(root: Path, weights: ResolvedWeights, dim: int, digest: str | None = None) -> str:
    """A two-class linear head as train-head writes it, on features of `weights` (head.json records them)."""
    root.mkdir(parents=True)
    spec = {"kind": "linear", "in_dim": dim, "num_classes": 2, "hidden": 0, "dropout": 0.0}
    torch.save(heads.create_head(spec).state_dict(), root / "head.pt")
    info = {
        "format": heads.HEAD_FORMAT,
        "architecture": spec,
        "classes": ["a", "b"],
        "backbone": weights.backbone,
        "weights": weights.weights,
        "weights_digest": weights.digest if digest is None else digest,
        "preprocessing": weights.preprocessing.to_dict(),
    }
    (root / "head.json").write_text(json.dumps(info))
    return str(root)


@pytest.mark.timeout(240)
def test_a_head_refuses_another_backbone_or_weights_before_any_work(tmp_path):
    """model.backbone / model.weights, when set, must name what the head's features came from; left unset,
    the head brings its own. Refused in one line naming both, before Ray starts or anything is written."""
    lite0 = resolve_weights("efficientnet_lite0")
    head = write_head(tmp_path / "lite0", lite0, 1280)
    write_imagefolder(tmp_path / "raw", {"a": 1, "b": 1}, size=(16, 16))
    cfg = ClassifyConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "out"), head=head)
    trained = f"{head}: the head was trained on features of efficientnet_lite0 (weights {lite0.weights})"

    def refusal(model: ModelConfig, classify: ClassifyConfig = cfg) -> str:
        with pytest.raises(ValueError) as refused:
            predict.check(model, classify, StorageConfig())
        return str(refused.value)

    assert refusal(ModelConfig(backbone="resnet18")) == (
        f"{trained}, but model.backbone is resnet18; leave model.backbone unset (a head brings its own) or train "
        "a head on resnet18 features"
    )
    assert refusal(ModelConfig(weights="none")) == (
        f"{trained}, {lite0.digest}; model.weights none gives none, no digest; leave model.weights unset (a head "
        "brings its own) or train a head on features of those weights"
    )
    stale = write_head(tmp_path / "stale", lite0, 1280, digest="sha256:" + "0" * 64)  # its backbone's file changed
    assert "those weights now give " + lite0.digest in refusal(ModelConfig(), cfg.model_copy(update={"head": stale}))
    with pytest.raises(ValueError, match="but model.backbone is resnet18"):
        inspection.load_model(ModelConfig(backbone="resnet18"), head, None)  # inspect resolves a head the same way

    # Unset, or set to what the head was trained on (DEFAULT is the same file): the head's backbone.
    assert predict.check(ModelConfig(), cfg, StorageConfig()).model[0].digest == lite0.digest
    same = ModelConfig(backbone="efficientnet_lite0", weights="DEFAULT")
    assert predict.check(same, cfg, StorageConfig()).model[0].digest == lite0.digest
    resnet = write_head(tmp_path / "resnet", resolve_weights("resnet18", "none"), 512)
    assert predict.check(ModelConfig(), cfg.model_copy(update={"head": resnet}), StorageConfig()).model[0].backbone == (
        "resnet18"
    )

    # As a user runs it: one line, exit 1, before Ray starts; nothing written.
    args = [f"classify.source={tmp_path / 'raw'}", f"classify.output={tmp_path / 'out'}", f"classify.head={head}"]
    cmd = [sys.executable, "-m", "jobs.cli", "classify", *(f"--set={a}" for a in args), "--set=model.backbone=resnet18"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent, env=ray_env(), timeout=180
    )
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"imgpipe classify: {refusal(ModelConfig(backbone='resnet18'))}"
    ], proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()
