"""Open images as a streaming Ray Dataset: prepared shards, WebDataset shards of another tool, a raw
ImageFolder, or a bare prefix.

Every source is cut into *units* (a shard, or a chunk of raw files) that are read whole by one
task. A unit is also the unit of output (one Parquet part each) and of resume (a rerun reads only
the units whose part is missing), and reordering units per epoch is the shard-order shuffle.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import itertools
import json
import logging
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Literal, Sequence

import pyarrow as pa
import ray

from pipeline import layouts, schema, storage, webshards
from pipeline.config import IMAGE_EXTENSIONS, StorageConfig, WebDatasetConfig
from pipeline.errors import UserError
from pipeline.shards import READ_THREADS  # GETs in flight per read task, as in prepare's

log = logging.getLogger("imgpipe")

MANIFEST = "manifest.json"
CLASSES = "classes.json"
RAW_SPLIT = "all"  # split name given to raw (unprepared) inputs

Kind = Literal["auto", "shards", "webdataset", "imagefolder", "images"]


@dataclass(frozen=True)
class Unit:
    """One input unit: a shard, or a chunk of raw files, read whole by one task."""

    name: str  # unique within its split: "train-000003" or "chunk-000003"
    split: str
    count: int  # samples (shards) or files (raw) in it; -1: not known before it is read (foreign shards)
    paths: tuple[str, ...]  # filesystem paths: the shard, or the raw files
    labels: tuple[int, ...] = ()  # raw files: one label per path (-1: unlabelled)
    keys: tuple[str, ...] = ()  # raw files: one sample key per path
    # What the unit holds: the shard's sha256, or a hash of the listing (path, size, mtime) of its files / shard.
    digest: str = ""

    def describe(self) -> dict:
        """JSON-ready identity of the unit, for run files: a changed input shows as a changed unit."""
        return {"split": self.split, "count": self.count, "digest": self.digest}


@dataclass(frozen=True)
class ImageSource:
    """A resolved image input: what it is, its classes, and its units."""

    location: storage.Location
    kind: Literal["shards", "webdataset", "imagefolder", "images"]
    classes: tuple[str, ...] | None
    units: tuple[Unit, ...]
    manifest: dict = field(default_factory=dict, compare=False)
    labels: webshards.LabelRules | None = field(default=None, compare=False)  # webdataset: how samples are labelled

    @property
    def splits(self) -> list[str]:
        """Split names in unit order."""
        return list(dict.fromkeys(u.split for u in self.units))

    def select(self, splits: Sequence[str] | None) -> "ImageSource":
        """Only the units of these splits; an unknown split is an error naming the known ones."""
        if not splits:
            return self
        unknown = sorted(set(splits) - set(self.splits))
        if unknown:
            raise UserError(f"{self.location.uri}: no split {unknown}; it has {self.splits}")
        return replace(self, units=tuple(u for u in self.units if u.split in splits))

    def dataset(
        self, units: Sequence[Unit] | None = None, block_rows: int | None = None, **ray_remote_args
    ) -> ray.data.Dataset:
        """A Ray Dataset of the given units (all by default), columns per `schema.IMAGE_SCHEMA`;
        `ray_remote_args` go to the read tasks (a `label_selector`, say). A unit's rows leave its read
        task as one block, or with `block_rows` in blocks of that many as they are read: followed by
        `repartition(target_num_rows_per_block=block_rows)`, the next stage starts on a unit's first
        rows instead of waiting for its last (Ray Data fuses that repartition into a `map_batches`
        read, not into a `flat_map`)."""
        units = list(self.units if units is None else units)
        if not units:
            raise UserError(f"{self.location.uri}: nothing to read (no units selected)")
        # Each item carries its own unit, so a task receives only the paths it reads.
        items = [_read_item(u) for u in units]
        read = functools.partial(_read_blocks, reader=self._reader(), block_rows=block_rows)
        ds = ray.data.from_items(items, override_num_blocks=len(units))
        return ds.map_batches(read, batch_size=1, batch_format="pyarrow", **ray_remote_args)

    def head_rows(self, count: int) -> list[dict]:
        """The first `count` rows of the source in unit order, read here, without Ray: a small sample
        that is the same on every call (int8's calibration images, say)."""
        rows: list[dict] = []
        read = self._reader()
        for unit in self.units:
            rows += itertools.islice(read(_read_item(unit)), count - len(rows))
            if len(rows) >= count:
                break
        return rows

    def _reader(self) -> Callable[[dict], Iterator[dict]]:
        loc = self.location
        if self.kind == "webdataset":
            return functools.partial(webshards.read_shard, fs=loc.fs, uri=loc.uri, root=loc.path, rules=self.labels)
        reader = _read_shard if self.kind == "shards" else _read_files
        return functools.partial(reader, fs=loc.fs, uri=loc.uri, root=loc.path)

    @property
    def count(self) -> int:
        """Inputs in the selected units (those counted so far: see `counted`)."""
        return sum(u.count for u in self.units if u.count >= 0)

    def identity(self) -> dict:
        """What, besides its units, makes a run over this source that run: its kind and (foreign shards) how
        its samples are labelled."""
        if self.labels is None:
            return {"kind": self.kind}
        rules = self.labels
        return {"kind": self.kind, "labels": json.dumps([rules.mode, rules.json_field, list(rules.classes or [])])}

    @property
    def counted(self) -> bool:
        """True when every unit's sample count is known before reading (foreign shards are counted as read)."""
        return all(u.count >= 0 for u in self.units)


def open_images(
    uri: str,
    cfg: StorageConfig | None = None,
    *,
    kind: Kind = "auto",
    splits: Sequence[str] | None = None,
    chunk_size: int = 1000,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    wds: WebDatasetConfig | None = None,
) -> ImageSource:
    """Resolve `uri` into an `ImageSource` (call `.dataset()` for the Ray Dataset). `wds` says how
    samples of WebDataset shards written by another tool are labelled."""
    if kind == "webdataset" or (kind == "auto" and (webshards.is_pattern(uri) or webshards.is_shard(uri))):
        return _open_webdataset(uri, cfg, wds or WebDatasetConfig()).select(splits)
    loc = storage.resolve(uri, cfg)
    if kind in ("auto", "shards") and storage.exists(loc.join(MANIFEST)):
        return _open_shards(loc).select(splits)
    if kind == "shards":
        raise UserError(
            f"{uri}: no {MANIFEST} here; run `imgpipe prepare` first, pass raw images, or set source_kind=webdataset "
            "for WebDataset shards of another tool"
        )
    listed = storage.list_files(loc)
    files = [f for f in listed if _extension(f.path) in extensions]
    if not files:
        rel = [f.path[len(loc.path) :].lstrip("/") for f in listed]
        # prepare's own shard names beside what it writes first (config.yaml) or last (errors.jsonl): its output,
        # unfinished; foreign shards with such names read with source_kind=webdataset.
        if any(schema.SHARD_FILE.fullmatch(r) for r in rel) and {"config.yaml", "errors.jsonl"} & set(rel):
            raise UserError(
                f"{uri}: shards but no {MANIFEST}: the last `imgpipe prepare` into it did not finish; run it again "
                "(or set source_kind=webdataset to read the shards as they are)"
            )
        if kind == "auto" and any(webshards.is_shard(r) for r in rel):
            log.info("%s: tar files and no %s: read as WebDataset shards (source_kind=webdataset)", uri, MANIFEST)
            return _open_webdataset(uri, cfg, wds or WebDatasetConfig()).select(splits)
        raise UserError(f"{uri}: no image files ({', '.join(extensions)}) under this prefix")
    depths = {f.path[len(loc.path) :].lstrip("/").count("/") for f in files}
    if kind == "imagefolder" or (kind == "auto" and depths == {1}):
        found = layouts.imagefolder(loc, files, None)
        source = _raw_source(loc, "imagefolder", tuple(found.classes), found.inputs, chunk_size)
        if kind == "auto":
            log.info(
                "%s: every image is one folder deep: read as an ImageFolder, %d classes from the folder names "
                "(source_kind=images reads them unlabelled)",
                uri,
                len(found.classes),
            )
    else:
        source = _raw_source(loc, "images", None, layouts.unlabelled(loc, files), chunk_size)
    return source.select(splits)


def _open_shards(loc: storage.Location) -> ImageSource:
    manifest = json.loads(storage.read_bytes(loc.join(MANIFEST)))
    units = [
        Unit(
            posixpath.basename(s["path"]).removesuffix(".tar"),
            split,
            s["samples"],
            (posixpath.join(loc.path, s["path"]),),
            digest=f"sha256:{s['sha256']}" if s.get("sha256") else "",
        )
        for split, info in manifest["splits"].items()
        for s in info["shards"]
    ]
    return ImageSource(loc, "shards", tuple(manifest["classes"]), tuple(units), manifest)


def _open_webdataset(uri: str, cfg: StorageConfig | None, wds: WebDatasetConfig) -> ImageSource:
    """Foreign shards, one unit each; samples are counted by the tasks that read them."""
    base, shards, listed = webshards.list_shards(uri, cfg)
    classes, origin = webshards.load_classes(base, listed, wds)
    units = []
    for n, info in enumerate(shards):
        rel = info.path[len(base.path) :].lstrip("/")
        text = f"{rel}\t{info.size}\t{info.mtime_ns or 0}"
        digest = "wds:" + hashlib.sha256(text.encode()).hexdigest()
        units.append(Unit(f"wds-{n:06d}", RAW_SPLIT, -1, (info.path,), digest=digest))
    log.info(
        "%s: %d WebDataset shards; labels: %s; %s",
        uri,
        len(units),
        wds.label,
        f"{len(classes)} classes from {origin}" if classes else "no class names",
    )
    return ImageSource(base, "webdataset", classes, tuple(units), labels=webshards.LabelRules.create(wds, classes))


def _raw_source(loc, kind, classes, inputs: list, chunk_size: int) -> ImageSource:
    units = []
    for n, start in enumerate(range(0, len(inputs), chunk_size)):
        chunk = inputs[start : start + chunk_size]
        units.append(
            Unit(
                f"chunk-{n:06d}",
                RAW_SPLIT,
                len(chunk),
                tuple(i.path for i in chunk),
                tuple(i.label for i in chunk),
                tuple(i.key for i in chunk),
                _chunk_digest(chunk),
            )
        )
    return ImageSource(loc, kind, classes, tuple(units))


def _read_blocks(items: pa.Table, *, reader: Callable[[dict], Iterator[dict]], block_rows: int | None):
    """The rows of each unit in `items`, as Arrow tables of `block_rows` rows (the whole unit: None)."""
    for item in items.to_pylist():
        rows: list[dict] = []
        for row in reader(item):
            rows.append(row)
            if block_rows and len(rows) >= block_rows:
                yield pa.Table.from_pylist(rows)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows)


