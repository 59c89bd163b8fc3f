"""From a source file to validated examples: column mapping, label scheme, problems, policy.

:func:`load_examples` reads a :class:`DataSource` and returns the example table (``schema``) with
splits and buckets assigned, plus a :class:`LoadReport`. Every problem is located by file, line
(or Parquet row) and column. The policy ``on_error`` decides what happens to problem rows:

``error`` (default)   read the whole file, then raise :class:`DataError` listing the problems
                      (the first ``max_problems_shown`` and a count per kind), so one run shows
                      them all; nothing is loaded.
``quarantine``        write each problem row, with its location and reason, as a JSON line to
                      the quarantine file, load the rest, and count the rejects in the report.

Problems that make the whole file unusable (not found, empty, truncated archive, unreadable Parquet,
a mapped column missing, wrong delimiter) raise under either policy. Exact duplicate pairs (same
query and item, same label) are merged, keeping the first, and counted in the report; duplicates
that disagree on the label are problems on every row involved. Nothing is dropped unreported.

The checks themselves (each record, then the file-wide ones: ids, duplicate pairs) are
``record_check``'s, shared with the streaming path (``datamodules.streaming``, what ``ellm-mkd score``
reads), so both report the same problems the same way.

Problem kinds: missing_column, wrong_delimiter, empty_file, truncated, broken_quoting,
field_count, invalid_json, empty_field, bad_label, undecodable, too_long, too_large, duplicate_id,
conflicting_duplicate, missing_product, bad_value, control_chars.

Text fields: a value that is not text (JSON or Parquet numbers, bytes; lists and dicts outside
``bullets``, ``attributes`` and ``description``, where they are the natural shape) is read as text
and counted per column in ``LoadReport.converted`` with a warning; booleans, dates and nested
lists are ``bad_value``. Control characters (:data:`datamodules.text.CONTROL_CHARS`: NUL, ESC and
the other C0 controls but tab/newline/CR, DEL, C1, bidi overrides and isolates) follow
``control_chars``: ``strip`` (default) or ``keep``, counted per column in
``LoadReport.control_chars`` with a warning, or ``reject`` (a ``control_chars`` problem).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ellm_mkd.schema import rows_to_table

from .data_source import PRESETS as PRESETS
from .data_source import ColumnMapping as ColumnMapping
from .data_source import DataSource
from .data_source import SplitOptions as SplitOptions
from .file_bytes import open_source
from .labels import LabelScheme
from .load_report import LoadReport, quarantine_file
from .products import join_products
from .readers import DataError, Problem, iter_records
from .record_check import PairLedger, RecordChecker, check_columns, check_records, close_report
from .splits import assign_splits

PROBLEM_KINDS = (
    "missing_column",
    "wrong_delimiter",
    "empty_file",
    "truncated",
    "broken_quoting",
    "field_count",
    "invalid_json",
    "empty_field",
    "bad_label",
    "undecodable",
    "too_long",
    "too_large",
    "duplicate_id",
    "conflicting_duplicate",
    "missing_product",
    "bad_value",
    "control_chars",
)


def load_examples(source: DataSource, append_quarantine: bool = False) -> tuple[pa.Table, LoadReport]:
    """Read, map, validate and split one source. See the module docstring for the policy.
    ``append_quarantine`` adds this source's rejects to the quarantine file instead of replacing it."""
    path = Path(source.path)
    if path.is_dir():
        return _load_example_dir(source)
    src = open_source(path, source.format, source.member, source.max_input_bytes, source.max_line_bytes)
    if source.products:
        if src.format != "parquet":
            raise DataError(
                f"{src.name}: products: is for the ESCI two-Parquet layout; the examples file must be Parquet"
            )
        src = join_products(src, source.products, source.max_input_bytes)
    mapping = source.resolved_mapping()
    columns, records = iter_records(src, source.encoding, source.delimiter)
    unit = "row" if src.format == "parquet" else "line"
    check_columns(src.name, columns, mapping, source.require_label, unit, source.preset == "examples")
    report = LoadReport(file=src.name, format=src.format, scheme=source.resolved_scheme().describe())
    checker = RecordChecker(source, src.name, columns, unit, report)
    rows: dict[int, dict] = {}  # line -> row, for every row kept so far
    ledger = PairLedger(checker, report, rows.get)
    problems: list[Problem] = []
    for row in check_records(records, checker, ledger, problems):
        rows[row["source_line"]] = row
    for line in ledger.grades:
        rows[line]["label"], rows[line]["grade"], rows[line]["gain"] = ledger.averaged(line)
    close_report(source, checker, ledger, problems, src.warnings, append_quarantine)
    table = rows_to_table([r for line, r in rows.items() if line not in ledger.bad_lines])
    table = assign_splits(table, keep_existing_split=bool(mapping.split), **asdict(source.split))
    report.rows_loaded = table.num_rows
    return table, report


