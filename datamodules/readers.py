"""Reading relevance files: CSV, TSV, JSONL and Parquet, each plain or inside ``.zip``/``.gz``.

This layer only turns bytes into *records*: ``(line, fields, raw)`` where ``line`` is the 1-based
line (text formats: the line the record starts on) or row (Parquet) in the source, ``fields`` a
dict of column -> value, and ``raw`` the record's original text for the quarantine file. A record
that cannot be parsed at all (broken quoting, wrong field count, invalid JSON) comes back as a
:class:`Problem` instead. Whole-file failures (missing, empty, truncated archive, unreadable
Parquet) raise :class:`DataError`. Mapping columns to the example contract and checking values is
``validation``'s job.

Encodings (text formats, :func:`choose_encoding`): ``auto`` reads UTF-8 (a BOM is dropped). When the bytes
that are not UTF-8 outnumber the valid multi-byte UTF-8 characters more than :data:`UTF8_CORRUPTION_RATIO`
times over the whole text — the signature of a single-byte code page, like Home Depot's ``train.csv`` — it
falls back to cp1252 with a warning. cp1252 is decoded as the WHATWG
encoding standard does (the five bytes cp1252 leaves undefined map to the C1 code points of the
same value, as in every browser), so no byte is lost. A UTF-8 file with a few corrupt bytes stays
UTF-8 and the rows holding them are reported as ``undecodable``. Any other Python codec name is
accepted as given.

Records are read from a text's lines or a Parquet file's batches, once and in order, so the same
iterators serve a file read whole (:func:`iter_records` over :func:`~datamodules.file_bytes.open_source`)
and one streamed (``datamodules.stream_reader``); only JSON Lines looks ahead (its first 1000 lines, for
the columns). The bytes themselves (``.gz``, ``.zip``, size caps) are ``file_bytes``'s; ESCI's
two-file layout is ``products``'s.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

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
_SURROGATE = re.compile("[\udc80-\udcff]")
_CP1252_UNDEFINED = (0x81, 0x8D, 0x8F, 0x90, 0x9D)  # decoded as the C1 controls of the same value (WHATWG)


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


#: ``auto`` keeps a text UTF-8 while its invalid bytes number at most this many times its valid multi-byte
#: characters (a UTF-8 file with a few corrupt bytes); past that it is a single-byte code page (Home Depot's
#: train.csv: 529 invalid bytes against 14 accidental multi-byte sequences) and is read as cp1252
UTF8_CORRUPTION_RATIO = 4


class EncodingScan:
    """What :func:`choose_encoding` needs to know of a text, gathered chunk by chunk (or at once)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")("surrogateescape")
        self.bad = 0  # bytes that are not UTF-8
        self.good_multibyte = 0  # valid non-ASCII characters
        self.c1 = 0  # bytes cp1252 leaves undefined

    def feed(self, chunk: bytes, final: bool = False) -> None:
        self.feed_text(self._decoder.decode(chunk, final))
        if not chunk.isascii():
            self.c1 += sum(chunk.count(b) for b in _CP1252_UNDEFINED)

    def feed_text(self, text: str) -> None:
        if not text.isascii():
            bad = len(_SURROGATE.findall(text))
            self.bad += bad
            self.good_multibyte += len(text) - len(text.encode("ascii", "ignore")) - bad


def choose_encoding(name: str, encoding: str, scan: EncodingScan | None) -> tuple[str, str, str | None]:
    """``(codec, errors, warning)`` to decode a text with: ``encoding`` as given, or for ``auto`` UTF-8 unless
    the bytes that are not UTF-8 outnumber the valid multi-byte characters :data:`UTF8_CORRUPTION_RATIO` times,
    then cp1252 (WHATWG). ``scan`` is the whole text's :class:`EncodingScan` (None: it is valid UTF-8)."""
    if encoding in ("auto", "utf-8", "utf8", "utf-8-sig"):
        if scan is None or not scan.bad or encoding != "auto":
            return "utf-8-sig", "surrogateescape", None
        if scan.bad <= UTF8_CORRUPTION_RATIO * scan.good_multibyte:
            warning = f"{name}: {scan.bad} byte(s) are not valid UTF-8; rows holding them are reported"
            return "utf-8-sig", "surrogateescape", warning
        msg = f"{name}: not UTF-8 ({scan.bad} invalid byte(s)), read as cp1252"
        if scan.c1:
            msg += f" ({scan.c1} byte(s) undefined in cp1252 kept as C1 control characters)"
        return "cp1252", "ellm_mkd_whatwg", msg
    if encoding.replace("-", "").lower() in ("cp1252", "windows1252"):
        return "cp1252", "ellm_mkd_whatwg", None
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"{name}: unknown encoding {encoding!r}") from None
    return encoding, "surrogateescape", None


