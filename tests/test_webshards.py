"""WebDataset shards written by another tool (the webdataset package's `ShardWriter`) read from the local S3
server by features, classify and the training input: labelled and unlabelled, plain and gzipped, prefix, glob
and brace lists, bad samples counted as rejects, a damaged or missing shard one clear error."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from images import CLASS_COLORS, jpeg_bytes

from jobs.common import user_error
from pipeline import features, predict, schema, storage
from pipeline.config import ClassifyConfig, FeaturesConfig, ModelConfig, StorageConfig, WebDatasetConfig
from pipeline.loader import TrainInput
from pipeline.sources import open_images
from pipeline.webshards import LabelRules, group_samples, list_shards

pytestmark = pytest.mark.timeout(300)
CLASSES = ["red", "green", "blue"]
BAD = {"a003": "no image member", "a007": "bad .cls member b'cat'", "a010": "unreadable image header"}


def shard_bytes(samples: list[dict], gz: bool = False) -> bytes:
    """One shard as the webdataset package writes it (its `TarWriter`, as `ShardWriter` uses it)."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, compress=gz) as tar:
        for sample in samples:
            tar.write(sample)
    return buf.getvalue()


def labelled_samples() -> list[dict]:
    """a000..a011: a coloured JPEG (class i % 3) + .cls; a003 has no image, a007 a bad .cls, a010 a cut JPEG."""
    samples = []
    for i in range(12):
        key, label = f"a{i:03d}", i % 3
        sample = {"__key__": key, "jpg": jpeg_bytes(40, 32, seed=i, color=CLASS_COLORS[label]), "cls": label}
        if key == "a003":
            sample = {"__key__": key, "cls": label, "json": {"note": "image lost"}}
        elif key == "a007":
            sample["cls"] = b"cat"
        elif key == "a010":
            sample["jpg"] = sample["jpg"][:200]
        samples.append(sample)
    return samples


@pytest.fixture(scope="module")
def shards(ray_session, s3) -> str:
    """s3://<bucket>/labelled: 2 plain shards of 6 and an empty one (ShardWriter's names), 1 gzipped of 4 (000..003,
    .tgz, NNN.png + NNN.cls as in webdataset's own test shards), classes.json; unlabelled/: 2 gzipped shards."""
    bucket = f"wds-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    samples = labelled_samples()
    for n in range(2):
        s3.put_object(Bucket=bucket, Key=f"labelled/shard-{n:06d}.tar", Body=shard_bytes(samples[6 * n : 6 * n + 6]))
    s3.put_object(Bucket=bucket, Key="labelled/shard-000002.tar", Body=shard_bytes([]))  # img2dataset writes these
    pngs = [{"__key__": f"{i:03d}", "png": _png(CLASS_COLORS[i % 3]), "cls": str(i % 3)} for i in range(4)]
    s3.put_object(Bucket=bucket, Key="labelled/extra-000000.tgz", Body=shard_bytes(pngs, gz=True))
    s3.put_object(Bucket=bucket, Key="labelled/classes.json", Body=json.dumps({"classes": CLASSES}).encode())
    for n in range(2):
        plain = [{"__key__": f"u/{n}{i:02d}", "jpg": jpeg_bytes(seed=50 + 10 * n + i)} for i in range(3)]
        s3.put_object(Bucket=bucket, Key=f"unlabelled/part-{n:02d}.tar.gz", Body=shard_bytes(plain, gz=True))
    return bucket


def _png(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 20), color).save(buf, format="PNG")
    return buf.getvalue()


def _table(s3, bucket: str, prefix: str):
    loc = storage.resolve(f"s3://{bucket}")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"])
    parts = [k for k in keys if k.endswith(".parquet")]
    return parts, [pq.read_table(loc.fs.open_input_file(f"{bucket}/{k}")) for k in parts]


def _errors(s3, bucket: str, key: str) -> dict[str, dict]:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return {e["key"]: e for e in map(json.loads, body.splitlines())}


