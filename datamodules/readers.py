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

Size caps (:func:`open_source`): a file (or ``.gz``/zip member) is read and decompressed as a stream
that stops with a :class:`DataError` once it passes ``max_bytes`` (``too_large``) or, in a text
format, a line passes ``max_line_bytes`` (``too_long``). A small ``.gz`` inflating to hundreds of
megabytes fails in milliseconds, holding one chunk of it. :func:`join_products`: ESCI's layout.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import logging
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
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
_CHUNK = 1 << 20  # bytes read (or decompressed) at a time
_SURROGATE = re.compile("[\udc80-\udcff]")


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


def _file_error(name: str, kind: str, msg: str, line: int | None = None, unit: str = "line") -> DataError:
    """A whole-file :class:`DataError` with its one :class:`Problem`."""
    return DataError(
        f"{name}:{line}: {msg}" if line else f"{name}: {msg}", [Problem(name, line, None, kind, msg, unit=unit)]
    )


def _read_capped(stream: Any, name: str, max_bytes: int | None, max_line_bytes: int | None) -> bytes:
    """All bytes of a stream, stopping with :class:`DataError` past ``max_bytes`` in all or past
    ``max_line_bytes`` between two line breaks (``\\n`` or ``\\r``)."""
    chunks: list[bytes] = []
    total, run, lines = 0, 0, 1  # run: bytes of the line still open at the end of the last chunk
    while True:
        chunk = stream.read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if max_bytes is not None and total > max_bytes:
            msg = f"more than max_input_bytes={max_bytes:,} bytes (after decompression); stopped reading"
            raise _file_error(name, "too_large", msg + ". Raise max_input_bytes if the data really is this large")
        if max_line_bytes is not None:
            lengths = [len(x) for x in chunk.replace(b"\r", b"\n").split(b"\n")]
            lengths[0] += run
            over = next((i for i, n in enumerate(lengths) if n > max_line_bytes), None)
            if over is not None:
                at = lines + chunk[: sum(lengths[:over]) - run + over].count(b"\n")
                msg = f"a line longer than {max_line_bytes:,} bytes (a field far over max_field_chars, or not a "
                raise _file_error(name, "too_long", msg + "line-based file); stopped reading", at)
            run = lengths[-1]
            lines += chunk.count(b"\n")
        chunks.append(chunk)


def _read_member(stream: Any, name: str, max_bytes: int | None, max_line_bytes: int | None) -> bytes:
    """A plain or gzip-compressed stream, capped (:func:`_read_capped`)."""
    if stream.peek(2)[:2] == b"\x1f\x8b":
        try:
            return _read_capped(gzip.GzipFile(fileobj=stream), name, max_bytes, max_line_bytes)
        except (EOFError, OSError, zlib.error) as e:
            raise _file_error(name, "truncated", f"truncated or corrupt gzip stream ({e})") from None
    return _read_capped(stream, name, max_bytes, max_line_bytes)


def open_source(
    path: str | Path,
    fmt: str = "auto",
    member: str | None = None,
    max_bytes: int | None = None,
    max_line_bytes: int | None = None,
) -> Source:
    """Read a file (plain, ``.gz`` or ``.zip``) into memory, raising :class:`DataError` on failure.
    ``max_bytes`` caps the (decompressed) bytes read, ``max_line_bytes`` one line of a text format."""
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise DataError(f"{name}: file not found")
    if p.is_dir():
        raise DataError(f"{name}: is a directory, expected a data file")
    if p.stat().st_size == 0:
        raise _file_error(name, "empty_file", "file is empty (0 bytes)")
    inner = p.name
    zipped = zipfile.is_zipfile(p) or p.suffix.lower() == ".zip"
    zf = None
    try:
        zf = zipfile.ZipFile(p) if zipped else None
        if zf is not None:
            names = [n for n in zf.namelist() if not n.endswith("/") and not n.startswith("__MACOSX/")]
            if member is None:
                if len(names) != 1:
                    raise DataError(f"{name}: zip holds {len(names)} files {names[:10]}; set member to choose one")
                member = names[0]
            elif member not in names:
                raise DataError(f"{name}: zip has no member {member!r}; members: {names[:10]}")
            inner, name = member, f"{name}::{member}"
        fmt = detect_format(inner) if fmt == "auto" else fmt
        if fmt not in FORMATS:
            raise DataError(f"{name}: unknown format {fmt!r}; choose one of {list(FORMATS)}")
        line_cap = max_line_bytes if fmt in TEXT_FORMATS else None
        with zf.open(member) if zf is not None else open(p, "rb") as f:
            raw = _read_member(f, name, max_bytes, line_cap)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, zlib.error) as e:
        raise _file_error(name, "truncated", f"truncated or corrupt zip archive ({e})") from None
    finally:
        if zf is not None:
            zf.close()
    if not raw:
        raise _file_error(name, "empty_file", "file is empty (0 bytes after decompression)")
    if fmt == "parquet":
        try:
            table = pq.read_table(io.BytesIO(raw))
        except (pa.ArrowInvalid, OSError) as e:
            msg = f"not a readable Parquet file, truncated or corrupt ({e})"
            raise _file_error(name, "truncated", msg, unit="row") from None
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
        try:
            return data.decode("utf-8-sig")  # the common case: valid UTF-8, decoded at C speed
        except UnicodeDecodeError:
            pass
        text = data.decode("utf-8-sig", errors="surrogateescape")
        if encoding != "auto":
            return text
        bad = len(_SURROGATE.findall(text))
        good_multibyte = len(text) - len(text.encode("ascii", "ignore")) - bad  # valid non-ASCII characters
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
    lines = io.StringIO(text, newline="").readlines()  # the lines csv sees: \n, \r\n or \r end one, not \x0c or \x85
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
    lines = [ln.removesuffix("\r") for ln in text.split("\n")]  # JSON Lines ends a line at \n only
    if lines and lines[-1] == "":
        lines.pop()
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