def decode(src: Source, encoding: str = "auto") -> str:
    """Decode a text source; undecodable bytes become lone surrogates for the validator to report."""
    data = src.data or b""
    scan = None
    if encoding in ("auto", "utf-8", "utf8", "utf-8-sig"):
        try:
            return data.decode("utf-8-sig")  # the common case: valid UTF-8, decoded at C speed
        except UnicodeDecodeError:
            scan = EncodingScan()
            scan.feed(data, final=True)
    codec, errors, warning = choose_encoding(src.name, encoding, scan)
    if warning:
        src.warnings.append(warning)
    return data.decode(codec, errors=errors)


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


Record = tuple[int, dict | None, str | None, Problem | None]


class _Lines:
    """The lines of a text as csv reads them, keeping those of the record being read (its raw text) and
    able to look ahead (is there more? is the text all blank?) without losing a line."""

    def __init__(self, lines: Iterable[str]):
        self._it = iter(lines)
        self._ahead: deque[str] = deque()
        self.held: list[str] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self._ahead.popleft() if self._ahead else next(self._it)
        self.held.append(line)
        return line

    def peek(self, k: int = 0) -> str | None:
        """The ``k``-th line not yet read (0: the next), or None past the end."""
        while len(self._ahead) <= k:
            line = next(self._it, None)
            if line is None:
                return None
            self._ahead.append(line)
        return self._ahead[k]

    def take(self) -> str:
        """The lines read since the last ``take``, joined."""
        raw = "".join(self.held)
        self.held.clear()
        return raw


