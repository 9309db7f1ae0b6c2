"""Exactly-once Parquet parts: one part per input unit, written whole, resumable.

`PartSink` (driver side) buffers rows by unit and writes a unit's part, atomically, when the
last of its rows has arrived; a part that exists is finished. `plan_run` reads the run file
(what made the parts, and each unit's content digest) and says which units a rerun still has to
write; `verify_parts` checks a finished output. Rejected inputs travel with their part (in its
metadata), so every run, resumed or not, reports every reject. Shared by `features` and
`predict`.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import schema, storage
from pipeline.errors import UserError
from pipeline.sources import Unit

log = logging.getLogger("imgpipe")

ERRORS_FILE = "errors.jsonl"
META = "imgpipe."  # prefix of our keys in Parquet file metadata
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}  # how a run's units are listed (then "all", raw inputs)
PART_NAME = re.compile(r"[^/]+/part-[^/]+\.parquet")
Batch = dict[str, np.ndarray]


def part_path(unit: Unit) -> str:
    """`<split>/part-NNNNNN.parquet`, numbered as the unit (`train-000003`, `chunk-000003`)."""
    match = re.fullmatch(r".*?-?(\d+)", unit.name)
    return f"{unit.split}/part-{match.group(1) if match else unit.name}.parquet"


def check_part_names(units: Sequence[Unit]) -> None:
    """Two units may not map to one part file (they would overwrite each other)."""
    seen: dict[str, str] = {}
    for unit in units:
        path = part_path(unit)
        if path in seen:
            raise ValueError(f"units {seen[path]} and {unit.name} would both write {path}")
        seen[path] = unit.name


class PartSink:
    """Driver side: buffers rows by unit; when a unit's rows are all in, writes its part once.

    `make_table(good_rows)` builds the part's Arrow table; `metadata` goes into every part,
    with the unit, its input count and its rejects (key, source, reason) added. Parts are encoded
    and uploaded on `writers` threads, off the loop that drains the stream (on one thread, the
    Parquet encode and a synchronous upload per part would cap a multi-GPU job); `close` waits.
    A part that could not be written (its store down past `storage.retry_seconds`) ends the run at
    the next `add` or at `close`: no part starts after one has failed, and none still queued is tried.
    """

    writers = 4

    def __init__(
        self,
        out: storage.Location,
        units: Sequence[Unit],
        make_table: Callable[[Batch], pa.Table],
        metadata: dict[str, str],
    ):
        self.out = out
        self.units = {u.name: u for u in units}
        self.make_table = make_table
        self.metadata = metadata
        self.buffers: dict[str, list[Batch]] = defaultdict(list)
        self.keys: dict[str, set[str]] = defaultdict(set)  # of the units still buffering
        self.written: dict[str, np.ndarray] = {}  # unit -> sorted hashes of its keys (8 bytes a row)
        self.extra: dict[str, int] = defaultdict(int)
        self.counts: dict[str, int] = {}  # unit -> its sample count, once known
        self.pool = ThreadPoolExecutor(self.writers, thread_name_prefix="part-writer")
        self.pending: list = []
        self.failed = False  # a part could not be written: the parts queued behind it are not tried

    def add(self, batch: Batch) -> None:
        """Take a batch from the stream (rows of any units, in any order)."""
        self._raise_failed()
        shards = np.asarray(batch[schema.SHARD])
        for name in np.unique(shards):
            rows = _take(batch, shards == name)
            if name in self.written:
                # Repeats of written keys (a retried read task) are dropped; a new key means
                # the unit holds more than its count, which `close` reports.
                new = ~np.isin(_key_hashes(rows[schema.KEY]), self.written[name])
                if (~new).any():
                    log.warning(
                        "ignored %d repeated rows of %s, whose part is already written", int((~new).sum()), name
                    )
                self.extra[name] += int(new.sum())
                continue
            if name not in self.units:
                self.extra[name] += len(rows[schema.KEY])
                continue
            rows = self._new_rows(name, rows)
            self.buffers[name].append(rows)
            if len(self.keys[name]) == self.expected(name, rows):
                self.write(self.units[name])

    def expected(self, name: str, rows: Batch) -> int:
        """The unit's sample count: known from the start, or (foreign shards) from its rows."""
        if name not in self.counts:
            count = self.units[name].count
            if count < 0 and schema.UNIT_SIZE in rows and len(rows[schema.UNIT_SIZE]):
                count = int(rows[schema.UNIT_SIZE][0])
            self.counts[name] = count
        return self.counts[name]

    def _new_rows(self, name: str, rows: Batch) -> Batch:
        # A retried read task may yield a row twice: keep the first, so each key lands once.
        seen = self.keys[name]
        fresh = np.zeros(len(rows[schema.KEY]), dtype=bool)
        for i, key in enumerate(rows[schema.KEY]):
            if str(key) not in seen:
                seen.add(str(key))
                fresh[i] = True
        return rows if fresh.all() else _take(rows, fresh)

    def write(self, unit: Unit) -> None:
        """Hand one unit's rows to a writer thread; at most 2 x `writers` parts wait in memory."""
        rows = _concat(self.buffers.pop(unit.name))
        self.keys.pop(unit.name, None)
        self.written[unit.name] = np.sort(_key_hashes(rows[schema.KEY]))
        while len(self.pending) >= 2 * self.writers:
            wait(self.pending, return_when=FIRST_COMPLETED)
            self._raise_failed()
            self.pending = [f for f in self.pending if not f.done() or f.exception() is not None]
        self.pending.append(self.pool.submit(self._write_unless_failed, unit, rows))

    def _raise_failed(self) -> None:
        """Raise the error of a part that could not be written, after dropping the parts still queued:
        with the store down, each would otherwise spend a whole retry budget before the run could end."""
        failed = next((f for f in self.pending if f.done() and not f.cancelled() and f.exception()), None)
        if failed is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            raise failed.exception()

    def _write_unless_failed(self, unit: Unit, rows: Batch) -> None:
        if self.failed:  # the run is ending: `_raise_failed` raises the failed part's error
            return
        try:
            self._write_part(unit, rows)
        except BaseException:
            self.failed = True
            raise

    def _write_part(self, unit: Unit, rows: Batch) -> None:
        """Write one unit's part (Parquet, atomic) with its rejects in the file metadata."""
        # Rows arrive in whatever order the actors finish; sorted by key, a part's bytes depend
        # only on its inputs, and whatever reads the parts (head training) sees a fixed order.
        rows = _take(rows, np.argsort(np.asarray(rows[schema.KEY]).astype(str), kind="stable"))
        errors = np.asarray(rows[schema.ERROR]).astype(str)
        good = errors == ""
        members = rows[schema.MEMBER] if schema.MEMBER in rows else np.full(len(errors), "")
        rejects = [
            {"key": str(k), "source": schema.located(str(s), str(m)), "reason": str(e)}
            for k, s, m, e in zip(rows[schema.KEY][~good], rows[schema.SOURCE][~good], members[~good], errors[~good])
        ]
        table = self.make_table(_take(rows, good))
        meta = {
            **self.metadata,
            "unit": unit.name,
            "split": unit.split,
            "inputs": str(len(errors)),
            "unit_digest": unit.digest,
            "rejects": json.dumps(rejects),
        }
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), **{f"{META}{k}": v for k, v in meta.items()}}
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        storage.write_bytes(self.out.join(part_path(unit)), sink.getvalue().to_pybytes())
        log.info(
            "wrote %s: %d rows, %d rejected (%d/%d parts this run)",
            part_path(unit),
            table.num_rows,
            len(rejects),
            len(self.written),
            len(self.units),
        )

    def close(self) -> None:
        """After the stream: every part written (a failed write raises here), every unit seen
        whole, and nothing else seen."""
        wait(self.pending, return_when=FIRST_EXCEPTION)
        self._raise_failed()
        self.pool.shutdown(wait=True)
        for name, unit in self.units.items():
            if unit.count < 0 and name not in self.written and name not in self.keys:
                # A foreign shard that yielded no row holds no sample (a Ray task that fails raises; rows
                # are never lost silently): its part is empty.
                self.counts[name] = 0
                self._write_part(unit, _empty_rows())
                self.written[name] = np.zeros(0, np.int64)
        short = {n: len(self.keys[n]) for n in self.units if n not in self.written}
        self.extra = {n: c for n, c in self.extra.items() if c}
        if short or self.extra:
            raise UserError(
                "the input did not match its manifest: "
                + "; ".join(
                    [f"{n}: {got} of {self.counts.get(n, self.units[n].count)} samples" for n, got in short.items()]
                    + [f"{n}: {c} rows beyond its count" for n, c in self.extra.items()]
                )
            )


