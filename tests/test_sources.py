"""The reader: prepared shards, raw ImageFolder and bare prefixes as streaming Ray Datasets."""

from __future__ import annotations

import collections
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from images import jpeg_bytes, upload_tree, write_imagefolder
from processes import Proxy

from pipeline import schema
from pipeline.config import PrepareConfig, StorageConfig
from pipeline.prepare import run as prepare
from pipeline.sources import _in_order, open_images
from pipeline.storage import StorageUnavailable

pytestmark = pytest.mark.timeout(180)


def test_prepared_shards_one_split_or_all(ray_session, tmp_path):
    write_imagefolder(tmp_path / "raw", {"a": 10, "b": 10})
    manifest = prepare(
        PrepareConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "out"), shard_max_samples=6), StorageConfig()
    )

    source = open_images(str(tmp_path / "out"))
    assert source.kind == "shards" and source.classes == ("a", "b") and source.count == 20
    assert source.splits == ["train", "val", "test"]
    rows = source.dataset().take_all()
    assert len(rows) == 20 and len({r[schema.KEY] for r in rows}) == 20
    assert all(r[schema.ERROR] == "" and r[schema.IMAGE][:2] == b"\xff\xd8" for r in rows)
    assert {r[schema.LABEL] for r in rows} == {0, 1}
    assert all(r[schema.KEY].split("/")[0] == "ab"[r[schema.LABEL]] for r in rows)

    val = open_images(str(tmp_path / "out"), splits=["val"])
    val_rows = val.dataset().take_all()
    assert len(val_rows) == manifest["splits"]["val"]["samples"] == val.count
    assert {r[schema.SHARD] for r in val_rows} == {u.name for u in val.units} == {"val-000000"}
    with pytest.raises(ValueError, match=r"no split \['dev'\]; it has \['train', 'val', 'test'\]"):
        open_images(str(tmp_path / "out"), splits=["dev"])


def test_raw_imagefolder_on_s3(ray_session, s3, bucket, tmp_path):
    write_imagefolder(tmp_path / "raw", {"cat": 5, "dog": 4})
    upload_tree(s3, bucket, tmp_path / "raw", "imgs")
    source = open_images(f"s3://{bucket}/imgs", chunk_size=4)
    assert source.kind == "imagefolder" and source.classes == ("cat", "dog")
    assert [u.count for u in source.units] == [4, 4, 1]
    rows = source.dataset().take_all()
    assert sorted((r[schema.KEY], r[schema.LABEL]) for r in rows)[:2] == [("cat/cat_0000", 0), ("cat/cat_0001", 0)]
    assert sum(r[schema.LABEL] == 1 for r in rows) == 4
    assert all(r[schema.SOURCE].startswith(f"s3://{bucket}/imgs/") for r in rows)


def test_bare_prefix_is_unlabelled_and_unreadable_objects_become_error_rows(ray_session, s3, bucket):
    for i, key in enumerate(["2024/01/a.jpg", "2024/02/b.jpg", "c.jpg", "notes.txt"]):
        s3.put_object(Bucket=bucket, Key=f"drop/{key}", Body=jpeg_bytes(seed=i))
    source = open_images(f"s3://{bucket}/drop")
    assert source.kind == "images" and source.classes is None and source.count == 3
    s3.delete_object(Bucket=bucket, Key="drop/c.jpg")  # gone between listing and reading
    rows = {r[schema.KEY]: r for r in source.dataset().take_all()}
    assert set(rows) == {"2024/01/a", "2024/02/b", "c"}
    assert all(r[schema.LABEL] == schema.UNLABELED for r in rows.values())
    assert rows["c"][schema.ERROR].startswith(f"cannot read: s3://{bucket}/drop/c.jpg: no such file")
    assert rows["2024/01/a"][schema.ERROR] == ""


def test_colliding_keys_are_made_unique(ray_session, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for name in ["x.1.jpg", "x_1.jpg", "x.1.png"]:
        (root / name).write_bytes(jpeg_bytes())
    keys = sorted(r[schema.KEY] for r in open_images(str(root)).dataset().take_all())
    assert len(set(keys)) == 3 and keys[0] == "x_1"


def test_one_folder_deep_prefix_reads_as_classes_or_unlabelled_on_request(tmp_path):
    root = tmp_path / "camera"
    for day in ("2024-01-01", "2024-01-02"):
        (root / day).mkdir(parents=True)
        for i in range(3):
            (root / day / f"img_{i}.jpg").write_bytes(jpeg_bytes(seed=i))
    guessed = open_images(str(root))
    assert guessed.kind == "imagefolder" and guessed.classes == ("2024-01-01", "2024-01-02")
    asked = open_images(str(root), kind="images")
    assert asked.kind == "images" and asked.classes is None and asked.count == 6
    assert set(asked.units[0].labels) == {schema.UNLABELED}


def test_units_carry_what_they_hold(ray_session, tmp_path):
    """A unit's digest is its content: the shard's sha256, or the listing of its files."""
    write_imagefolder(tmp_path / "raw", {"a": 4, "b": 4})
    manifest = prepare(
        PrepareConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "out"), shard_max_samples=3), StorageConfig()
    )
    sha = {s["path"].removesuffix(".tar"): s["sha256"] for info in manifest["splits"].values() for s in info["shards"]}
    assert {u.name: u.digest for u in open_images(str(tmp_path / "out")).units} == {
        n: f"sha256:{h}" for n, h in sha.items()
    }

    before = open_images(str(tmp_path / "raw"), chunk_size=5).units
    assert [u.digest for u in before] == [u.digest for u in open_images(str(tmp_path / "raw"), chunk_size=5).units]
    (tmp_path / "raw" / "b" / "b_0003.jpg").write_bytes(jpeg_bytes(96, 64, seed=7))  # same name, other bytes
    after = open_images(str(tmp_path / "raw"), chunk_size=5).units
    assert after[0].digest == before[0].digest and after[1].digest != before[1].digest


def test_raw_files_in_a_bucket_are_read_with_requests_in_flight_and_kept_in_order(s3, s3_endpoint, bucket):
    # One GET at a time would wait out every round trip of a distant store: 1,000 of them per unit.
    images = {f"many/img_{i:03d}.jpg": jpeg_bytes(seed=i) for i in range(48)}
    for key, data in images.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    proxy = Proxy(int(s3_endpoint.rsplit(":", 1)[1]), delay=0.05)
    source = open_images(f"s3://{bucket}/many", StorageConfig(endpoint_url=f"http://127.0.0.1:{proxy.port}"))
    rows = source.head_rows(48)
    assert [r[schema.KEY] for r in rows] == [k.removeprefix("many/").removesuffix(".jpg") for k in images]
    assert [r[schema.IMAGE] for r in rows] == list(images.values())
    assert proxy.most >= 8, f"at most {proxy.most} requests in flight at once"
    # One request an image, not pyarrow's HEAD (the object's size) and then GET: half the round trips and the bill.
    per_image = collections.Counter(method for method, path in proxy.requests if path.endswith(".jpg"))
    assert per_image == {"GET": 48}, per_image


def test_a_read_that_fails_the_job_cancels_the_reads_not_yet_started():
    started: list[int] = []

    def read(i: int) -> int:
        started.append(i)
        if i == 0:
            raise StorageUnavailable("s3://b/x: the store is down")
        time.sleep(0.05)
        return i

    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(StorageUnavailable):
            list(_in_order(pool, read, range(100), window=8))
    assert len(started) < 8, started  # 8 were submitted; those still queued when 0 failed never ran
