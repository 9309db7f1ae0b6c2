"""Write WebDataset shards, byte-for-byte reproducibly, and the manifest that counts them.

A shard task reads its inputs (in threads: object-store reads are latency-bound), proves each
image decodes, and writes one `<split>-NNNNNN.tar` in a single PUT. Inputs that fail become
rejects with a reason. Tar headers carry no time or owner, so the same inputs give the same
bytes and the same sha256 on every run.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.decode import ImageRejected, inspect_image
from pipeline.layouts import RawInput

FORMAT = "imgpipe.prepared/1"
READ_THREADS = 16


TAR_BLOCK = 512
# The end-of-archive marker (2 blocks) and tarfile's padding to a 20-block record: under 21 blocks.
TAR_TAIL = 21 * TAR_BLOCK
LONGEST_EXT = 5  # ".jpeg", ".tiff", ".webp", ".json"


def sample_tar_bytes(item: RawInput, class_name: str) -> int:
    """An upper bound of a sample's bytes in its shard: three members (image, .cls, .json),
    each a 512-byte header (plus a 2-block pax header when the name is over 100 bytes or not
    ASCII) and its data padded to 512. Small images are mostly this overhead: a 200-byte digit
    PNG takes 3 KiB."""
    name = (item.key + "." * LONGEST_EXT).encode()
    pax = 0 if len(name) <= 100 and name.isascii() else TAR_BLOCK + _blocks(len(name) + 32)  # its header, its records
    header = TAR_BLOCK + pax
    meta = _sample_meta(item, class_name, 10**9, 10**9)  # the widest width and height
    return 3 * header + _blocks(item.size) + _blocks(len(str(item.label))) + _blocks(len(meta))


def _blocks(n: int) -> int:
    return -(-n // TAR_BLOCK) * TAR_BLOCK


@dataclass(frozen=True)
class ShardPlan:
    """What one shard will hold, decided on the driver before any image is read."""

    name: str  # "train-000003"
    split: str
    inputs: tuple[RawInput, ...]


def plan_shards(
    split: str, inputs: list[RawInput], max_samples: int, max_bytes: int, classes: list[str]
) -> list[ShardPlan]:
    """Cut a split's (already shuffled) inputs into shards by sample count and tar size."""
    plans, current, size = [], [], TAR_TAIL
    for item in inputs:
        item_bytes = sample_tar_bytes(item, classes[item.label])
        if current and (len(current) >= max_samples or size + item_bytes > max_bytes):
            plans.append(current)
            current, size = [], TAR_TAIL
        current.append(item)
        size += item_bytes
    if current:
        plans.append(current)
    return [ShardPlan(f"{split}-{n:06d}", split, tuple(p)) for n, p in enumerate(plans)]


