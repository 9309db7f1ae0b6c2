"""The inputs of a fine-tuning run: train, val and (optionally) test sources, each from a prepared dataset's
split or from WebDataset shards of another tool, with the train shards counted before training starts.

    finetune.source       prepared shards (its train/val/test splits) | WebDataset shards
    finetune.val_source   None: the source's val split, or (WebDataset) whole shards held out of it
    finetune.test_source  None: the source's test split when it has one; WebDataset: no test scoring

Prepared shards carry their sample counts in their manifest. WebDataset shards of another tool do not, and
the learning-rate schedule needs the steps of an epoch: `count` reads the train shards once, in Ray tasks,
and keeps the counts in the run folder (`input-counts.json`, by shard digest), so a resumed run does not read
them again. The same pass finds the class count when the shards have integer labels but no class names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, replace

import ray

from pipeline import schema, storage, webshards
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.sources import MANIFEST, ImageSource, Unit, open_images

log = logging.getLogger("imgpipe")

COUNTS_FILE = "input-counts.json"


@dataclass(frozen=True)
class TrainSets:
    """The sources of a run; `classes` is None only for WebDataset shards not yet counted (integer labels,
    no class names)."""

    train: ImageSource
    val: ImageSource
    test: ImageSource | None
    classes: tuple[str, ...] | None

    @property
    def foreign(self) -> bool:
        """True when any of the sources is WebDataset shards of another tool."""
        return any(s is not None and s.kind == "webdataset" for s in (self.train, self.val, self.test))

    def identity(self) -> str:
        """A digest of what the run reads: every unit of every role, and how foreign samples are labelled."""
        roles = {"train": self.train, "val": self.val, "test": self.test}
        described = {
            role: {**s.identity(), "units": [u.name for u in s.units], "digests": [u.digest for u in s.units]}
            for role, s in roles.items()
            if s is not None
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def resolve(cfg: Config) -> TrainSets:
    """The run's sources from `cfg.finetune`: listings only, nothing read, no Ray. Every error names the
    setting to change."""
    ft = cfg.finetune
    source = _open(cfg, ft.source, "finetune.source")
    if source.kind == "shards":
        missing = [s for s in (ft.train_split, *([] if ft.val_source else [ft.val_split])) if s not in source.splits]
        if missing:
            raise UserError(
                f"{ft.source} has no split {missing} (it has {source.splits}); prepare it with a val split "
                "(prepare.split), set finetune.val_source, or set finetune.train_split / finetune.val_split"
            )
        train = source.select([ft.train_split])
        val = _role(cfg, ft.val_source, "finetune.val_source", ft.val_split) or source.select([ft.val_split])
        has_test = ft.test_split and ft.test_split in source.splits
        test = _role(cfg, ft.test_source, "finetune.test_source", ft.test_split) or (
            source.select([ft.test_split]) if has_test else None
        )
    else:
        train, val = source, _role(cfg, ft.val_source, "finetune.val_source", ft.val_split)
        if val is None:
            train, val = hold_out(source, ft.val_fraction, ft.seed, ft.source)
        test = _role(cfg, ft.test_source, "finetune.test_source", ft.test_split)
    classes = _classes(ft.source, train, val, test)
    if classes is None and train.kind == "shards":
        raise UserError(f"{ft.source}: no classes.json classes; finetune needs labelled shards")
    return TrainSets(train, val, test, classes)


def hold_out(source: ImageSource, fraction: float, seed: int, uri: str) -> tuple[ImageSource, ImageSource]:
    """(train, val): whole shards of `source`, `fraction` of them (at least one) drawn from `seed` for val."""
    units = list(source.units)
    if len(units) < 2:
        raise UserError(
            f"{uri}: one WebDataset shard, and no finetune.val_source: set finetune.val_source to the validation "
            "shards (or split the data into more shards, so that whole shards can be held out)"
        )
    k = min(len(units) - 1, max(1, round(len(units) * fraction)))
    held = set(random.Random(f"{seed}/val-shards").sample(range(len(units)), k))
    val = tuple(replace(u, split="val") for n, u in enumerate(units) if n in held)
    log.info("%s: %d of %d shards held out for validation (finetune.val_fraction=%g)", uri, k, len(units), fraction)
    return (
        replace(source, units=tuple(u for n, u in enumerate(units) if n not in held)),
        replace(source, units=val),
    )


def count(sets: TrainSets, cfg: Config, out: storage.Location) -> TrainSets:
    """`sets` with every train unit counted (foreign shards: read once in Ray tasks, counts kept in the run
    folder) and, for integer labels without class names, classes named 0..K-1 from the largest label seen."""
    if sets.train.counted:
        return sets
    loc = out.join(COUNTS_FILE)
    known = json.loads(storage.read_bytes(loc)) if storage.exists(loc) else {}
    todo = [u for u in sets.train.units if u.digest not in known]
    if todo:
        log.info("finetune: counting the samples of %d WebDataset shards (read once; kept in %s)", len(todo), loc.uri)
        src = sets.train
        tally = ray.remote(num_cpus=1)(_tally)
        refs = [tally.remote(u, src.location.fs, src.location.uri, src.location.path, src.labels) for u in todo]
        known.update(zip([u.digest for u in todo], ray.get(refs)))
        storage.write_bytes(loc, json.dumps(known, indent=1).encode())
    tallies = [known[u.digest] for u in sets.train.units]
    train = replace(sets.train, units=tuple(replace(u, count=t["samples"]) for u, t in zip(sets.train.units, tallies)))
    _check_labels(cfg.finetune.source, tallies)
    classes = sets.classes
    if classes is None:
        classes = tuple(str(i) for i in range(max(t["max_label"] for t in tallies) + 1))
        log.info(
            "%s: no class names (webdataset.classes, or classes.json / classes.txt beside the shards): "
            "%d classes from the largest integer label, named 0..%d",
            cfg.finetune.source,
            len(classes),
            len(classes) - 1,
        )
    return replace(sets, train=_named(train, cfg, classes), val=_named(sets.val, cfg, classes), classes=classes)


def usable(sets: TrainSets, out: storage.Location) -> int:
    """Train rows that reach the model (the count minus the samples rejected while reading: no image, bad
    label); the decoder may still reject some."""
    if sets.train.kind == "shards":
        return sets.train.count
    known = json.loads(storage.read_bytes(out.join(COUNTS_FILE)))
    return sum(known[u.digest]["samples"] - known[u.digest]["rejected"] for u in sets.train.units)


def wds_config(cfg: Config, sets: TrainSets):
    """`cfg.webdataset` with the run's class names, for reading foreign test shards as the model labels them."""
    return cfg.webdataset.model_copy(update={"classes": list(sets.classes or ())})


