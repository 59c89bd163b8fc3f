"""Reading relevance files: CSV, TSV, JSONL and Parquet, each plain or inside ``.zip``/``.gz``.

This layer only turns bytes into *records*: ``(line, fields, raw)`` where ``line`` is the 1-based
line (text formats: the line the record starts on) or row (Parquet) in the source, ``fields`` a
dict of column -> value, and ``raw`` the record's original text for the quarantine file. A record
that cannot be parsed at all (broken quoting, wrong field count, invalid JSON) comes back as a
:class:`Problem` instead. Whole-file failures (missing, empty, truncated archive, unreadable
Parquet) raise :class:`DataError`. Mapping columns to the example contract and checking values is
``validation``'s job.

Encodings (text formats): ``auto`` reads UTF-8 (a BOM is dropped). When the bytes that are not UTF-8
outnumber the valid multi-byte UTF-8 characters more than :data:`UTF8_CORRUPTION_RATIO` times — the
signature of a single-byte code page, like Home Depot's ``train.csv`` — it falls back to cp1252 with
a warning. cp1252 is decoded as the WHATWG
encoding standard does (the five bytes cp1252 leaves undefined map to the C1 code points of the
same value, as in every browser), so no byte is lost. A UTF-8 file with a few corrupt bytes stays
UTF-8 and the rows holding them are reported as ``undecodable``. Any other Python codec name is
accepted as given.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

TEXT_FORMATS = ("csv", "tsv", "jsonl")
FORMATS = ("csv", "tsv", "jsonl", "parquet")
_EXT_FORMAT = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_DELIMS = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
#: csv's own per-field limit is set well above the validator's ``max_field_chars`` so that an
#: absurdly long field is reported by the validator (with its column) rather than by csv.
_CSV_FIELD_LIMIT = 1 << 30


@dataclass
class Problem:
    """One thing wrong with the input, located precisely."""

    file: str
    line: int | None  # 1-based line (text) or row (Parquet); None for the whole file
    field: str | None  # source column, when one is to blame
    kind: str  # e.g. "missing_column", "bad_label", "broken_quoting" (see validation.PROBLEM_KINDS)
    message: str
    raw: str | None = None  # the record as it was, for the quarantine file
    unit: str = "line"  # "line" for text formats, "row" for Parquet

    @property
    def location(self) -> str:
        loc = self.file
        if self.line is not None:
            loc += f":{self.line}" if self.unit == "line" else f" row {self.line}"
        if self.field:
            loc += f": column {self.field!r}"
        return loc

    def __str__(self) -> str:
        return f"{self.location}: {self.message} [{self.kind}]"

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            self.unit: self.line,
            "field": self.field,
            "kind": self.kind,
            "message": self.message,
            "raw": self.raw,
        }


class DataError(ValueError):
    """Input that cannot be used; ``problems`` lists every located reason."""

    def __init__(self, message: str, problems: list[Problem] | None = None):
        super().__init__(message)
        self.problems = problems or []


def _whatwg_cp1252(err: UnicodeDecodeError) -> tuple[str, int]:
    return err.object[err.start : err.end].decode("latin-1"), err.end


codecs.register_error("ellm_mkd_whatwg", _whatwg_cp1252)


@dataclass
class Source:
    """A file as opened: its display name, format and bytes (or Parquet table)."""

    name: str
    format: str
    data: bytes | None = None
    table: pa.Table | None = None
    warnings: list[str] = field(default_factory=list)


def detect_format(name: str) -> str:
    n = name.lower()
    for comp in (".gz", ".gzip"):
        if n.endswith(comp):
            n = n[: -len(comp)]
    for ext, fmt in _EXT_FORMAT.items():
        if n.endswith(ext):
            return fmt
    raise DataError(f"{name}: cannot tell the format from the name; set format to one of {list(FORMATS)}")


def open_source(path: str | Path, fmt: str = "auto", member: str | None = None) -> Source:
    """Read a file (plain, ``.gz`` or ``.zip``) into memory, raising :class:`DataError` on failure."""
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise DataError(f"{name}: file not found")
    if p.is_dir():
        raise DataError(f"{name}: is a directory, expected a data file")
    raw = p.read_bytes()
    if not raw:
        raise DataError(f"{name}: file is empty (0 bytes)", [Problem(name, None, None, "empty_file", "file is empty")])
    inner = p.name
    if zipfile.is_zipfile(p) or p.suffix.lower() == ".zip":
        try:
            zf = zipfile.ZipFile(io.BytesIO(raw))
            names = [n for n in zf.namelist() if not n.endswith("/") and not n.startswith("__MACOSX/")]
            if member is None:
                if len(names) != 1:
                    raise DataError(f"{name}: zip holds {len(names)} files {names[:10]}; set member to choose one")
                member = names[0]
            elif member not in names:
                raise DataError(f"{name}: zip has no member {member!r}; members: {names[:10]}")
            raw = zf.read(member)
        except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as e:
            raise DataError(
                f"{name}: truncated or corrupt zip archive ({e})",
                [Problem(name, None, None, "truncated", f"corrupt zip: {e}")],
            ) from None
        inner = member
        name = f"{name}::{member}"
        if not raw:
            raise DataError(
                f"{name}: file is empty (0 bytes)", [Problem(name, None, None, "empty_file", "file is empty")]
            )
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, gzip.BadGzipFile) as e:
            raise DataError(
                f"{name}: truncated or corrupt gzip stream ({e})",
                [Problem(name, None, None, "truncated", f"corrupt gzip: {e}")],
            ) from None
        if not raw:
            raise DataError(
                f"{name}: file is empty after decompression", [Problem(name, None, None, "empty_file", "file is empty")]
            )
    fmt = detect_format(inner) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise DataError(f"{name}: unknown format {fmt!r}; choose one of {list(FORMATS)}")
    if fmt == "parquet":
        try:
            table = pq.read_table(io.BytesIO(raw))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(
                f"{name}: not a readable Parquet file, truncated or corrupt ({e})",
                [Problem(name, None, None, "truncated", f"unreadable Parquet: {e}", unit="row")],
            ) from None
        return Source(name, fmt, table=table)
    return Source(name, fmt, data=raw)


#: ``auto`` keeps a text UTF-8 while its invalid bytes number at most this many times its valid multi-byte
#: characters (a UTF-8 file with a few corrupt bytes); past that it is a single-byte code page (Home Depot's
#: train.csv: 529 invalid bytes against 14 accidental multi-byte sequences) and is read as cp1252
UTF8_CORRUPTION_RATIO = 4


def decode(src: Source, encoding: str = "auto") -> str:
    """Decode a text source; undecodable bytes become lone surrogates for the validator to report."""
    data = src.data or b""
    if encoding in ("auto", "utf-8", "utf8", "utf-8-sig"):
        text = data.decode("utf-8-sig", errors="surrogateescape")
        if encoding != "auto":
            return text
        bad = sum(1 for c in text if "\udc80" <= c <= "\udcff")
        if not bad:
            return text
        good_multibyte = sum(1 for c in text if ord(c) > 127 and not "\udc80" <= c <= "\udcff")
        if bad <= UTF8_CORRUPTION_RATIO * good_multibyte:
            src.warnings.append(f"{src.name}: {bad} byte(s) are not valid UTF-8; rows holding them are reported")
            return text
        c1 = sum(data.count(bytes([b])) for b in (0x81, 0x8D, 0x8F, 0x90, 0x9D))
        msg = f"{src.name}: not UTF-8 ({bad} invalid byte(s)), read as cp1252"
        if c1:
            msg += f" ({c1} byte(s) undefined in cp1252 kept as C1 control characters)"
        src.warnings.append(msg)
        return data.decode("cp1252", errors="ellm_mkd_whatwg")
    if encoding.replace("-", "").lower() in ("cp1252", "windows1252"):
        return data.decode("cp1252", errors="ellm_mkd_whatwg")
    try:
        return data.decode(encoding, errors="surrogateescape")
    except LookupError:
        raise DataError(f"{src.name}: unknown encoding {encoding!r}") from None


def _sniff_delimiter(header_line: str, current: str) -> str | None:
    """A delimiter other than ``current`` that splits the header into more columns, if any."""
    best, best_n = None, 1
    for d in _DELIMS:
        if d == current:
            continue
        n = len(next(csv.reader([header_line], delimiter=d)))
        if n > best_n:
            best, best_n = d, n
    return best


def iter_delimited(
    src: Source, text: str, delimiter: str
) -> tuple[list[str], Iterator[tuple[int, dict | None, str, Problem | None]]]:
    """Header and an iterator of records from CSV/TSV text (strict quoting)."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    lines = text.splitlines(keepends=True)
    if not lines or not text.strip():
        raise DataError(
            f"{src.name}: file has no header line", [Problem(src.name, None, None, "empty_file", "no header line")]
        )
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as e:
        raise DataError(
            f"{src.name}:1: cannot parse the header ({e})",
            [Problem(src.name, 1, None, "broken_quoting", f"header: {e}")],
        ) from None
    if len(header) == 1:
        other = _sniff_delimiter(lines[0], delimiter)
        if other is not None:
            cols = next(csv.reader([lines[0].rstrip("\r\n")], delimiter=other))
            msg = (
                f"{src.name}:1: the header has one column with delimiter {delimiter!r} "
                f"({_DELIMS.get(delimiter, delimiter)}) "
                f"but {len(cols)} with {other!r} ({_DELIMS[other]}): {cols[:8]}; set delimiter: {other!r}"
            )
            raise DataError(msg, [Problem(src.name, 1, None, "wrong_delimiter", msg)])
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        msg = f"{src.name}:1: header repeats column(s) {dupes}"
        raise DataError(msg, [Problem(src.name, 1, None, "missing_column", msg)])

    def records() -> Iterator[tuple[int, dict | None, str, Problem | None]]:
        prev_end = reader.line_num
        while True:
            start = prev_end + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                end = reader.line_num
                raw = "".join(lines[start - 1 : end])
                if "unexpected end of data" in str(e) or end >= len(lines):
                    msg = (
                        f"unterminated quoted field: the record starting here runs to the end of the file "
                        f"(lines {start}..{end}); the file is truncated or a quote is unbalanced"
                    )
                else:
                    msg = f"broken quoting ({e})"
                prev_end = end
                yield start, None, raw, Problem(src.name, start, None, "broken_quoting", msg, raw)
                continue
            end = reader.line_num
            raw = "".join(lines[start - 1 : end])
            prev_end = end
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line holds no record
            if len(row) != len(header):
                spans = f" (the record spans lines {start}..{end}: check quoting)" if end > start else ""
                msg = f"expected {len(header)} fields, found {len(row)}{spans}"
                if len(row) == 1 and _sniff_delimiter(raw, delimiter):
                    msg += "; the line looks delimited by another character"
                yield start, None, raw, Problem(src.name, start, None, "field_count", msg, raw)
                continue
            yield start, dict(zip(header, row)), raw, None

    return header, records()