def test_features_over_a_prefix_of_foreign_shards_counts_every_sample(shards, s3):
    bucket = shards
    cfg = FeaturesConfig(source=f"s3://{bucket}/labelled", output=f"s3://{bucket}/feats", batch_size=8)
    result = features.run(ModelConfig(), cfg, StorageConfig())
    assert (result["inputs"], result["rows"], result["rejected"], result["written"]) == (16, 13, 3, 4)
    parts, tables = _table(s3, bucket, "feats/")
    assert parts == [f"feats/all/part-00000{n}.parquet" for n in range(4)]  # extra-000000.tgz sorts first
    assert [t.num_rows for t in tables] == [4, 5, 4, 0] and tables[3].schema.metadata[b"imgpipe.inputs"] == b"0"
    rows = {k: r for t in tables for k, r in zip(t.column("key").to_pylist(), t.to_pylist())}
    assert sorted(rows) == [f"{i:03d}" for i in range(4)] + [f"a{i:03d}" for i in range(12) if f"a{i:03d}" not in BAD]
    assert all(r["label"] == int(k.lstrip("a")) % 3 for k, r in rows.items())
    assert rows["a005"]["source"] == f"s3://{bucket}/labelled/shard-000000.tar" and rows["a005"]["member"] == "a005.jpg"
    assert rows["002"]["source"] == f"s3://{bucket}/labelled/extra-000000.tgz" and rows["002"]["member"] == "002.png"
    assert len(rows["a000"]["embedding"]) == 1280 and np.abs(rows["a000"]["embedding"]).sum() > 0
    meta = tables[0].schema.metadata
    assert json.loads(meta[b"imgpipe.classes"]) == CLASSES and meta[b"imgpipe.inputs"] == b"4"
    errors = _errors(s3, bucket, "feats/errors.jsonl")
    assert sorted(errors) == sorted(BAD) and all(BAD[k] in e["reason"] for k, e in errors.items())
    assert errors["a010"]["source"] == f"s3://{bucket}/labelled/shard-000001.tar:a010.jpg"
    run_file = json.loads(s3.get_object(Bucket=bucket, Key="feats/features.json")["Body"].read())
    assert run_file["identity"]["kind"] == "webdataset" and run_file["complete"]
    assert all(u["digest"].startswith("wds:") and u["count"] == -1 for u in run_file["units"].values())

    # Resume: nothing left to write; a shard written again (new size/mtime) is another input.
    assert features.run(ModelConfig(), cfg, StorageConfig())["written"] == 0
    s3.put_object(Bucket=bucket, Key="labelled/shard-000001.tar", Body=shard_bytes(labelled_samples()[6:11]))
    with pytest.raises(ValueError, match=r"differs in the content of wds-000002"):
        features.run(ModelConfig(), cfg, StorageConfig())
    s3.put_object(Bucket=bucket, Key="labelled/shard-000001.tar", Body=shard_bytes(labelled_samples()[6:]))


def test_classify_an_unlabelled_brace_list_and_a_glob(shards, s3):
    bucket = shards
    cfg = ClassifyConfig(
        source=f"s3://{bucket}/labelled/shard-{{000000..000002}}.tar", output=f"s3://{bucket}/preds", top_k=3
    )
    result = predict.run(ModelConfig(), cfg, StorageConfig(), WebDatasetConfig(label="none"))
    # label=none: a007's bad .cls is no longer read; the sample without an image and the cut JPEG stay rejects.
    assert (result["inputs"], result["rows"], result["rejected"], result["metrics"]) == (12, 10, 2, None)
    assert result["written"] == 3  # the empty shard is an empty part
    _, tables = _table(s3, bucket, "preds/")
    rows = [r for t in tables for r in t.to_pylist()]
    assert len(rows) == 10 and {r["label"] for r in rows} == {-1}
    assert all(len(r["topk"]) == 3 and 0 < r["prob"] <= 1 and r["pred_class"] for r in rows)
    assert {r["source"].rsplit("/", 1)[1] for r in rows} == {"shard-000000.tar", "shard-000001.tar"}
    assert all(r["member"] == r["key"] + ".jpg" for r in rows)
    assert sorted(_errors(s3, bucket, "preds/errors.jsonl")) == ["a003", "a010"]

    glob = open_images(f"s3://{bucket}/unlabelled/*.tar.gz")
    assert glob.kind == "webdataset" and glob.classes is None and len(glob.units) == 2
    got = glob.dataset().take_all()
    assert sorted(r[schema.KEY] for r in got) == [f"u/{n}{i:02d}" for n in range(2) for i in range(3)]
    assert {(r[schema.LABEL], r[schema.ERROR], r[schema.UNIT_SIZE]) for r in got} == {(-1, "", 3)}


def test_training_input_reads_foreign_shards_and_drops_their_rejects(shards):
    from pipeline.config import AugmentConfig, LoaderConfig
    from pipeline.preprocessing import Preprocessing

    source = open_images(f"s3://{shards}/labelled", kind="webdataset")
    assert source.classes == tuple(CLASSES) and not source.counted
    loader = LoaderConfig(batch_size=4, shuffle_buffer=8, prefetch_batches=1)
    train_input = TrainInput(source, Preprocessing(crop_size=16, resize_size=18), AugmentConfig(), loader)
    rows = train_input.dataset(epoch=0).take_all()
    assert len(rows) == 13 and {r[schema.KEY]: r[schema.LABEL] for r in rows}["001"] == 1
    assert len(source.units) == 4
    assert all(r[schema.PIXELS].shape == (16, 16, 3) for r in rows)
    dropped = train_input.dropped()
    assert dropped["dropped"] == {0: 3}
    assert {e["key"]: e["source"].rsplit("/", 1)[1] for e in dropped["examples"]} == {
        "a003": "shard-000000.tar",
        "a007": "shard-000001.tar:a007.jpg",
        "a010": "shard-000001.tar:a010.jpg",
    }


