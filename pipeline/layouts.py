"""Find the labelled inputs of a raw dataset: ImageFolder, flat `cat.123.jpg`, CIFAR-10, MNIST.

Discovery only lists and labels; it reads no pixels. Files are read and checked later, in
parallel, by the tasks that write shards. Array datasets (CIFAR-10, MNIST) are small enough to
load on the driver once; their samples become PNGs (lossless) in the shards.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from pipeline import schema, storage
from pipeline.errors import UserError

SPLIT_FREE = ""  # an input that the ratio split assigns
CIFAR_META = "batches.meta"
MIN_FILES_FOR_CLASS_CHECK = 20  # a flat folder's labels must repeat: fewer classes than half the files


@dataclass(frozen=True)
class RawInput:
    """One input of a raw dataset: a file, or row `index` of an array dataset."""

    key: str
    label: int  # -1: the file could not be labelled (`problem` says why)
    source: str  # URI of the file (arrays: URI of the batch file + row)
    path: str = ""  # filesystem path of a file input
    size: int = 0  # bytes (files) or an estimate (arrays), for shard sizing
    mtime_ns: int = 0  # a file's modification time, as listed (0 when the store gives none)
    index: int = -1  # row of an array input
    split: str = SPLIT_FREE  # set when the dataset fixes it (CIFAR/MNIST test sets)
    problem: str = ""  # a reason to reject this input before reading it


@dataclass
class Discovery:
    """What a raw dataset holds: classes, inputs, and files that are not inputs."""

    layout: str
    classes: list[str]
    inputs: list[RawInput]
    ignored: list[str] = field(default_factory=list)  # URIs of non-image files
    images: np.ndarray | None = None  # array datasets: (N, H, W) or (N, H, W, 3) uint8
    counts: dict = field(default_factory=dict)  # the layout's own tallies (the labels layout: rows, missing files)


def discover(
    loc: storage.Location, layout: str, extensions, label_pattern: str, classes: list[str] | None
) -> Discovery:
    """List and label the inputs under `loc` in the given layout ('auto' detects it)."""
    files = storage.list_files(loc)
    rel = {f.path: f.path[len(loc.path) :].lstrip("/") for f in files}
    if layout == "auto":
        layout = detect_layout(loc, [rel[f.path] for f in files], extensions)
    if layout == "cifar10":
        return _cifar10(loc, files)
    if layout == "mnist":
        return _mnist(loc, files)
    images = [f for f in files if is_image(rel[f.path], extensions)]
    ignored = [loc.uri_of(f.path) for f in files if not is_image(rel[f.path], extensions)]
    if not images:
        raise UserError(f"{loc.uri}: no image files ({', '.join(extensions)}) under this prefix")
    if layout == "imagefolder":
        found = imagefolder(loc, images, classes)
    else:
        found = _flat(loc, images, label_pattern, classes)
    found.ignored = ignored
    return found


def unlabelled(loc: storage.Location, files) -> list[RawInput]:
    """A bare prefix of images, any depth: inputs without labels (label -1, no problem)."""
    inputs = [
        RawInput(
            schema.sample_key(f.path[len(loc.path) :].lstrip("/")),
            schema.UNLABELED,
            loc.uri_of(f.path),
            path=f.path,
            size=f.size,
            mtime_ns=f.mtime_ns or 0,
        )
        for f in files
    ]
    return unique_keys(inputs)


def unique_keys(inputs: list[RawInput]) -> list[RawInput]:
    """Make sample keys unique: `a.b.jpg` and `a_b.jpg` both map to `a_b`; the later gets a hash."""
    counts = Counter(i.key for i in inputs)
    seen: set[str] = set()
    result = []
    for item in inputs:
        key = item.key
        if counts[key] > 1 and key in seen:
            key = f"{key}_{hashlib.sha1(item.source.encode()).hexdigest()[:8]}"
        seen.add(key)
        result.append(item if key == item.key else replace(item, key=key))
    return result


def detect_layout(loc: storage.Location, rel: list[str], extensions) -> str:
    """Tell the layout from file names; an ambiguous tree is an error that says what to set."""
    names = {r.rsplit("/", 1)[-1] for r in rel}
    if CIFAR_META in names and any(n.startswith("data_batch_") for n in names):
        return "cifar10"
    if any(re.fullmatch(r".*-images[-.]idx3-ubyte(\.gz)?", n) for n in names):
        return "mnist"
    depths = {r.count("/") for r in rel if is_image(r, extensions)}
    if not depths:
        raise UserError(f"{loc.uri}: no image files ({', '.join(extensions)}) under this prefix")
    if depths == {1}:
        return "imagefolder"
    if depths == {0}:
        return "flat"
    raise UserError(
        f"{loc.uri}: cannot tell the layout (image files at depths {sorted(depths)}); "
        "set prepare.layout to imagefolder (<root>/<class>/<file>), flat, cifar10 or mnist"
    )


def imagefolder(loc: storage.Location, files, classes: list[str] | None) -> Discovery:
    """`<root>/<class>/<file>`: the folder names the class; nested deeper folders are errors."""
    rels = [f.path[len(loc.path) :].lstrip("/") for f in files]
    deep = [r for r in rels if r.count("/") != 1]
    if deep:
        raise UserError(
            f"{loc.uri}: imagefolder layout wants <class>/<file>, found {deep[0]!r}; fix the tree or set prepare.layout"
        )
    found = sorted({r.split("/", 1)[0] for r in rels})
    classes = _check_classes(loc, classes, found, "class folder")
    index = {c: i for i, c in enumerate(classes)}
    inputs = [
        file_input(
            loc,
            f,
            r,
            index.get(r.split("/", 1)[0], -1),
            f"class folder {r.split('/', 1)[0]!r} is not in prepare.classes",
        )
        for f, r in zip(files, rels)
    ]
    return Discovery("imagefolder", classes, unique_keys(inputs))


def _flat(loc: storage.Location, files, label_pattern: str, classes: list[str] | None) -> Discovery:
    pattern = re.compile(label_pattern)
    if "label" not in pattern.groupindex:
        raise UserError(f"prepare.label_pattern '{label_pattern}' needs a named group (?P<label>...)")
    rels = [f.path[len(loc.path) :].lstrip("/") for f in files]
    labels = [_match_label(pattern, r) for r in rels]
    found = sorted({lab for lab in labels if lab})
    labelled = sum(1 for lab in labels if lab)
    if classes is None and labelled >= MIN_FILES_FOR_CLASS_CHECK and len(found) > labelled / 2:
        raise UserError(
            f"{loc.uri}: prepare.label_pattern '{label_pattern}' gives {len(found)} classes for {labelled} files "
            f"(e.g. {found[:3]}): it captures more than the class. Set a pattern whose (?P<label>...) group holds "
            "the class alone, list prepare.classes, or use layout=imagefolder"
        )
    classes = _check_classes(loc, classes, found, "label")
    index = {c: i for i, c in enumerate(classes)}
    inputs = []
    for f, r, lab in zip(files, rels, labels):
        problem = (
            f"file name does not match prepare.label_pattern '{label_pattern}'"
            if not lab
            else f"label {lab!r} is not in prepare.classes"
        )
        inputs.append(file_input(loc, f, r, index.get(lab, -1) if lab else -1, problem))
    return Discovery("flat", classes, unique_keys(inputs))


def _cifar10(loc: storage.Location, files) -> Discovery:
    by_name = {f.path.rsplit("/", 1)[-1]: f for f in files}
    meta = _unpickle(
        storage.read_bytes(storage.Location(loc.fs, by_name[CIFAR_META].path, loc.uri_of(by_name[CIFAR_META].path)))
    )
    classes = [c.decode() if isinstance(c, bytes) else c for c in meta[b"label_names"]]
    batches = sorted(n for n in by_name if n.startswith("data_batch_")) + (
        ["test_batch"] if "test_batch" in by_name else []
    )
    images, inputs = [], []
    for name in batches:
        info = by_name[name]
        batch = _unpickle(storage.read_bytes(storage.Location(loc.fs, info.path, loc.uri_of(info.path))))
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        split = "test" if name == "test_batch" else SPLIT_FREE
        start = sum(len(a) for a in images)
        for i, label in enumerate(batch[b"labels"]):
            inputs.append(
                RawInput(
                    f"{name}_{i:05d}",
                    int(label),
                    f"{loc.uri_of(info.path)}#{i}",
                    size=png_size_bound((32, 32, 3)),
                    index=start + i,
                    split=split,
                )
            )
        images.append(data)
    return Discovery("cifar10", classes, inputs, images=np.concatenate(images))


def _mnist(loc: storage.Location, files) -> Discovery:
    images, inputs = [], []
    for prefix, split in (("train", SPLIT_FREE), ("t10k", "test")):
        img_file = _find(files, rf"{prefix}-images[-.]idx3-ubyte(\.gz)?")
        lab_file = _find(files, rf"{prefix}-labels[-.]idx1-ubyte(\.gz)?")
        if img_file is None or lab_file is None:
            continue
        pixels = _read_idx(loc, img_file)
        labels = _read_idx(loc, lab_file)
        if len(pixels) != len(labels):
            raise UserError(f"{loc.uri_of(img_file.path)}: {len(pixels)} images but {len(labels)} labels")
        start = sum(len(a) for a in images)
        uri = loc.uri_of(img_file.path)
        for i, label in enumerate(labels):
            inputs.append(
                RawInput(
                    f"{prefix}_{i:05d}",
                    int(label),
                    f"{uri}#{i}",
                    size=png_size_bound(pixels[0].shape),
                    index=start + i,
                    split=split,
                )
            )
        images.append(pixels)
    if not images:
        raise UserError(f"{loc.uri}: no MNIST pair train-images-idx3-ubyte / train-labels-idx1-ubyte found")
    return Discovery("mnist", [str(d) for d in range(10)], inputs, images=np.concatenate(images))


def png_size_bound(shape: tuple[int, ...]) -> int:
    """At most the bytes of an array sample as the PNG prepare writes: stored pixels, a filter
    byte a row, and the chunks around them (incompressible noise does not shrink)."""
    return int(np.prod(shape)) + shape[0] + 128


def file_input(loc: storage.Location, info, rel: str, label: int, problem: str) -> RawInput:
    """A file as an input: its key from `rel`, `problem` kept only when it has no label."""
    return RawInput(
        schema.sample_key(rel),
        label,
        loc.uri_of(info.path),
        path=info.path,
        size=info.size,
        mtime_ns=info.mtime_ns or 0,
        problem="" if label >= 0 else problem,
    )


def _check_classes(loc: storage.Location, wanted: list[str] | None, found: list[str], what: str) -> list[str]:
    if wanted is None:
        return found
    missing = [c for c in wanted if c not in found]
    if missing:
        raise UserError(
            f"{loc.uri}: no {what} for class(es) {missing} listed in prepare.classes; found {found}. "
            "Add the images or drop the class from prepare.classes"
        )
    return list(wanted)


def _match_label(pattern: re.Pattern, rel: str) -> str:
    m = pattern.search(rel.rsplit("/", 1)[-1])
    return m.group("label") if m else ""


def is_image(rel: str, extensions) -> bool:
    """Whether a relative path has one of the image `extensions`."""
    base = rel.rsplit("/", 1)[-1]
    return "." in base and base.rsplit(".", 1)[1].lower() in extensions


def _find(files, pattern: str):
    return next((f for f in files if re.fullmatch(pattern, f.path.rsplit("/", 1)[-1])), None)


def _read_idx(loc: storage.Location, info) -> np.ndarray:
    """MNIST's idx format: magic (dtype, ndim), big-endian dims, then the values."""
    data = storage.read_bytes(storage.Location(loc.fs, info.path, loc.uri_of(info.path)))
    if info.path.endswith(".gz"):
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{loc.uri_of(info.path)}: not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(dims)):
        raise UserError(f"{loc.uri_of(info.path)}: idx header promises {dims}, file holds {values.size} values")
    return values.reshape(dims)


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are pickles; allow only what numpy arrays need, never arbitrary code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(data: bytes) -> dict:
    return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
