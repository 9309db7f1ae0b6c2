"""prepare: raw images -> shards, local and over S3, with bad inputs counted and listed."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from images import bad_files, bomb_png, jpeg_bytes, upload_tree, write_imagefolder
from processes import free_port, modules_after

from pipeline import storage
from pipeline.config import PrepareConfig, StorageConfig
from pipeline.layouts import RawInput
from pipeline.prepare import PrepareError, run
from pipeline.shards import TAR_TAIL, _member, sample_tar_bytes, tar_samples
from pipeline.sources import open_images

pytestmark = pytest.mark.timeout(180)


def prepare(source, output, **kw) -> dict:
    return run(PrepareConfig(source=str(source), output=str(output), **kw), StorageConfig())


def read_errors(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def folder_with_bad(tmp_path) -> Path:
    """3 classes (30/20/10 good JPEGs) + one of each bad kind + a stray text file."""
    root = tmp_path / "raw"
    write_imagefolder(root, {"cat": 30, "dog": 20, "eel": 10})
    for name, data in bad_files().items():
        (root / "cat" / f"bad_{name}.jpg").write_bytes(data)
    (root / "dog" / "huge.png").write_bytes(bomb_png(3000, 3000))
    (root / "dog" / "notes.txt").write_text("not an input")
    return root


def test_local_imagefolder_counts_rejects_and_readable_shards(ray_session, folder_with_bad, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(folder_with_bad, out, shard_max_samples=16, max_pixels=4_000_000, max_reject_fraction=0.2)

    assert manifest["inputs"] == 65 and manifest["samples"] == 60 and manifest["rejected"] == 5
    errors = read_errors(out / "errors.jsonl")
    reasons = {Path(e["source"]).name: e["reason"] for e in errors}
    assert set(reasons) == {
        "bad_empty.jpg",
        "bad_truncated.jpg",
        "bad_not_an_image.jpg",
        "bad_garbage_header.jpg",
        "huge.png",
    }
    assert "empty" in reasons["bad_empty.jpg"] and "truncated" in reasons["bad_truncated.jpg"]
    assert "not an image" in reasons["bad_not_an_image.jpg"] and "over the limit" in reasons["huge.png"]
    assert manifest["ignored_files"]["count"] == 1
    assert json.loads((out / "classes.json").read_text()) == {"classes": ["cat", "dog", "eel"]}

    shards = [(split, s) for split, info in manifest["splits"].items() for s in info["shards"]]
    assert sum(s["samples"] for _, s in shards) == 60
    for _, shard in shards:
        data = (out / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        with tarfile.open(out / shard["path"]) as tar:
            names = tar.getnames()
        assert len(names) == 3 * shard["samples"] and all(n.endswith((".jpg", ".cls", ".json")) for n in names)
    # The webdataset library itself reads them back: keys, labels, bytes, metadata.
    urls = [str(out / s["path"]) for _, s in shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 60 and len({s["__key__"] for s in samples}) == 60
    for s in samples:
        meta = json.loads(s["json"])
        label = int(s["cls"])
        assert ["cat", "dog", "eel"][label] == meta["class"] == s["__key__"].split("/")[0]
        assert (meta["width"], meta["height"]) == (48, 32)
        assert s["jpg"] == Path(meta["source"]).read_bytes()  # original bytes, unchanged


def test_split_is_stratified_disjoint_and_deterministic(ray_session, tmp_path):
    root = tmp_path / "raw"
    write_imagefolder(root, {"a": 50, "b": 30, "c": 20})
    m1 = prepare(root, tmp_path / "o1", shard_max_samples=20, split={"train": 0.6, "val": 0.2, "test": 0.2}, seed=7)
    m2 = prepare(root, tmp_path / "o2", shard_max_samples=20, split={"train": 0.6, "val": 0.2, "test": 0.2}, seed=7)
    m3 = prepare(root, tmp_path / "o3", shard_max_samples=20, split={"train": 0.6, "val": 0.2, "test": 0.2}, seed=8)

    assert {s: i["classes"] for s, i in m1["splits"].items()} == {
        "train": {"a": 30, "b": 18, "c": 12},
        "val": {"a": 10, "b": 6, "c": 4},
        "test": {"a": 10, "b": 6, "c": 4},
    }
    sums = lambda m: [s["sha256"] for i in m["splits"].values() for s in i["shards"]]  # noqa: E731
    assert sums(m1) == sums(m2)
    assert sums(m1) != sums(m3)
    keys = {split: _keys(tmp_path / "o1", info) for split, info in m1["splits"].items()}
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    assert len(keys["train"] | keys["val"] | keys["test"]) == 100
    # Shards mix classes (streaming training reads whole shards).
    first = _labels(tmp_path / "o1" / m1["splits"]["train"]["shards"][0]["path"])
    assert len(set(first)) == 3


def test_s3_to_s3(ray_session, s3, bucket, folder_with_bad, tmp_path):
    n = upload_tree(s3, bucket, folder_with_bad, "raw")
    manifest = prepare(
        f"s3://{bucket}/raw",
        f"s3://{bucket}/prepared",
        shard_max_samples=25,
        max_pixels=4_000_000,
        max_reject_fraction=0.2,
    )

    assert n == 66 and manifest["inputs"] == 65 and manifest["samples"] == 60 and manifest["rejected"] == 5
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="prepared/")["Contents"]}
    assert {"prepared/manifest.json", "prepared/classes.json", "prepared/errors.jsonl"} <= listed
    errors = [
        json.loads(line)
        for line in s3.get_object(Bucket=bucket, Key="prepared/errors.jsonl")["Body"].read().splitlines()
    ]
    assert len(errors) == 5 and all(e["source"].startswith(f"s3://{bucket}/raw/") for e in errors)
    total = 0
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            data = s3.get_object(Bucket=bucket, Key=f"prepared/{shard['path']}")["Body"].read()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                total += sum(1 for m in tar.getmembers() if m.name.endswith(".cls"))
    assert total == 60


def test_flat_layout_labels_from_file_names(ray_session, tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(12):
        (root / f"cat.{i}.jpg").write_bytes(jpeg_bytes(seed=i, color=(200, 50, 50)))
        (root / f"dog.{i}.jpg").write_bytes(jpeg_bytes(seed=100 + i, color=(50, 50, 200)))
    (root / "unlabelled.jpg").write_bytes(jpeg_bytes(seed=999))
    manifest = prepare(root, tmp_path / "out", label_pattern=r"^(?P<label>cat|dog)\.", max_reject_fraction=0.1)

    assert manifest["layout"] == "flat" and manifest["classes"] == ["cat", "dog"]
    assert manifest["samples"] == 24 and manifest["rejected"] == 1
    (error,) = read_errors(tmp_path / "out" / "errors.jsonl")
    assert error["source"].endswith("unlabelled.jpg") and "label_pattern" in error["reason"]
    keys = set().union(*(_keys(tmp_path / "out", info) for info in manifest["splits"].values()))
    assert "cat_3" in keys and "dog_11" in keys  # dots leave keys: WebDataset splits at the first dot


def test_cifar10_batches_keep_their_test_set(ray_session, tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    for name, n in (("data_batch_1", 40), ("test_batch", 10)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    manifest = prepare(root, tmp_path / "out", split={"train": 0.8, "val": 0.2})

    assert manifest["layout"] == "cifar10" and manifest["classes"][3] == "c3"
    # The source's own test batch stays `test`; the rest splits 0.8/0.2 per class (4 -> 3 + 1).
    assert {s: i["samples"] for s, i in manifest["splits"].items()} == {"train": 30, "val": 10, "test": 10}
    assert set(manifest["splits"]["train"]["classes"].values()) == {3}
    sample = next(iter(wds.WebDataset(str(tmp_path / "out" / "test-000000.tar"), shardshuffle=False).decode("rgb8")))
    assert sample["png"].shape == (32, 32, 3)


def test_cifar_loader_refuses_arbitrary_pickles(tmp_path):
    from pipeline.layouts import _unpickle

    evil = pickle.dumps({"x": subprocess.Popen})
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _unpickle(evil)


def test_mnist_idx_files(ray_session, tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 30), ("t10k", 10)):
        pixels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + pixels.tobytes()))
        labels = np.arange(n, dtype=np.uint8) % 10
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.tobytes())
        )
    manifest = prepare(root, tmp_path / "out", split={"train": 0.9, "val": 0.1})

    assert manifest["layout"] == "mnist" and manifest["classes"] == [str(d) for d in range(10)]
    assert manifest["splits"]["test"]["samples"] == 10 and manifest["samples"] == 40


def test_too_many_rejects_fails_with_the_errors_written(ray_session, tmp_path):
    root = tmp_path / "raw"
    write_imagefolder(root, {"a": 4, "b": 4})
    for name, data in bad_files().items():
        (root / "a" / f"{name}.jpg").write_bytes(data)
    with pytest.raises(
        PrepareError, match=r"4 of 12 inputs \(33.3%\) were rejected, over prepare.max_reject_fraction=0.1"
    ):
        prepare(root, tmp_path / "out", max_reject_fraction=0.1)
    assert len(read_errors(tmp_path / "out" / "errors.jsonl")) == 4
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_class_folder_is_named(tmp_path):
    root = tmp_path / "raw"
    write_imagefolder(root, {"cat": 2, "dog": 2})
    with pytest.raises(ValueError, match=r"no class folder for class\(es\) \['eel'\]"):
        prepare(root, tmp_path / "out", classes=["cat", "dog", "eel"])


def test_rerun_with_bigger_shards_removes_stale_ones(ray_session, tmp_path):
    root = tmp_path / "raw"
    write_imagefolder(root, {"a": 12, "b": 12})
    prepare(root, tmp_path / "out", split={"train": 1.0}, shard_max_samples=5)
    assert len(list((tmp_path / "out").glob("train-*.tar"))) == 5
    manifest = prepare(root, tmp_path / "out", split={"train": 1.0}, shard_max_samples=100)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["train-000000.tar"]
    assert manifest["splits"]["train"]["shards"][0]["samples"] == 24


def test_cli_wrong_config_key_is_one_line_listing_valid_keys(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.prepare", "--set", "prepare.shard_size=3"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert (
        "unknown config key 'prepare.shard_size'" in lines[0]
        and "shard_max_samples" in lines[0]
        and "label_pattern" in lines[0]
    )


def _keys(out: Path, info: dict) -> set[str]:
    keys = set()
    for shard in info["shards"]:
        with tarfile.open(out / shard["path"]) as tar:
            keys |= {n.rsplit(".", 1)[0] for n in tar.getnames() if n.endswith(".cls")}
    return keys


def _labels(path: Path) -> list[int]:
    with tarfile.open(path) as tar:
        return [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]


def test_shard_max_mb_bounds_the_tar_size(ray_session, tmp_path):
    """Small images are mostly tar headers: the byte limit counts them, not just the image bytes."""
    write_imagefolder(tmp_path / "raw", {"a": 30, "b": 30}, size=(16, 16))
    limit_mb = 0.04
    manifest = prepare(tmp_path / "raw", tmp_path / "out", shard_max_mb=limit_mb, split={"train": 1.0})
    shards = manifest["splits"]["train"]["shards"]
    sizes = [(tmp_path / "out" / s["path"]).stat().st_size for s in shards]
    assert sizes == [s["bytes"] for s in shards] and max(sizes) <= limit_mb * 2**20
    assert sum(s["samples"] for s in shards) == 60 and len(shards) >= 60 * 3 * 1024 // (limit_mb * 2**20)


def test_flat_default_pattern_wants_label_dot_id(ray_session, tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(10):
        (root / f"cat.{i}.jpg").write_bytes(jpeg_bytes(seed=i))
        (root / f"dog.{i}.jpg").write_bytes(jpeg_bytes(seed=50 + i))
    (root / "IMG_0001.jpg").write_bytes(jpeg_bytes(seed=99))
    manifest = prepare(root, tmp_path / "out", max_reject_fraction=0.1)
    assert manifest["classes"] == ["cat", "dog"] and (manifest["samples"], manifest["rejected"]) == (20, 1)

    camera = tmp_path / "camera"
    camera.mkdir()
    for i in range(25):
        (camera / f"IMG_{i:04d}.jpg").write_bytes(jpeg_bytes(seed=i))
    with pytest.raises(
        ValueError,
        match=r"label_pattern '\^\(\?P<label>\[\^\.\]\+\)\\\.' gives 25 classes for 25 files "
        r".* captures more than the class",
    ):
        prepare(camera, tmp_path / "out2", layout="flat", label_pattern=r"^(?P<label>[^.]+)\.")


def test_a_failed_rerun_leaves_no_manifest_behind(ray_session, tmp_path):
    write_imagefolder(tmp_path / "raw", {"a": 6, "b": 6})
    out = tmp_path / "out"
    prepare(tmp_path / "raw", out)
    assert (out / "manifest.json").is_file()
    for name, data in bad_files().items():
        (tmp_path / "raw" / "a" / f"{name}.jpg").write_bytes(data)
    with pytest.raises(PrepareError, match=r"4 of 16 inputs \(25.0%\) were rejected"):
        prepare(tmp_path / "raw", out, max_reject_fraction=0.1)
    # The shards were rewritten; the old manifest would vouch for them: it is gone, and so is classes.json.
    assert not (out / "manifest.json").exists() and not (out / "classes.json").exists()
    assert len(read_errors(out / "errors.jsonl")) == 4
    with pytest.raises(
        ValueError, match=r"shards but no manifest.json: the last `imgpipe prepare` into it did not finish"
    ):
        open_images(str(out))


def test_the_tar_size_estimate_is_an_upper_bound():
    """Long and non-ASCII names take pax headers, JSON escapes non-ASCII: none may break the bound."""
    names = ["a/short", "b/" + "x" * 120, "c/кот_" + "ж" * 30, "d/" + "y" * 700]
    items = [
        RawInput(key, 0, f"s3://bucket/raw/{key}é.jpg", size=size) for key in names for size in (0, 1, 511, 513, 4000)
    ]
    samples = [
        _member(item, ["ünïcode class"], {"ext": "jpeg", "data": b"x" * item.size, "width": 123456, "height": 7})
        for item in items
    ]
    for n in range(1, len(items) + 1):
        written = tar_samples(samples[:n])
        assert len(written) <= TAR_TAIL + sum(sample_tar_bytes(i, "ünïcode class") for i in items[:n])
    # The shards' bytes are webdataset's own writer's, so shards prepared before keep their sha256.
    buf = io.BytesIO()
    with wds.TarWriter(buf, user="", group="", mode=0o444, mtime=0, encoder=False) as tar:
        for sample in samples:
            tar.write(sample)
    assert written == buf.getvalue()


def test_a_split_that_leaves_the_free_inputs_nowhere_is_a_config_error():
    from pipeline.prepare import assign_splits

    inputs = [RawInput(f"train_{i}", i % 2, f"x#{i}", index=i) for i in range(6)]
    inputs += [RawInput(f"test_{i}", i % 2, f"y#{i}", index=6 + i, split="test") for i in range(4)]
    with pytest.raises(ValueError, match=r"every share to \['test'\].* other 6 inputs would go nowhere"):
        assign_splits(inputs, {"test": 1.0}, 0, keep_source_test=True)
    kept = assign_splits(inputs, {"test": 1.0}, 0, keep_source_test=False)  # then the ratio applies to all
    assert {name: len(items) for name, items in kept.items()} == {"test": 10}
    both = assign_splits(inputs, {"train": 0.5, "test": 0.5}, 0, keep_source_test=True)
    assert {name: len(items) for name, items in both.items()} == {"train": 6, "test": 4}


def test_stale_shard_cleanup_fails_the_job_when_the_listing_fails(tmp_path):
    from pipeline.prepare import _remove_stale_shards

    manifest = {"splits": {"train": {"shards": [{"path": "train-000000.tar"}]}}}
    _remove_stale_shards(storage.resolve(str(tmp_path / "not-yet")), manifest)  # nothing there: nothing stale
    (tmp_path / "out").mkdir()
    for name in ("train-000000.tar", "train-000001.tar", "notes.txt"):
        (tmp_path / "out" / name).write_bytes(b"x")
    _remove_stale_shards(storage.resolve(str(tmp_path / "out")), manifest)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt", "train-000000.tar"]
    down = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1, retry_seconds=0)
    with pytest.raises(storage.StorageError, match="s3://bucket/prepared"):
        _remove_stale_shards(storage.resolve("s3://bucket/prepared", down), manifest)


def test_the_shard_writer_leaves_torch_unimported(tmp_path):
    """prepare's task processes read, check and write shards: they need no torch, whose import would cost each
    about 1.5 CPU-seconds (webdataset's package imports it, so the tar is written with `tarfile`)."""
    write_imagefolder(tmp_path / "raw", {"a": 2, "b": 2}, size=(16, 16))
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    code = f"from images import prepare_without_ray; prepare_without_ray({raw!r}, {out!r}, 2)"
    assert modules_after(code) == []
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["samples"] == 4
    assert len(list((tmp_path / "out").glob("*.tar"))) >= 2