def iter_delimited(name: str, text: Iterable[str], delimiter: str) -> tuple[list[str], Iterator[Record]]:
    """Header and an iterator of records from CSV/TSV ``text``: its lines as csv sees them (``\\n``,
    ``\\r\\n`` or ``\\r`` end one, not ``\\x0c`` or ``\\x85``: ``io.StringIO(text, newline="")`` or a
    ``TextIOWrapper`` with ``newline=""``), read once, in order (strict quoting)."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    lines = _Lines(text)
    k = 0
    while (first := lines.peek(k)) is not None and not first.strip():
        k += 1  # blank lines are looked past only to tell a blank text from a blank first line
    if first is None:
        raise DataError(f"{name}: file has no header line", [Problem(name, None, None, "empty_file", "no header line")])
    first = lines.peek()
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as e:
        raise DataError(
            f"{name}:1: cannot parse the header ({e})", [Problem(name, 1, None, "broken_quoting", f"header: {e}")]
        ) from None
    lines.take()
    if len(header) == 1:
        other = _sniff_delimiter(first, delimiter)
        if other is not None:
            cols = next(csv.reader([first.rstrip("\r\n")], delimiter=other))
            msg = (
                f"{name}:1: the header has one column with delimiter {delimiter!r} "
                f"({_DELIMS.get(delimiter, delimiter)}) "
                f"but {len(cols)} with {other!r} ({_DELIMS[other]}): {cols[:8]}; set delimiter: {other!r}"
            )
            raise DataError(msg, [Problem(name, 1, None, "wrong_delimiter", msg)])
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        msg = f"{name}:1: header repeats column(s) {dupes}"
        raise DataError(msg, [Problem(name, 1, None, "missing_column", msg)])

    def records() -> Iterator[Record]:
        prev_end = reader.line_num
        while True:
            start = prev_end + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                end = reader.line_num
                raw = lines.take()
                if "unexpected end of data" in str(e) or lines.peek() is None:
                    msg = (
                        f"unterminated quoted field: the record starting here runs to the end of the file "
                        f"(lines {start}..{end}); the file is truncated or a quote is unbalanced"
                    )
                else:
                    msg = f"broken quoting ({e})"
                prev_end = end
                yield start, None, raw, Problem(name, start, None, "broken_quoting", msg, raw)
                continue
            end = reader.line_num
            raw = lines.take()
            prev_end = end
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line holds no record
            if len(row) != len(header):
                spans = f" (the record spans lines {start}..{end}: check quoting)" if end > start else ""
                msg = f"expected {len(header)} fields, found {len(row)}{spans}"
                if len(row) == 1 and _sniff_delimiter(raw, delimiter):
                    msg += "; the line looks delimited by another character"
                yield start, None, raw, Problem(name, start, None, "field_count", msg, raw)
                continue
            yield start, dict(zip(header, row)), raw, None

    return header, records()


def iter_jsonl(name: str, text: Iterable[str], key_lines: int = 1000) -> tuple[list[str], Iterator[Record]]:
    """Columns (union of keys of the objects on the first ``key_lines`` lines, read ahead) and an iterator of
    records from JSON Lines ``text``: its lines ending at ``\\n`` only, each with its ``\\n``
    (``io.StringIO(text, newline="\\n")`` or a ``TextIOWrapper`` with ``newline="\\n"``), read once."""
    lines = _Lines(text)
    k = 0
    while (ln := lines.peek(k)) is not None and not ln.strip():
        k += 1
    if ln is None:
        raise DataError(f"{name}: file holds no JSON lines", [Problem(name, None, None, "empty_file", "no records")])
    keys: dict[str, None] = {}
    for k in range(key_lines):
        if (ln := lines.peek(k)) is None:
            break
        try:
            obj = json.loads(ln)
        except ValueError:
            continue
        if isinstance(obj, dict):
            keys.update(dict.fromkeys(obj))

    def records() -> Iterator[Record]:
        for i, full in enumerate(lines, 1):
            lines.take()
            ln = full.removesuffix("\n").removesuffix("\r")
            if not ln.strip():
                continue
            try:
                obj = json.loads(ln)
            except ValueError as e:
                last = not full.endswith("\n")  # only the last line can lack its line break
                kind = "truncated" if last else "invalid_json"
                msg = f"invalid JSON ({e})" + ("; the last line is cut off, the file looks truncated" if last else "")
                yield i, None, ln, Problem(name, i, None, kind, msg, ln)
                continue
            if not isinstance(obj, dict):
                msg = f"expected a JSON object, got {type(obj).__name__}"
                yield i, None, ln, Problem(name, i, None, "invalid_json", msg, ln)
                continue
            yield i, obj, ln, None

    return list(keys), records()


def iter_parquet(
    name: str, columns: list[str], num_rows: int, batches: Iterable[Any]
) -> tuple[list[str], Iterator[Record]]:
    """Columns and an iterator of records (row numbers from 1) from Arrow ``batches`` (record batches or
    tables) of a Parquet file of ``num_rows`` rows."""
    if num_rows == 0:
        raise DataError(
            f"{name}: Parquet file has no rows", [Problem(name, None, None, "empty_file", "no rows", unit="row")]
        )

    def records() -> Iterator[Record]:
        row = 0
        for batch in batches:
            for rec in batch.to_pylist():
                row += 1
                yield row, rec, None, None  # raw is rebuilt from fields when needed

    return list(columns), records()


def iter_records(src: Source, encoding: str = "auto", delimiter: str | None = None):
    """Dispatch on format; returns ``(columns, records)`` of a source read whole (:func:`open_source`)."""
    if src.format == "parquet":
        t = src.table
        return iter_parquet(src.name, t.column_names, t.num_rows, t.to_batches(max_chunksize=65536))
    text = decode(src, encoding)
    if src.format == "jsonl":
        return iter_jsonl(src.name, io.StringIO(text, newline="\n"))
    delim = delimiter or ("\t" if src.format == "tsv" else ",")
    return iter_delimited(src.name, io.StringIO(text, newline=""), delim)
