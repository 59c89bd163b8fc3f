"""The checks every example record goes through, whether the file is loaded whole (``validation``) or
streamed (``streaming``): one code path, so both report the same problems with the same messages.

:class:`RecordChecker` maps and validates one record (required fields, text values, control characters,
label, ids, split, verdicts) and returns the example row or its problems. :class:`PairLedger` holds the
file-wide checks over the rows that passed: a ``source_id`` used twice, the same pair twice (merged,
grades averaged, or a ``conflicting_duplicate``). It keeps, per row, only small things (the ids, and
the line, label and grade of each pair's first row) and says afterwards which lines to drop and which
to give an averaged grade. :func:`close_report` is the end of a file: warnings, the ``on_error``
policy (raise, or write the quarantine file), and the refusal of a file with no usable rows.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from typing import Any

from ellm_mkd.schema import DIMENSIONS, VERDICTS, make_example_id

from .data_source import ColumnMapping, DataSource
from .labels import LabelError
from .load_report import LoadReport, _problem_message, _write_quarantine
from .readers import DataError, Problem, Record
from .text import CONTROL_CHARS, strip_control_chars

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


def check_columns(
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


class RecordChecker:
    """Maps and validates the records of one file (``name``, with ``columns``); counts conversions and
    control characters into ``report``."""

    def __init__(self, source: DataSource, name: str, columns: list[str], unit: str, report: LoadReport):
        self.source, self.name, self.unit, self.report = source, name, unit, report
        self.mapping = source.resolved_mapping()
        self.scheme = source.resolved_scheme()
        self.present_dims = [d for d in DIMENSIONS if f"dim_{d}" in columns]
        self.joined = source.products is not None
        self.converted_kinds: dict[str, set[str]] = {}  # column -> kinds of non-text values read as text

    def problem(self, line: int, rec: dict, raw: str | None, fld: str | None, kind: str, msg: str) -> Problem:
        raw = raw if raw is not None else json.dumps(rec, default=str, ensure_ascii=False)
        return Problem(self.name, line, fld, kind, msg, raw, self.unit)

    def check(self, line: int, rec: dict, raw: str | None) -> tuple[dict[str, Any] | None, list[Problem]]:
        """The example row of a parsed record (with ``example_id``), or None and its problems."""
        source, mapping, report = self.source, self.mapping, self.report

        def bad(fld: str | None, kind: str, msg: str) -> Problem:
            return self.problem(line, rec, raw, fld, kind, msg)

        if self.joined and not rec.get("__has_product"):
            msg = f"no product ({rec.get('product_locale')!r}, {rec.get('product_id')!r}) in the products file"
            return None, [bad("product_id", "missing_product", msg)]
        problems: list[Problem] = []
        row: dict[str, Any] = {"source_line": line}
        for fld in _TEXT_FIELDS:
            col = getattr(mapping, fld)
            if not col or col not in rec:
                continue
            try:
                val, converted = _text(rec[col], fld in _LIST_FIELDS)
            except _NotText as e:
                problems.append(bad(col, "bad_value", str(e)))
                continue
            if converted:
                report.converted[col] = report.converted.get(col, 0) + 1
                self.converted_kinds.setdefault(col, set()).add(converted)
            if val is not None:
                if len(val) > source.max_field_chars:
                    msg = f"{len(val)} characters, more than max_field_chars={source.max_field_chars}"
                    problems.append(bad(col, "too_long", msg))
                    continue
                m = _SURROGATE.search(val)
                if m:
                    msg = f"undecodable byte 0x{ord(m.group()) - 0xDC00:02x} at character {m.start() + 1}"
                    problems.append(bad(col, "undecodable", msg))
                    continue
                m = CONTROL_CHARS.search(val)
                if m:
                    if source.control_chars == "reject":
                        msg = f"control character U+{ord(m.group()):04X} at character {m.start() + 1}"
                        problems.append(bad(col, "control_chars", msg + " (control_chars: reject)"))
                        continue
                    report.control_chars[col] = report.control_chars.get(col, 0) + 1
                    if source.control_chars == "strip":
                        val = strip_control_chars(val)
                val = val.strip()
            if fld in ("query", "title") and not val:
                problems.append(bad(col, "empty_field", f"{fld} is empty"))
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
                    row["label"], row["grade"], row["gain"] = self.scheme.parse(raw_label)
                except LabelError as e:
                    problems.append(bad(mapping.label, "bad_label", str(e)))
        elif source.require_label:
            problems.append(bad(mapping.label, "bad_label", "no label"))

        if mapping.item_id and mapping.item_id in rec:
            try:
                iid = (_text(rec[mapping.item_id])[0] or "").strip()
            except _NotText as e:
                problems.append(bad(mapping.item_id, "bad_value", str(e)))
                iid = ""
            if not iid:
                problems.append(bad(mapping.item_id, "empty_field", "item id is empty"))
            row["item_id"] = iid
        if mapping.source_id and mapping.source_id in rec:
            try:
                row["source_id"] = (_text(rec[mapping.source_id])[0] or "").strip() or None
            except _NotText as e:
                problems.append(bad(mapping.source_id, "bad_value", str(e)))
        freq = mapping.frequency
        if freq and freq in rec and rec[freq] not in (None, ""):
            try:
                row["frequency"] = int(float(rec[freq]))
                if row["frequency"] < 0:
                    raise ValueError
            except (TypeError, ValueError):
                problems.append(bad(freq, "bad_value", f"expected a non-negative count, got {rec[freq]!r}"))
        if mapping.split and mapping.split in rec and rec[mapping.split] not in (None, ""):
            sp = str(rec[mapping.split]).strip().lower()
            sp = {"validation": "val", "dev": "val"}.get(sp, sp)
            if sp not in ("train", "val", "test"):
                msg = f"expected train/val/test, got {rec[mapping.split]!r}"
                problems.append(bad(mapping.split, "bad_value", msg))
            row["split"] = sp
        for d in self.present_dims:
            v = rec.get(f"dim_{d}")
            if v is not None and v not in VERDICTS:
                problems.append(bad(f"dim_{d}", "bad_value", f"expected one of {list(VERDICTS)}, got {v!r}"))
            row[f"dim_{d}"] = v

        if problems:
            return None, problems
        if not row.get("item_id"):
            rest = " | ".join(row.get(f) or "" for f in _TEXT_FIELDS[1:])
            row["item_id"] = "t:" + make_example_id(row["title"], rest)
        row["example_id"] = make_example_id(row["query"], row["item_id"])
        return row, []

    def warn(self) -> None:
        """The report's warnings about values read as text and control characters."""
        report, name = self.report, self.name
        for col, n in report.converted.items():
            kinds = " and ".join(sorted(self.converted_kinds[col]))
            report.warnings.append(f"{name}: column {col!r}: {n} {kinds} value(s) where text is expected, read as text")
        if report.control_chars:
            counts = ", ".join(f"{c!r}: {n}" for c, n in report.control_chars.items())
            done = "stripped" if self.source.control_chars == "strip" else "kept"
            report.warnings.append(
                f"{name}: control characters (NUL, ESC, C1, bidi overrides ...) in text values ({counts}), "
                f"{done} (control_chars: {self.source.control_chars})"
            )