JOIN_KEYS = ("product_locale", "product_id")


def _join_key(s: Source, what: str, warnings: list[str]) -> pa.ChunkedArray:
    """``product_locale`` and ``product_id`` of one side as one text key per row (integers as their
    decimal text, with a warning; an all-null or non-text, non-integer column is a :class:`DataError`)."""
    cols = []
    for k in JOIN_KEYS:
        col = s.table.column(k)
        t = col.type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if pa.types.is_integer(t):
            warnings.append(f"{s.name}: join column {k!r} is {t}; its values are matched as decimal text")
        elif not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            why = "is all null (an empty column)" if pa.types.is_null(t) else f"is {t}, not text or integers"
            msg = f"join column {k!r} {why}; the {what} file needs text {list(JOIN_KEYS)}"
            raise DataError(f"{s.name}: {msg}", [Problem(s.name, None, k, "bad_value", msg, unit="row")])
        cols.append(pc.cast(col, pa.string()))
    return pc.binary_join_element_wise(*cols, "\x1f")


def join_products(src: Source, products_path: str, max_bytes: int | None = None) -> Source:
    """ESCI layout: each example row of ``src`` (Parquet) with the columns of its product, looked up by
    ``(product_locale, product_id)`` in the products Parquet. Rows and order stay the examples';
    ``__has_product`` says whether the product was found. A key that the products file holds twice
    is a :class:`DataError` naming the products file, the key and its rows."""
    prod = open_source(products_path, "parquet", max_bytes=max_bytes)
    for s, what in ((src, "examples"), (prod, "products")):
        missing = [k for k in JOIN_KEYS if k not in s.table.column_names]
        if missing:
            raise DataError(
                f"{s.name}: the {what} file lacks join column(s) {missing}",
                [
                    Problem(s.name, None, m, "missing_column", f"join column {m!r} not found", unit="row")
                    for m in missing
                ],
            )
    warnings = src.warnings + prod.warnings
    ex_key, prod_key = _join_key(src, "examples", warnings), _join_key(prod, "products", warnings)
    counts = pa.table({"key": prod_key}).group_by("key").aggregate([("key", "count")])
    dups = counts.filter((pc.field("key_count") > 1) & pc.is_valid(pc.field("key")))["key"]
    if len(dups):
        rows: dict[str, list[int]] = {}
        for i in pc.indices_nonzero(pc.is_in(prod_key, value_set=dups)).to_pylist():
            rows.setdefault(prod_key[i].as_py(), []).append(i + 1)
        problems = []
        for key, at in sorted(rows.items(), key=lambda kv: kv[1][0]):
            msg = f"product {tuple(key.split(chr(31), 1))} appears {len(at)} times, at rows {at[:10]}"
            problems.append(Problem(prod.name, at[0], "product_id", "duplicate_id", msg, unit="row"))
        shown = "; ".join(x.message for x in problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise DataError(
            f"{prod.name}: {len(problems)} (product_locale, product_id) key(s) appear more than once, so an "
            f"example could not tell which product it means: {shown}. Keep one row per key",
            problems,
        )
    index = pc.index_in(ex_key, value_set=prod_key)
    found = pc.is_valid(index)
    products = prod.table.drop_columns([c for c in prod.table.column_names if c in src.table.column_names])
    joined = src.table
    for name, col in zip(products.column_names, products.take(index).columns):
        joined = joined.append_column(name, col)
    joined = joined.append_column("__has_product", found)
    return Source(f"{src.name} + {prod.name}", "parquet", table=joined, warnings=warnings)
