"""The `labels` layout: image files under a prefix, labelled by the rows of a CSV, TSV or JSONL file.

Every file and every row is accounted for. A file that one row labels with a known class is an
input. So is each thing that goes wrong, rejected with its reason: a row that names no file, a row
that names a file an earlier row named, a row without its columns, a file whose label is not a
class, a file that no row names. So `samples + rejected == inputs` holds and nothing is dropped
unseen. ImageNet's validation set as distributed (`LOC_val_solution.csv`: `ImageId,
PredictionString`, the wnid first) is one such file.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from dataclasses import dataclass

from pipeline import schema, storage
from pipeline.config import LabelFileConfig, StorageConfig
from pipeline.errors import UserError
from pipeline.layouts import Discovery, RawInput, file_input, is_image, unique_keys

FORMATS = {"csv": "csv", "tsv": "tsv", "tab": "tsv", "jsonl": "jsonl", "ndjson": "jsonl"}


def discover(
    loc: storage.Location, cfg: LabelFileConfig, extensions, classes: list[str] | None, storage_cfg: StorageConfig
) -> Discovery:
    """List the images under `loc` and label them from the rows of `cfg.file`."""
    if not cfg.file:
        raise UserError("the labels layout needs prepare.labels.file: a CSV, TSV or JSONL file of (image, label) rows")
    label_loc = storage.resolve(cfg.file, storage_cfg)
    rows = read_rows(storage.read_bytes(label_loc), cfg, label_loc.uri)
    files = storage.list_files(loc)
    images = [f for f in files if is_image(_rel(loc, f.path), extensions)]
    ignored = [loc.uri_of(f.path) for f in files if not is_image(_rel(loc, f.path), extensions)]
    if not images:
        raise UserError(f"{loc.uri}: no image files ({', '.join(extensions)}) under this prefix")
    classes, inputs, counts = label_files(loc, images, rows, label_loc.uri, classes)
    return Discovery("labels", classes, inputs, ignored, counts=counts)


@dataclass(frozen=True)
class LabelRow:
    """One row of a label file: where it is, the file it names, its class, or why it is unusable."""

    line: int  # 1-based line in the label file
    path: str  # the image path or key cell ("" when missing)
    label: str  # the class ("" when missing)
    problem: str = ""


def read_rows(data: bytes, cfg: LabelFileConfig, uri: str) -> list[LabelRow]:
    """Parse a label file's rows; a file that cannot be read as the configured format is an error."""
    fmt = label_format(cfg, uri)
    pattern = _label_pattern(cfg.label_pattern)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{uri}: the label file is not UTF-8 text ({exc})") from None
    rows = _jsonl_rows(text, cfg, uri) if fmt == "jsonl" else _table_rows(text, cfg, uri, fmt)
    return [_apply_pattern(row, pattern, cfg.label_pattern) for row in rows]


def label_format(cfg: LabelFileConfig, uri: str) -> str:
    """The configured format, or the one the file's extension names."""
    if cfg.format != "auto":
        return cfg.format
    ext = uri.rsplit("/", 1)[-1].rsplit(".", 1)[-1].lower()
    if ext not in FORMATS:
        raise UserError(f"{uri}: cannot tell the label file's format from its name; set prepare.labels.format")
    return FORMATS[ext]