class PairLedger:
    """File-wide checks over the rows that passed :meth:`RecordChecker.check`, in file order.

    ``admit(row)`` says whether the row is kept for now and returns its problems. A later row can make an
    earlier kept one bad (a conflicting duplicate): its line joins ``bad_lines``, and its problem's ``raw``
    comes from ``row_at(line)`` (None where the caller keeps no rows: streaming fills it in later).
    ``dropped`` holds every admitted line that is not kept in the end; ``grades`` the grades to average
    per kept line. State per row: the source ids and, per pair, its first row's line, label and grade.
    """

    def __init__(
        self, checker: RecordChecker, report: LoadReport, row_at: Callable[[int], dict | None] = lambda line: None
    ):
        source, self.checker, self.report, self.row_at = checker.source, checker, report, row_at
        self.field = checker.mapping.label
        self.average = source.on_conflict == "mean" or (
            source.on_conflict == "auto" and checker.scheme.name == "graded"
        )
        self.first_by_source_id: dict[str, int] = {}  # source id -> line
        self.first_by_example: dict[str, tuple[int, int | None, float | None]] = {}  # -> line, label, grade
        self.bad_lines: set[int] = set()  # kept lines that turned out bad later (conflicts)
        self.dropped: set[int] = set()
        self.grades: dict[int, list[float]] = {}  # line -> grades of every judgment of that pair
        self.raw_wanted: dict[int, Problem] = {}  # line -> the problem whose raw ``row_at`` could not give

    def admit(self, row: dict[str, Any], raw: str | None, rec: dict) -> tuple[bool, list[Problem]]:
        line, unit, checker = row["source_line"], self.checker.unit, self.checker
        sid = row.get("source_id")
        if sid is not None:
            if sid in self.first_by_source_id:
                self.dropped.add(line)
                msg = f"id {sid!r} already used at {unit} {self.first_by_source_id[sid]}"
                return False, [checker.problem(line, rec, raw, checker.mapping.source_id, "duplicate_id", msg)]
            self.first_by_source_id[sid] = line
        eid = row["example_id"]
        if eid not in self.first_by_example:
            self.first_by_example[eid] = (line, row.get("label"), row.get("grade"))
            return True, []
        self.dropped.add(line)
        first, label, grade = self.first_by_example[eid]
        if label == row.get("label") and grade == row.get("grade"):
            self.report.duplicates_merged += 1
            return False, []
        if self.average and grade is not None and row.get("grade") is not None:
            self.grades.setdefault(first, [grade]).append(row["grade"])
            return False, []
        msg = (
            f"the pair ({row['query']!r}, item {row['item_id']!r}) appears at {unit} {first} "
            f"with label {grade!r} and here with {row.get('grade')!r}"
        )
        problems = [checker.problem(line, rec, raw, self.field, "conflicting_duplicate", msg)]
        if first not in self.bad_lines:
            self.bad_lines.add(first)
            self.dropped.add(first)
            other = self.row_at(first)
            other_raw = None if other is None else row_json(other)
            problems.append(Problem(checker.name, first, self.field, "conflicting_duplicate", msg, other_raw, unit))
            if other is None:
                self.raw_wanted[first] = problems[-1]
        return False, problems

    def kept(self) -> int:
        return len(self.first_by_example) - len(self.bad_lines)

    def any_label(self) -> bool:
        """Does a kept row carry a label?"""
        return any(lab is not None for ln, lab, _ in self.first_by_example.values() if ln not in self.bad_lines)

    def averaged(self, line: int) -> tuple[int, float, float]:
        """Label, grade and gain of a kept line whose pair was judged several times."""
        grades = self.grades[line]
        return self.checker.scheme.parse(sum(grades) / len(grades))


