"""Fine-tuning on WebDataset shards of another tool (the webdataset package's `TarWriter`) in the local S3
server: train shards as a brace list, val shards as a prefix, test shards as a glob, integer labels without
class names; the counting pass and its cache; whole shards held out for validation; one-line refusals."""

from __future__ import annotations

import io
import json
import uuid

import pytest
import webdataset as wds
from images import CLASS_COLORS, jpeg_bytes
from test_finetune import base_config

from pipeline import finetune, storage, trainsets
from pipeline.config import build_config

pytestmark = pytest.mark.timeout(300)


def shard_bytes(samples: list[dict]) -> bytes:
    buf = io.BytesIO()
    with wds.TarWriter(buf) as tar:
        for sample in samples:
            tar.write(sample)
    return buf.getvalue()


def samples(prefix: str, n: int, seed: int) -> list[dict]:
    """n samples of 3 colour classes, `.jpg` + `.cls` (an integer), as img2dataset or ImageNet shards have."""
    return [
        {
            "__key__": f"{prefix}{i:04d}",
            "jpg": jpeg_bytes(40, 32, seed=seed + i, color=CLASS_COLORS[i % 3]),
            "cls": i % 3,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def bucket(ray_session, s3) -> str:
    """train/shard-00000{0..3}.tar (12 samples each; one with a label outside the classes), val/ (one shard of
    12), test/test-00000{0,1}.tar (6 each). No class names anywhere: classes come from the labels."""
    name = f"ftwds-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=name)
    for n in range(4):
        part = samples(f"t{n}-", 12, 100 * n)
        s3.put_object(Bucket=name, Key=f"train/shard-{n:06d}.tar", Body=shard_bytes(part))
    s3.put_object(Bucket=name, Key="val/val-000000.tar", Body=shard_bytes(samples("v-", 12, 1000)))
    broken = samples("v2-", 3, 1100)
    broken[0]["cls"] = 7  # outside the 3 classes the train shards show: a reject, not a crash
    s3.put_object(Bucket=name, Key="val/val-000001.tar", Body=shard_bytes(broken))
    for n in range(2):
        s3.put_object(Bucket=name, Key=f"test/test-{n:06d}.tar", Body=shard_bytes(samples(f"x{n}-", 6, 2000 + 10 * n)))
    return name


def config(bucket: str, output: str, **finetune_keys):
    """test_finetune's run (two workers, simple_cnn at 32 px, 2 epochs) over the train shards as a brace list."""
    source = f"s3://{bucket}/train/shard-{{000000..000003}}.tar"
    return build_config(base_config(bucket, output, **{"source": source, **finetune_keys}))


def test_finetune_trains_on_foreign_shards_and_scores_their_test_shards(bucket, s3):
    cfg = config(bucket, "run", val_source=f"s3://{bucket}/val/", test_source=f"s3://{bucket}/test/test-*.tar")
    result = finetune.run(cfg)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["val"]["samples"] == 14  # 12 + 3, less the sample labelled 7
    assert result["val"]["top1"] >= 0.9 and result["test"]["top1"] >= 0.9 and result["test"]["samples"] == 12
    sidecar = json.loads(s3.get_object(Bucket=bucket, Key="run/model.json")["Body"].read())
    assert sidecar["classes"] == ["0", "1", "2"]  # from the largest .cls label
    counts = json.loads(s3.get_object(Bucket=bucket, Key=f"run/{trainsets.COUNTS_FILE}")["Body"].read())
    assert sorted(t["samples"] for t in counts.values()) == [12, 12, 12, 12]
    assert all(t["labelled"] == 12 and t["max_label"] == 2 for t in counts.values())
    page = s3.get_object(Bucket=bucket, Key="run/report.html")["Body"].read().decode()
    assert "<td>train samples</td><td>48</td>" in page and "<td>val shards</td><td>2</td>" in page

    again = finetune.run(cfg)
    assert again.get("already_finished") and again["test"] == result["test"]


def test_the_counts_are_read_once_and_kept_in_the_run_folder(bucket):
    cfg = config(bucket, "counted", val_source=f"s3://{bucket}/val/")
    out = storage.resolve(cfg.finetune.output, cfg.storage)
    first = trainsets.count(trainsets.resolve(cfg), cfg, out)
    assert first.train.count == 48 and first.classes == ("0", "1", "2") and first.val.classes == first.classes
    kept = json.loads(storage.read_bytes(out.join(trainsets.COUNTS_FILE)))
    for tally in kept.values():
        tally["samples"] = 5  # a later pass that read the shards again would count 12
    storage.write_bytes(out.join(trainsets.COUNTS_FILE), json.dumps(kept).encode())
    assert trainsets.count(trainsets.resolve(cfg), cfg, out).train.count == 20


def test_whole_shards_are_held_out_for_validation_when_there_is_no_val_source(bucket):
    sets = trainsets.resolve(config(bucket, "held", val_fraction=0.25))
    assert len(sets.train.units) == 3 and len(sets.val.units) == 1 and sets.test is None
    assert {u.paths for u in sets.train.units}.isdisjoint({u.paths for u in sets.val.units})
    assert sets.val.units == trainsets.resolve(config(bucket, "held", val_fraction=0.25)).val.units  # from seed
    other = trainsets.resolve(config(bucket, "held", val_fraction=0.25, seed=3))
    assert {u.paths for u in other.val.units} | {u.paths for u in other.train.units} == {
        u.paths for u in sets.train.units + sets.val.units
    }


@pytest.mark.parametrize(
    "keys, message",
    [
        (
            {"source": "{bucket}/train/shard-000000.tar"},
            "one WebDataset shard, and no finetune.val_source: set finetune.val_source",
        ),
        (
            {"source": "{bucket}/val/val-00000{{0..1}}.tar", "val_source": "{bucket}/nothing-here/x.tar"},
            "nothing-here: no such file or prefix",
        ),
        ({"source": "{bucket}/raw/"}, "no WebDataset shards; run `imgpipe prepare` on the images first"),
        ({"source": "{bucket}/empty/"}, "no prepared shards here (no manifest.json) and no WebDataset shards"),
    ],
)
def test_bad_inputs_are_refused_in_one_line_before_training(bucket, s3, keys, message):
    s3.put_object(Bucket=bucket, Key="raw/red/a.jpg", Body=jpeg_bytes())
    s3.put_object(Bucket=bucket, Key="empty/readme.txt", Body=b"nothing to train on")
    cfg = config(bucket, "refused", **{k: v.format(bucket=f"s3://{bucket}") for k, v in keys.items()})
    with pytest.raises((ValueError, OSError)) as exc:
        finetune.check(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_unlabelled_train_shards_are_refused_by_the_counting_pass(bucket, s3):
    plain = [{"__key__": f"u{i:03d}", "jpg": jpeg_bytes(seed=i)} for i in range(4)]
    for n in range(2):
        s3.put_object(Bucket=bucket, Key=f"unlabelled/u-{n}.tar", Body=shard_bytes(plain))
    cfg = config(bucket, "unlabelled-run", source=f"s3://{bucket}/unlabelled/")
    out = storage.resolve(cfg.finetune.output, cfg.storage)
    with pytest.raises(ValueError) as exc:
        trainsets.count(trainsets.resolve(cfg), cfg, out)
    assert "none of the 4 train samples has a label; finetune needs labels (set webdataset.label" in str(exc.value)
