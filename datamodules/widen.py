"""A teacher's labelled set wider than the students': more queries, the students' evaluation kept out.

In production the LLM teacher is trained once on an annotated set larger than what a student's team labels for
its own surface; the students then learn from N labelled pairs plus the teacher's judgement of an unlabelled pool.
:func:`widen_examples` builds such a set from two examples directories (``train/val/test.parquet``, as
``ellm-mkd data synth`` or ``ellm-mkd data check --json`` users write them):

- ``base``: the students' data. Its train split is kept whole; its val split too (the teacher's checkpoint is
  still chosen on it); its test split is copied unchanged, so the teacher is tested on the students' test pairs.
- ``extra``: more labelled pairs. Its train rows (and, with ``widen_val``, its val rows) are added, except every
  row whose query (normalised: case, spacing, Unicode form) occurs anywhere in ``base``: its train, val and test
  splits and its ``pool.parquet`` when there is one. So the teacher never sees a query the students are validated
  or tested on, nor a gold label of a pair from the pool it will be asked to judge. ``extra``'s test split is
  not used.

``widen.json`` beside the tables records both sources and the counts (rows and queries kept, added and dropped).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from datamodules.readers import DataError
from datamodules.staging import staged_files
from datamodules.synth import POOL_FILE
from ellm_mkd.schema import SPLITS, normalize_text

SUMMARY = "widen.json"


def _read(path: Path, columns: list[str] | None = None) -> pa.Table:
    if not path.is_file():
        raise DataError(
            f"{path}: not found; --base and --extra are examples directories holding train.parquet, val.parquet "
            "and test.parquet (as ellm-mkd data synth writes them)"
        )
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise DataError(f"{path}: not a readable examples table ({e})") from e


def _conform(table: pa.Table, schema: pa.Schema, path: Path) -> pa.Table:
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise DataError(f"{path}: column(s) {missing} missing; the base tables have {schema.names}")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{path}: its columns do not convert to the base tables' types ({e})") from e


def widen_examples(
    base: str | os.PathLike, extra: str | os.PathLike, out: str | os.PathLike, widen_val: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Write ``out/{train,val,test}.parquet`` and ``out/widen.json``; return the summary (see the module doc).

    Raises :class:`DataError` naming the file when a table is missing, unreadable or of other columns, and
    ``FileExistsError`` when ``out`` holds these files already (unless ``overwrite``). Files are written in a
    temporary directory beside ``out`` and moved in, ``widen.json`` last."""
    base, extra, out = Path(base), Path(extra), Path(out)
    if out.resolve() in (base.resolve(), extra.resolve()):
        raise ValueError(f"--out {out} must be a directory of its own, not --base or --extra")
    names = [f"{s}.parquet" for s in SPLITS] + [SUMMARY]
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {existing}")
    tables = {s: _read(base / f"{s}.parquet") for s in SPLITS}
    queries = [q for t in tables.values() for q in t["query"].to_pylist()]
    if (base / POOL_FILE).is_file():
        queries += _read(base / POOL_FILE, ["query"])["query"].to_pylist()
    held = {normalize_text(q) for q in queries}
    counts: dict[str, Any] = {}
    for split in ("train", "val") if widen_val else ("train",):
        path = extra / f"{split}.parquet"
        rows = _conform(_read(path), tables[split].schema, path)
        normed = [normalize_text(q) for q in rows["query"].to_pylist()]
        keep = [q not in held for q in normed]
        added = rows.filter(pa.array(keep, pa.bool_()))
        counts[split] = {
            "base_rows": tables[split].num_rows,
            "added_rows": added.num_rows,
            "added_queries": len({q for q, k in zip(normed, keep) if k}),
            "dropped_rows": rows.num_rows - added.num_rows,  # their query is one of base's
        }
        tables[split] = pa.concat_tables([tables[split], added])
        counts[split]["rows"] = tables[split].num_rows
    counts["test"] = {"base_rows": tables["test"].num_rows, "rows": tables["test"].num_rows}
    summary = {
        "base": str(base),
        "extra": str(extra),
        "widen_val": widen_val,
        "base_queries_held_out": len(held),
        "splits": counts,
    }
    with staged_files(out, names) as tmp:
        for split, table in tables.items():
            pq.write_table(table, tmp / f"{split}.parquet")
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return {"out_dir": str(out), **summary}
