"""Fine-tuning on a real local Ray (Ray Train, two DDP workers over gloo) with the run's storage in
the local S3 server: learning, checkpoints in the bucket, recovery from a worker fault with the
same final weights, linear probe, resume of a finished run, export through classify, bad configs."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow.parquet as pq
import pytest
import torch
from images import CLASS_COLORS, jpeg_bytes, upload_tree, write_shards

from jobs import finetune as finetune_job
from pipeline import finetune, predict, storage, trainloop
from pipeline.config import ClassifyConfig, ModelConfig, build_config
from pipeline.models import SimpleCNN

CLASSES = ["red", "green", "blue"]
RAY_TIMEOUT = 300


def base_config(bucket: str, output: str, **finetune_keys) -> dict:
    """Two workers, simple_cnn at 32 px, 48 train images: three batches of 8 per worker per epoch."""
    return {
        "model": {"backbone": "simple_cnn", "weights": "none"},
        "augment": {"hflip": 0.5},
        "loader": {"batch_size": 8, "shuffle_buffer": 16, "actor_cpus": 0.5, "prefetch_batches": 1},
        "finetune": {
            "source": f"s3://{bucket}/prepared",
            "output": f"s3://{bucket}/{output}",
            "image_size": 32,
            "epochs": 2,
            "num_workers": 2,
            "cpus_per_worker": 0.5,
            "optimizer": "adamw",
            "lr": 0.003,
            "max_failures": 1,
            **finetune_keys,
        },
    }


@pytest.fixture(scope="module")
def colours(ray_session, s3, tmp_path_factory) -> str:
    """A prepared set in the bucket: 3 colour classes, 48 train / 12 val / 12 test 40x32 JPEGs."""
    root = tmp_path_factory.mktemp("colours")

    def samples(split: str, n: int, offset: int) -> list:
        return [
            (f"{split}{i:03d}", jpeg_bytes(40, 32, seed=offset + i, color=CLASS_COLORS[i % 3]), i % 3) for i in range(n)
        ]

    write_shards(
        root,
        {"train": samples("train", 48, 0), "val": samples("val", 12, 1000), "test": samples("test", 12, 2000)},
        per_shard=12,
        classes=CLASSES,
    )
    bucket = "finetune-colours"
    s3.create_bucket(Bucket=bucket)
    upload_tree(s3, bucket, root, "prepared")
    return bucket


@pytest.fixture(scope="module")
def baseline(colours) -> dict:
    """One uninterrupted run, shared by the tests that compare against it."""
    return finetune.run(build_config(base_config(colours, "baseline")))


def keys(s3, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def digest(s3, bucket: str, key: str) -> str:
    return hashlib.sha256(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest()


@pytest.mark.timeout(RAY_TIMEOUT)
def test_two_workers_learn_checkpoint_to_the_bucket_and_export(baseline, colours, s3):
    history = baseline["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert baseline["val"]["top1"] >= 0.9 and baseline["test"]["top1"] >= 0.9  # chance is 1/3
    assert all(h["images_per_s"] > 0 and 0 <= h["data_wait"] <= 1 for h in history)
    listed = keys(s3, colours, "baseline/")
    folders = [k.split("/")[3] for k in listed if k.startswith("baseline/ray/train/") and k.count("/") > 3]
    checkpoints = {name for name in folders if name.startswith("checkpoint_")}
    assert len(checkpoints) == 2  # the best 2 by val loss (of 2 epochs), the latest among them
    for name in ("model.pt", "model.json", "metrics.json", "curves.png", "confusion.png", "run.json"):
        assert f"baseline/{name}" in listed
    sidecar = json.loads(s3.get_object(Bucket=colours, Key="baseline/model.json")["Body"].read())
    assert sidecar["backbone"] == "simple_cnn" and sidecar["classes"] == CLASSES
    assert sidecar["preprocessing"]["crop_size"] == 32
    metrics = json.loads(s3.get_object(Bucket=colours, Key="baseline/metrics.json")["Body"].read())
    assert set(metrics["test"]["per_class"]) == set(CLASSES) and metrics["test"]["samples"] == 12
    page = s3.get_object(Bucket=colours, Key="baseline/report.html")["Body"].read().decode()
    assert baseline["report"] == f"s3://{colours}/baseline/report.html"
    assert "<td>train samples</td><td>48</td>" in page and "<td>test samples</td><td>12</td>" in page
    assert "Training curves" in page and "Per class (test)" in page and "Galleries" in page


@pytest.mark.timeout(RAY_TIMEOUT)
def test_classify_reads_the_exported_model_with_one_setting(baseline, colours):
    model = ModelConfig(weights=f"s3://{colours}/baseline/model.pt")  # backbone left at its default
    out = f"s3://{colours}/predicted"
    result = predict.run(
        model, ClassifyConfig(source=f"s3://{colours}/prepared", output=out, splits=["test"]), build_config({}).storage
    )
    assert result["rows"] == 12 and result["rejected"] == 0
    assert result["metrics"]["test"]["top1"] == baseline["test"]["top1"]
    assert "simple_cnn" in result["model"]


@pytest.mark.timeout(RAY_TIMEOUT)
def test_a_finished_run_is_not_run_again_and_another_config_is_refused(baseline, colours, capsys):
    again = finetune.run(build_config(base_config(colours, "baseline")))
    assert again["already_finished"] and again["best_epoch"] == baseline["best_epoch"]
    with pytest.raises(ValueError, match=r"another config or input \(finetune\.lr: 0\.003 there, 0\.01 now\)"):
        finetune.run(build_config(base_config(colours, "baseline", lr=0.01)))


def test_each_reader_of_a_checkpoint_gets_a_folder_of_its_own(s3, bucket):
    """Ray's `as_directory` shares one folder per node between the readers of a checkpoint, and a reader leaving
    deletes it under another: ranks restoring after a fault then failed on a missing state.pt."""
    from ray.train import Checkpoint

    s3.put_object(Bucket=bucket, Key="ckpt/state.json", Body=b'{"epoch": 1}')
    loc = storage.resolve(f"s3://{bucket}/ckpt")
    checkpoint = Checkpoint(loc.path, filesystem=loc.fs)
    with trainloop.checkpoint_folder(checkpoint) as first:
        with trainloop.checkpoint_folder(checkpoint) as second:
            assert first != second
        assert json.loads((first / "state.json").read_text()) == {"epoch": 1}  # still there for this reader
    assert not first.exists() and not second.exists()


@pytest.mark.timeout(RAY_TIMEOUT)
def test_a_worker_fault_mid_epoch_is_recovered_with_the_same_final_weights(
    baseline, colours, s3, tmp_path, monkeypatch
):
    marker = tmp_path / "fault-fired"
    # Rank 1 raises once at the middle batch of epoch 2 (the last); mid-epoch checkpoints every step mean the
    # run resumes inside the epoch, on a fresh worker group.
    monkeypatch.setenv(finetune.FAULT_ENV, f"1:1:1:{marker}")
    result = finetune.run(build_config(base_config(colours, "faulty", checkpoint_every_steps=1)))
    assert marker.exists()
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert [h["val_loss"] for h in result["history"]] == [h["val_loss"] for h in baseline["history"]]
    assert digest(s3, colours, "faulty/model.pt") == digest(s3, colours, "baseline/model.pt")


@pytest.mark.timeout(RAY_TIMEOUT)
def test_linear_probe_leaves_the_pretrained_trunk_bit_identical(colours, s3):
    torch.manual_seed(1)
    pretrained = SimpleCNN(num_classes=7).state_dict()  # "pretrained" on 7 classes
    buf = io.BytesIO()
    torch.save(pretrained, buf)
    s3.put_object(Bucket=colours, Key="init/simple.pt", Body=buf.getvalue())
    raw = base_config(colours, "probe", mode="linear_probe", epochs=1, lr=0.05)
    raw["model"]["weights"] = f"s3://{colours}/init/simple.pt"
    result = finetune.run(build_config(raw))
    exported = torch.load(
        io.BytesIO(s3.get_object(Bucket=colours, Key="probe/model.pt")["Body"].read()), weights_only=True
    )
    trunk = [k for k in pretrained if not k.startswith("classifier.")]
    assert all(torch.equal(exported[k], pretrained[k]) for k in trunk)  # BatchNorm running stats included
    assert exported["classifier.weight"].shape == (3, 256)
    assert result["history"][0]["train_loss"] > 0


@pytest.mark.timeout(RAY_TIMEOUT)
@pytest.mark.parametrize(
    "override, message",
    [
        ("model.backbone=resnet5", "unknown backbone 'resnet5'; known: efficientnet_b0"),
        ("finetune.num_workers=0", "config key 'finetune.num_workers'"),
        ("finetune.use_gpu=true", "workers x 1.0 GPU, but the cluster has 0 GPUs"),
        ("finetune.num_workers=9", "9 workers x 0.5 CPU plus 1 for reading, but the cluster has 4 CPUs"),
        ("finetune.mode=partial", "set finetune.mode=full and finetune.head_epochs=0"),
        ("finetune.source=/nonexistent/prepared", "/nonexistent/prepared: no such file or prefix; check the path"),
    ],
)
def test_a_bad_config_fails_in_one_line_before_any_worker_starts(colours, s3, override, message, capsys):
    raw = base_config(colours, f"bad-{abs(hash(override))}")
    argv = [f"--set={section}.{key}={value}" for section, values in raw.items() for key, value in _flat(values)]
    with pytest.raises(SystemExit) as exc:
        finetune_job.main([*argv, "--set", override])
    text = str(exc.value.code)
    assert message in text and "\n" not in text
    assert not [k for k in keys(s3, colours, f"bad-{abs(hash(override))}/") if "/ray/" in k]  # no worker ran


def _flat(values: dict):
    for key, value in values.items():
        yield key, json.dumps(value) if isinstance(value, (list, dict)) else ("null" if value is None else value)


def test_predictions_of_the_export_are_parquet_with_classes(baseline, colours, s3):
    table = pq.read_table(
        io.BytesIO(
            s3.get_object(Bucket=colours, Key="baseline/predictions-test/test/part-000000.parquet")["Body"].read()
        )
    )
    assert table.num_rows == 12 and set(table.column("pred_class").to_pylist()) <= set(CLASSES)


@pytest.mark.timeout(RAY_TIMEOUT)
def test_features_embed_with_the_fine_tuned_trunk(baseline, colours):
    from pipeline import features
    from pipeline.config import FeaturesConfig

    cfg = FeaturesConfig(source=f"s3://{colours}/prepared", output=f"s3://{colours}/tuned-features", splits=["test"])
    result = features.run(ModelConfig(weights=f"s3://{colours}/baseline/model.pt"), cfg, build_config({}).storage)
    assert (result["rows"], result["rejected"], result["dim"]) == (12, 0, 256)  # simple_cnn's dense layer


@pytest.mark.timeout(RAY_TIMEOUT)
def test_a_worker_that_keeps_failing_ends_the_job_in_one_line(colours, tmp_path, monkeypatch):
    monkeypatch.setenv(finetune.FAULT_ENV, f"0:0:1:{tmp_path / 'fired'}")
    raw = base_config(colours, "failing", max_failures=0, epochs=1)
    argv = [f"--set={section}.{key}={value}" for section, values in raw.items() for key, value in _flat(values)]
    with pytest.raises(SystemExit) as exc:
        finetune_job.main(argv)
    text = str(exc.value.code)
    assert text.startswith("imgpipe finetune: worker rank 1 failed") and "\n" not in text
    assert "injected fault at epoch 0, batch 0, rank 1" in text
