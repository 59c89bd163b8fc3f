"""Label schemes, query-disjoint splits and query buckets."""

from __future__ import annotations

import pyarrow as pa
import pytest

from datamodules.labels import LabelError, make_scheme
from datamodules.splits import assign_splits, frequency_buckets, query_terms, split_of
from ellm_mkd.schema import make_example_id, rows_to_table


@pytest.mark.parametrize(
    "raw,level,gain",
    [("E", 3, 1.0), ("exact", 3, 1.0), (" Substitute ", 2, 0.1), ("c", 1, 0.01), ("IRRELEVANT", 0, 0.0)],
)
def test_esci_letters_and_words(raw, level, gain):
    lv, grade, g = make_scheme("esci").parse(raw)
    assert (lv, grade, g) == (level, float(level), pytest.approx(gain))


def test_graded_cut_points_keep_raw_grade():
    s = make_scheme({"name": "graded", "low": 1, "high": 3, "cut_points": [2.0, 2.5]})
    assert s.num_levels == 3
    assert s.parse("1.33")[:2] == (0, pytest.approx(1.33))
    assert s.parse(2)[0] == 1 and s.parse("2.33")[0] == 1
    assert s.parse("2.5")[0] == 2 and s.parse(3.0) == (2, 3.0, 1.0)
    assert s.parse(2.0)[2] == pytest.approx(0.5)
    s2 = make_scheme({"name": "graded", "cut_points": [2.5]})
    assert s2.num_levels == 2 and s2.parse("2.33")[0] == 0
    with pytest.raises(ValueError, match="cut_points must increase"):
        make_scheme({"name": "graded", "cut_points": [2.5, 2.0]})


def test_ordinal_and_binary_and_levels():
    o = make_scheme({"name": "ordinal", "low": 1, "high": 4})
    assert o.num_levels == 4 and o.parse("4") == (3, 4.0, 1.0) and o.parse(1)[0] == 0
    with pytest.raises(LabelError):
        o.parse(5)
    b = make_scheme("binary")
    assert [b.parse(x)[0] for x in ("1", "yes", "Relevant", "0", "false", "irrelevant")] == [1, 1, 1, 0, 0, 0]
    lv = make_scheme({"name": "levels", "num_levels": 3})
    assert lv.parse(2)[0] == 2 and lv.level_names == ("irrelevant", "partial", "relevant")
    with pytest.raises(LabelError, match="integer level in 0..2"):
        lv.parse(3)


def test_scheme_config_errors():
    with pytest.raises(ValueError, match="unknown label scheme"):
        make_scheme("stars")
    with pytest.raises(ValueError, match="level_names has 2 names for 4 levels"):
        make_scheme({"name": "levels", "num_levels": 4, "level_names": ["a", "b"]})


def _table(queries: list[str]) -> pa.Table:
    rows = [
        {"example_id": make_example_id(q, str(i)), "query": q, "item_id": str(i), "title": "t", "label": 0}
        for i, q in enumerate(queries)
    ]
    return rows_to_table(rows)


QUERIES = [f"query {i} {'drill' if i % 3 else 'saw'}" for i in range(600)]


def test_splits_are_query_disjoint_and_deterministic():
    t = _table(QUERIES + [q.upper() for q in QUERIES[:100]])  # the same queries in another case
    a = assign_splits(t, seed=0)
    b = assign_splits(t, seed=0)
    assert a.column("split").to_pylist() == b.column("split").to_pylist()
    by_query: dict[str, set] = {}
    for q, s in zip(a.column("query").to_pylist(), a.column("split").to_pylist()):
        by_query.setdefault(q.lower(), set()).add(s)
    assert all(len(v) == 1 for v in by_query.values())
    counts = {s: sum(1 for v in by_query.values() if s in v) for s in ("train", "val", "test")}
    assert 0.14 < counts["test"] / 600 < 0.26 and 0.05 < counts["val"] / 600 < 0.15
    c = assign_splits(t, seed=1)
    assert c.column("split").to_pylist() != a.column("split").to_pylist()


def test_split_of_a_query_does_not_depend_on_other_rows():
    small = assign_splits(_table(QUERIES[:50]), seed=3).column("split").to_pylist()
    big = assign_splits(_table(QUERIES), seed=3).column("split").to_pylist()[:50]
    assert small == big
    assert split_of("Cordless  Drill", 0, 0.1, 0.2) == split_of("cordless drill", 0, 0.1, 0.2)


def test_frequency_buckets_by_traffic_mass():
    freq = {"a": 50, "b": 30, "c": 10, "d": 5, "e": 3, "f": 2}
    b = frequency_buckets(freq)
    assert b["a"] == "head" and b["b"] == "torso" and b["c"] == "tail" and b["f"] == "tail"
    assert frequency_buckets({"x": 1, "y": 1, "z": 1}) == {"x": "head", "y": "torso", "z": "tail"}


def test_unseen_marks_held_out_queries_with_new_terms():
    t = _table(QUERIES + ["zxq-9000 widget"] * 3)
    a = assign_splits(t, seed=0).to_pylist()
    train_terms = set().union(*(query_terms(r["query"]) for r in a if r["split"] == "train"))
    for r in a:
        if r["split"] == "train":
            assert r["query_bucket"] != "unseen"
        else:
            assert (r["query_bucket"] == "unseen") == (not query_terms(r["query"]) <= train_terms)
    # frequency is the traffic count when given
    t2 = t.set_column(t.column_names.index("frequency"), "frequency", pa.array([7] * t.num_rows, pa.int64()))
    assert set(assign_splits(t2).column("frequency").to_pylist()) == {7}