def _table_rows(text: str, cfg: LabelFileConfig, uri: str, fmt: str) -> list[LabelRow]:
    by_name = isinstance(cfg.path_column, str) or isinstance(cfg.label_column, str)
    header = by_name if cfg.header is None else cfg.header
    if by_name and not header:
        raise UserError("prepare.labels: columns given by name need a header row; give 0-based positions instead")
    reader = csv.reader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",")
    lines = [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
    if header and not lines:
        raise UserError(f"{uri}: the label file is empty; a header row was expected")
    names = [c.strip() for c in lines.pop(0)[1]] if header else []
    path_at, label_at = (_column_index(col, names, uri) for col in (cfg.path_column, cfg.label_column))
    rows = []
    for line, cells in lines:
        if max(path_at, label_at) >= len(cells):
            rows.append(LabelRow(line, "", "", f"{len(cells)} columns, fewer than the label file's columns"))
        else:
            rows.append(LabelRow(line, cells[path_at].strip(), cells[label_at].strip()))
    return rows


def _column_index(column: int | str, names: list[str], uri: str) -> int:
    if isinstance(column, int):
        return column
    if column not in names:
        raise UserError(f"{uri}: no column {column!r} in the header; it has {names}")
    return names.index(column)


def _jsonl_rows(text: str, cfg: LabelFileConfig, uri: str) -> list[LabelRow]:
    if not (isinstance(cfg.path_column, str) and isinstance(cfg.label_column, str)):
        raise UserError("prepare.labels: a JSONL label file's columns are keys; set path_column and label_column")
    rows = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as exc:
            rows.append(LabelRow(line, "", "", f"not a JSON object ({exc})"))
            continue
        if not isinstance(record, dict) or cfg.path_column not in record or cfg.label_column not in record:
            rows.append(LabelRow(line, "", "", f"no {cfg.path_column!r} and {cfg.label_column!r} keys"))
            continue
        rows.append(LabelRow(line, str(record[cfg.path_column]).strip(), _label_text(record[cfg.label_column])))
    return rows


def _label_text(value) -> str:
    # JSON numbers are labels too; 3.0 and 3 are the same class.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return "" if value is None else str(value).strip()


def _label_pattern(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    compiled = re.compile(pattern)
    if "label" not in compiled.groupindex:
        raise UserError(f"prepare.labels.label_pattern '{pattern}' needs a named group (?P<label>...)")
    return compiled


def _apply_pattern(row: LabelRow, pattern: re.Pattern | None, text: str | None) -> LabelRow:
    if row.problem:
        return row
    if not row.path:
        return LabelRow(row.line, "", row.label, "no image path in the row")
    label = row.label
    if pattern is not None:
        m = pattern.search(label)
        label = m.group("label") if m else ""
        if not label:
            return LabelRow(row.line, row.path, "", f"label {row.label[:40]!r} does not match label_pattern '{text}'")
    if not label:
        return LabelRow(row.line, row.path, "", "no label in the row")
    return LabelRow(row.line, row.path, label)


def label_files(
    loc: storage.Location, files, rows: list[LabelRow], label_uri: str, classes: list[str] | None
) -> tuple[list[str], list[RawInput], dict]:
    """Match rows to the image files under `loc`: (classes, inputs, counts).

    A row names a file by its path under `loc`, or by that path without its extension (ImageNet's
    `ImageId`). `classes` fixes the class list (a label outside it is an unknown label); None
    discovers it: the labels sorted, numerically when every one is an integer.
    """
    by_rel = {_rel(loc, f.path): f for f in files}
    named, unusable = _name_files(rows, by_rel, loc.uri)
    if classes is None:
        found = {row.label for row in named.values()}
        classes = sorted(found, key=lambda c: (0, int(c), c) if _is_int(c) else (1, 0, c))
    index = {c: i for i, c in enumerate(classes)}
    inputs = [_labelled_input(loc, info, named.get(rel), index, label_uri) for rel, info in by_rel.items()]
    rejects = [
        RawInput(f"row-{row.line}", schema.UNLABELED, f"{label_uri}#line={row.line}", problem=f"line {row.line}: {why}")
        for row, why, _ in unusable
    ]
    unknown = sum(1 for row in named.values() if row.label not in index)
    counts = {"file": label_uri, "rows": len(rows), "labelled": len(named) - unknown}
    for kind in ("missing_files", "duplicate_rows", "bad_rows"):
        counts[kind] = sum(1 for _, _, k in unusable if k == kind)
    counts.update(unlabelled_files=len(by_rel) - len(named), unknown_labels=unknown)
    return classes, unique_keys(inputs) + rejects, counts


def _name_files(rows: list[LabelRow], by_rel: dict, root: str) -> tuple[dict[str, LabelRow], list[tuple]]:
    """({file's path under the root: the row that labels it}, [(row, why it names no file, kind)])."""
    by_stem: dict[str, list[str]] = {}
    for rel in by_rel:
        by_stem.setdefault(_stem(rel), []).append(rel)
    named: dict[str, LabelRow] = {}
    unusable: list[tuple] = []
    for row in rows:
        if row.problem:
            unusable.append((row, row.problem, "bad_rows"))
            continue
        path = row.path.replace("\\", "/").removeprefix("./").lstrip("/")
        candidates = [path] if path in by_rel else by_stem.get(path, [])
        if not candidates:
            unusable.append((row, f"no image file {path!r} under {root}", "missing_files"))
        elif len(candidates) > 1:
            listed = ", ".join(sorted(candidates)[:3])
            unusable.append((row, f"{path!r} names {len(candidates)} files ({listed}); give the extension", "bad_rows"))
        elif candidates[0] in named:
            first = named[candidates[0]]
            same = "the same label" if first.label == row.label else f"label {row.label!r}, not {first.label!r}"
            why = f"names {candidates[0]!r} again ({same}); line {first.line} labels it"
            unusable.append((row, why, "duplicate_rows"))
        else:
            named[candidates[0]] = row
    return named, unusable


def _labelled_input(
    loc: storage.Location, info, row: LabelRow | None, index: dict[str, int], label_uri: str
) -> RawInput:
    if row is None:
        label, problem = schema.UNLABELED, f"no row of {label_uri} names this file"
    else:
        label = index.get(row.label, schema.UNLABELED)
        problem = "" if label >= 0 else f"label {row.label!r} (line {row.line}) is not one of the classes"
    return file_input(loc, info, _rel(loc, info.path), label, problem)


def _rel(loc: storage.Location, path: str) -> str:
    return path[len(loc.path) :].lstrip("/")


def _stem(rel: str) -> str:
    return rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def read_classes_file(loc: storage.Location) -> list[str]:
    """A class list from `classes.json` ({"classes": [...]} or a list) or from text, one class a
    line, its first word (ImageNet's `LOC_synset_mapping.txt`: `n01440764 tench, Tinca tinca`)."""
    data = storage.read_bytes(loc).decode("utf-8-sig")
    if loc.path.endswith(".json"):
        parsed = json.loads(data)
        classes = parsed.get("classes") if isinstance(parsed, dict) else parsed
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise UserError(f"{loc.uri}: want {{'classes': [names]}} or a JSON list of names")
    else:
        classes = [line.split()[0] for line in data.splitlines() if line.strip()]
    duplicates = sorted(c for c, n in Counter(classes).items() if n > 1)
    if not classes or duplicates:
        raise UserError(f"{loc.uri}: " + (f"classes listed twice: {duplicates[:5]}" if classes else "no classes"))
    return classes


def describe(counts: dict) -> str:
    """One line of a label file's tallies, for the job's summary."""
    return (
        f"{counts['file']}: {counts['rows']} rows, {counts['labelled']} files labelled; rejected: "
        f"{counts['missing_files']} rows naming no file, {counts['unlabelled_files']} files no row names, "
        f"{counts['unknown_labels']} unknown labels, {counts['duplicate_rows']} duplicate rows, "
        f"{counts['bad_rows']} unusable rows"
    )