def _open(cfg: Config, uri: str, setting: str) -> ImageSource:
    if not webshards.is_pattern(uri) and not webshards.is_shard(uri):
        loc = storage.resolve(uri, cfg.storage)
        if not storage.exists(loc.join(MANIFEST)) and not any(
            webshards.is_shard(f.path) for f in storage.list_files(loc)
        ):
            raise UserError(
                f"{uri} ({setting}): no prepared shards here (no {MANIFEST}) and no WebDataset shards; run `imgpipe "
                "prepare` on the images first, or name WebDataset shards (a prefix of .tar files, a glob, a brace list)"
            )
    source = open_images(uri, cfg.storage, wds=cfg.webdataset)
    if source.kind not in ("shards", "webdataset"):
        raise UserError(
            f"{uri} ({setting}): raw images ({source.kind}); finetune reads prepared shards or WebDataset shards: "
            f"run `imgpipe prepare` on the images first and point {setting} at its output"
        )
    return source


def _role(cfg: Config, uri: str | None, setting: str, split: str | None) -> ImageSource | None:
    """The val or test source named by `setting`: a prepared dataset's `split`, or WebDataset shards whole."""
    if not uri:
        return None
    source = _open(cfg, uri, setting)
    if source.kind == "webdataset":
        return source
    if split not in source.splits:
        raise UserError(f"{uri} ({setting}) has no split {split!r} (it has {source.splits})")
    return source.select([split])


def _classes(uri: str, *sources: ImageSource | None) -> tuple[str, ...] | None:
    """The class names the sources agree on; different names in two of them are an error."""
    named = [s for s in sources if s is not None and s.classes]
    for other in named[1:]:
        if other.classes != named[0].classes:
            raise UserError(
                f"{uri}: the classes of {named[0].location.uri} and {other.location.uri} differ "
                f"({len(named[0].classes)} vs {len(other.classes)} classes, or their order); "
                "train, val and test must share one class list (set webdataset.classes for foreign shards)"
            )
    return named[0].classes if named else None


def _named(source: ImageSource, cfg: Config, classes: tuple[str, ...]) -> ImageSource:
    """A foreign source labelled against `classes` (a label outside them is then a reject, not a crash)."""
    if source.kind != "webdataset":
        return source
    return replace(source, classes=classes, labels=webshards.LabelRules.create(cfg.webdataset, classes))


def _check_labels(uri: str, tallies: list[dict]) -> None:
    samples = sum(t["samples"] for t in tallies)
    labelled = sum(t["labelled"] for t in tallies)
    if not labelled:
        raise UserError(
            f"{uri}: none of the {samples} train samples has a label; finetune needs labels "
            "(set webdataset.label, and webdataset.json_field for .json labels)"
        )
    unlabelled = samples - labelled - sum(t["rejected"] for t in tallies)
    if unlabelled:
        log.warning("%s: %d of %d train samples have no label; they are read but add no loss", uri, unlabelled, samples)


def _tally(unit: Unit, fs, uri: str, root: str, rules: webshards.LabelRules) -> dict:
    """One shard's counts, from the same reader the training input uses (so both count alike)."""
    item = {"name": unit.name, "paths": list(unit.paths), "labels": [], "keys": []}
    tally = {"samples": 0, "labelled": 0, "rejected": 0, "max_label": -1}
    for row in webshards.read_shard(item, fs=fs, uri=uri, root=root, rules=rules):
        tally["samples"] += 1
        if row[schema.ERROR]:
            tally["rejected"] += 1
        elif row[schema.LABEL] >= 0:
            tally["labelled"] += 1
            tally["max_label"] = max(tally["max_label"], int(row[schema.LABEL]))
    return tally