def example_dir_files(source: DataSource) -> list[tuple[DataSource, str]]:
    """The split files of an example directory, each as its own source (sharing one quarantine file), and
    the split its rows belong to when they carry none."""
    d = Path(source.path)
    files = [d / f"{s}.parquet" for s in ("train", "val", "test") if (d / f"{s}.parquet").exists()]
    if not files:
        raise DataError(f"{d}: directory holds none of train.parquet, val.parquet, test.parquet")
    quarantine = str(quarantine_file(source))
    return [
        (
            replace(
                source, path=str(f), preset=source.preset or "examples", format="parquet", quarantine_path=quarantine
            ),
            f.stem,
        )
        for f in files
    ]


def merge_reports(source: DataSource, reports: list[LoadReport]) -> LoadReport:
    """One report for an example directory from its files' reports."""
    report = LoadReport(file=str(source.path), format="examples", scheme=reports[0].scheme)
    for r in reports:
        report.rows_read += r.rows_read
        report.rows_loaded += r.rows_loaded
        report.duplicates_merged += r.duplicates_merged
        report.conflicts_averaged += r.conflicts_averaged
        report.rows_rejected += r.rows_rejected
        report.warnings += r.warnings
        for what in (report.converted, report.control_chars):
            for k, v in (r.converted if what is report.converted else r.control_chars).items():
                what[k] = what.get(k, 0) + v
        for k, v in r.rejected.items():
            report.rejected[k] = report.rejected.get(k, 0) + v
        report.quarantine_path = report.quarantine_path or r.quarantine_path
    return report


def _load_example_dir(source: DataSource) -> tuple[pa.Table, LoadReport]:
    """A directory of ``train/val/test.parquet`` example files (the synthetic catalog's output)."""
    tables, reports = [], []
    # one quarantine file for the directory: the first split file with rejects starts it, the others add
    for sub, split in example_dir_files(source):
        started = any(r.quarantine_path for r in reports)
        t, r = load_examples_file_keep_split(sub, split, append_quarantine=started)
        tables.append(t)
        reports.append(r)
    table = pa.concat_tables(tables)
    report = merge_reports(source, reports)
    # Buckets and frequencies are recomputed over all splits together (a file's split is kept).
    table = assign_splits(table, keep_existing_split=True, **asdict(source.split))
    return table, report


def load_examples_file_keep_split(
    source: DataSource, split: str, append_quarantine: bool = False
) -> tuple[pa.Table, LoadReport]:
    """Load one example file whose rows all belong to ``split`` (when they carry no split of their own)."""
    table, report = load_examples(source, append_quarantine)
    if "split" not in pq.read_schema(source.path).names:
        table = table.set_column(table.column_names.index("split"), "split", pa.array([split] * table.num_rows))
    return table, report


def summarize(table: pa.Table, scheme: LabelScheme) -> dict[str, Any]:
    """Counts a person checks first: rows, queries, items, labels, buckets per split."""
    from ellm_mkd.schema import normalize_text

    from .splits import split_summary

    labels = Counter(table.column("label").to_pylist())
    return {
        "rows": table.num_rows,
        "queries": len({normalize_text(q) for q in table.column("query").to_pylist()}),
        "query_strings": len(set(table.column("query").to_pylist())),
        "items": len(set(table.column("item_id").to_pylist())),
        "labels": {
            scheme.level_names[k] if k is not None else "unlabelled": labels[k]
            for k in sorted(labels, key=lambda x: -1 if x is None else x)
        },
        "splits": split_summary(table),
    }