def _empty_rows() -> Batch:
    return {c: np.zeros(0, dtype=object) for c in (schema.KEY, schema.LABEL, schema.SOURCE, schema.ERROR)}


def _key_hashes(keys) -> np.ndarray:
    # Within this process str hashes are stable, and 64 bits make a collision between two keys
    # of one unit (at most thousands) negligible.
    return np.fromiter((hash(str(k)) for k in keys), dtype=np.int64, count=len(keys))


def _take(batch: Batch, pick: np.ndarray) -> Batch:
    """The rows that `pick` (a boolean mask or an index array) selects, in its order."""
    return {k: np.asarray(v)[pick] for k, v in batch.items()}


def _concat(parts: list[Batch]) -> Batch:
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------- reading parts back


@dataclass(frozen=True)
class PartInfo:
    """What a finished part says about itself (from its footer)."""

    path: str
    split: str
    rows: int
    inputs: int
    rejects: list[dict]
    metadata: dict[str, str]


def read_part_info(loc: storage.Location) -> PartInfo:
    """A part's footer: row count and our metadata (no data pages read)."""
    try:
        with loc.fs.open_input_file(loc.path) as f:
            footer = pq.read_metadata(f)
    except OSError as exc:
        raise storage.explain(exc, loc.uri) from None
    meta = {
        k.decode()[len(META) :]: v.decode() for k, v in (footer.metadata or {}).items() if k.startswith(META.encode())
    }
    return PartInfo(
        loc.uri,
        meta.get("split", ""),
        footer.num_rows,
        int(meta.get("inputs", footer.num_rows)),
        json.loads(meta.get("rejects", "[]")),
        meta,
    )


