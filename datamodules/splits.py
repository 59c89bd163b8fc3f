"""Query-disjoint splits and query buckets.

Splits
    Every query (normalised: NFC, case-folded, whitespace collapsed) goes to exactly one of
    train/val/test, decided by a seeded hash of the query text. The assignment of a query never
    depends on the other rows, so it is deterministic by seed, stable when rows are added, and the
    same for a query wherever it appears. Fractions are met in expectation (a hash, not a sort).
    So a row's split can be told as it is read (:class:`QuerySplits`, what streaming uses); only a file
    that ships some splits of its own needs one remembered split per query.

Buckets
    ``frequency`` is how often the query occurs: the data's own traffic count where it has one
    (the synthetic catalog does; a reader maps a ``frequency`` column), otherwise the number of
    judged pairs of the query in the whole file. Queries sorted by frequency, most frequent first,
    are cut by cumulative frequency mass: ``head`` is the set of most frequent queries that carries
    the first ``head_share`` of all traffic, ``torso`` the next ``torso_share``, ``tail`` the rest.

    ``unseen`` (val/test only) marks a query with at least one term that no training query
    contains: a new model number, a new brand, a misspelling. Because splits are query-disjoint,
    *every* held-out query string is new to training; ``unseen`` singles out the ones whose words
    are new too, which is where a student has nothing to memorise. It takes precedence over the
    frequency bucket.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ellm_mkd.schema import normalize_text

_TERM = re.compile(r"[^\W_]+", re.UNICODE)


def query_terms(query: str) -> set[str]:
    """Lower-cased word terms of a query (letters and digits; punctuation splits terms)."""
    return set(_TERM.findall(normalize_text(query)))


def split_of(query: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split a query belongs to, by a seeded hash of its normalised text."""
    h = hashlib.blake2b(f"{seed}\x1f{normalize_text(query)}".encode(), digest_size=8)
    u = int.from_bytes(h.digest(), "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def frequency_buckets(
    freq_by_query: dict[str, int], head_share: float = 1 / 3, torso_share: float = 1 / 3
) -> dict[str, str]:
    """Map each query to head/torso/tail by cumulative frequency mass (see module docstring)."""
    if not 0 < head_share < 1 or not 0 <= torso_share < 1 or head_share + torso_share > 1:
        raise ValueError(f"bucket shares must satisfy 0<head, 0<=torso, head+torso<=1; got {head_share}, {torso_share}")
    items = sorted(freq_by_query.items(), key=lambda kv: (-kv[1], kv[0]))
    total = float(sum(v for _, v in items)) or 1.0
    out: dict[str, str] = {}
    cum = 0.0
    for q, f in items:
        # A query belongs to the bucket in which its mass starts.
        share = cum / total
        out[q] = "head" if share < head_share else ("torso" if share < head_share + torso_share else "tail")
        cum += f
    return out


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"need 0 <= val, test and val + test < 1; got val={val_fraction}, test={test_fraction}")


class QuerySplits:
    """The split of each row, given in file order: with ``keep_existing`` the row's own split when it has one,
    else the split of the first row of its query, else :func:`split_of`. Per row, from what came before: it
    remembers one split per query (``by_query``), needed only with ``keep_existing`` (else a query's split is
    always its hash's) or when the caller reads ``by_query``."""

    def __init__(
        self, seed: int, val_fraction: float, test_fraction: float, keep_existing: bool = False, remember: bool = True
    ):
        check_fractions(val_fraction, test_fraction)
        self.seed, self.val, self.test, self.keep_existing = seed, val_fraction, test_fraction, keep_existing
        self.remember = remember or keep_existing
        self.by_query: dict[str, str] = {}

    def __call__(self, norm_query: str, existing: str | None = None) -> str:
        """The split of a row with normalised query ``norm_query`` and its own split ``existing``."""
        if self.keep_existing and existing:
            s = existing
        else:
            s = self.by_query.get(norm_query) or split_of(norm_query, self.seed, self.val, self.test)
        if self.remember:
            self.by_query.setdefault(norm_query, s)
        return s


