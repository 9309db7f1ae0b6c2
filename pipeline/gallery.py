"""Error galleries from a `classify` output: pick the telling rows, fetch only their images, draw grids.

    predictions parts (key, label, pred, prob; the unit from each part's footer)
      -> select_galleries: most confident mistakes (overall, per class), least confident correct,
         most confused class pairs with examples
      -> fetch_images: only the units (shards or files) that hold a picked row, nothing else
      -> gallery_png: a captioned grid per gallery

A prepared shard is read whole when one of its samples is shown (a tar has no index; a shard is
bounded by `prepare.shard_max_mb`); a raw image is read alone.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from pipeline import schema, storage
from pipeline.config import IMAGE_EXTENSIONS, StorageConfig
from pipeline.parts import read_part_info, read_parts
from pipeline.sources import ImageSource, Unit, open_images

log = logging.getLogger("imgpipe")

UNIT = "unit"  # column added to predictions read back: the input unit (shard or chunk) of the row
THUMB = 96  # pixels, the long side of a gallery cell
CAPTION = 32  # pixels under each cell: two lines of text
PAD = 4


@dataclass(frozen=True)
class Gallery:
    """A titled list of picked rows (dicts with key, label, pred, prob, unit), best example first."""

    title: str
    rows: list[dict]


def read_keyed(out: storage.Location, parts: list[str], columns: list[str]) -> pa.Table:
    """`columns` of every part (predictions or features), plus the unit each row came from (the part's footer)."""
    tables = []
    for path in parts:
        unit = read_part_info(out.join(path)).metadata.get("unit", "")
        table = read_parts(out, [path], columns)
        tables.append(table.append_column(UNIT, pa.array([unit] * table.num_rows, pa.string())))
    return pa.concat_tables(tables) if tables else pa.table({})


def select_galleries(
    table: pa.Table,
    classes: list[str],
    per_gallery: int = 16,
    per_class: int = 4,
    max_classes: int = 10,
    pairs: int = 5,
    per_pair: int = 4,
) -> list[Gallery]:
    """The galleries of labelled rows: most confident mistakes overall and for the `max_classes`
    true classes with the most mistakes, least confident correct, and the `pairs` most confused
    (true, predicted) pairs. Ties break by key, so the pick is the same on every run."""
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in (schema.LABEL, schema.PRED, schema.PROB)}
    keys = np.asarray(table.column(schema.KEY).to_pylist(), dtype=object)
    units = np.asarray(table.column(UNIT).to_pylist(), dtype=object)
    label, pred, prob = cols[schema.LABEL].astype(np.int64), cols[schema.PRED].astype(np.int64), cols[schema.PROB]
    labelled = label >= 0
    wrong, right = labelled & (pred != label), labelled & (pred == label)
    key_order = np.argsort(keys.astype(str), kind="stable")

    def pick(mask: np.ndarray, confident: bool, n: int) -> list[dict]:
        rows = key_order[mask[key_order]]  # in key order, then a stable sort by probability
        rows = rows[np.argsort(-prob[rows] if confident else prob[rows], kind="stable")][:n]
        return [
            {
                "key": str(keys[i]),
                "label": int(label[i]),
                "pred": int(pred[i]),
                "prob": float(prob[i]),
                "unit": units[i],
            }
            for i in rows
        ]

    galleries = [
        Gallery("most confident mistakes", pick(wrong, True, per_gallery)),
        Gallery("least confident correct predictions", pick(right, False, per_gallery)),
    ]
    mistakes = np.bincount(label[wrong], minlength=len(classes))
    for c in [int(c) for c in np.argsort(-mistakes, kind="stable")[:max_classes] if mistakes[c]]:
        galleries.append(
            Gallery(
                f"most confident mistakes on true class {classes[c]!r}", pick(wrong & (label == c), True, per_class)
            )
        )
    for true, predicted, count in top_confusions(label[wrong], pred[wrong], pairs):
        title = f"{classes[true]!r} taken for {classes[predicted]!r} ({count} time{'s' if count > 1 else ''})"
        galleries.append(Gallery(title, pick(wrong & (label == true) & (pred == predicted), True, per_pair)))
    return [g for g in galleries if g.rows]


def top_confusions(labels: np.ndarray, preds: np.ndarray, n: int) -> list[tuple[int, int, int]]:
    """The `n` most frequent (true, predicted) pairs among mistakes, most first (ties: lower indices first)."""
    pairs, counts = np.unique(np.stack([labels, preds], 1), axis=0, return_counts=True) if len(labels) else ([], [])
    order = np.argsort(-np.asarray(counts), kind="stable")[:n]
    return [(int(pairs[i][0]), int(pairs[i][1]), int(counts[i])) for i in order]


