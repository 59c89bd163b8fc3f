"""The synthetic catalog: determinism, schema, label balance, dimension truth, splits, files."""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict

import pyarrow.parquet as pq
import pytest

from datamodules import synth
from datamodules.splits import query_terms, select_split
from datamodules.synth import (
    CATEGORIES,
    CLOSE,
    COMPLEMENTS,
    GAINS,
    LEVEL_NAMES,
    QUERY_KINDS,
    SynthConfig,
    build,
    generate,
    model_key,
    rule_level,
    write,
)
from ellm_mkd.schema import BUCKETS, DIMENSIONS, EXAMPLE_SCHEMA, SPLITS, VERDICTS, make_example_id


@pytest.fixture(scope="module")
def data() -> synth.SynthData:
    return build(SynthConfig())


@pytest.fixture(scope="module")
def clean() -> synth.SynthData:
    """The default data without label noise: labels equal the rule everywhere."""
    return build(SynthConfig(label_noise=0.0))


def _rows(d: synth.SynthData) -> list[dict]:
    return d.examples.to_pylist()


def _dims(row: dict) -> dict[str, str]:
    return {d: row[f"dim_{d}"] for d in DIMENSIONS}


def _joined(d: synth.SynthData) -> list[tuple[dict, dict, dict]]:
    """(example row, its query's truth, its product) for every example."""
    queries = {q["query"]: q for q in d.queries.to_pylist()}
    products = {p["item_id"]: p for p in d.products.to_pylist()}
    return [(r, queries[r["query"]], products[r["item_id"]]) for r in _rows(d)]


# ------------------------------------------------------------------------------------ contract


def test_same_seed_identical_and_other_seed_different(data: synth.SynthData) -> None:
    again = build(SynthConfig())
    assert again.examples.equals(data.examples)
    assert again.products.equals(data.products)
    assert again.queries.equals(data.queries)
    other_ex, other_pr = generate(SynthConfig(seed=1))
    assert not other_ex.equals(data.examples)
    assert not other_pr.equals(data.products)


def test_generate_returns_examples_and_products(data: synth.SynthData) -> None:
    examples, products = generate(SynthConfig())
    assert examples.equals(data.examples) and products.equals(data.products)
    assert {"item_id", "title", "brand", "color", "category", "model", "attributes"} <= set(products.column_names)


def test_catalog_does_not_depend_on_query_count(data: synth.SynthData) -> None:
    assert build(SynthConfig(num_queries=20)).products.equals(data.products)


def test_schema_ids_and_required_fields(data: synth.SynthData) -> None:
    t = data.examples
    assert t.schema.equals(EXAMPLE_SCHEMA)
    cfg = SynthConfig()
    assert t.num_rows == cfg.num_queries * cfg.items_per_query
    assert data.queries.num_rows == cfg.num_queries
    ids = t.column("example_id").to_pylist()
    assert len(set(ids)) == len(ids)
    for i, r in enumerate(_rows(data), start=1):
        for name in ("example_id", "query", "item_id", "title", "brand", "description", "bullets", "attributes"):
            assert isinstance(r[name], str) and r[name].strip(), (name, r)
        assert r["example_id"] == make_example_id(r["query"], r["item_id"])
        assert re.fullmatch(r"P\d{6}", r["item_id"])
        assert r["source_id"] is None and r["source_line"] == i
        assert (
            r["label"] in range(4) and r["grade"] == float(r["label"]) and r["gain"] == pytest.approx(GAINS[r["label"]])
        )
        assert r["frequency"] >= 1 and r["split"] in SPLITS and r["query_bucket"] in BUCKETS
        assert all(r[f"dim_{d}"] in VERDICTS for d in DIMENSIONS)


def test_label_balance(data: synth.SynthData) -> None:
    counts = Counter(data.examples.column("label").to_pylist())
    n = data.examples.num_rows
    for level, name in enumerate(LEVEL_NAMES):
        assert 0.10 <= counts[level] / n <= 0.45, (name, counts[level] / n)