def _read_item(unit: Unit) -> dict:
    return {"name": unit.name, "paths": list(unit.paths), "labels": list(unit.labels), "keys": list(unit.keys)}


def _chunk_digest(chunk: list) -> str:
    # Listing data only (no reads): a file added, removed, renamed, relabelled, resized or
    # rewritten changes the digest of its chunk.
    text = "\n".join(f"{i.key}\t{i.label}\t{i.size}\t{i.mtime_ns}" for i in chunk)
    return "files:" + hashlib.sha256(text.encode()).hexdigest()


def _read_files(unit: dict, *, fs, uri: str, root: str) -> Iterator[dict]:
    def read(item: tuple) -> dict:
        path, label, key = item
        rel = path[len(root) :].lstrip("/")
        row = _row(key, b"", int(label), f"{uri}/{rel}", "", unit["name"], "", len(unit["paths"]))
        try:
            row[schema.IMAGE] = storage.read_bytes(storage.Location(fs, path, row[schema.SOURCE]))
        except storage.StorageUnavailable:
            raise  # the store is down or refuses us: the job's error, not this input's
        except storage.StorageError as exc:
            row[schema.ERROR] = f"cannot read: {exc}"
        return row

    items = zip(unit["paths"], unit["labels"], unit["keys"])
    if storage.is_local(storage.Location(fs, root, uri)):
        yield from map(read, items)
        return
    # One object per GET: a sequential read of a 1,000-file unit waits out 1,000 round trips (tens of ms
    # each on a cloud store); READ_THREADS requests in flight overlap them, rows still in listing order.
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="read") as pool:
        yield from _in_order(pool, read, items, window=2 * READ_THREADS)


