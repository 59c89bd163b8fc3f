"""Bad input the readers and validation own (issue 21, items 5, 7 and 12): the ESCI join, compressed
inputs that inflate without limit, control characters and wrong-typed text columns. Real files on disk."""

from __future__ import annotations

import gzip
import json
import time
import tracemalloc
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_readers import ROWS, esci_source, problems_of, write_delimited

from datamodules.readers import DataError
from datamodules.validation import ColumnMapping, DataSource, load_examples

# ------------------------------------------------------------------------------ ESCI join (item 5)


def esci_files(tmp_path: Path, examples: dict, products: dict, **kw) -> DataSource:
    base_ex = {
        "example_id": [10, 11, 12, 13],
        "query": ["drill", "drill", "saw", "lamp"],
        "product_id": ["B1", "B2", "B9", "B3"],
        "product_locale": ["us", "us", "us", "us"],
        "esci_label": ["E", "I", "S", "E"],
    }
    base_prod = {
        "product_id": ["B1", "B2", "B1", "B3"],
        "product_locale": ["us", "us", "jp", "us"],
        "product_title": ["Drill", "Lamp", "ドリル", "Desk lamp"],
        "product_brand": ["V", "L", "V", "L"],
        "product_color": [None, "red", None, "white"],
        "product_description": ["", "", "", ""],
        "product_bullet_point": ["fast", None, None, "bright"],
    }
    pq.write_table(pa.table({**base_ex, **examples}), tmp_path / "examples.parquet")
    pq.write_table(pa.table({**base_prod, **products}), tmp_path / "products.parquet")
    return DataSource(
        path=str(tmp_path / "examples.parquet"), preset="esci", products=str(tmp_path / "products.parquet"), **kw
    )


def test_esci_duplicated_product_key_names_the_products_file_and_key(tmp_path):
    src = esci_files(tmp_path, {}, {"product_locale": ["us", "us", "us", "us"]})  # B1 twice in 'us'
    with pytest.raises(DataError) as e:
        load_examples(src)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'products.parquet'}: 1 (product_locale, product_id) key(s) appear more")
    assert "product ('us', 'B1') appears 2 times, at rows [1, 3]" in msg and "examples.parquet" not in msg
    (p,) = e.value.problems
    assert (p.file, p.line, p.field, p.kind) == (str(tmp_path / "products.parquet"), 1, "product_id", "duplicate_id")


def test_esci_join_keeps_every_example_row_once_with_its_row_number(tmp_path):
    """A product id held by two locales matches once; rows read equal the examples file's rows."""
    src = esci_files(tmp_path, {}, {}, on_error="quarantine", quarantine_path=str(tmp_path / "q.jsonl"))
    table, report = load_examples(src)
    assert report.rows_read == 4 and table.num_rows == 3 and report.rejected == {"missing_product": 1}
    assert {r["source_id"]: r["source_line"] for r in table.to_pylist()} == {"10": 1, "11": 2, "13": 4}
    (q,) = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert q["row"] == 3 and "('us', 'B9')" in q["problems"][0]["message"]


def test_esci_all_null_columns(tmp_path):
    null4 = pa.array([None] * 4, pa.null())
    src = esci_files(tmp_path, {}, {"product_brand": null4, "product_color": null4}, on_error="quarantine")
    src.quarantine_path = str(tmp_path / "q.jsonl")
    table, _ = load_examples(src)
    assert table.num_rows == 3 and set(table.column("brand").to_pylist()) == {""}
    # an all-null query column is every row's empty query, located, not a pyarrow error
    probs = problems_of(esci_files(tmp_path, {"query": null4}, {}))
    assert {(p.kind, p.field) for p in probs} == {("empty_field", "query"), ("missing_product", "product_id")}
    with pytest.raises(DataError, match=r"examples\.parquet: join column 'product_locale' is all null"):
        load_examples(esci_files(tmp_path, {"product_locale": null4}, {}))


