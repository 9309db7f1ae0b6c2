"""WebDataset shards written by another tool (img2dataset, webdataset's `ShardWriter`, public sets) as an input.

Shards are named by a prefix, a glob or WebDataset's brace notation (`shard-{000000..001281}.tar`), plain or
gzipped. Samples follow the webdataset package's own rules, with its own helpers: its tar iterator (which skips
`__meta__` members), and `base_plus_ext` (the key runs to the first dot of the file name, folders kept). A shard
is counted only by the task that reads it, so opening a source reads nothing but a listing. A shard that is
missing, unreadable or not a tar fails the job in one line naming it; a sample without a usable image or label is
a reject.
"""

from __future__ import annotations

import fnmatch
import io
import json
import posixpath
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow.fs as pafs
from braceexpand import braceexpand

from pipeline import schema, storage
from pipeline.config import IMAGE_EXTENSIONS, StorageConfig, WebDatasetConfig
from pipeline.errors import UserError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_MEMBERS = (*IMAGE_EXTENSIONS, "ppm", "pgm", "pnm")
INTEGER_LABELS = ("cls", "cls2", "label")
SIDECARS = ("classes.json", "classes.txt")
_GLOB = re.compile(r"[*?\[]")
_BRACES = re.compile(r"\{[^{}]*(?:\.\.|,)[^{}]*\}")
MAX_NAMED = 3  # missing shards named in the error line


def is_pattern(uri: str) -> bool:
    """True for a glob (`*`, `?`, `[...]`) or WebDataset brace notation (`{000..009}`, `{a,b}`)."""
    return bool(_GLOB.search(uri) or _BRACES.search(uri))


def is_shard(path: str) -> bool:
    """True for a file name that a WebDataset shard has (`.tar`, `.tar.gz`, `.tgz`)."""
    return path.lower().endswith(SHARD_SUFFIXES)


def list_shards(uri: str, cfg: StorageConfig | None = None) -> tuple[storage.Location, list[pafs.FileInfo], set[str]]:
    """(the folder the shards are under, the shards in order, every path listed there) for a prefix, a shard,
    a glob or a brace list.

    One listing of that folder answers every name; a named shard (or a glob) that is not there is an error
    naming it, before anything is read."""
    locs = [storage.resolve(u, cfg) for u in braceexpand(uri)]
    single = len(locs) == 1 and not is_pattern(uri)
    if single and not is_shard(locs[0].path):  # a prefix: every shard under it
        base = locs[0]
        listed = storage.list_files(base)
        shards = [f for f in listed if is_shard(f.path)]
        if not shards:
            raise UserError(f"{uri}: no WebDataset shards ({', '.join(SHARD_SUFFIXES)}) under this prefix")
        return base, shards, {f.path for f in listed}
    base_path = posixpath.commonpath([_fixed_folder(loc.path) for loc in locs])
    base = storage.Location(locs[0].fs, base_path, _uri_prefix(uri) + base_path)
    listed = storage.list_files(base)
    by_path = {f.path: f for f in listed}
    chosen: dict[str, pafs.FileInfo] = {}
    missing = []
    for loc in locs:
        found = (
            [f for f in listed if fnmatch.fnmatchcase(f.path, loc.path)]
            if _GLOB.search(loc.path)
            else [by_path[loc.path]]
            if loc.path in by_path
            else []
        )
        if not found:
            missing.append(loc.uri)
        chosen.update((f.path, f) for f in found)
    if missing:
        more = f" (and {len(missing) - MAX_NAMED} more)" if len(missing) > MAX_NAMED else ""
        raise storage.StorageError(
            f"{', '.join(missing[:MAX_NAMED])}{more}: no such shard; {len(missing)} of the {len(locs)} "
            f"shards that {uri} names are missing"
        )
    return base, list(chosen.values()), set(by_path)


def _fixed_folder(path: str) -> str:
    """The folder of a path up to its first component with a wildcard."""
    parts = path.split("/")
    fixed = next((i for i, p in enumerate(parts) if _GLOB.search(p)), len(parts) - 1)
    return "/".join(parts[: min(fixed, len(parts) - 1)]) or "/"


def _uri_prefix(uri: str) -> str:
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    return "" if scheme in ("", "file") else f"{scheme}://"


def load_classes(base: storage.Location, listed: set[str], cfg: WebDatasetConfig) -> tuple[tuple[str, ...] | None, str]:
    """(class names, where they came from): the `webdataset.classes` setting, else a sidecar beside the shards
    (`classes.json`: a list or {"classes": [...]}; `classes.txt`: one name a line), else (None, "")."""
    if cfg.classes:
        return tuple(cfg.classes), "webdataset.classes"
    for name in SIDECARS:
        loc = base.join(name)
        if loc.path not in listed:
            continue
        text = storage.read_bytes(loc).decode("utf-8", errors="replace")
        try:
            names = [line.strip() for line in text.splitlines() if line.strip()] if name.endswith(".txt") else None
            if names is None:
                data = json.loads(text)
                names = data.get("classes") if isinstance(data, dict) else data
        except json.JSONDecodeError as exc:
            raise UserError(f"{loc.uri}: not JSON ({exc}); expected a list of class names") from None
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise UserError(f'{loc.uri}: expected a list of class names (or {{"classes": [...]}})')
        return tuple(names), loc.uri
    return None, ""


