"""Synthetic e-commerce catalog: the embedded default data of every stage and of the demo.

Nothing is downloaded. A hand-written taxonomy of 24 product categories in four departments
(tools, home improvement, electronics, home & kitchen) is expanded, deterministically from a seed,
into a catalog of products, a set of search queries, and judged (query, item) pairs whose
relevance level and per-dimension verdicts follow the documented rules below.

Catalog
    Each category has 4 invented brands, attribute keys with category-appropriate values
    (colour, sizes with units, material, voltage / wattage / capacity ...), *complement*
    categories (used together: drill -> drill bits and batteries, saw -> blades, coffee maker ->
    filters, laptop -> charger and sleeve, vacuum -> bags; the relation is symmetric) and, for
    three pairs, a *close* category that does the same job (cordless drill ~ impact driver,
    headphones ~ earbuds, LED bulb ~ smart bulb). A brand has 1..``series_per_brand`` series per
    category (a marketing name and a model code); a series has 1..``variants_per_series`` models
    that differ in at least one attribute ("VX-2041" / "VX-2057", "KS850" / "KS850C"); a model is
    sold as one or two listings (same specs, different title). Titles mix brand, series, model,
    key attributes and marketing noise ("Heavy Duty", "(2-Pack)", "New 2024 Model") in varying
    order. ``attributes`` always holds ``model: ...; key: value; ...``; the title usually shows
    the model. ``item_id`` is "P000001".. in catalog order; the catalog depends on the seed and the
    catalog fields of :class:`SynthConfig` only, not on ``num_queries``.

Queries (kind recorded in ``queries.parquet``, counts in ``synth.json``)
    category        "cordless drills", "best flower pot"
    brand_category  "voltara cordless drill"
    model           "vx-2041", "voltara vx2041", "ks850c circular saw"
    attribute       "red ceramic planter 12 in" (1-2 values of an existing product)
    long_tail       brand + 2-4 attribute values (+ sometimes the model) + filler words
    misspelled      any of the above with 1-2 character edits on words of 4+ letters
                    ("cordles drill", "voltra drill"); model numbers are never edited
    Queries are distinct after normalisation. Traffic (``frequency``) is heavy-tailed: a per-kind
    base (category 1000, brand_category 300, model 40, attribute 30, long_tail 4, misspelled 3)
    times a log-normal factor (sigma 0.6), so a few dozen category/brand queries carry most of the
    traffic and long-tail and misspelled queries sit in the tail. ``splits.assign_splits`` turns it into
    head/torso/tail buckets; misspellings and model numbers fill the ``unseen`` bucket.
    ``queries.parquet`` holds what each query asks (kind, base_kind, base_query, category, brand,
    model_key, attributes), its frequency, split and bucket.

Candidates
    Per query ``items_per_query`` items aimed at about 30% exact, 30% substitute, 20% complement and
    20% irrelevant: exact items from the asked category that satisfy every stated constraint;
    substitutes from the same category (preferring hard ones: same brand, same series, some of the
    asked attributes) and from a close category; complements from complement categories;
    irrelevant items from other categories (preferring the same department). Missing exact items
    (a model has one or two listings) are replaced by substitutes and missing substitutes (a
    category query has only close-category ones) by exact items; what is still missing becomes
    complements, then irrelevant items.

Pool (``pool_items_per_query`` > 0)
    ``pool.parquet``: that many further candidates for each *training* query, drawn the same way
    (same level mix, none of them already judged for the query) from separate random streams, so
    the judged splits are identical with or without a pool. It stands for the production setting
    where a few pairs are human-labelled and many more are not: the teacher labels the pool
    (``data.augment.source``) and the students learn from its judgement. Its rows carry the rules'
    labels so that a benchmark can score the teacher on them; augmentation drops every label.

Labelling rules
    A query asks for a category (named, or implied by its model number: a model number names one
    product, so a pure model-number query asks for that product's category), optionally a brand, a
    model and attribute values. A misspelled query keeps the truth of the query it was misspelled
    from: verdicts judge what the user meant. Verdicts per (query, item):

    category    match: the item is of the asked category; partial: of a close category that does
                the same job (impact driver for "cordless drill"); mismatch: otherwise. Never
                absent here (see above).
    brand       absent: the query names no brand; match: same brand; mismatch: another brand.
    model       absent: the query has no model number; match: same model (case and hyphens
                ignored); partial: another model of the same series (same brand and model code,
                another variant); mismatch: otherwise.
    attributes  absent: the query asks for no attribute value; match: the item has every asked
                value under the same key; partial: some of them; mismatch: none (an item without
                the key does not have the value).
    usage       match: the item does the asked job (category match or partial); partial: it is
                used together with the asked product (a complement category: drill bits for a
                drill); mismatch: neither. Never absent here.

    Level (rule_level), first rule that applies:
      1. category mismatch: substitute (2) if usage is match, complement (1) if usage is partial,
         else irrelevant (0);
      2. category partial: substitute (2);
      3. category match or absent, and brand, model or attributes is mismatch or partial:
         substitute (2);
      4. otherwise (every stated dimension matches): exact (3).
    Before noise, label == rule_level(dims) for every pair (the label is computed from the dims).

    Label noise: with probability ``label_noise`` a pair's label moves to an adjacent level
    (0 -> 1, 3 -> 2, 1 and 2 up or down with equal chance); verdicts stay truthful, so
    label != rule_level(dims) marks exactly the noisy pairs. grade = float(label); gain is the
    ESCI gain of the label (0, 0.01, 0.1, 1).
"""