def _in_order(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """`fn` over `items` on `pool`, results in input order, at most `window` submitted ahead (memory bound)."""
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # a failed read, or a reader that stops early: what has not started never starts
        for future in pending:
            future.cancel()


def _read_shard(unit: dict, *, fs, uri: str, root: str) -> Iterator[dict]:
    path = unit["paths"][0]
    shard_uri = f"{uri}/{path[len(root) :].lstrip('/')}"
    # A shard that is missing or not a tar fails the job: the prepared dataset is damaged, and
    # its samples cannot even be named as rejects.
    try:
        data = storage.read_bytes(storage.Location(fs, path, shard_uri))
    except storage.StorageUnavailable:
        raise
    except storage.StorageError as exc:
        raise storage.StorageError(
            f"{exc}. The prepared dataset {uri} is incomplete: run `imgpipe prepare` again"
        ) from None
    samples: dict[str, dict[str, bytes]] = {}
    names: dict[str, dict[str, str]] = {}  # key -> extension -> member name
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    key, ext = _split_member(member.name)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
                    names.setdefault(key, {})[ext] = member.name
    except tarfile.TarError as exc:
        raise UserError(
            f"{shard_uri}: not a readable tar ({exc}); the shard is damaged: run `imgpipe prepare` again"
        ) from None
    for key, parts in samples.items():
        ext = next((e for e in parts if e in IMAGE_EXTENSIONS), None)
        label, error = _shard_label(parts.get("cls"))
        if ext is None:
            error = error or "no image member in shard sample"
        member = names[key].get(ext, "")
        image = parts[ext] if ext and not error else b""
        yield _row(key, image, label, shard_uri, member, unit["name"], error, len(samples))


def _shard_label(cls: bytes | None) -> tuple[int, str]:
    """(label, "") from a sample's `.cls`, unlabelled without one; (-1, reason) when it is not an integer."""
    if cls is None:
        return schema.UNLABELED, ""
    try:
        return int(cls), ""
    except ValueError:
        return schema.UNLABELED, f"bad .cls member {cls[:20]!r}: not an integer label"


def _row(key: str, image: bytes, label: int, source: str, member: str, shard: str, error: str, unit_size: int) -> dict:
    return {
        schema.KEY: key,
        schema.IMAGE: image,
        schema.LABEL: label,
        schema.SOURCE: source,
        schema.MEMBER: member,
        schema.SHARD: shard,
        schema.ERROR: error,
        schema.UNIT_SIZE: unit_size,
    }


def _split_member(name: str) -> tuple[str, str]:
    # WebDataset's rule: the key runs to the first dot of the file name.
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _extension(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""