def write_shard(
    plan: ShardPlan, src_fs, out: storage.Location, classes: list[str], max_pixels: int, images: np.ndarray | None
) -> dict:
    """Read, check and write one shard; returns its manifest entry plus its rejects."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        read = list(pool.map(lambda item: _read_input(item, src_fs, images), plan.inputs))
    # Checked in this thread: the decoders' warnings are caught per file (Python's warning filters are global).
    checked = [_check_sample(item, data, reason, max_pixels) for item, (data, reason) in zip(plan.inputs, read)]
    kept, rejects, per_class = [], [], {}
    for item, (sample, reason) in zip(plan.inputs, checked):
        if reason:
            rejects.append({"source": item.source, "reason": reason})
            continue
        kept.append(_member(item, classes, sample))
        per_class[classes[item.label]] = per_class.get(classes[item.label], 0) + 1
    data, samples = tar_samples(kept), len(kept)
    path = f"{plan.name}.tar"
    if samples:
        storage.write_bytes(out.join(path), data)
    return {
        "path": path,
        "split": plan.split,
        "samples": samples,
        "bytes": len(data) if samples else 0,
        "sha256": hashlib.sha256(data).hexdigest() if samples else "",
        "classes": per_class,
        "rejects": rejects,
    }


def tar_samples(samples: Iterable[dict]) -> bytes:
    """A tar of WebDataset samples (`{"__key__": key, ext: bytes, ...}`), each member named `key.ext`, in
    extension order, with no time or owner: byte for byte what webdataset's `TarWriter(user="", group="",
    mode=0o444, mtime=0, encoder=False)` writes (`tests/test_prepare.py` compares them). Written here
    because that package imports torch, about 1.5 CPU-seconds in each of prepare's task processes, which
    need nothing else of it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|") as tar:
        for sample in samples:
            for ext in sorted(k for k in sample if k != "__key__"):
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(sample[ext]), 0, 0o444, "", ""
                tar.addfile(info, io.BytesIO(sample[ext]))
    return buf.getvalue()


def _read_input(item: RawInput, src_fs, images: np.ndarray | None) -> tuple[bytes | dict | None, str]:
    """(the file's bytes, or an array input's encoded sample, "") or (None, reason)."""
    if item.problem:
        return None, item.problem
    if images is not None:
        return _encode_array(images[item.index]), ""
    try:
        return storage.read_bytes(storage.Location(src_fs, item.path, item.source)), ""
    except storage.StorageUnavailable:
        raise  # the store is down or refuses us: the job's error, not this input's
    except storage.StorageError as exc:
        return None, f"cannot read: {exc}"


def _check_sample(item: RawInput, data: bytes | dict | None, reason: str, max_pixels: int) -> tuple[dict | None, str]:
    """(sample, "") for a good input, (None, reason) for a reject: the verdict of `decode.inspect_image`."""
    if reason or isinstance(data, dict):
        return data, reason
    try:
        width, height = inspect_image(data, max_pixels)
    except ImageRejected as exc:
        return None, str(exc)
    ext = item.path.rsplit(".", 1)[-1].lower()
    return {"ext": ext, "data": data, "width": width, "height": height}, ""


def _encode_array(pixels: np.ndarray) -> dict:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return {"ext": "png", "data": buf.getvalue(), "width": pixels.shape[1], "height": pixels.shape[0]}


def _member(item: RawInput, classes: list[str], sample: dict) -> dict:
    return {
        "__key__": item.key,
        sample["ext"]: sample["data"],
        "cls": str(item.label).encode(),
        "json": _sample_meta(item, classes[item.label], sample["width"], sample["height"]),
    }


def _sample_meta(item: RawInput, class_name: str, width: int, height: int) -> bytes:
    meta = {"source": item.source, "class": class_name, "width": width, "height": height}
    return json.dumps(meta, sort_keys=True).encode()


def build_manifest(
    *,
    source: str,
    layout: str,
    seed: int,
    ratios: dict,
    classes: list[str],
    results: list[dict],
    inputs: int,
    rejected: int,
    ignored: list[str],
) -> dict:
    """The manifest (docs/ARCHITECTURE.md, section 3): per split, shards with counts and sha256, per-class counts."""
    splits: dict[str, dict] = {}
    for r in sorted(results, key=lambda r: r["path"]):
        info = splits.setdefault(r["split"], {"samples": 0, "classes": {c: 0 for c in classes}, "shards": []})
        info["samples"] += r["samples"]
        for c, n in r["classes"].items():
            info["classes"][c] += n
        if r["samples"]:
            info["shards"].append({k: r[k] for k in ("path", "samples", "bytes", "sha256")})
    samples = sum(s["samples"] for s in splits.values())
    return {
        "format": FORMAT,
        "source": source,
        "layout": layout,
        "seed": seed,
        "split_ratios": ratios,
        "classes": classes,
        "inputs": inputs,
        "samples": samples,
        "rejected": rejected,
        "ignored_files": {"count": len(ignored), "examples": ignored[:20]},
        "splits": {name: splits[name] for name in ("train", "val", "test") if name in splits},
    }
