"""Validated examples of a source in chunks, in memory bounded by the chunk, not by the file:
what ``ellm-mkd score`` reads.

:func:`stream_examples` checks a source exactly as :func:`~datamodules.validation.load_examples` does (the
same :class:`~datamodules.record_check.RecordChecker`, :class:`~datamodules.record_check.PairLedger` and
:func:`~datamodules.record_check.close_report`: the same problems, messages, ``on_error`` policy, quarantine
file and report) and :meth:`ExampleStream.chunks` then gives the rows ``load_examples`` would keep, in the
same order and with the same values, ``chunk_rows`` at a time, as :data:`~ellm_mkd.schema.EXAMPLE_SCHEMA`
tables. Files are read as streams (:class:`~datamodules.stream_reader.StreamSource`):

1. a first pass checks every record and keeps no rows: only the file-wide state the checks need (each
   ``source_id``, and each pair's id with its first line, label and grade), the problems (the rejected
   records' text, for the error or the quarantine file, as ``load_examples`` holds them) and, after it, the
   lines to drop (duplicates, conflicts) and the grades to average. A problem found on an earlier row by a
   later one (a conflicting duplicate) gets that row's text from one more pass, only when there is one.
   Under ``on_error: error`` the file is refused here, before anything is scored;
2. each :meth:`ExampleStream.chunks` reads the file again, checks each record again (the same code) and
   gives the kept rows.

Splits are per row (``datamodules.splits``: a seeded hash of the normalised query; with a split column,
the row's own split, else the first split seen for its query, remembered per query). ``frequency`` and
``query_bucket`` need the whole file (a query's count, the traffic cut points) and nothing scored needs
them: they are left null. An example directory is streamed file by file (train, val, test), each checked
as ``load_examples`` checks it. ESCI's products file is held in memory whole (it is the catalog).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ellm_mkd.schema import normalize_text, rows_to_table

from .data_source import DataSource
from .load_report import LoadReport
from .readers import Problem
from .record_check import PairLedger, RecordChecker, check_columns, check_records, close_report, row_json
from .splits import QuerySplits
from .stream_reader import StreamSource, StreamStats
from .validation import example_dir_files, merge_reports


@dataclass
class _Checked:
    """What the first pass leaves of one file: what to drop, what to average, what it holds."""

    input: StreamSource
    source: DataSource
    split: str | None  # an example directory's file without a split column: the split of every row
    report: LoadReport
    dropped: set[int] = field(default_factory=set)
    averaged: dict[int, tuple] = field(default_factory=dict)  # line -> label, grade, gain
    rows: int = 0
    any_label: bool = False


class ExampleStream:
    """A checked source whose kept rows :meth:`chunks` reads; ``report`` is ``load_examples``'s report
    (``rows_loaded``: the rows kept, before any split is chosen). Close it (or use ``with``) to delete
    temporary files."""

    def __init__(self, source: DataSource, chunk_rows: int = 4096, stats: StreamStats | None = None):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.source, self.chunk_rows = source, chunk_rows
        self.stats = stats if stats is not None else StreamStats()
        self._stack = ExitStack()
        self._files: list[_Checked] = []
        try:
            if Path(source.path).is_dir():
                for sub, split in example_dir_files(source):
                    started = any(f.report.quarantine_path for f in self._files)
                    checked = self._check(sub, started)
                    if "split" not in pq.read_schema(sub.path).names:
                        checked.split = split
                self.report = merge_reports(source, [f.report for f in self._files])
            else:
                self.report = self._check(source, False).report
        except BaseException:
            self.close()
            raise

    @property
    def rows(self) -> int:
        """Rows kept, in all splits."""
        return sum(f.rows for f in self._files)

    def any_label(self) -> bool:
        """Does a kept row (of any split) carry a label?"""
        return any(f.any_label for f in self._files)

    @property
    def _batch_rows(self) -> int:
        return min(max(self.chunk_rows, 1024), 65536)  # Parquet rows decoded at a time

    def _check(self, source: DataSource, append_quarantine: bool) -> _Checked:
        """The first pass over one file (see the module docstring)."""
        inp = self._stack.enter_context(StreamSource(source, stats=self.stats))
        problems: list[Problem] = []
        with inp.records(self._batch_rows) as (columns, records):
            mapping = source.resolved_mapping()
            examples = source.preset == "examples"
            check_columns(inp.name, columns, mapping, source.require_label, inp.unit, examples)
            report = LoadReport(file=inp.name, format=inp.format, scheme=source.resolved_scheme().describe())
            checker = RecordChecker(source, inp.name, columns, inp.unit, report)
            ledger = PairLedger(checker, report)
            for _ in check_records(records, checker, ledger, problems):
                pass
        if ledger.raw_wanted:
            self._fill_raw(inp, source, ledger.raw_wanted)
        close_report(source, checker, ledger, problems, inp.warnings, append_quarantine)
        report.rows_loaded = ledger.kept()
        checked = _Checked(inp, source, None, report, ledger.dropped, {ln: ledger.averaged(ln) for ln in ledger.grades})
        checked.rows, checked.any_label = ledger.kept(), ledger.any_label()
        self._files.append(checked)
        return checked

    def _fill_raw(self, inp: StreamSource, source: DataSource, wanted: dict[int, Problem]) -> None:
        """The text of earlier rows made bad by later ones: the rows as checked (``load_examples`` has them)."""
        left = set(wanted)
        with inp.records(self._batch_rows) as (columns, records):
            checker = RecordChecker(source, inp.name, columns, inp.unit, LoadReport(file=inp.name))
            for line, rec, raw, prob in records:
                if line in left and prob is None:
                    row, _ = checker.check(line, rec, raw)
                    wanted[line].raw = row_json(row)
                    left.discard(line)
                    if not left:
                        return

    def chunks(self, split: str = "all") -> Iterator[pa.Table]:
        """The kept rows (of ``split``, or all), in file order, ``chunk_rows`` at a time (the last chunk
        may hold fewer); each call reads the files again."""
        rows: list[dict] = []
        for f in self._files:
            if split != "all" and f.split is not None and f.split != split:
                continue  # a file of an example directory holds one split
            keep_existing = bool(f.source.resolved_mapping().split)
            s = f.source.split
            assign = QuerySplits(s.seed, s.val_fraction, s.test_fraction, keep_existing, remember=False)
            with f.input.records(self._batch_rows) as (columns, records):
                checker = RecordChecker(f.source, f.input.name, columns, f.input.unit, LoadReport(file=f.input.name))
                for line, rec, raw, prob in records:
                    self.stats.records += 1
                    if prob is not None or line in f.dropped:
                        continue
                    row, _ = checker.check(line, rec, raw)
                    if row is None:
                        continue
                    if line in f.averaged:
                        row["label"], row["grade"], row["gain"] = f.averaged[line]
                    row_split = f.split or assign(normalize_text(row["query"]), row.get("split"))
                    if split != "all" and row_split != split:
                        continue
                    row["split"] = row_split
                    row.pop("frequency", None)
                    rows.append(row)
                    self.stats.peak_rows = max(self.stats.peak_rows, len(rows))
                    if len(rows) >= self.chunk_rows:
                        yield rows_to_table(rows)
                        rows = []
        if rows:
            yield rows_to_table(rows)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> ExampleStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stream_examples(source: DataSource, chunk_rows: int = 4096, stats: StreamStats | None = None) -> ExampleStream:
    """Check ``source`` (raising, or quarantining, as ``load_examples`` does) and return its
    :class:`ExampleStream`. Memory: one chunk of rows, one read buffer (1 MiB while a text's bytes are first
    scanned, then :data:`~datamodules.stream_reader.STREAM_READ` bytes of text, or one Parquet batch), plus
    per row only the ids and hashes the file-wide checks need while the first pass runs, and the problems
    found (the rejected records)."""
    return ExampleStream(source, chunk_rows, stats)