@dataclass(frozen=True)
class LabelRules:
    """Which member of a sample holds its label, and the class names that `.txt` and `.json` names map to."""

    mode: str = "auto"
    json_field: str = "label"
    classes: tuple[str, ...] | None = None
    index: dict[str, int] = field(default_factory=dict, compare=False)

    @classmethod
    def create(cls, cfg: WebDatasetConfig, classes: tuple[str, ...] | None) -> "LabelRules":
        """The rules of `cfg` with these class names; label=txt without class names is an error."""
        if cfg.label == "txt" and not classes:
            raise UserError(
                "webdataset.label=txt reads class names, but none are known: set webdataset.classes or put "
                "classes.json / classes.txt beside the shards"
            )
        return cls(cfg.label, cfg.json_field, classes, {n: i for i, n in enumerate(classes or ())})

    def label(self, parts: dict[str, tuple[str, bytes]]) -> tuple[int, str]:
        """(label, "") of a sample, UNLABELED when it has none; (UNLABELED, reason) when it is unusable."""
        mode = self.mode
        if mode == "auto":
            mode = next((e for e in INTEGER_LABELS if e in parts), "txt" if self.classes else "none")
        if mode == "none" or mode not in parts:
            return schema.UNLABELED, ""
        data = parts[mode][1]
        if mode in INTEGER_LABELS:
            try:
                return self._checked(int(data.decode("utf-8").strip()), mode)
            except (UnicodeDecodeError, ValueError):
                return schema.UNLABELED, f"bad .{mode} member {data[:20]!r}: not an integer label"
        if mode == "txt":
            return self._named(data.decode("utf-8", errors="replace").strip(), "txt")
        return self._from_json(data)

    def _from_json(self, data: bytes) -> tuple[int, str]:
        try:
            value = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return schema.UNLABELED, f"bad .json member {data[:20]!r}: not JSON"
        for name in self.json_field.split("."):
            if not isinstance(value, dict) or name not in value:
                return schema.UNLABELED, ""
            value = value[name]
        if isinstance(value, int) and not isinstance(value, bool):
            return self._checked(value, "json")
        if isinstance(value, str):
            return self._named(value.strip(), "json")
        return schema.UNLABELED, f"bad .json field {self.json_field!r}: {value!r} is not a label"

    def _checked(self, label: int, member: str) -> tuple[int, str]:
        if label < 0 or (self.classes is not None and label >= len(self.classes)):
            known = f"the {len(self.classes)} classes" if self.classes is not None else "the labels (>= 0)"
            return schema.UNLABELED, f"bad .{member} label {label}: outside {known}"
        return label, ""

    def _named(self, name: str, member: str) -> tuple[int, str]:
        if name in self.index:
            return self.index[name], ""
        if not self.classes:
            return schema.UNLABELED, f".{member} label {name[:40]!r} is a class name, but no class names are known"
        return schema.UNLABELED, f".{member} label {name[:40]!r} is not one of the {len(self.classes)} classes"


def read_shard(unit: dict, *, fs, uri: str, root: str, rules: LabelRules) -> Iterator[dict]:
    """The rows of one shard (the flat_map of `sources.ImageSource.dataset`), each with the shard's sample count."""
    path = unit["paths"][0]
    shard_uri = f"{uri}/{path[len(root) :].lstrip('/')}" if path.startswith(root + "/") else path
    data = storage.read_bytes(storage.Location(fs, path, shard_uri))  # a vanished shard: the job's error
    samples = group_samples(data, shard_uri)
    for key, parts in samples.items():
        image = next((e for e in parts if e in IMAGE_MEMBERS), None)
        label, error = rules.label(parts)
        if image is None:
            error = f"no image member ({', '.join(IMAGE_MEMBERS[:5])}, ...); the sample has {', '.join(parts)}"
        member, body = parts[image] if image is not None else ("", b"")
        yield {
            schema.KEY: key,
            schema.IMAGE: body if not error else b"",
            schema.LABEL: label,
            schema.SOURCE: shard_uri,
            schema.MEMBER: member,
            schema.SHARD: unit["name"],
            schema.ERROR: error,
            schema.UNIT_SIZE: len(samples),
        }


def group_samples(data: bytes, shard_uri: str) -> dict[str, dict[str, tuple[str, bytes]]]:
    """key -> {extension (lower case): (member name, bytes)}, in the order of the tar; a damaged tar raises
    one `ValueError` naming the shard. A repeated extension of a key keeps its first member."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator  # imports torch: only when reading

    samples: dict[str, dict[str, tuple[str, bytes]]] = {}
    try:
        for member in tar_file_iterator(io.BytesIO(data)):
            key, ext = base_plus_ext(member["fname"])
            if key is None:  # no extension: part of no sample, as in WebDataset
                continue
            samples.setdefault(key, {}).setdefault(ext.lower(), (member["fname"], member["data"]))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        reason = str(exc).split(" @ ")[0] or type(exc).__name__
        raise UserError(f"{shard_uri}: not a readable tar ({reason}); the shard is damaged or not a tar") from None
    return samples
