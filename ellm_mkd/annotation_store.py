"""Where annotations go: a directory of append-only shards, resumable and safe against kills.

Layout::

    out_dir/manifest.json                                what produced the rows (+ store_version, format)
    out_dir/{shard_prefix}-{run_id}-{seq:05d}.jsonl      complete shards (or .parquet)
    out_dir/.tmp-...                                     a shard being written; never read

``run_id`` (UTC time to the microsecond, pid, a per-process counter) is new for every
:class:`AnnotationStore`, so a rerun never overwrites an earlier run's shards; shard names sort
chronologically within a prefix. A shard is written to a ``.tmp-`` file in the same directory,
flushed, ``fsync``-ed and then ``os.replace``-d to its final name, so a kill at any moment leaves
complete shards only and loses at most the rows still buffered (fewer than ``rows_per_shard``).
Stale ``.tmp-`` files are ignored by readers and removed when a store with the same
``shard_prefix`` is opened again.

Resuming: :meth:`AnnotationStore.done_ids` lists the ``example_id`` of every row on disk (every
shard file with the store's extension, whatever its prefix: under DDP each rank passes its own
``shard_prefix``, e.g. ``part-r0``, and sees all ranks' rows). :meth:`~AnnotationStore.append`
skips rows whose ``example_id`` is already written or buffered, so the API never creates
duplicates.

The manifest pins what the rows mean (teacher, prompt fingerprint, sampling ...). Reopening a
store with a different manifest is an error naming the differing keys, except for the
``volatile_keys`` (default ``created``); ``overwrite=True`` deletes the old shards and manifest.

Rows are dicts of JSON-able values. JSONL shards hold one ``json.dumps(row, ensure_ascii=False)``
per line. Parquet shards hold the rows as pyarrow infers them (dict values become structs, lists
become list columns); a column is the union of the keys of a shard's rows, missing values are null.
Parquet therefore needs a field to keep one type across rows and cannot hold an empty dict (a
struct with no fields); such rows fail with :class:`StoreError` at write time, buffer intact.
:func:`read_annotations` returns the same columns for both formats (types inferred the same way,
so a dict field is a struct column either way).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Literal, Self

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

STORE_VERSION = 1
MANIFEST = "manifest.json"
ID = "example_id"
_RESERVED = ("store_version", "format")
_EXT = {"jsonl": ".jsonl", "parquet": ".parquet"}
_PREFIX = re.compile(r"^[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*$")
_RUN_ID = r"\d{8}T\d{12}Z_\d+_\d+"
_TMP = re.compile(rf"^\.tmp-(?P<prefix>.+)-(?P<run>{_RUN_ID})-.*$")
_counter = itertools.count()


class StoreError(ValueError):
    """A store directory that cannot be used as asked (mismatch, corruption, missing files)."""


def _new_run_id() -> str:
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}{int((now % 1) * 1e6):06d}Z_{os.getpid()}_{next(_counter)}"


def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples -> lists ...), for comparing manifests."""
    return json.loads(json.dumps(value, ensure_ascii=False))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, tmp: Path, write) -> None:
    """``write(file)`` into ``tmp``, flush, fsync, then rename to ``path`` (a kill leaves old or new, never half)."""
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _shard_files(directory: Path, fmt: str) -> list[Path]:
    """Every complete shard with the format's extension, any prefix, in name order."""
    ext = _EXT[fmt]
    return sorted(p for p in directory.glob(f"*-*{ext}") if not p.name.startswith(".") and p.is_file())