from __future__ import annotations

import json
import os
import random
import textwrap
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ellm_mkd.schema import DIMENSIONS, EXAMPLE_SCHEMA, SPLITS, make_example_id

from .splits import assign_splits, select_split, split_summary
from .staging import staged_files
from .synth_catalog import _attr_text, _build_catalog
from .synth_queries import _candidates, _make_queries
from .synth_spec import DEFAULT_KIND_MIX as DEFAULT_KIND_MIX
from .synth_spec import GAINS, LEVEL_NAMES, Product, SynthConfig, rule_level
from .synth_spec import QUERY_KINDS as QUERY_KINDS
from .synth_spec import Query as Query
from .synth_spec import judge as judge
from .synth_spec import model_key as model_key
from .synth_vocab import CATEGORIES
from .synth_vocab import CLOSE as CLOSE
from .synth_vocab import COMPLEMENTS as COMPLEMENTS
from .synth_vocab import Category as Category

#: Files :func:`write` produces; ``synth.json`` last, so its presence marks a complete write.
OUTPUT_FILES: tuple[str, ...] = (
    "train.parquet",
    "val.parquet",
    "test.parquet",
    "products.parquet",
    "queries.parquet",
    "synth.json",
)
#: Written beside them when ``pool_items_per_query`` > 0: unjudged candidate pairs of the training queries.
POOL_FILE = "pool.parquet"
#: The labelling rules as text (stored in synth.json).
RULES: str = textwrap.dedent((__doc__ or "").partition("Labelling rules\n")[2]).strip()


@dataclass
class SynthData:
    """Everything :func:`build` generates: examples (EXAMPLE_SCHEMA), the catalog and the queries."""

    examples: pa.Table
    products: pa.Table
    queries: pa.Table
    pool: pa.Table | None = None


# ------------------------------------------------------------------------------------------ build


def _noisy(rng: random.Random, level: int) -> int:
    """An adjacent level: 0 -> 1, 3 -> 2, 1 and 2 up or down with equal chance."""
    return 1 if level == 0 else 2 if level == 3 else level + rng.choice((-1, 1))


