"""Data files as bytes: plain, ``.gz`` or a ``.zip`` member, read whole (:func:`open_source`) or as a stream
(:func:`open_binary`), both through the same size caps.

A file (or ``.gz``/zip member) is read and decompressed as a stream that stops with a :class:`DataError`
once it passes ``max_bytes`` (``too_large``) or, in a text format, a line passes ``max_line_bytes``
(``too_long``). A small ``.gz`` inflating to hundreds of megabytes fails in milliseconds, holding one chunk
of it. A truncated or corrupt archive is a ``truncated`` :class:`DataError` wherever reading finds it.
"""

from __future__ import annotations

import gzip
import io
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .readers import FORMATS, TEXT_FORMATS, DataError, Source, _file_error, detect_format

_CHUNK = 1 << 20  # bytes read (or decompressed) at a time: a file read whole, or streaming's first pass


def _too_large(name: str, max_bytes: int) -> DataError:
    msg = f"more than max_input_bytes={max_bytes:,} bytes (after decompression); stopped reading"
    return _file_error(name, "too_large", msg + ". Raise max_input_bytes if the data really is this large")


class _Cap:
    """Checks a stream's bytes as they pass, in order: :class:`DataError` past ``max_bytes`` in all or past
    ``max_line_bytes`` between two line breaks (``\\n`` or ``\\r``). Where the chunks fall does not matter."""

    def __init__(self, name: str, max_bytes: int | None, max_line_bytes: int | None):
        self.name, self.max_bytes, self.max_line_bytes = name, max_bytes, max_line_bytes
        self.total, self.run, self.lines = 0, 0, 1  # run: bytes of the line still open after the last chunk

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.max_bytes is not None and self.total > self.max_bytes:
            raise _too_large(self.name, self.max_bytes)
        if self.max_line_bytes is None:
            return
        lengths = [len(x) for x in chunk.replace(b"\r", b"\n").split(b"\n")]
        lengths[0] += self.run
        over = next((i for i, n in enumerate(lengths) if n > self.max_line_bytes), None)
        if over is not None:  # the line over the cap starts at this chunk's offset ``start`` (or before it)
            start = sum(lengths[:over]) - self.run + over if over else 0
            at = self.lines + chunk[:start].count(b"\n")
            msg = f"a line longer than {self.max_line_bytes:,} bytes (a field far over max_field_chars, or not a "
            raise _file_error(self.name, "too_long", msg + "line-based file); stopped reading", at)
        self.run = lengths[-1]
        self.lines += chunk.count(b"\n")


@dataclass
class Resolved:
    """Where a source's bytes are: the file, the zip member (if any), the display name and the format."""

    path: Path
    name: str
    format: str
    member: str | None = None


def resolve_source(path: str | Path, fmt: str = "auto", member: str | None = None) -> Resolved:
    """Check that ``path`` is a readable, non-empty file (or zip holding ``member``) and tell its format."""
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise DataError(f"{name}: file not found")
    if p.is_dir():
        raise DataError(f"{name}: is a directory, expected a data file")
    if p.stat().st_size == 0:
        raise _file_error(name, "empty_file", "file is empty (0 bytes)")
    inner = p.name
    if zipfile.is_zipfile(p) or p.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(p) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/") and not n.startswith("__MACOSX/")]
        except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, zlib.error) as e:
            raise _file_error(name, "truncated", f"truncated or corrupt zip archive ({e})") from None
        if member is None:
            if len(names) != 1:
                raise DataError(f"{name}: zip holds {len(names)} files {names[:10]}; set member to choose one")
            member = names[0]
        elif member not in names:
            raise DataError(f"{name}: zip has no member {member!r}; members: {names[:10]}")
        inner, name = member, f"{name}::{member}"
    else:
        member = None
    fmt = detect_format(inner) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise DataError(f"{name}: unknown format {fmt!r}; choose one of {list(FORMATS)}")
    return Resolved(p, name, fmt, member)


@dataclass
class ReadStats:
    """What reading has held: bytes read in all, and the most bytes one read took (the reader's buffer)."""

    bytes_read: int = 0
    peak_read: int = 0


class _Meter(io.RawIOBase):
    """The (decompressed) bytes of a member, checked by a :class:`_Cap` and counted as they are read;
    a truncated or corrupt archive becomes a :class:`DataError`."""

    def __init__(self, inner: Any, res: Resolved, cap: _Cap, gz: bool, stats: ReadStats | None):
        self.inner, self.res, self.cap, self.gz, self.stats = inner, res, cap, gz, stats

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            data = self.inner.read(len(b))
        except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
            raise _file_error(self.res.name, "truncated", f"truncated or corrupt zip archive ({e})") from None
        except (EOFError, OSError, zlib.error) as e:
            if self.gz:
                raise _file_error(self.res.name, "truncated", f"truncated or corrupt gzip stream ({e})") from None
            if self.res.member is None or isinstance(e, OSError):
                raise
            raise _file_error(self.res.name, "truncated", f"truncated or corrupt zip archive ({e})") from None
        self.cap.feed(data)
        if self.stats is not None:
            self.stats.bytes_read += len(data)
            self.stats.peak_read = max(self.stats.peak_read, len(data))
        b[: len(data)] = data
        return len(data)


@contextmanager
def open_binary(
    res: Resolved, max_bytes: int | None = None, max_line_bytes: int | None = None, stats: ReadStats | None = None
) -> Iterator[_Meter]:
    """The bytes of ``res`` (a gzip stream decompressed), read through the caps (see :class:`_Cap`)."""
    with ExitStack() as stack:
        try:
            if res.member is not None:
                zf = stack.enter_context(zipfile.ZipFile(res.path))
                f = stack.enter_context(zf.open(res.member))
            else:
                f = stack.enter_context(open(res.path, "rb"))
            gz = f.peek(2)[:2] == b"\x1f\x8b"
        except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, zlib.error) as e:
            raise _file_error(res.name, "truncated", f"truncated or corrupt zip archive ({e})") from None
        inner = stack.enter_context(gzip.GzipFile(fileobj=f)) if gz else f
        yield _Meter(inner, res, _Cap(res.name, max_bytes, max_line_bytes), gz, stats)


def read_all(f: Any) -> bytes:
    """Every byte of ``f``, read :data:`_CHUNK` at a time."""
    chunks = []
    while chunk := f.read(_CHUNK):
        chunks.append(chunk)
    return b"".join(chunks)


def open_source(
    path: str | Path,
    fmt: str = "auto",
    member: str | None = None,
    max_bytes: int | None = None,
    max_line_bytes: int | None = None,
) -> Source:
    """Read a file (plain, ``.gz`` or ``.zip``) into memory, raising :class:`DataError` on failure.
    ``max_bytes`` caps the (decompressed) bytes read, ``max_line_bytes`` one line of a text format."""
    res = resolve_source(path, fmt, member)
    with open_binary(res, max_bytes, max_line_bytes if res.format in TEXT_FORMATS else None) as f:
        raw = read_all(f)
    if not raw:
        raise _file_error(res.name, "empty_file", "file is empty (0 bytes after decompression)")
    if res.format == "parquet":
        try:
            table = pq.read_table(io.BytesIO(raw))
        except (pa.ArrowInvalid, OSError) as e:
            raise unreadable_parquet(res.name, e) from None
        return Source(res.name, res.format, table=table)
    return Source(res.name, res.format, data=raw)


def unreadable_parquet(name: str, e: Exception) -> DataError:
    return _file_error(name, "truncated", f"not a readable Parquet file, truncated or corrupt ({e})", unit="row")
