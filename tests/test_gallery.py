"""Error galleries: the right rows from a hand-made predictions table, and only the shown images read."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from images import prepare_without_ray, upload_tree, write_imagefolder
from PIL import Image

from pipeline import gallery, schema
from pipeline.sources import open_images

CLASSES = ["cat", "dog", "fox"]


def _table(rows: list[tuple[str, int, int, float]]) -> pa.Table:
    keys, labels, preds, probs = zip(*rows)
    return pa.table(
        {
            schema.KEY: list(keys),
            schema.LABEL: pa.array(labels, pa.int32()),
            schema.PRED: pa.array(preds, pa.int32()),
            schema.PROB: pa.array(probs, pa.float32()),
            gallery.UNIT: ["test-000000"] * len(keys),
        }
    )


def test_galleries_pick_the_right_rows_most_confident_wrong_first():
    table = _table(
        [
            ("a", 0, 1, 0.60),  # cat taken for dog
            ("b", 0, 1, 0.95),  # cat taken for dog, surest
            ("c", 1, 2, 0.80),  # dog taken for fox
            ("d", 0, 0, 0.40),  # right, unsure
            ("e", 1, 1, 0.99),  # right, sure
            ("f", 2, 2, 0.35),  # right, least sure
            ("g", 0, 1, 0.60),  # ties with "a": key order
            ("h", -1, 2, 0.99),  # unlabelled: in no gallery
        ]
    )
    galleries = {g.title: [r["key"] for r in g.rows] for g in gallery.select_galleries(table, CLASSES, per_gallery=3)}
    assert galleries == {
        "most confident mistakes": ["b", "c", "a"],
        "least confident correct predictions": ["f", "d", "e"],
        "most confident mistakes on true class 'cat'": ["b", "a", "g"],
        "most confident mistakes on true class 'dog'": ["c"],
        "'cat' taken for 'dog' (3 times)": ["b", "a", "g"],
        "'dog' taken for 'fox' (1 time)": ["c"],
    }
    first = gallery.select_galleries(table, CLASSES)[0].rows[0]
    assert first == {"key": "b", "label": 0, "pred": 1, "prob": np.float32(0.95).item(), "unit": "test-000000"}


def test_fetch_reads_only_the_shards_of_the_shown_images(s3, bucket, tmp_path):
    write_imagefolder(tmp_path / "raw", {"blue": 6, "red": 6})
    upload_tree(s3, bucket, tmp_path / "raw", "raw")
    prepare_without_ray(f"s3://{bucket}/raw", f"s3://{bucket}/prepared", shard_max_samples=3)
    source = open_images(f"s3://{bucket}/prepared")
    unit = source.units[0]
    others = [u for u in source.units if u is not unit]
    # Other shards gone from the bucket: a fetch that touched them would fail or miss.
    for u in others:
        s3.delete_object(Bucket=bucket, Key=f"prepared/{u.name}.tar")
    keys = {k for k in _keys_of(s3, bucket, unit.name)}
    wanted = set(sorted(keys)[:2])
    images = gallery.fetch_images(source, {unit.name: wanted})
    assert set(images) == wanted
    assert all(Image.open(io.BytesIO(b)).size == (48, 32) for b in images.values())


def _keys_of(s3, bucket: str, unit: str) -> set[str]:
    import io
    import tarfile

    data = s3.get_object(Bucket=bucket, Key=f"prepared/{unit}.tar")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name.rsplit(".", 1)[0] for m in tar if m.name.endswith(".jpg")}


def test_gallery_png_has_a_cell_per_row_and_greys_missing_images():
    g = gallery.Gallery("t", [{"key": k, "label": 0, "pred": 1, "prob": 0.9, "unit": "u"} for k in "abc"])
    digit = io.BytesIO()
    Image.new("L", (12, 12), 30).save(digit, format="PNG")
    sheet = Image.open(io.BytesIO(gallery.gallery_png(g, {"a": digit.getvalue()}, CLASSES)))
    cell = gallery.THUMB + 2 * gallery.PAD
    assert sheet.size == (3 * cell, cell + gallery.CAPTION)
    pad = gallery.PAD
    assert sheet.getpixel((pad + 48, pad + 48)) == (30, 30, 30)  # the 12-px image, enlarged 8x to fill its cell
    assert sheet.getpixel((cell + pad + 48, pad + 48)) == (200, 200, 200)  # "b": no image, a grey cell
    big = io.BytesIO()
    Image.new("RGB", (640, 480), (1, 2, 3)).save(big, format="JPEG")
    assert gallery.thumbnail(big.getvalue()).shape == (72, 96, 3)
    assert gallery.thumbnail(b"not an image").shape == (gallery.THUMB, gallery.THUMB, 3)