def row_json(row: dict[str, Any]) -> str:
    """A checked row as the ``raw`` of a problem found on it later (it has no source text of its own then)."""
    return json.dumps(dict(row), default=str, ensure_ascii=False)


def check_records(
    records: Iterable[Record], checker: RecordChecker, ledger: PairLedger, problems: list[Problem]
) -> Iterator[dict[str, Any]]:
    """The rows of ``records`` that pass :meth:`RecordChecker.check` and :meth:`PairLedger.admit` (kept for
    now: a later conflict can still make one bad), counting records read and collecting ``problems``."""
    for line, rec, raw, prob in records:
        checker.report.rows_read += 1
        if prob is not None:
            problems.append(prob)
            continue
        row, row_problems = checker.check(line, rec, raw)
        if row is None:
            problems.extend(row_problems)
            continue
        keep, row_problems = ledger.admit(row, raw, rec)
        problems.extend(row_problems)
        if keep:
            yield row


def close_report(
    source: DataSource,
    checker: RecordChecker,
    ledger: PairLedger,
    problems: list[Problem],
    warnings: list[str],
    append_quarantine: bool = False,
) -> None:
    """The end of one file: its warnings, then the ``on_error`` policy over ``problems`` (raise a
    :class:`DataError` listing them, or write them to the quarantine file), then a file with no usable
    rows is refused."""
    report, name = checker.report, checker.name
    report.warnings.extend(warnings)
    checker.warn()
    if ledger.grades:
        report.conflicts_averaged = sum(len(g) - 1 for g in ledger.grades.values())
        report.warnings.append(
            f"{name}: {len(ledger.grades)} pair(s) judged more than once with different grades; "
            f"grades averaged ({report.conflicts_averaged} judgment(s) folded in)"
        )
    if problems:
        report.rejected = dict(Counter(p.kind for p in problems))
        report.rows_rejected = len({p.line for p in problems})
        if source.on_error == "error":
            raise DataError(_problem_message(name, problems, report, source.max_problems_shown), problems)
        report.quarantine_path = _write_quarantine(source, name, problems, append=append_quarantine)
    if report.duplicates_merged:
        report.warnings.append(f"{name}: {report.duplicates_merged} exact duplicate pair(s) merged (first kept)")
    if not ledger.kept():
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(report.rejected.items()))
        notes = "".join(f"\n  {w}" for w in report.warnings)
        raise DataError(
            f"{name}: no usable rows ({report.rows_read} read, {report.rows_rejected} rejected"
            f"{': ' + kinds if kinds else ''}){notes}",
            problems,
        )