def build(config: SynthConfig | None = None) -> SynthData:
    """Generate catalog, queries and examples (split and bucketed); see the module docstring."""
    cfg = config or SynthConfig()
    products = _build_catalog(cfg)
    by_cat: dict[str, list[Product]] = {c: [] for c in CATEGORIES}
    for p in products:
        by_cat[p.category].append(p)
    queries = _make_queries(cfg, products)
    rng_pairs = random.Random(f"synth-pairs:{cfg.seed}")
    rng_noise = random.Random(f"synth-noise:{cfg.seed}")
    cols: dict[str, list] = {name: [] for name in EXAMPLE_SCHEMA.names}
    for q in queries:
        for p, dims in _candidates(rng_pairs, q, by_cat, cfg.items_per_query):
            _add_pair(cols, q, p, dims, rng_noise, cfg.label_noise)
    examples = assign_splits(
        pa.Table.from_pydict(cols, schema=EXAMPLE_SCHEMA),
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
    )
    examples = examples.select(EXAMPLE_SCHEMA.names).cast(EXAMPLE_SCHEMA)
    first: dict[str, tuple[str, str]] = {}
    for q, s, b in zip(*(examples.column(c).to_pylist() for c in ("query", "split", "query_bucket"))):
        first.setdefault(q, (s, b))
    pool = _pool(cfg, queries, by_cat, examples, first) if cfg.pool_items_per_query else None

    product_table = pa.Table.from_pydict(
        {
            "item_id": [p.item_id for p in products],
            "title": [p.title for p in products],
            "brand": [p.brand for p in products],
            "color": [p.attrs.get("color", "") for p in products],
            "category": [p.category for p in products],
            "department": [CATEGORIES[p.category].department for p in products],
            "series": [p.series for p in products],
            "model": [p.model for p in products],
            "description": [p.description for p in products],
            "bullets": [p.bullets for p in products],
            "attributes": [_attr_text(p) for p in products],
        }
    )
    query_table = pa.Table.from_pydict(
        {
            "query": [q.text for q in queries],
            "kind": [q.kind for q in queries],
            "base_kind": [q.base_kind for q in queries],
            "base_query": [q.base_text or q.text for q in queries],
            "category": [q.category for q in queries],
            "brand": [q.brand for q in queries],
            "model_key": [q.model for q in queries],
            "attributes": ["; ".join(f"{k}: {v}" for k, v in q.attrs.items()) for q in queries],
            "frequency": pa.array([q.frequency for q in queries], pa.int64()),
            "split": [first[q.text][0] for q in queries],
            "query_bucket": [first[q.text][1] for q in queries],
        }
    )
    return SynthData(examples, product_table, query_table, pool)


def _add_pair(cols: dict[str, list], q: Query, p: Product, dims: dict[str, str], rng_noise, label_noise: float) -> None:
    """Append one judged (query, item) row to the column lists."""
    level = rule_level(dims)
    label = _noisy(rng_noise, level) if rng_noise.random() < label_noise else level
    row = {
        "example_id": make_example_id(q.text, p.item_id),
        "source_id": None,
        "source_line": len(cols["query"]) + 1,
        "query": q.text,
        "item_id": p.item_id,
        "title": p.title,
        "brand": p.brand,
        "color": p.attrs.get("color", ""),
        "description": p.description,
        "bullets": p.bullets,
        "attributes": _attr_text(p),
        "label": label,
        "grade": float(label),
        "gain": GAINS[label],
        "frequency": q.frequency,
        "query_bucket": None,
        "split": None,
        **{f"dim_{d}": dims[d] for d in DIMENSIONS},
    }
    for name, value in row.items():
        cols[name].append(value)