def _columns(rows: list[dict]) -> dict[str, list]:
    """Rows -> columns over the union of their keys (in order of first appearance); missing -> None."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return {k: [row.get(k) for row in rows] for k in keys}


def _table(rows: list[dict], where: str) -> pa.Table:
    try:
        return pa.Table.from_pydict(_columns(rows))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise StoreError(f"{where}: the rows do not form a table (a field with mixed types?): {e}") from e


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise StoreError(
                    f"{path}, line {lineno}: not valid JSON ({e.msg}); the shard is corrupt: "
                    "delete it to re-annotate its rows"
                ) from e
            if not isinstance(row, dict) or not isinstance(row.get(ID), str):
                raise StoreError(f"{path}, line {lineno}: expected a JSON object with a string {ID!r}")
            rows.append(row)
    return rows


def _read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(f"{path}: cannot read the parquet shard ({e}); delete it to re-annotate its rows") from e


def read_manifest(path: str | Path, kind: str = "annotation store") -> dict:
    """The manifest of a store directory (or the ``manifest.json`` file itself); ``kind`` names the store in errors."""
    path = Path(path)
    file = path if path.name == MANIFEST and path.is_file() else path / MANIFEST
    if not path.exists():
        raise StoreError(f"{kind} {path} does not exist")
    if not file.is_file():
        raise StoreError(f"{path} is not a {kind}: {file} is missing")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StoreError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") not in _EXT:
        raise StoreError(f"{file}: not an annotation-store manifest (no 'format' of {list(_EXT)})")
    return manifest


def read_annotations(path: str | Path, kind: str = "annotation store") -> pa.Table:
    """All rows of a store directory, shard by shard in name order (no shards: an empty ``example_id`` table)."""
    path = Path(path)
    fmt = read_manifest(path, kind)["format"]
    shards = _shard_files(path, fmt)
    if fmt == "jsonl":
        rows = [row for shard in shards for row in _read_jsonl(shard)]
        table = _table(rows, str(path)) if rows else None
    else:
        tables = [_read_parquet(shard) for shard in shards]
        tables = [t for t in tables if t.num_rows]
        try:
            table = pa.concat_tables(tables, promote_options="permissive") if tables else None
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise StoreError(f"{path}: shards with incompatible columns: {e}") from e
    if table is None:
        return pa.table({ID: pa.array([], pa.string())})
    return table


class AnnotationStore:
    """Append-only, sharded, resumable output of one annotation job (see the module docstring).

    ``rows_written`` counts rows this instance put on disk; ``skipped_duplicates`` counts rows
    :meth:`append` dropped because their ``example_id`` was already written or buffered.
    Under DDP give each rank its own ``shard_prefix`` and let one rank alone pass
    ``overwrite=True`` (before the others open the store): it deletes every shard in the directory.
    """

    def __init__(
        self,
        out_dir: str | Path,
        manifest: dict,
        fmt: Literal["jsonl", "parquet"] = "jsonl",
        rows_per_shard: int = 256,
        overwrite: bool = False,
        shard_prefix: str = "part",
        volatile_keys: tuple[str, ...] | list[str] = ("created",),
        kind: str = "annotation store",
        schema: pa.Schema | None = None,
    ):
        if fmt not in _EXT:
            raise ValueError(f"fmt must be one of {list(_EXT)}, got {fmt!r}")
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        if not _PREFIX.match(shard_prefix):
            raise ValueError(
                f"shard_prefix must be letters, digits, '_', '.' in '-'-separated parts, got {shard_prefix!r}"
            )
        clash = [k for k in _RESERVED if k in manifest]
        if clash:
            raise ValueError(f"manifest keys {clash} are reserved: the store sets them itself")
        try:
            manifest = _jsonable({**manifest, "store_version": STORE_VERSION, "format": fmt})
        except (TypeError, ValueError) as e:
            raise ValueError(f"manifest must be JSON-able: {e}") from e

        if schema is not None and fmt != "parquet":
            raise ValueError("an explicit schema is for parquet shards only")
        self.kind, self.schema = kind, schema
        self.out_dir = Path(out_dir)
        self.fmt, self.rows_per_shard, self.shard_prefix = fmt, rows_per_shard, shard_prefix
        self.volatile_keys = tuple(volatile_keys)
        self.run_id = _new_run_id()
        self.rows_written = 0
        self.skipped_duplicates = 0
        self._seq = 0
        self._buffer: list[dict] = []
        self._buffered_ids: set[str] = set()
        self._closed = False
        self._done: set[str] = set()

        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise StoreError(f"{self.out_dir} exists and is not a directory")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self._clear()
        else:
            self._remove_stale_tmp()
        self.manifest = self._open_manifest(manifest)
        self._done = self.done_ids()
        if self._done:
            log.info("%s %s: resuming, %d rows already written", self.kind, self.out_dir, len(self._done))

    # -- opening --------------------------------------------------------------------------------

    def _clear(self) -> None:
        removed = 0
        for pattern in ("*-*.jsonl", "*-*.parquet", ".tmp-*", MANIFEST):
            for p in self.out_dir.glob(pattern):
                if p.is_file():
                    p.unlink()
                    removed += 1
        if removed:
            log.info("%s %s: overwrite=True removed %d files", self.kind, self.out_dir, removed)

    def _remove_stale_tmp(self) -> None:
        """Leftovers of a killed run with this prefix (other prefixes may belong to live ranks)."""
        for p in self.out_dir.glob(".tmp-*"):
            m = _TMP.match(p.name)
            if m and m["prefix"] == self.shard_prefix and p.is_file():
                log.info("%s %s: removing %s, left by an interrupted run", self.kind, self.out_dir, p.name)
                p.unlink(missing_ok=True)

    def _tmp(self, name: str) -> Path:
        """A temporary file of this run (the name :meth:`_remove_stale_tmp` recognises by its prefix)."""
        return self.out_dir / f".tmp-{self.shard_prefix}-{self.run_id}-{name}"

    def _open_manifest(self, manifest: dict) -> dict:
        file = self.out_dir / MANIFEST
        if not file.exists():
            others = _shard_files(self.out_dir, "jsonl") + _shard_files(self.out_dir, "parquet")
            if others:
                raise StoreError(
                    f"{self.out_dir} holds shard files ({others[0].name} ...) but no {MANIFEST}: "
                    f"it is not a {self.kind} or it was damaged. Choose another directory "
                    "or pass overwrite=True to delete them"
                )
            self._write_manifest(manifest)
            return manifest
        stored = read_manifest(self.out_dir, self.kind)
        if stored["format"] != self.fmt:
            raise StoreError(
                f"the {self.kind} {self.out_dir} holds {stored['format']} shards, this run asked "
                f"for {self.fmt}: pass fmt={stored['format']!r}, or overwrite=True (deletes the old "
                "shards and manifest), or choose another directory"
            )
        keys = sorted((set(stored) | set(manifest)) - set(self.volatile_keys))
        missing = object()
        diffs = [
            (k, stored.get(k, missing), manifest.get(k, missing))
            for k in keys
            if stored.get(k, missing) != manifest.get(k, missing)
        ]
        if diffs:

            def show(v: Any) -> str:
                return "(absent)" if v is missing else json.dumps(v, ensure_ascii=False)

            lines = "; ".join(f"{k!r}: stored {show(a)}, now {show(b)}" for k, a, b in diffs)
            raise StoreError(
                f"the {self.kind} {self.out_dir} was made with a different manifest "
                f"(differing keys {[k for k, _, _ in diffs]}): {lines}. Pass overwrite=True "
                "(deletes the old shards and manifest) or choose another directory"
            )
        return stored

    # -- public API -----------------------------------------------------------------------------

    def update_manifest(self, **keys: Any) -> dict:
        """Rewrite the manifest (atomically) with ``keys`` changed; only ``volatile_keys`` may change,
        so a reopened store still matches (e.g. a row count written when a job completes)."""
        fixed = sorted(set(keys) - set(self.volatile_keys))
        if fixed:
            raise ValueError(f"manifest keys {fixed} are not volatile: they pin what the rows mean")
        self.manifest = _jsonable({**self.manifest, **keys})
        self._write_manifest(self.manifest)
        return self.manifest

    def _write_manifest(self, manifest: dict) -> None:
        text = json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
        _write_atomic(self.out_dir / MANIFEST, self._tmp(MANIFEST), lambda f: f.write(text.encode("utf-8")))

    def done_ids(self) -> set[str]:
        """``example_id`` of every row on disk (every shard in the directory, any prefix, any run)."""
        ids: set[str] = set()
        for shard in _shard_files(self.out_dir, self.fmt):
            if self.fmt == "jsonl":
                ids.update(row[ID] for row in _read_jsonl(shard))
            else:
                table = _read_parquet(shard, columns=[ID])  # a shard without the column: StoreError
                ids.update(table.column(ID).to_pylist())
        self._done |= ids
        return ids

    def append(self, rows: list[dict]) -> None:
        """Buffer rows; write a shard whenever ``rows_per_shard`` rows are buffered.

        Every row needs a string ``example_id``; a row whose id is already on disk or buffered is
        skipped (counted in ``skipped_duplicates``). Rows are checked to be JSON-able here, so a bad
        row fails at once instead of losing the buffer at write time.
        """
        if self._closed:
            raise StoreError(f"the {self.kind} {self.out_dir} is closed")
        for row in rows:
            if not isinstance(row, dict):
                raise StoreError(f"a row must be a dict, got {type(row).__name__}")
            eid = row.get(ID)
            if not isinstance(eid, str):
                raise StoreError(f"every row needs a string {ID!r}, got {eid!r} in a row with keys {sorted(row)}")
            if eid in self._done or eid in self._buffered_ids:
                self.skipped_duplicates += 1
                continue
            try:
                json.dumps(row, ensure_ascii=False)
            except (TypeError, ValueError) as e:
                raise StoreError(f"row {eid!r} is not JSON-able: {e}") from e
            self._buffer.append(dict(row))
            self._buffered_ids.add(eid)
        while len(self._buffer) >= self.rows_per_shard:
            self._write(self._buffer[: self.rows_per_shard])
            del self._buffer[: self.rows_per_shard]

    def flush(self) -> None:
        """Write the buffered rows (if any) as one shard."""
        if self._buffer:
            self._write(self._buffer)
            self._buffer = []

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # buffered rows are complete: keep them even when the block raised

    @property
    def shard_files(self) -> list[Path]:
        return _shard_files(self.out_dir, self.fmt)

    # -- writing --------------------------------------------------------------------------------

    def _typed_table(self, rows: list[dict], where: str) -> pa.Table:
        try:
            return pa.Table.from_pylist(rows, schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise StoreError(f"{where}: the rows do not fit the {self.kind} schema: {e}") from e

    def _write(self, rows: list[dict]) -> None:
        name = f"{self.shard_prefix}-{self.run_id}-{self._seq:05d}{_EXT[self.fmt]}"
        path = self.out_dir / name
        if path.exists():
            raise StoreError(
                f"{path} exists already; two stores share shard_prefix {self.shard_prefix!r} "
                "and run id (give each process its own shard_prefix)"
            )
        if self.fmt == "jsonl":
            data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")

            def write(f: Any) -> None:
                f.write(data)
        else:
            table = self._typed_table(rows, str(path)) if self.schema is not None else _table(rows, str(path))

            def write(f: Any) -> None:
                pq.write_table(table, f)

        try:
            _write_atomic(path, self.out_dir / f".tmp-{name}", write)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise StoreError(
                f"{path}: cannot write the rows as parquet ({e}); an empty dict value or a field "
                "with mixed types cannot be stored as a parquet column (use fmt='jsonl')"
            ) from e
        self._seq += 1
        ids = [row[ID] for row in rows]
        self._done.update(ids)
        self._buffered_ids.difference_update(ids)
        self.rows_written += len(rows)