def test_esci_integer_product_ids_are_matched_as_text(tmp_path):
    src = esci_files(tmp_path, {"product_id": [1, 2, 9, 3]}, {"product_id": [1, 2, 1, 3]}, on_error="quarantine")
    src.quarantine_path = str(tmp_path / "q.jsonl")
    table, report = load_examples(src)
    assert table.num_rows == 3 and sorted(table.column("item_id").to_pylist()) == ["1", "2", "3"]
    assert sum("join column 'product_id' is int64" in w for w in report.warnings) == 2
    # integer ids against text ids that are not decimal: nothing matches, and the error says why
    src = esci_files(tmp_path, {"product_id": [1, 2, 9, 3]}, {}, on_error="quarantine")
    src.quarantine_path = str(tmp_path / "q2.jsonl")
    with pytest.raises(DataError, match=r"no usable rows \(4 read, 4 rejected: missing_product: 4\)\n.*is int64"):
        load_examples(src)
    with pytest.raises(DataError, match=r"join column 'product_id' is double, not text or integers"):
        load_examples(esci_files(tmp_path, {}, {"product_id": [1.0, 2.0, 1.0, 3.0]}))


# ------------------------------------------------------------------ compressed input caps (item 7)


def write_bomb(path: Path, field_bytes: int) -> Path:
    """A CSV.gz whose second line holds one ``field_bytes``-long title, written a megabyte at a time."""
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(b"id,query,title,label\n1,drill,")
        for _ in range(field_bytes >> 20):
            f.write(b"x" * (1 << 20))
        f.write(b",E\n2,saw,Saw,E\n")
    return path


def test_a_small_gz_inflating_to_200_mb_fails_fast_in_little_memory(tmp_path):
    bomb = write_bomb(tmp_path / "bomb.csv.gz", 200 << 20)
    assert bomb.stat().st_size < 300_000
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        load_examples(DataSource(path=str(bomb), scheme="esci"))
    seconds, (_, peak) = time.perf_counter() - t0, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 2 and peak < 40 << 20  # not 29 s and 2.45 GB
    assert str(e.value).startswith(f"{bomb}:2: a line longer than 1,280,000 bytes (a field far over max_field_chars")
    assert e.value.problems[0].kind == "too_long" and e.value.problems[0].line == 2


def test_decompressed_bytes_are_capped(tmp_path):
    g = tmp_path / "d.csv.gz"
    rows = [[str(i), f"query {i}", f"Title {i}", "Brand", "E"] for i in range(1000)]
    g.write_bytes(gzip.compress(write_delimited(tmp_path / "d.csv", rows).read_bytes()))
    with pytest.raises(DataError, match=r"d\.csv\.gz: more than max_input_bytes=4,096 bytes .* Raise max_input_bytes"):
        load_examples(esci_source(g, max_input_bytes=4096))
    assert load_examples(esci_source(g))[1].rows_read == 1000


def test_zip_member_and_jsonl_lines_are_capped(tmp_path):
    rows = [r[:] for r in ROWS]
    rows[3][2] = "y" * 70_000
    csv_path = write_delimited(tmp_path / "d.csv", rows)
    z = tmp_path / "d.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(csv_path, "d.csv")
    with pytest.raises(DataError, match=r"d\.zip::d\.csv:5: a line longer than 64,000 bytes"):
        load_examples(esci_source(z, max_field_chars=1000))
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"query": "q", "title": t, "label": "E"}) for t in ["a", "b" * 9000]) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: a line longer than 6,400 bytes"):
        load_examples(DataSource(path=str(j), scheme="esci", max_field_chars=100))


# --------------------------------------------------------- control characters, wrong types (item 12)

DIRTY = {
    "title": "Voltara\x00 Drill \x1b[31mRED\x1b[0m",  # NUL, ESC (a terminal colour sequence)
    "brand": "\u202eartloV",  # a right-to-left override
    "query": "cordless\x9b drill",  # a C1 control
}