def fetch_images(source: ImageSource, wanted: dict[str, set[str]]) -> dict[str, bytes]:
    """The encoded bytes of the wanted keys ({unit name: keys}); reads only the units named there."""
    units = {u.name: u for u in source.units}
    found: dict[str, bytes] = {}
    for name, keys in wanted.items():
        unit = units.get(name)
        if unit is None:
            log.warning("gallery: unit %s is no longer in %s; its images are left out", name, source.location.uri)
            continue
        reader = _shard_images if source.kind == "shards" else _file_images
        try:
            found.update(reader(source.location, unit, keys))
        except storage.StorageError as exc:
            log.warning("gallery: cannot read %s (%s); its images are left out", name, exc)
    return found


def _shard_images(loc: storage.Location, unit: Unit, keys: set[str]) -> dict[str, bytes]:
    data = storage.read_bytes(storage.Location(loc.fs, unit.paths[0], f"{loc.uri}/{unit.name}.tar"))
    found = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            directory, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            key = f"{directory}/{stem}" if directory else stem
            if member.isfile() and key in keys and ext.lower() in IMAGE_EXTENSIONS:
                found[key] = tar.extractfile(member).read()
    return found


def _file_images(loc: storage.Location, unit: Unit, keys: set[str]) -> dict[str, bytes]:
    paths = dict(zip(unit.keys, unit.paths))
    return {k: storage.read_bytes(storage.Location(loc.fs, paths[k], paths[k])) for k in keys if k in paths}


def gallery_png(gallery: Gallery, images: dict[str, bytes], classes: list[str], columns: int = 8) -> bytes:
    """A grid of the gallery's images, each captioned `true -> predicted` and `p=0.97` (green when
    right, red when wrong); a missing image is a grey cell."""
    cols = min(columns, len(gallery.rows))
    rows = math.ceil(len(gallery.rows) / cols)
    cell_w, cell_h = THUMB + 2 * PAD, THUMB + CAPTION + 2 * PAD
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    for i, row in enumerate(gallery.rows):
        x, y = (i % cols) * cell_w + PAD, (i // cols) * cell_h + PAD
        thumb = Image.fromarray(thumbnail(images.get(row["key"])))
        sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        colour = (0, 110, 40) if row["label"] == row["pred"] else (190, 30, 30)
        text = f"{_short(classes[row['label']])} -> {_short(classes[row['pred']])}\np={row['prob']:.2f}"
        draw.multiline_text((x, y + THUMB + 2), text, fill=colour, font=font, spacing=1)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def thumbnail(data: bytes | None) -> np.ndarray:
    """RGB uint8 of an encoded image fitted in THUMB x THUMB: large ones shrunk, small ones (a 12-px
    digit) enlarged by a whole factor, pixels kept sharp; grey when missing or undecodable."""
    if data is None:
        return np.full((THUMB, THUMB, 3), 200, np.uint8)
    try:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (THUMB, THUMB))
        img = img.convert("RGB")
    except Exception:  # noqa: BLE001 - a damaged image is shown as missing, the gallery goes on
        return np.full((THUMB, THUMB, 3), 200, np.uint8)
    factor = THUMB // max(img.size)
    if factor >= 2:
        img = img.resize((img.width * factor, img.height * factor), Image.NEAREST)
    img.thumbnail((THUMB, THUMB))
    return np.asarray(img)


def prediction_galleries(out: storage.Location, storage_cfg: StorageConfig | None) -> list[tuple[str, bytes]]:
    """Galleries of a finished classify output (its `predictions.json`) as (title, PNG) pairs; [] when
    it has no labelled rows. Reads the predictions and only the images shown."""
    run = json.loads(storage.read_bytes(out.join("predictions.json")))
    table = read_keyed(out, run["parts"], [schema.KEY, schema.LABEL, schema.PRED, schema.PROB])
    identity = run["identity"]
    return draw_galleries(table, json.loads(identity["classes"]), identity["source"], identity["kind"], storage_cfg)


def draw_galleries(
    table: pa.Table, classes: list[str], source_uri: str, kind: str, storage_cfg: StorageConfig | None
) -> list[tuple[str, bytes]]:
    """Select the galleries of `table` (key, label, pred, prob, unit), fetch their images from the
    source the rows came from, draw them; [] when nothing to show or the source is gone."""
    galleries = select_galleries(table, classes) if table.num_rows else []
    if not galleries:
        return []
    wanted: dict[str, set[str]] = defaultdict(set)
    for g in galleries:
        for row in g.rows:
            wanted[row["unit"]].add(row["key"])
    try:
        source = open_images(source_uri, storage_cfg, kind=kind)
    except (ValueError, storage.StorageError) as exc:
        log.warning("gallery: the images of %s cannot be read (%s); no galleries", source_uri, exc)
        return []
    images = fetch_images(source, wanted)
    log.info("gallery: %d images read from %d units for %d galleries", len(images), len(wanted), len(galleries))
    return [(g.title, gallery_png(g, images, classes)) for g in galleries]


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[: width - 1] + "~"