def read_parts(out: storage.Location, paths: Sequence[str], columns: Sequence[str] | None = None) -> pa.Table:
    """Concatenate parts (relative paths under `out`), reading only `columns`, in parallel."""

    def read(path: str) -> pa.Table:
        loc = out.join(path)
        try:
            return pq.read_table(loc.path, filesystem=loc.fs, columns=list(columns) if columns else None)
        except OSError as exc:
            raise storage.explain(exc, loc.uri) from None

    with ThreadPoolExecutor(max_workers=16) as pool:
        tables = list(pool.map(read, paths))
    return pa.concat_tables(tables) if tables else pa.table({})


def verify_parts(out: storage.Location, units: Sequence[Unit]) -> dict:
    """Check the finished output: every unit's part there, rows + rejects == inputs per part,
    keys unique across all parts. Returns the counts and the rejects."""
    paths = [part_path(u) for u in units]
    with ThreadPoolExecutor(max_workers=16) as pool:
        infos = list(pool.map(lambda p: read_part_info(out.join(p)), paths))
    for unit, info in zip(units, infos):
        if (
            info.rows + len(info.rejects) != (unit.count if unit.count >= 0 else info.inputs)
            or info.metadata.get("unit") != unit.name
            or info.metadata.get("unit_digest", "") != unit.digest
        ):
            raise UserError(
                f"{info.path}: holds {info.rows} rows + {len(info.rejects)} rejects of unit "
                f"{info.metadata.get('unit')}, expected {unit.count} of {unit.name} "
                f"({unit.digest or 'no digest'}, it has {info.metadata.get('unit_digest') or 'none'}); "
                "delete it and rerun"
            )
    keys = read_parts(out, paths, [schema.KEY]).column(schema.KEY) if paths else pa.array([], pa.string())
    unique = len(pc.unique(keys)) if len(keys) else 0
    if unique != len(keys):
        raise UserError(
            f"{out.uri}: {len(keys) - unique} keys appear in more than one row; the input has duplicate keys"
        )
    by_split: dict[str, dict[str, int]] = defaultdict(lambda: {"rows": 0, "rejected": 0, "parts": 0})
    for unit, info in zip(units, infos):
        counts = by_split[unit.split]
        counts["rows"] += info.rows
        counts["rejected"] += len(info.rejects)
        counts["parts"] += 1
    rejects = sorted((r for i in infos for r in i.rejects), key=lambda r: r["source"])
    rows = sum(i.rows for i in infos)
    return {
        "inputs": sum(i.inputs for i in infos),
        "rows": rows,
        "rejected": len(rejects),
        "splits": dict(by_split),
        "parts": paths,
        "rejects": rejects,
    }


