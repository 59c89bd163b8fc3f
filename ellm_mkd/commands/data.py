"""``ellm-mkd data check``, ``ellm-mkd data synth`` and ``ellm-mkd data widen``."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from datamodules.readers import DataError
from datamodules.validation import DataSource, load_examples, summarize


def _check_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="ellm-mkd data check",
        description=(
            "Validate a relevance file and print rows, queries, items, label distribution, split and bucket sizes and "
            "rejected rows. Exits 1 when the file has errors (under on_error: error) or cannot be read."
        ),
    )
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of the options below")
    p.add_argument("path", type=str, help="data file (CSV/TSV/JSONL/Parquet, plain/.gz/.zip) or examples directory")
    p.add_class_arguments(DataSource, skip={"path"}, sub_configs=True)
    p.add_argument("--json", type=str | None, default=None, help="also write the summary as JSON to this file")
    return p


def _synth_parser() -> ArgumentParser:
    from datamodules.synth import SynthConfig

    p = ArgumentParser(
        prog="ellm-mkd data synth",
        description=(
            "Generate the embedded synthetic catalog (queries, items, graded labels, per-dimension truth) as "
            "Parquet train/val/test files."
        ),
    )
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--out", type=str, required=True, help="output directory")
    p.add_argument("--overwrite", type=bool, default=False, help="replace the catalog files already in --out")
    p.add_class_arguments(SynthConfig, sub_configs=True)
    return p


def _widen_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="ellm-mkd data widen",
        description=(
            "A teacher's labelled set wider than the students': --base's splits plus --extra's train (and val) rows "
            "whose query occurs nowhere in --base (train, val, test, pool); --base's test split unchanged. The "
            "teacher then trains on more queries than the students label, never on one they are validated or tested "
            "on, nor on a pair of the pool it will judge."
        ),
    )
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--base", type=str, required=True, help="the students' examples directory (train/val/test.parquet)")
    p.add_argument("--extra", type=str, required=True, help="examples directory with the further labelled pairs")
    p.add_argument("--out", type=str, required=True, help="output directory (the teacher's data.source.path)")
    p.add_argument("--widen_val", type=bool, default=True, help="add --extra's val rows to the validation split too")
    p.add_argument("--overwrite", type=bool, default=False, help="replace the tables already in --out")
    return p


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[f"{c:,}" if isinstance(c, int) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for k, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def check(argv: list[str]) -> int:
    parser = _check_parser()
    cfg = parser.parse_args(argv)
    init = parser.instantiate(cfg)
    src_kwargs = {f.name: init[f.name] for f in dataclasses.fields(DataSource) if f.name != "path" and f.name in init}
    source = DataSource(path=cfg.path, **src_kwargs)
    try:
        table, report = load_examples(source)
    except DataError as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 1
    summary = summarize(table, source.resolved_scheme())
    print(f"file: {report.file} ({report.format})")
    print(f"label scheme: {report.scheme['name']} ({', '.join(report.scheme['level_names'])})")
    for w in report.warnings:
        print(f"warning: {w}")
    print(
        f"rows read: {report.rows_read:,}   examples: {summary['rows']:,}   rejected: {report.rows_rejected:,}"
        + (f"   duplicates merged: {report.duplicates_merged:,}" if report.duplicates_merged else "")
        + (f"   judgments averaged: {report.conflicts_averaged:,}" if report.conflicts_averaged else "")
    )
    print(
        f"queries: {summary['queries']:,} (distinct strings: {summary['query_strings']:,}; queries equal up to case "
        f"and spacing count once)   items: {summary['items']:,}"
    )
    total = max(summary["rows"], 1)
    print("\nlabels")
    print(_table([[k, v, f"{100 * v / total:.1f}%"] for k, v in summary["labels"].items()], ["level", "rows", "share"]))
    print("\nsplits (rows per query bucket)")
    print(
        _table(
            [
                [s, d["rows"], d["queries"], d["head"], d["torso"], d["tail"], d["unseen"]]
                for s, d in summary["splits"].items()
            ],
            ["split", "rows", "queries", "head", "torso", "tail", "unseen"],
        )
    )
    if report.rejected:
        print("\nrejected rows by kind")
        print(_table([[k, v] for k, v in sorted(report.rejected.items())], ["kind", "rows"]))
        print(f"quarantined to: {report.quarantine_path}")
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps({"report": report.to_json(), "summary": summary}, indent=2))
        print(f"\nsummary written to {cfg.json}")
    return 0


def synth(argv: list[str]) -> int:
    from datamodules.synth import SynthConfig, write

    parser = _synth_parser()
    cfg = parser.parse_args(argv)
    init = parser.instantiate(cfg)
    config = SynthConfig(**{f.name: init[f.name] for f in dataclasses.fields(SynthConfig) if f.name in init})
    try:
        summary = write(cfg.out, config, overwrite=cfg.overwrite)
    except FileExistsError as e:
        print(f"ERROR {e} (pass --overwrite true to replace it)", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    print(f"catalog written to {cfg.out}")
    return 0


def widen(argv: list[str]) -> int:
    from datamodules.widen import widen_examples

    cfg = _widen_parser().parse_args(argv)
    try:
        summary = widen_examples(cfg.base, cfg.extra, cfg.out, widen_val=cfg.widen_val, overwrite=cfg.overwrite)
    except FileExistsError as e:
        print(f"ERROR {e} (pass --overwrite true to replace them)", file=sys.stderr)
        return 1
    except (DataError, ValueError) as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 1
    rows = [
        [s, d["base_rows"], d.get("added_rows", 0), d.get("added_queries", 0), d.get("dropped_rows", 0), d["rows"]]
        for s, d in summary["splits"].items()
    ]
    print(_table(rows, ["split", "base rows", "added rows", "added queries", "dropped (base query)", "rows"]))
    print(f"teacher data written to {cfg.out} ({cfg.out}/widen.json)")
    return 0


def data_main(argv: list[str]) -> int:
    usage = "usage: ellm-mkd data {check,synth,widen} [options]   (ellm-mkd data check --help)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] == "check":
        return check(argv[1:])
    if argv[0] == "synth":
        return synth(argv[1:])
    if argv[0] == "widen":
        return widen(argv[1:])
    print(f"ellm-mkd data: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
    return 2