def _pool(
    cfg: SynthConfig, queries: list[Query], by_cat: dict[str, list[Product]], examples: pa.Table, first
) -> pa.Table:
    """``pool_items_per_query`` further candidates for each training query, none of them judged for it, drawn from
    their own random streams (the judged tables do not depend on the pool). Rows keep the rules' labels so a
    benchmark can score the teacher on them; augmentation reads them as unlabelled pairs."""
    judged: dict[str, set[str]] = {}
    for q, item in zip(examples.column("query").to_pylist(), examples.column("item_id").to_pylist()):
        judged.setdefault(q, set()).add(item)
    rng_pairs = random.Random(f"synth-pool:{cfg.seed}")
    rng_noise = random.Random(f"synth-pool-noise:{cfg.seed}")
    cols: dict[str, list] = {name: [] for name in EXAMPLE_SCHEMA.names}
    for q in queries:
        split, bucket = first[q.text]
        if split != "train":
            continue
        free = {c: [p for p in ps if p.item_id not in judged[q.text]] for c, ps in by_cat.items()}
        for p, dims in _candidates(rng_pairs, q, free, cfg.pool_items_per_query):
            _add_pair(cols, q, p, dims, rng_noise, cfg.label_noise)
            cols["split"][-1], cols["query_bucket"][-1] = split, bucket
    return pa.Table.from_pydict(cols, schema=EXAMPLE_SCHEMA)


def generate(config: SynthConfig | None = None) -> tuple[pa.Table, pa.Table]:
    """Return ``(examples, products)``: examples conform to ``EXAMPLE_SCHEMA`` with split, frequency and
    query_bucket filled by ``splits.assign_splits``; products is the catalog (item_id, title, brand, color,
    category, department, series, model, description, bullets, attributes)."""
    data = build(config)
    return data.examples, data.products


def summarize(data: SynthData, config: SynthConfig) -> dict:
    """Counts, label distribution, query kinds and split buckets (the body of synth.json)."""
    labels = Counter(data.examples.column("label").to_pylist())
    n = data.examples.num_rows or 1
    return {
        "generator": "datamodules.synth",
        "config": asdict(config),
        "counts": {
            "examples": data.examples.num_rows,
            "queries": data.queries.num_rows,
            "products": data.products.num_rows,
            "pool": data.pool.num_rows if data.pool is not None else 0,
            "categories": len(CATEGORIES),
        },
        "label_distribution": {
            name: {"count": labels[i], "fraction": round(labels[i] / n, 4)} for i, name in enumerate(LEVEL_NAMES)
        },
        "query_kinds": {k: v for k, v in sorted(Counter(data.queries.column("kind").to_pylist()).items())},
        "splits": split_summary(data.examples),
        "levels": list(LEVEL_NAMES),
        "gains": list(GAINS),
        "rules": RULES,
    }


def write(out_dir: str | os.PathLike, config: SynthConfig | None = None, overwrite: bool = False) -> dict:
    """Generate and write ``train/val/test.parquet`` (EXAMPLE_SCHEMA), ``products.parquet``,
    ``queries.parquet`` and ``synth.json`` into ``out_dir``; return the synth.json summary plus
    ``out_dir`` and ``files``.

    Files are written into a temporary directory next to ``out_dir`` and moved in with
    ``os.replace`` (synth.json last). Raises ``FileExistsError`` when ``out_dir`` already holds
    any of these files, unless ``overwrite=True`` (which replaces only these files).
    """
    cfg = config or SynthConfig()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    existing = [f for f in OUTPUT_FILES if (out / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {existing}; pass overwrite=True to replace them")
    data = build(cfg)
    summary = summarize(data, cfg)
    names = (POOL_FILE, *OUTPUT_FILES) if data.pool is not None else OUTPUT_FILES
    with staged_files(out, names) as tmp:
        for split in SPLITS:
            pq.write_table(select_split(data.examples, split), tmp / f"{split}.parquet")
        pq.write_table(data.products, tmp / "products.parquet")
        pq.write_table(data.queries, tmp / "queries.parquet")
        if data.pool is not None:
            pq.write_table(data.pool, tmp / POOL_FILE)
        (tmp / "synth.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (out / POOL_FILE).unlink(missing_ok=True)  # a pool of earlier settings never outlives them
    return {"out_dir": str(out), "files": [str(out / f) for f in OUTPUT_FILES], **summary}