def write_run_file(
    out: storage.Location, name: str, identity: dict, result: dict | None, units: Sequence[Unit] = ()
) -> None:
    """The run's identity (what made these parts), the units it holds, and, once verified, its counts."""
    body = {"identity": identity, "units": {u.name: u.describe() for u in units}, "complete": result is not None}
    if result is not None:
        body.update({k: v for k, v in result.items() if k != "rejects"})
    storage.write_bytes(out.join(name), json.dumps(body, indent=1).encode())


def plan_run(
    out: storage.Location,
    name: str,
    identity: dict,
    units: Sequence[Unit],
    known: Sequence[Unit],
    overwrite: bool = False,
    overwrite_key: str = "overwrite",
) -> tuple[list[Unit], list[Unit]]:
    """(every unit the output will hold, the units still to write), for a run over `units`,
    selected from the source's `known` units.

    A rerun completes the parts of the same run: same model, output format and source, and
    units with the same content as the source has now (a re-prepared dataset has new shard
    checksums even where names and counts stay). Finished units of other splits that an earlier
    run of the same kind wrote are kept, so splits can be embedded one at a time. Another run's
    output is refused (the message names the config key `overwrite_key`), or with `overwrite`
    deleted first.
    """
    previous = _previous_units(out, name, identity, known, overwrite, overwrite_key)
    present = set(_part_files(out))
    recorded = [Unit(n, d["split"], int(d["count"]), (), digest=d.get("digest", "")) for n, d in previous.items()]
    # An interrupted run recorded units it never wrote: those are not held.
    held = {u.name: u for u in recorded if out.join(part_path(u)).path in present}
    held.update({u.name: u for u in units})
    every = sorted(held.values(), key=lambda u: (SPLIT_ORDER.get(u.split, len(SPLIT_ORDER)), u.split, u.name))
    check_part_names(every)
    return every, [u for u in units if out.join(part_path(u)).path not in present]


def _previous_units(
    out: storage.Location, name: str, identity: dict, known: Sequence[Unit], overwrite: bool, overwrite_key: str
) -> dict[str, dict]:
    """The units an earlier run of this same job recorded; {} when there is none (or it was deleted)."""
    loc = out.join(name)
    if storage.exists(loc):
        previous = json.loads(storage.read_bytes(loc))
        before = previous.get("identity", {})
        if "units" in before:  # the run files of imgpipe 0.1 before unit digests
            differs = ["format (written by an older imgpipe, without unit digests)"]
        else:
            differs = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
        now = {u.name: u.describe() for u in known}
        changed = sorted(n for n, d in previous.get("units", {}).items() if now.get(n) != d)
        if changed:
            differs.append(
                f"the content of {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} (was the input "
                "changed or prepared again?)"
            )
        if not differs:
            return previous.get("units", {})
    else:
        present = _part_files(out)
        if not present:
            return {}
        differs = [f"{len(present)} parts there have no {name}"]
    if not overwrite:
        raise UserError(
            f"{out.uri} already holds the output of another run (it differs in {'; '.join(differs)}); "
            f"choose a new output, delete the old one, or set {overwrite_key}=true"
        )
    log.warning("%s holds the output of another run (it differs in %s): deleting it", out.uri, "; ".join(differs))
    for path in _part_files(out):
        out.fs.delete_file(path)
    if storage.exists(loc):
        out.fs.delete_file(loc.path)
    return {}


def _part_files(out: storage.Location) -> list[str]:
    try:
        infos = out.fs.get_file_info(pafs.FileSelector(out.path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise storage.explain(exc, out.uri) from None
    return [
        i.path
        for i in infos
        if i.type == pafs.FileType.File and PART_NAME.fullmatch(i.path[len(out.path) :].lstrip("/"))
    ]


def write_errors(out: storage.Location, rejects: list[dict]) -> None:
    """errors.jsonl: one line per rejected input (key, source, reason)."""
    storage.write_bytes(out.join(ERRORS_FILE), "".join(json.dumps(r) + "\n" for r in rejects).encode())