def iter_jsonl(src: Source, text: str) -> tuple[list[str], Iterator[tuple[int, dict | None, str, Problem | None]]]:
    """Columns (union of keys of the first 1000 objects) and an iterator of records."""
    lines = text.splitlines()
    if not any(ln.strip() for ln in lines):
        raise DataError(
            f"{src.name}: file holds no JSON lines", [Problem(src.name, None, None, "empty_file", "no records")]
        )
    keys: dict[str, None] = {}
    for ln in lines[:1000]:
        try:
            obj = json.loads(ln)
        except ValueError:
            continue
        if isinstance(obj, dict):
            keys.update(dict.fromkeys(obj))

    def records() -> Iterator[tuple[int, dict | None, str, Problem | None]]:
        for i, ln in enumerate(lines, 1):
            if not ln.strip():
                continue
            try:
                obj = json.loads(ln)
            except ValueError as e:
                last = i == len(lines) and not text.endswith("\n")
                kind = "truncated" if last else "invalid_json"
                msg = f"invalid JSON ({e})" + ("; the last line is cut off, the file looks truncated" if last else "")
                yield i, None, ln, Problem(src.name, i, None, kind, msg, ln)
                continue
            if not isinstance(obj, dict):
                yield (
                    i,
                    None,
                    ln,
                    Problem(src.name, i, None, "invalid_json", f"expected a JSON object, got {type(obj).__name__}", ln),
                )
                continue
            yield i, obj, ln, None

    return list(keys), records()


def iter_parquet(
    src: Source, batch_size: int = 65536
) -> tuple[list[str], Iterator[tuple[int, dict | None, str, Problem | None]]]:
    table = src.table
    assert table is not None
    if table.num_rows == 0:
        raise DataError(
            f"{src.name}: Parquet file has no rows",
            [Problem(src.name, None, None, "empty_file", "no rows", unit="row")],
        )

    def records() -> Iterator[tuple[int, dict | None, str, Problem | None]]:
        row = 0
        for batch in table.to_batches(max_chunksize=batch_size):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec, None, None  # raw is rebuilt from fields when needed

    return list(table.column_names), records()


def iter_records(src: Source, encoding: str = "auto", delimiter: str | None = None):
    """Dispatch on format; returns ``(columns, records)``."""
    if src.format == "parquet":
        return iter_parquet(src)
    text = decode(src, encoding)
    if src.format == "jsonl":
        return iter_jsonl(src, text)
    delim = delimiter or ("\t" if src.format == "tsv" else ",")
    return iter_delimited(src, text, delim)