def test_a_damaged_or_missing_shard_is_one_error_naming_it(shards, s3):
    bucket = shards
    good = shard_bytes(labelled_samples()[:2])
    s3.put_object(Bucket=bucket, Key="damaged/x-000.tar", Body=good)
    s3.put_object(Bucket=bucket, Key="damaged/x-001.tar.gz", Body=shard_bytes(labelled_samples()[2:3], gz=True)[:60])
    with pytest.raises(Exception) as caught:
        open_images(f"s3://{bucket}/damaged").dataset().take_all()
    assert user_error(caught.value) == (
        f"s3://{bucket}/damaged/x-001.tar.gz: not a readable tar (truncated header); the shard is damaged or not a tar"
    )
    with pytest.raises(storage.StorageError) as missing:
        open_images(f"s3://{bucket}/damaged/x-{{000..003}}.tar")
    assert str(missing.value) == (
        f"s3://{bucket}/damaged/x-001.tar, s3://{bucket}/damaged/x-002.tar, s3://{bucket}/damaged/x-003.tar: "
        f"no such shard; 3 of the 4 shards that s3://{bucket}/damaged/x-{{000..003}}.tar names are missing"
    )
    with pytest.raises(storage.StorageError, match=r"damaged/y-\*\.tar: no such shard"):
        open_images(f"s3://{bucket}/damaged/y-*.tar")


def test_listing_and_keys_follow_webdataset(shards):
    base, found, _ = list_shards(f"s3://{shards}/labelled/{{shard,extra}}-*")
    assert base.uri == f"s3://{shards}/labelled"
    assert [f.path.rsplit("/", 1)[1] for f in found] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
        "extra-000000.tgz",
    ]
    # Keys keep folders and run to the first dot of the file name; __meta__ members and dotless names are no samples.
    tar = io.BytesIO()
    import tarfile

    with tarfile.open(fileobj=tar, mode="w") as t:
        for name, data in [("d/x.1.seg.png", b"1"), ("d/x.1.JPG", b"2"), ("__meta__", b"m"), ("README", b"r")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    assert group_samples(tar.getvalue(), "t.tar") == {
        "d/x": {"1.seg.png": ("d/x.1.seg.png", b"1"), "1.jpg": ("d/x.1.JPG", b"2")}
    }


def test_label_rules():
    auto = LabelRules.create(WebDatasetConfig(), ("cat", "dog"))
    assert auto.label({"cls2": ("k.cls2", b"1"), "txt": ("k.txt", b"cat")}) == (1, "")
    assert auto.label({"txt": ("k.txt", b" dog\n")}) == (1, "")
    assert auto.label({"jpg": ("k.jpg", b"")}) == (-1, "")
    assert auto.label({"cls": ("k.cls", b"2")}) == (-1, "bad .cls label 2: outside the 2 classes")
    assert auto.label({"txt": ("k.txt", b"cow")}) == (-1, ".txt label 'cow' is not one of the 2 classes")
    assert LabelRules.create(WebDatasetConfig(), None).label({"txt": ("k.txt", b"cat")}) == (-1, "")
    by_json = LabelRules.create(WebDatasetConfig(label="json", json_field="meta.y"), ("cat", "dog"))
    assert by_json.label({"json": ("k.json", b'{"meta": {"y": "dog"}}')}) == (1, "")
    assert by_json.label({"json": ("k.json", b'{"meta": {"y": 0}}')}) == (0, "")
    assert by_json.label({"json": ("k.json", b'{"other": 1}')}) == (-1, "")
    assert by_json.label({"json": ("k.json", b"{")})[1] == "bad .json member b'{': not JSON"
    assert LabelRules.create(WebDatasetConfig(label="none"), None).label({"cls": ("k.cls", b"x")}) == (-1, "")
    with pytest.raises(ValueError, match="webdataset.label=txt reads class names, but none are known"):
        LabelRules.create(WebDatasetConfig(label="txt"), None)


def test_auto_tells_foreign_shards_from_an_unfinished_prepare(tmp_path):
    for name in ("foreign", "unfinished"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train-000000.tar").write_bytes(shard_bytes(labelled_samples()[:2]))
    (tmp_path / "unfinished" / "config.yaml").write_text("prepare: {}\n")  # the first file prepare writes
    foreign = open_images(str(tmp_path / "foreign"))
    assert foreign.kind == "webdataset" and [u.name for u in foreign.units] == ["wds-000000"]
    with pytest.raises(ValueError, match=r"shards but no manifest.json: the last `imgpipe prepare` into it did not"):
        open_images(str(tmp_path / "unfinished"))
    assert open_images(str(tmp_path / "unfinished"), kind="webdataset").kind == "webdataset"
