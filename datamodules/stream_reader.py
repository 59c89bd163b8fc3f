"""A data file read as a stream of records, as many times as asked, in memory that does not grow with it.

:class:`StreamSource` gives the same records as :func:`~datamodules.readers.iter_records` over a file read
whole, from the same record iterators, but never holds the file:

* text (CSV, TSV, JSON Lines; plain, ``.gz`` or a ``.zip`` member): a first pass reads the bytes once,
  :data:`~datamodules.file_bytes._CHUNK` at a time, through the same size caps (``too_large``,
  ``too_long``) and, for ``encoding: auto``, decides the encoding (:func:`~datamodules.readers.choose_encoding`
  over the whole text, so a valid UTF-8 file never becomes cp1252 mojibake). Each :meth:`StreamSource.records` then
  decodes the bytes again through a :class:`io.TextIOWrapper` reading :data:`STREAM_READ` bytes at a time,
  and csv (or ``json.loads``) reads it line by line.
* Parquet: ``pyarrow.parquet.ParquetFile.iter_batches``, ``batch_rows`` rows at a time (pyarrow holds
  one row group's column chunks while it decodes them: a file written with huge row groups costs that
  much). A ``.gz`` or zipped Parquet file is first copied, decompressed, to a temporary file (Parquet needs
  to seek), deleted on :meth:`StreamSource.close`.
* ESCI's two-Parquet layout: the products file is the catalog, held in memory whole as a table
  (:class:`~datamodules.products.ProductJoin`); the examples are joined to it in batches of at least
  :data:`_JOIN_BATCH_ROWS` rows (each join hashes the whole catalog).

A record whose quote is never closed runs to the end of the file (csv's reading, and its quarantine record
keeps its raw text whole), so such a file costs its size in memory once, as when read whole.

:class:`StreamStats` counts what was read and the most bytes one read took, so a test can check that
reading never takes the whole file.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .data_source import DataSource
from .file_bytes import _CHUNK, ReadStats, _too_large, open_binary, resolve_source, unreadable_parquet
from .products import ProductJoin
from .readers import (
    TEXT_FORMATS,
    DataError,
    EncodingScan,
    Record,
    _file_error,
    choose_encoding,
    iter_delimited,
    iter_jsonl,
    iter_parquet,
)

#: bytes one read takes from a text file while its records are read (the buffer under the text decoder)
STREAM_READ = 1 << 16
#: example rows per Parquet batch when a products file is joined (each join builds a hash of the catalog)
_JOIN_BATCH_ROWS = 1 << 16


@dataclass
class StreamStats(ReadStats):
    """What streaming read and held: ``bytes_read`` and ``peak_read`` (the most bytes one read took, every
    pass), ``records`` (records read by the passes that give rows) and ``peak_rows`` (the most example rows
    held at once: a chunk)."""

    records: int = 0
    peak_rows: int = 0


def _stamp(path: Any) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class StreamSource:
    """One data file of ``source``, opened for streaming. Each pass checks that the file has not changed since
    it was opened (size and modification time): the passes must read the same rows."""

    def __init__(self, source: DataSource, stats: StreamStats | None = None):
        self.source = source
        self.stats = stats if stats is not None else StreamStats()
        self.res = resolve_source(source.path, source.format, source.member)
        self._stamp = _stamp(self.res.path)
        self.name, self.format = self.res.name, self.res.format
        self.unit = "row" if self.format == "parquet" else "line"
        self.warnings: list[str] = []
        self._tmp: str | None = None
        self._join: ProductJoin | None = None
        try:
            if self.format in TEXT_FORMATS:
                self._scan()
            else:
                self._open_parquet()
        except BaseException:
            self.close()
            raise

    # -- text ------------------------------------------------------------------------------------
    def _scan(self) -> None:
        """The first pass over a text: caps checked, encoding decided."""
        src = self.source
        scan = EncodingScan() if src.encoding == "auto" else None  # other encodings are taken as given
        total = 0
        with open_binary(self.res, src.max_input_bytes, src.max_line_bytes, self.stats) as f:
            while chunk := f.read(_CHUNK):
                total += len(chunk)
                if scan is not None:
                    scan.feed(chunk)
        if not total:
            raise _file_error(self.name, "empty_file", "file is empty (0 bytes after decompression)")
        if src.products:
            raise DataError(
                f"{self.name}: products: is for the ESCI two-Parquet layout; the examples file must be Parquet"
            )
        if scan is not None:
            scan.feed(b"", final=True)
        self.codec, self.errors, warning = choose_encoding(self.name, src.encoding, scan)
        if warning:
            self.warnings.append(warning)

    # -- Parquet ---------------------------------------------------------------------------------
    def _open_parquet(self) -> None:
        src, res = self.source, self.res
        with open(res.path, "rb") as f:
            plain = res.member is None and f.read(2) != b"\x1f\x8b"
        path = str(res.path)
        if plain:
            if src.max_input_bytes is not None and res.path.stat().st_size > src.max_input_bytes:
                raise _too_large(self.name, src.max_input_bytes)
        else:  # decompressed to a file: Parquet is read by seeking
            fd, self._tmp = tempfile.mkstemp(suffix=".parquet", prefix="ellm-mkd-")
            with os.fdopen(fd, "wb") as out, open_binary(res, src.max_input_bytes, None, self.stats) as f:
                shutil.copyfileobj(f, out, _CHUNK)
            if not os.path.getsize(self._tmp):
                raise _file_error(self.name, "empty_file", "file is empty (0 bytes after decompression)")
            path = self._tmp
        try:
            self._pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise unreadable_parquet(self.name, e) from None
        schema = self._pf.schema_arrow
        self.columns = list(schema.names)
        if src.products:
            self._join = ProductJoin(self.name, schema, src.products, src.max_input_bytes)
            self.name = f"{self.name} + {self._join.name}"
            self.warnings += self._join.warnings
            self.columns = self._join.columns(self.columns)

    def _batches(self, batch_rows: int) -> Iterator[Any]:
        if self._join is not None:  # each join hashes the whole catalog: join few large batches, not many small
            batch_rows = max(batch_rows, _JOIN_BATCH_ROWS)
        try:
            for batch in self._pf.iter_batches(batch_size=batch_rows):
                yield batch if self._join is None else self._join.apply(pa.Table.from_batches([batch]))
        except (pa.ArrowInvalid, OSError) as e:
            raise unreadable_parquet(self.res.name, e) from None

    # -- records ---------------------------------------------------------------------------------
    @contextmanager
    def records(self, batch_rows: int = 4096) -> Iterator[tuple[list[str], Iterator[Record]]]:
        """``(columns, records)`` read from the start of the file, as :func:`~datamodules.readers.iter_records`
        gives them; Parquet ``batch_rows`` rows at a time."""
        if _stamp(self.res.path) != self._stamp:
            raise DataError(f"{self.res.name}: the file changed while it was being read; run again on a stable copy")
        if self.format == "parquet":
            yield iter_parquet(self.name, self.columns, self._pf.metadata.num_rows, self._batches(batch_rows))
            return
        src = self.source
        with open_binary(self.res, src.max_input_bytes, src.max_line_bytes, self.stats) as f:
            newline = "\n" if self.format == "jsonl" else ""
            text = io.TextIOWrapper(io.BufferedReader(f, STREAM_READ), self.codec, self.errors, newline)
            if self.format == "jsonl":
                yield iter_jsonl(self.name, text)
            else:
                yield iter_delimited(self.name, text, src.delimiter or ("\t" if self.format == "tsv" else ","))

    def close(self) -> None:
        if getattr(self, "_pf", None) is not None:
            self._pf.close()
            self._pf = None
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None

    def __enter__(self) -> StreamSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