def dirty_csv(tmp_path: Path) -> Path:
    rows = [r[:] for r in ROWS]
    rows[0][2], rows[0][3], rows[1][1] = DIRTY["title"], DIRTY["brand"], DIRTY["query"]
    rows[2][2] = "Planter\x0cRed"  # a form feed: a line break to str.splitlines, not to csv
    return write_delimited(tmp_path / "d.csv", rows)


def test_control_characters_are_stripped_and_counted_per_column(tmp_path):
    table, report = load_examples(esci_source(dirty_csv(tmp_path)))
    rows = {r["source_id"]: r for r in table.to_pylist()}
    assert rows["1"]["title"] == "Voltara Drill [31mRED[0m" and rows["1"]["brand"] == "artloV"
    assert rows["2"]["query"] == "cordless drill" and rows["3"]["title"] == "PlanterRed"
    assert report.control_chars == {"title": 2, "brand": 1, "query": 1}
    assert [r["source_line"] for r in table.to_pylist()] == [2, 3, 4, 5, 6]  # the form feed moved no line
    assert any("control characters" in w and "stripped (control_chars: strip)" in w for w in report.warnings)


def test_control_characters_kept_or_rejected_by_policy(tmp_path):
    p = dirty_csv(tmp_path)
    table, report = load_examples(esci_source(p, control_chars="keep"))
    assert table.to_pylist()[0]["title"] == DIRTY["title"] and report.control_chars["title"] == 2
    probs = problems_of(esci_source(p, control_chars="reject"))
    assert [(x.line, x.field, x.kind) for x in probs] == [
        (2, "title", "control_chars"),
        (2, "brand", "control_chars"),
        (3, "query", "control_chars"),
        (4, "title", "control_chars"),
    ]
    assert "control character U+0000 at character 8" in probs[0].message
    with pytest.raises(ValueError, match="control_chars must be"):
        DataSource(path="x", control_chars="drop")


def test_a_json_line_separator_inside_a_value_does_not_split_the_record(tmp_path):
    j = tmp_path / "d.jsonl"
    recs = [
        {"query": "drill", "title": "Drill\u2028Set\x85", "label": "E"},
        {"query": "saw", "title": "Saw", "label": "S"},
    ]
    j.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    table, report = load_examples(DataSource(path=str(j), scheme="esci"))
    assert table.num_rows == 2 and report.rows_read == 2 and report.control_chars == {"title": 1}


def test_wrong_typed_parquet_text_columns(tmp_path):
    p = tmp_path / "d.parquet"
    mapping = ColumnMapping(query="query", title="title", brand="brand", bullets="bullets", label="label")
    base = {
        "query": ["drill", "saw", "bit"],
        "title": pa.array([1234, 5678, 42], pa.int64()),  # numbers where text is expected: read, counted
        "brand": [["V", "W"], ["R"], None],  # a list where one text is expected: joined, counted
        "bullets": [["fast", "light"], None, ["steel"]],  # a list is the natural shape of bullets: not counted
        "label": ["E", "S", "I"],
    }
    pq.write_table(pa.table(base), p)
    table, report = load_examples(DataSource(path=str(p), mapping=mapping, scheme="esci"))
    rows = table.to_pylist()
    assert [r["title"] for r in rows] == ["1234", "5678", "42"] and rows[0]["brand"] == "V\nW"
    assert rows[0]["bullets"] == "fast\nlight" and report.converted == {"title": 3, "brand": 2}
    assert any("column 'title': 3 number value(s) where text is expected" in w for w in report.warnings)
    pq.write_table(pa.table({**base, "title": [True, False, True]}), p)
    probs = problems_of(DataSource(path=str(p), mapping=mapping, scheme="esci"))
    assert [(x.line, x.field, x.kind) for x in probs] == [(r, "title", "bad_value") for r in (1, 2, 3)]
    assert "expected text, got a boolean (True)" in probs[0].message