def test_every_query_kind_present(data: synth.SynthData) -> None:
    kinds = Counter(data.queries.column("kind").to_pylist())
    assert set(kinds) == set(QUERY_KINDS)
    assert synth.summarize(data, SynthConfig())["query_kinds"] == dict(kinds)
    # category and brand queries are the frequent ones, misspelled and long-tail ones rare
    freq = defaultdict(list)
    for k, f in zip(data.queries.column("kind").to_pylist(), data.queries.column("frequency").to_pylist()):
        freq[k].append(f)
    med = {k: sorted(v)[len(v) // 2] for k, v in freq.items()}
    assert med["category"] > med["brand_category"] > med["attribute"] > med["long_tail"] >= med["misspelled"]


# -------------------------------------------------------------------------------------- labels


def test_labels_follow_the_rule_up_to_noise(data: synth.SynthData, clean: synth.SynthData) -> None:
    noise = SynthConfig().label_noise
    rows = _rows(data)
    agree = sum(r["label"] == rule_level(_dims(r)) for r in rows) / len(rows)
    assert 1 - noise - 0.03 <= agree <= 1 - noise + 0.03
    assert all(abs(r["label"] - rule_level(_dims(r))) == 1 for r in rows if r["label"] != rule_level(_dims(r)))
    assert all(r["label"] == rule_level(_dims(r)) for r in _rows(clean))
    # noise changes labels only: the same pairs with the same verdicts
    for col in ["example_id", *(f"dim_{d}" for d in DIMENSIONS)]:
        assert data.examples.column(col).equals(clean.examples.column(col))


def test_rule_level_cases() -> None:
    full = {"category": "match", "brand": "match", "model": "match", "attributes": "match", "usage": "match"}
    assert rule_level(full) == 3
    assert rule_level({"category": "match", "usage": "match"}) == 3  # unstated dimensions are absent
    assert rule_level({**full, "model": "partial"}) == 2
    assert rule_level({**full, "brand": "mismatch"}) == 2
    assert rule_level({**full, "attributes": "partial"}) == 2
    assert rule_level({**full, "category": "partial"}) == 2
    assert rule_level({**full, "category": "mismatch", "usage": "partial"}) == 1
    assert rule_level({**full, "category": "mismatch", "usage": "mismatch"}) == 0
    assert rule_level({**full, "category": "mismatch", "usage": "match"}) == 2
    with pytest.raises(ValueError, match="unknown verdicts"):
        rule_level({**full, "brand": "maybe"})


def test_verdicts_agree_with_query_and_item(clean: synth.SynthData) -> None:
    seen: Counter[str] = Counter()
    brand_of_model = {
        model_key(m): b
        for m, b in zip(clean.products.column("model").to_pylist(), clean.products.column("brand").to_pylist())
    }
    for r, q, p in _joined(clean):
        qc, pc = q["category"], p["category"]
        level = r["label"]
        assert (r["dim_category"] == "match") == (pc == qc)
        if level == 3:
            assert pc == qc
        elif level == 1:
            assert pc in COMPLEMENTS[qc] and r["dim_usage"] == "partial"
        elif level == 0:
            assert pc != qc and pc not in CLOSE[qc] and pc not in COMPLEMENTS[qc]
        if r["dim_brand"] == "absent":
            assert q["brand"] is None
        else:
            assert (r["dim_brand"] == "match") == (p["brand"] == q["brand"])
        if r["dim_brand"] == "match":
            assert q["brand"].lower() in r["title"].lower()
            seen["brand"] += 1
        if r["dim_model"] == "match":
            assert q["model_key"] in model_key(r["attributes"])  # "model: VX-2041; ..." always carries it
            seen["model"] += 1
        if r["dim_model"] == "partial":  # same series: same brand and model code, another model
            assert p["brand"] == brand_of_model[q["model_key"]]
            assert model_key(p["model"]) != q["model_key"] and model_key(p["model"])[:2] == q["model_key"][:2]
            seen["model_partial"] += 1
        if q["attributes"]:
            asked = q["attributes"].split("; ")
            hits = sum(a in r["attributes"].split("; ") for a in asked)
            expected = "match" if hits == len(asked) else "partial" if hits else "mismatch"
            assert r["dim_attributes"] == expected
            if level == 3:
                seen["attributes"] += 1
        else:
            assert r["dim_attributes"] == "absent"
    assert min(seen.values()) > 20 and len(seen) == 4, seen


def test_exact_items_contain_what_the_query_says(clean: synth.SynthData) -> None:
    checked = 0
    for r, q, _ in _joined(clean):
        if r["label"] != 3:
            continue
        if q["kind"] == "brand_category":  # the brand is spelled in the query and in the title
            brand = q["brand"].lower()
            assert brand in r["query"] and brand in r["title"].lower()
            checked += 1
        if q["kind"] == "attribute":  # every asked value appears in the query text and the item
            for pair in q["attributes"].split("; "):
                value = pair.split(": ", 1)[1]
                assert value.lower() in r["query"] and pair in r["attributes"]
            checked += 1
    assert checked > 100


def test_each_query_covers_the_levels(clean: synth.SynthData) -> None:
    levels = defaultdict(set)
    for r in _rows(clean):
        levels[r["query"]].add(r["label"])
    base_kinds = dict(zip(clean.queries.column("query").to_pylist(), clean.queries.column("base_kind").to_pylist()))
    for query, found in levels.items():
        assert {0, 1, 3} <= found, query  # a pure category query has substitutes only from a close category
        if base_kinds[query] != "category":
            assert found == {0, 1, 2, 3}, query


def test_misspelled_queries_are_small_edits(data: synth.SynthData) -> None:
    rows = [q for q in data.queries.to_pylist() if q["kind"] == "misspelled"]
    assert rows
    for q in rows:
        assert q["query"] != q["base_query"] and q["base_kind"] != "misspelled"
        assert abs(len(q["query"]) - len(q["base_query"])) <= 2
        assert len(q["query"].split()) == len(q["base_query"].split())


# -------------------------------------------------------------------------------------- splits


def test_splits_are_query_disjoint_with_buckets(data: synth.SynthData) -> None:
    by_split = {s: set(select_split(data.examples, s).column("query").to_pylist()) for s in SPLITS}
    assert all(by_split.values())
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    test_buckets = Counter(select_split(data.examples, "test").column("query_bucket").to_pylist())
    assert test_buckets["head"] and test_buckets["tail"] and test_buckets["unseen"]
    assert "unseen" not in select_split(data.examples, "train").column("query_bucket").to_pylist()
    train_terms = set().union(*(query_terms(q) for q in by_split["train"]))
    test = select_split(data.examples, "test")
    for q, b in zip(test.column("query").to_pylist(), test.column("query_bucket").to_pylist()):
        assert (b == "unseen") == (not query_terms(q) <= train_terms)


# ---------------------------------------------------------------------------------------- files


def test_write_round_trip_and_refuses_to_overwrite(tmp_path, data: synth.SynthData) -> None:
    out = tmp_path / "synth"
    summary = write(out, SynthConfig())
    for name in synth.OUTPUT_FILES:
        assert (out / name).is_file()
    for split in SPLITS:
        table = pq.read_table(out / f"{split}.parquet")
        assert table.schema.equals(EXAMPLE_SCHEMA)
        assert table.equals(select_split(data.examples, split))
    assert pq.read_table(out / "products.parquet").equals(data.products)
    meta = json.loads((out / "synth.json").read_text(encoding="utf-8"))
    assert meta["counts"]["examples"] == data.examples.num_rows == summary["counts"]["examples"]
    assert set(meta["query_kinds"]) == set(QUERY_KINDS)
    assert sum(v["count"] for v in meta["label_distribution"].values()) == data.examples.num_rows
    assert "category" in meta["rules"] and meta["config"]["seed"] == 0
    assert sorted(os.listdir(tmp_path)) == ["synth"]  # no temporary directory left behind

    (out / "notes.txt").write_text("mine")
    before = (out / "train.parquet").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write(out, SynthConfig(seed=3))
    assert (out / "train.parquet").stat().st_mtime_ns == before
    write(out, SynthConfig(seed=3, num_queries=30), overwrite=True)
    assert pq.read_table(out / "train.parquet").num_rows < data.examples.num_rows
    assert (out / "notes.txt").read_text() == "mine"  # only the generator's own files are replaced


# --------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_queries": 0}, "num_queries"),
        ({"items_per_query": 3}, "items_per_query"),
        ({"label_noise": 1.5}, "label_noise"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction"),
        ({"variants_per_series": 0}, "variants_per_series"),
        ({"kind_mix": {"typo": 1.0}}, "unknown kinds"),
        ({"kind_mix": {"model": -1.0}}, "kind_mix"),
        ({"pool_items_per_query": -1}, "pool_items_per_query"),
    ],
)
def test_config_is_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SynthConfig(**kwargs)


def test_small_and_custom_configs() -> None:
    d = build(SynthConfig(num_queries=12, items_per_query=4, kind_mix={"model": 1.0}, seed=5))
    assert d.examples.num_rows == 48
    assert set(d.queries.column("kind").to_pylist()) == {"model"}
    assert len(CATEGORIES) >= 15


def test_pool_of_unjudged_pairs_for_training_queries(tmp_path) -> None:
    """``pool_items_per_query`` draws further candidates for every training query, none of them judged for it,
    with the same rules (labels follow the verdicts up to noise); the judged tables do not change, and a write
    without a pool removes the pool of an earlier one."""
    cfg = dict(seed=3, num_queries=60, items_per_query=6)
    plain, pooled = build(SynthConfig(**cfg)), build(SynthConfig(**cfg, pool_items_per_query=12))
    assert plain.pool is None and pooled.examples.equals(plain.examples) and pooled.products.equals(plain.products)
    rows, pool = _rows(plain), pooled.pool.to_pylist()
    train_queries = {r["query"] for r in rows if r["split"] == "train"}
    judged = {(r["query"], r["item_id"]) for r in rows}
    per_query = Counter(r["query"] for r in pool)
    assert set(per_query) == train_queries and set(per_query.values()) == {12}
    assert not judged & {(r["query"], r["item_id"]) for r in pool}
    assert len({r["example_id"] for r in pool}) == len(pool)
    assert all(r["split"] == "train" and r["example_id"] == make_example_id(r["query"], r["item_id"]) for r in pool)
    noisy = sum(r["label"] != rule_level(_dims(r)) for r in pool)
    assert noisy <= 0.15 * len(pool) and len({r["label"] for r in pool}) == 4
    write(tmp_path, SynthConfig(**cfg, pool_items_per_query=12))
    assert pq.read_table(tmp_path / synth.POOL_FILE).num_rows == len(pool)
    assert json.loads((tmp_path / "synth.json").read_text())["counts"]["pool"] == len(pool)
    write(tmp_path, SynthConfig(**cfg), overwrite=True)
    assert not (tmp_path / synth.POOL_FILE).exists()
