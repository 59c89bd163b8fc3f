"""Unlabelled pools and teacher calibration for ``ellm-mkd bench mkd``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def calibration(data: dict[str, Any], cache_dir: str, level_bias: str | None = None) -> dict[str, Any]:
    """The temperature of the teacher's level distributions (and with ``level_bias`` ``fit`` one bias per level;
    ``auto``: where cross-validation over the validation queries keeps them), fitted once on
    the validation split (``CachedTeacher(temperature: fit)``) and given to every MKD run: T (b) and the
    validation NLL and ECE of the teacher before and after it; under ``test`` the same figures on the test
    split, which the fit did not see (reported, never used to choose)."""
    from dataclasses import asdict

    import torch

    from datamodules.datamodule import RelevanceDataModule
    from datamodules.teacher_signal import CachedTeacher
    from ellm_mkd.calibration import nll_and_ece
    from ellm_mkd.teacher_cache import TeacherCache

    teacher = CachedTeacher(cache_dir, missing="hard_label", temperature="fit", level_bias=level_bias)
    dm = RelevanceDataModule(**data, teacher=teacher)
    dm.setup("fit")
    log.info("teacher calibration: %s", teacher.calibration.describe())
    fit = asdict(teacher.calibration)
    rows = [r for r in dm.datasets["test"].rows if r["label"] is not None and teacher.covers(r["example_id"])]
    if rows:
        raw = TeacherCache(cache_dir).signals([r["example_id"] for r in rows])
        labels = torch.tensor([r["label"] for r in rows])
        nll_before, ece_before = nll_and_ece(torch.tensor([raw[r["example_id"]].level_probs for r in rows]), labels)
        nll_after, ece_after = nll_and_ece(torch.tensor([s.level_probs for s in teacher.signals(rows)]), labels)
        fit["test"] = {
            "pairs": len(rows),
            "nll_before": nll_before,
            "nll_after": nll_after,
            "ece_before": ece_before,
            "ece_after": ece_after,
        }
    return fit


def catalog_pool_files(out: Path, pools: list[int], items_per_query: int) -> dict[int, str]:
    """``pool_<p>x.parquet`` beside the catalog: for each training query, the first ``p * items_per_query`` pairs
    of its pool (a larger pool holds every smaller one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datamodules.synth import POOL_FILE

    table = pq.read_table(out / "data" / POOL_FILE)
    seen: dict[str, int] = {}
    rank = []
    for q in table.column("query").to_pylist():
        rank.append(seen.get(q, 0))
        seen[q] = rank[-1] + 1
    files = {}
    for p in pools:
        if p > 0:
            path = out / "data" / f"pool_{p}x.parquet"
            keep = pa.array([r < p * items_per_query for r in rank])
            pq.write_table(table.filter(keep), path)
            files[p] = str(path)
    return files


def source_pool_files(
    out: Path, data: dict[str, Any], pools: list[int], labelled: set[str], pool_after: int | None
) -> dict[int, str]:
    """``pool_<p>x.parquet`` for ``--source``: training pairs of further queries, about ``p`` times the labelled
    ones, in the seeded query order ``limit_pairs`` takes them in (each pool holds every smaller one), after the
    first ``pool_after`` training pairs (default: the labelled ones). Labels are dropped (the augment reads the
    pairs unlabelled anyway)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from datamodules.datamodule import RelevanceDataModule
    from datamodules.splits import limit_by_query

    limits = {k: v for k, v in (data.get("limit_pairs") or {}).items() if k != "train"}
    full = RelevanceDataModule(**{**data, "limit_pairs": limits})
    full.setup("fit")
    rows = full.datasets["train"].rows
    n, seed = len(labelled), full.source.split.seed
    if len(rows) <= n:
        raise ValueError("pools with --source are further training queries: set limit_pairs.train below the split")
    start = n if pool_after is None else pool_after
    before = labelled | {r["example_id"] for r in limit_by_query(rows, start, seed)} if start > 0 else set(labelled)
    columns = [c for c in ("query", "item_id", *data["item_fields"]) if c in full.table.column_names]
    (out / "data").mkdir(parents=True, exist_ok=True)
    files = {}
    for p in pools:
        if p <= 0:
            continue
        ids = {r["example_id"] for r in limit_by_query(rows, start + p * n, seed)} - before
        if len(ids) < 0.9 * p * n:
            raise ValueError(
                f"pool {p}x: only {len(ids)} training pairs after the first {start} (wanted about {p * n}); "
                "choose smaller pools or a smaller pool_after"
            )
        table = full.table.filter(pc.is_in(full.table.column("example_id"), pa.array(sorted(ids))))
        path = out / "data" / f"pool_{p}x.parquet"
        pq.write_table(table.select(columns), path)
        files[p] = str(path)
    return files


def file_pool_files(
    out: Path,
    data: dict[str, Any],
    own: Any,
    pools: list[int],
    n_labelled: int,
    pool_source: str,
    exclude: list[str],
    seed: int,
) -> dict[int, str]:
    """``pool_<p>x.parquet`` from ``--pool_source``, a file (or example directory) of pairs of further queries, such
    as logged queries with candidate items: whole queries in a seeded order until a pool holds about ``p`` times the
    ``n_labelled`` pairs (each pool holds every smaller one). Queries of the benchmark's own examples ``own`` (the
    table its data module for ``data`` loaded, every split) and of the ``exclude`` sources (e.g. the data a
    teacher_dir was fine-tuned on) are left out; labels are dropped; ``data`` names the item fields kept."""
    import random

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from datamodules.validation import DataSource, load_examples
    from ellm_mkd.schema import normalize_text

    def queries(table) -> set[str]:
        return {normalize_text(q) for q in table.column("query").to_pylist()}

    taken = queries(own)
    for path in exclude:
        taken |= queries(load_examples(DataSource(path=path, require_label=False))[0])
    table, _ = load_examples(DataSource(path=pool_source, require_label=False))
    norm = [normalize_text(q) for q in table.column("query").to_pylist()]
    pairs: dict[str, int] = {}
    for q in norm:
        if q not in taken:
            pairs[q] = pairs.get(q, 0) + 1
    order = sorted(pairs)
    random.Random(f"pool:{seed}").shuffle(order)
    left_out = len(set(norm) - set(pairs))
    log.info("pool source %s: %d further queries (%d queries left out)", pool_source, len(order), left_out)
    columns = [c for c in ("query", "item_id", *data["item_fields"]) if c in table.column_names]
    (out / "data").mkdir(parents=True, exist_ok=True)
    files = {}
    for p in pools:
        if p <= 0:
            continue
        chosen, total = set(), 0
        for q in order:
            if total >= p * n_labelled:
                break
            chosen.add(q)
            total += pairs[q]
        if total < 0.9 * p * n_labelled:
            raise ValueError(
                f"pool {p}x: {pool_source} holds only {total} pairs of further queries (wanted about "
                f"{p * n_labelled}); choose smaller pools"
            )
        keep = pc.is_in(pa.array(norm), pa.array(sorted(chosen)))
        path = out / "data" / f"pool_{p}x.parquet"
        pq.write_table(table.filter(keep).select(columns), path)
        files[p] = str(path)
    return files


def augment_args(pool_file: str) -> list[str]:
    """The data options that add a pool file's pairs, unlabelled, to the training split."""
    return [f"--data.augment={json.dumps({'source': {'path': pool_file, 'require_label': False}})}"]