def assign_splits(
    table: pa.Table,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    head_share: float = 1 / 3,
    torso_share: float = 1 / 3,
    mark_unseen: bool = True,
    keep_existing_split: bool = False,
) -> pa.Table:
    """Return ``table`` with ``split``, ``frequency`` and ``query_bucket`` filled in.

    ``frequency`` values already present are kept (taken per query, the maximum over its rows);
    missing ones become the number of rows of the query. With ``keep_existing_split`` rows that
    already carry a split keep it (a file that ships its own split).
    """
    check_fractions(val_fraction, test_fraction)
    queries = table.column("query").to_pylist()
    norm = [normalize_text(q) for q in queries]

    given_freq = table.column("frequency").to_pylist() if "frequency" in table.column_names else [None] * len(norm)
    counts: dict[str, int] = {}
    explicit: dict[str, int] = {}
    for q, f in zip(norm, given_freq):
        counts[q] = counts.get(q, 0) + 1
        if f is not None:
            explicit[q] = max(explicit.get(q, 0), int(f))
    freq_by_query = {q: explicit.get(q, c) for q, c in counts.items()}

    keep = keep_existing_split and "split" in table.column_names
    existing = table.column("split").to_pylist() if keep else [None] * len(norm)
    assign = QuerySplits(seed, val_fraction, test_fraction, keep)
    splits = [assign(q, e) for q, e in zip(norm, existing)]
    split_by_query = assign.by_query

    buckets_by_query = frequency_buckets(freq_by_query, head_share, torso_share)
    train_terms: set[str] = set()
    if mark_unseen:
        for q, s in split_by_query.items():
            if s == "train":
                train_terms |= query_terms(q)
    buckets = []
    unseen_cache: dict[str, bool] = {}
    for q, s in zip(norm, splits):
        b = buckets_by_query[q]
        if mark_unseen and s != "train":
            if q not in unseen_cache:
                unseen_cache[q] = not query_terms(q) <= train_terms
            if unseen_cache[q]:
                b = "unseen"
        buckets.append(b)

    out = table
    for name, values, typ in (
        ("split", splits, pa.string()),
        ("frequency", [freq_by_query[q] for q in norm], pa.int64()),
        ("query_bucket", buckets, pa.string()),
    ):
        arr = pa.array(values, type=typ)
        if name in out.column_names:
            out = out.set_column(out.column_names.index(name), name, arr)
        else:
            out = out.append_column(name, arr)
    return out


def select_split(table: pa.Table, split: str | Iterable[str]) -> pa.Table:
    names = [split] if isinstance(split, str) else list(split)
    return table.filter(pc.is_in(table.column("split"), value_set=pa.array(names)))


def split_summary(table: pa.Table) -> dict[str, dict[str, int]]:
    """Rows and distinct queries per split, rows per bucket per split."""
    out: dict[str, dict[str, int]] = {}
    splits = np.array(table.column("split").to_pylist(), dtype=object)
    buckets = np.array(table.column("query_bucket").to_pylist(), dtype=object)
    queries = [normalize_text(q) for q in table.column("query").to_pylist()]
    for s in sorted(
        set(splits.tolist()), key=lambda x: ("train", "val", "test").index(x) if x in ("train", "val", "test") else 3
    ):
        mask = splits == s
        d = {"rows": int(mask.sum()), "queries": len({q for q, m in zip(queries, mask) if m})}
        for b in ("head", "torso", "tail", "unseen"):
            d[b] = int(((buckets == b) & mask).sum())
        out[s] = d
    return out


def limit_by_query(
    rows: list[dict[str, Any]], limit: int, seed: int, split: str = "train", option: str = "--train_limit"
) -> list[dict[str, Any]]:
    """Whole queries of ``rows`` in the order of a seeded hash of the normalised query, while the pairs
    kept stay within ``limit`` (a query-disjoint subsample: every kept query keeps all its pairs).
    Rows keep their order. ``option`` names the setting in errors."""
    if limit < 1:
        raise ValueError(f"{option} must be >= 1, got {limit}")
    by_query: dict[str, int] = {}
    for r in rows:
        q = normalize_text(r["query"])
        by_query[q] = by_query.get(q, 0) + 1
    tag = "train_limit" if split == "train" else f"{split}_limit"

    def key(q: str) -> bytes:
        return hashlib.blake2b(f"{seed}\x1f{tag}\x1f{q}".encode(), digest_size=8).digest()

    keep: set[str] = set()
    total = 0
    for q in sorted(by_query, key=key):
        if total + by_query[q] > limit:
            break
        keep.add(q)
        total += by_query[q]
    if by_query and not keep:
        raise ValueError(
            f"{option} {limit} is smaller than the first {split} query's {by_query[min(by_query, key=key)]} pairs"
        )
    return [r for r in rows if normalize_text(r["query"]) in keep]
