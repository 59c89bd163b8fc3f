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

import difflib
import json
import math
import re
from collections import Counter
from dataclasses import asdict, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ellm_mkd.schema import DIMENSIONS, VERDICTS, make_example_id, rows_to_table

from .data_source import PRESETS as PRESETS
from .data_source import ColumnMapping, DataSource
from .data_source import SplitOptions as SplitOptions
from .labels import LabelError, LabelScheme
from .load_report import LoadReport, _problem_message, _write_quarantine, quarantine_file
from .readers import DataError, Problem, iter_records, join_products, open_source
from .splits import assign_splits
from .text import CONTROL_CHARS, strip_control_chars

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
_TEXT_FIELDS = ("query", "title", "brand", "color", "description", "bullets", "attributes")
_LIST_FIELDS = ("description", "bullets", "attributes")  # a list or dict value is their natural shape
_SURROGATE = re.compile("[\udc80-\udcff]")


class _NotText(ValueError):
    """A value that cannot stand for text (a boolean, a date, a nested list ...)."""


def _text(value: Any, natural_lists: bool = True) -> tuple[str | None, str | None]:
    """Source value -> (text, the kind of non-text value it was read from, or None). Lists are joined by
    newlines, dicts written ``key: value; ...``; with ``natural_lists`` these are not counted as conversions.
    Raises :class:`_NotText` for values that do not stand for text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, None
    if isinstance(value, str):
        return value, None
    if isinstance(value, bool):
        raise _NotText(f"expected text, got a boolean ({value})")
    if isinstance(value, int | float | Decimal):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value), "number"
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape"), "bytes"
    if isinstance(value, dict):
        if any(isinstance(v, list | dict) for v in value.values()):
            raise _NotText("expected text, got a nested dict")
        return "; ".join(f"{k}: {v}" for k, v in value.items() if v is not None), None if natural_lists else "dict"
    if isinstance(value, list | tuple):
        if any(isinstance(v, list | tuple | dict | bool) for v in value):
            raise _NotText("expected text or a list of texts, got a nested list")
        return "\n".join(str(v) for v in value if v is not None), None if natural_lists else "list"
    raise _NotText(f"expected text, got {type(value).__name__} ({value!r:.40})")


def _check_columns(
    name: str,
    columns: list[str],
    mapping: ColumnMapping,
    require_label: bool,
    unit: str,
    optional_may_be_absent: bool = False,
) -> None:
    """Every mapped column must exist (for the project's own example files, only the required ones)."""
    problems = []
    required = {"query", "title"} | ({"label"} if require_label else set())
    for fld, col in mapping.used().items():
        if col in columns or (optional_may_be_absent and fld not in required) or (fld == "label" and not require_label):
            continue  # unlabelled pairs (require_label: false) may have no label column at all
        close = difflib.get_close_matches(col, columns, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(
            Problem(
                name,
                1 if unit == "line" else None,
                col,
                "missing_column",
                f"column {col!r} (mapping.{fld}) not found; the file has {columns}{hint}",
                unit=unit,
            )
        )
    if problems:
        raise DataError(f"{name}: " + "; ".join(p.message for p in problems), problems)


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
    scheme = source.resolved_scheme()
    columns, records = iter_records(src, source.encoding, source.delimiter)
    unit = "row" if src.format == "parquet" else "line"
    _check_columns(src.name, columns, mapping, source.require_label, unit, source.preset == "examples")
    report = LoadReport(file=src.name, format=src.format, scheme=scheme.describe())

    rows: list[dict] = []
    problems: list[Problem] = []
    bad_rows: set[int] = set()  # indexes into rows of rows that turned out bad later (conflicts)
    first_by_source_id: dict[str, int] = {}
    first_by_example: dict[str, int] = {}
    present_dims = [d for d in DIMENSIONS if f"dim_{d}" in columns]
    average = source.on_conflict == "mean" or (source.on_conflict == "auto" and scheme.name == "graded")
    grades_seen: dict[int, list[float]] = {}  # row index -> grades of every judgment of that pair
    converted_kinds: dict[str, set[str]] = {}  # column -> kinds of non-text values read as text
    joined = source.products is not None

    for line, rec, raw, prob in records:
        report.rows_read += 1
        if prob is not None:
            problems.append(prob)
            continue

        def bad(fld: str | None, kind: str, msg: str, line=line, raw=raw, rec=rec) -> Problem:
            return Problem(
                src.name,
                line,
                fld,
                kind,
                msg,
                raw if raw is not None else json.dumps(rec, default=str, ensure_ascii=False),
                unit,
            )

        row_problems: list[Problem] = []
        row: dict[str, Any] = {"source_line": line}
        if joined and not rec.get("__has_product"):
            problems.append(
                bad(
                    "product_id",
                    "missing_product",
                    f"no product ({rec.get('product_locale')!r}, {rec.get('product_id')!r}) in the products file",
                )
            )
            continue
        for fld in _TEXT_FIELDS:
            col = getattr(mapping, fld)
            if not col or col not in rec:
                continue
            try:
                val, converted = _text(rec[col], fld in _LIST_FIELDS)
            except _NotText as e:
                row_problems.append(bad(col, "bad_value", str(e)))
                continue
            if converted:
                report.converted[col] = report.converted.get(col, 0) + 1
                converted_kinds.setdefault(col, set()).add(converted)
            if val is not None:
                if len(val) > source.max_field_chars:
                    row_problems.append(
                        bad(
                            col,
                            "too_long",
                            f"{len(val)} characters, more than max_field_chars={source.max_field_chars}",
                        )
                    )
                    continue
                m = _SURROGATE.search(val)
                if m:
                    row_problems.append(
                        bad(
                            col,
                            "undecodable",
                            f"undecodable byte 0x{ord(m.group()) - 0xDC00:02x} at character {m.start() + 1}",
                        )
                    )
                    continue
                m = CONTROL_CHARS.search(val)
                if m:
                    if source.control_chars == "reject":
                        msg = f"control character U+{ord(m.group()):04X} at character {m.start() + 1}"
                        row_problems.append(bad(col, "control_chars", msg + " (control_chars: reject)"))
                        continue
                    report.control_chars[col] = report.control_chars.get(col, 0) + 1
                    if source.control_chars == "strip":
                        val = strip_control_chars(val)
                val = val.strip()
            if fld in ("query", "title") and not val:
                row_problems.append(bad(col, "empty_field", f"{fld} is empty"))
                continue
            row[fld] = val or ("" if fld not in ("query", "title") else val)

        if mapping.label and mapping.label in rec:
            raw_label = rec[mapping.label]
            empty = (
                raw_label is None
                or (isinstance(raw_label, str) and not raw_label.strip())
                or (isinstance(raw_label, float) and math.isnan(raw_label))
            )
            if empty and not source.require_label:
                row.update(label=None, grade=None, gain=None)
            else:
                try:
                    row["label"], row["grade"], row["gain"] = scheme.parse(raw_label)
                except LabelError as e:
                    row_problems.append(bad(mapping.label, "bad_label", str(e)))
        elif source.require_label:
            row_problems.append(bad(mapping.label, "bad_label", "no label"))

        if mapping.item_id and mapping.item_id in rec:
            try:
                iid = (_text(rec[mapping.item_id])[0] or "").strip()
            except _NotText as e:
                row_problems.append(bad(mapping.item_id, "bad_value", str(e)))
                iid = ""
            if not iid:
                row_problems.append(bad(mapping.item_id, "empty_field", "item id is empty"))
            row["item_id"] = iid
        if mapping.source_id and mapping.source_id in rec:
            try:
                row["source_id"] = (_text(rec[mapping.source_id])[0] or "").strip() or None
            except _NotText as e:
                row_problems.append(bad(mapping.source_id, "bad_value", str(e)))
        if mapping.frequency and mapping.frequency in rec and rec[mapping.frequency] not in (None, ""):
            try:
                row["frequency"] = int(float(rec[mapping.frequency]))
                if row["frequency"] < 0:
                    raise ValueError
            except (TypeError, ValueError):
                row_problems.append(
                    bad(
                        mapping.frequency, "bad_value", f"expected a non-negative count, got {rec[mapping.frequency]!r}"
                    )
                )
        if mapping.split and mapping.split in rec and rec[mapping.split] not in (None, ""):
            sp = str(rec[mapping.split]).strip().lower()
            sp = {"validation": "val", "dev": "val"}.get(sp, sp)
            if sp not in ("train", "val", "test"):
                row_problems.append(
                    bad(mapping.split, "bad_value", f"expected train/val/test, got {rec[mapping.split]!r}")
                )
            row["split"] = sp
        for d in present_dims:
            v = rec.get(f"dim_{d}")
            if v is not None and v not in VERDICTS:
                row_problems.append(bad(f"dim_{d}", "bad_value", f"expected one of {list(VERDICTS)}, got {v!r}"))
            row[f"dim_{d}"] = v

        if row_problems:
            problems.extend(row_problems)
            continue
        if not row.get("item_id"):
            row["item_id"] = "t:" + make_example_id(
                row["title"], " | ".join(row.get(f) or "" for f in _TEXT_FIELDS[1:])
            )
        row["example_id"] = make_example_id(row["query"], row["item_id"])

        sid = row.get("source_id")
        if sid is not None:
            if sid in first_by_source_id:
                first = rows[first_by_source_id[sid]]["source_line"]
                problems.append(bad(mapping.source_id, "duplicate_id", f"id {sid!r} already used at {unit} {first}"))
                continue
            first_by_source_id[sid] = len(rows)
        eid = row["example_id"]
        if eid in first_by_example:
            j = first_by_example[eid]
            other = rows[j]
            if other.get("label") == row.get("label") and other.get("grade") == row.get("grade"):
                report.duplicates_merged += 1
                continue
            if average and other.get("grade") is not None and row.get("grade") is not None:
                grades_seen.setdefault(j, [other["grade"]]).append(row["grade"])
                continue
            msg = (
                f"the pair ({row['query']!r}, item {row['item_id']!r}) appears at {unit} {other['source_line']} "
                f"with label {other.get('grade')!r} and here with {row.get('grade')!r}"
            )
            problems.append(bad(mapping.label, "conflicting_duplicate", msg))
            if j not in bad_rows:
                bad_rows.add(j)
                problems.append(
                    Problem(
                        src.name,
                        other["source_line"],
                        mapping.label,
                        "conflicting_duplicate",
                        msg,
                        json.dumps({k: v for k, v in other.items()}, default=str, ensure_ascii=False),
                        unit,
                    )
                )
            continue
        first_by_example[eid] = len(rows)
        rows.append(row)

    report.warnings.extend(src.warnings)
    for col, n in report.converted.items():
        kinds = " and ".join(sorted(converted_kinds[col]))
        report.warnings.append(f"{src.name}: column {col!r}: {n} {kinds} value(s) where text is expected, read as text")
    if report.control_chars:
        counts = ", ".join(f"{c!r}: {n}" for c, n in report.control_chars.items())
        done = "stripped" if source.control_chars == "strip" else "kept"
        report.warnings.append(
            f"{src.name}: control characters (NUL, ESC, C1, bidi overrides ...) in text values ({counts}), "
            f"{done} (control_chars: {source.control_chars})"
        )
    for j, grades in grades_seen.items():
        rows[j]["label"], rows[j]["grade"], rows[j]["gain"] = scheme.parse(sum(grades) / len(grades))
    if grades_seen:
        report.conflicts_averaged = sum(len(g) - 1 for g in grades_seen.values())
        report.warnings.append(
            f"{src.name}: {len(grades_seen)} pair(s) judged more than once with different grades; "
            f"grades averaged ({report.conflicts_averaged} judgment(s) folded in)"
        )
    if bad_rows:
        rows = [r for i, r in enumerate(rows) if i not in bad_rows]
    if problems:
        report.rejected = dict(Counter(p.kind for p in problems))
        report.rows_rejected = len({p.line for p in problems})
        if source.on_error == "error":
            raise DataError(_problem_message(src.name, problems, report, source.max_problems_shown), problems)
        report.quarantine_path = _write_quarantine(source, src.name, problems, append=append_quarantine)
    if report.duplicates_merged:
        report.warnings.append(f"{src.name}: {report.duplicates_merged} exact duplicate pair(s) merged (first kept)")
    if not rows:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(report.rejected.items()))
        notes = "".join(f"\n  {w}" for w in report.warnings)
        raise DataError(
            f"{src.name}: no usable rows ({report.rows_read} read, {report.rows_rejected} rejected"
            f"{': ' + kinds if kinds else ''}){notes}",
            problems,
        )
    table = rows_to_table(rows)
    table = assign_splits(table, keep_existing_split=bool(mapping.split), **asdict(source.split))
    report.rows_loaded = table.num_rows
    return table, report


def _load_example_dir(source: DataSource) -> tuple[pa.Table, LoadReport]:
    """A directory of ``train/val/test.parquet`` example files (the synthetic catalog's output)."""
    d = Path(source.path)
    files = [d / f"{s}.parquet" for s in ("train", "val", "test") if (d / f"{s}.parquet").exists()]
    if not files:
        raise DataError(f"{d}: directory holds none of train.parquet, val.parquet, test.parquet")
    tables, reports = [], []
    # one quarantine file for the directory: the first split file with rejects starts it, the others add
    quarantine = str(quarantine_file(source))
    for f in files:
        sub = replace(
            source, path=str(f), preset=source.preset or "examples", format="parquet", quarantine_path=quarantine
        )
        started = any(r.quarantine_path for r in reports)
        t, r = load_examples_file_keep_split(sub, f.stem, append_quarantine=started)
        tables.append(t)
        reports.append(r)
    table = pa.concat_tables(tables)
    report = LoadReport(file=str(d), format="examples", scheme=reports[0].scheme)
    for r in reports:
        report.rows_read += r.rows_read
        report.rows_loaded += r.rows_loaded
        report.duplicates_merged += r.duplicates_merged
        report.rows_rejected += r.rows_rejected
        report.warnings += r.warnings
        for what in (report.converted, report.control_chars):
            for k, v in (r.converted if what is report.converted else r.control_chars).items():
                what[k] = what.get(k, 0) + v
        for k, v in r.rejected.items():
            report.rejected[k] = report.rejected.get(k, 0) + v
        report.quarantine_path = report.quarantine_path or r.quarantine_path
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
