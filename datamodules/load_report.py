"""What loading a source did: :class:`LoadReport`, the error message that lists the problems
(``on_error: error``) and the quarantine file of rejected rows (``on_error: quarantine``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .data_source import DataSource
from .readers import Problem

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What reading a source did: counts, warnings, rejects, where the quarantine went."""

    file: str
    format: str = ""
    rows_read: int = 0
    rows_loaded: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    duplicates_merged: int = 0
    conflicts_averaged: int = 0
    warnings: list[str] = field(default_factory=list)
    quarantine_path: str | None = None
    scheme: dict[str, Any] = field(default_factory=dict)

    rows_rejected: int = 0
    """distinct records rejected (a record may have several problems)"""
    control_chars: dict[str, int] = field(default_factory=dict)
    """source column -> text values holding control characters (stripped or kept by ``control_chars``)"""
    converted: dict[str, int] = field(default_factory=dict)
    """source column -> values that were not text (numbers, bytes, lists ...) read as text"""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _problem_message(name: str, problems: list[Problem], report: LoadReport, shown: int) -> str:
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(report.rejected.items()))
    lines = [f"{name}: {len(problems)} problem(s) in {report.rows_read} record(s) ({kinds})"]
    lines += [f"  {p}" for p in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown} more")
    lines.append("Fix the file, or set on_error: quarantine to set these rows aside and load the rest.")
    return "\n".join(lines)


def quarantine_file(source: DataSource) -> Path:
    """Where ``source``'s rejected records go: ``quarantine_path``, or ``runs/rejected/<name>.rejected.jsonl``."""
    return Path(source.quarantine_path or Path("runs") / "rejected" / (Path(source.path).name + ".rejected.jsonl"))


def _write_quarantine(source: DataSource, name: str, problems: list[Problem], append: bool = False) -> str:
    """One JSON line per rejected record: its location, every problem found, and its original text.
    ``append`` adds to the file (the other split files of one example directory) instead of replacing it."""
    out = quarantine_file(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    by_line: dict[Any, list[Problem]] = {}
    for p in problems:
        by_line.setdefault(p.line, []).append(p)
    tmp = out.with_name(out.name + ".tmp")
    if append and out.exists():
        shutil.copyfile(out, tmp)
    with open(tmp, "a" if append else "w", encoding="utf-8") as f:
        for line in sorted(by_line, key=lambda x: (x is None, x or 0)):
            ps = by_line[line]
            rec = {
                "file": name,
                ps[0].unit: line,
                "problems": [{"field": p.field, "kind": p.kind, "message": p.message} for p in ps],
                "raw": ps[0].raw,
            }
            line = json.dumps(rec, ensure_ascii=False, default=str)
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:  # undecodable bytes, held as lone surrogates: escaped, so no byte is lost
                line = json.dumps(rec, ensure_ascii=True, default=str)
            f.write(line + "\n")
    os.replace(tmp, out)
    log.warning("%s: %d record(s) quarantined to %s", name, len(by_line), out)
    return str(out)
