"""Readers, encodings, presets, and every kind of bad input, on real files written to disk."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import catalog_with_empty_queries

from datamodules.readers import DataError
from datamodules.validation import ColumnMapping, DataSource, load_examples
from ellm_mkd.schema import EXAMPLE_SCHEMA, make_example_id

HEADER = ["id", "query", "title", "brand", "label"]
ROWS = [
    ["1", "cordless drill", "Voltara 20V Cordless Drill", "Voltara", "E"],
    ["2", "cordless drill", "Drill Bit Set (50 pc)", "Kestrel", "C"],
    ["3", "red planter", "Ceramic Planter, Red, 12 in.", "Terrabloom", "Exact"],
    ["4", "red planter", "LED Bulb 60W", "Lumix", "irrelevant"],
    ["5", "circular saw", "Ridgeway 7-1/4 in. Circular Saw", "Ridgeway", "S"],
]


def esci_source(path, **kw) -> DataSource:
    mapping = ColumnMapping(query="query", title="title", brand="brand", label="label", source_id="id")
    return DataSource(path=str(path), mapping=mapping, scheme="esci", **kw)


def write_delimited(path: Path, rows, header=HEADER, delim=",", encoding="utf-8") -> Path:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delim, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


def write_jsonl(path: Path, rows, header=HEADER) -> Path:
    path.write_text("".join(json.dumps(dict(zip(header, r))) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows, header=HEADER) -> Path:
    pq.write_table(pa.table({h: [r[i] for r in rows] for i, h in enumerate(header)}), path)
    return path


def gz(path: Path) -> Path:
    out = path.with_name(path.name + ".gz")
    out.write_bytes(gzip.compress(path.read_bytes()))
    return out


def zipped(path: Path) -> Path:
    out = path.with_name(path.name + ".zip")
    with zipfile.ZipFile(out, "w") as z:
        z.write(path, path.name)
    return out


WRITERS = {
    "csv": lambda p: write_delimited(p / "d.csv", ROWS),
    "tsv": lambda p: write_delimited(p / "d.tsv", ROWS, delim="\t"),
    "jsonl": lambda p: write_jsonl(p / "d.jsonl", ROWS),
    "parquet": lambda p: write_parquet(p / "d.parquet", ROWS),
}


def problems_of(source: DataSource) -> list:
    with pytest.raises(DataError) as ei:
        load_examples(source)
    return ei.value.problems


# ------------------------------------------------------------------------------------- readers
@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("wrap", ["plain", "gz", "zip"])
def test_every_format_plain_and_compressed(tmp_path, fmt, wrap):
    path = WRITERS[fmt](tmp_path)
    path = {"plain": lambda p: p, "gz": gz, "zip": zipped}[wrap](path)
    table, report = load_examples(esci_source(path))
    assert table.schema == EXAMPLE_SCHEMA
    assert report.rows_read == 5 and table.num_rows == 5 and report.rows_rejected == 0
    by_source = {r["source_id"]: r for r in table.to_pylist()}
    assert by_source["1"]["label"] == 3 and by_source["2"]["label"] == 1 and by_source["4"]["label"] == 0
    assert by_source["3"]["gain"] == pytest.approx(1.0) and by_source["2"]["gain"] == pytest.approx(0.01)
    assert by_source["1"]["brand"] == "Voltara"
    # line numbers point at the source: CSV line 2 (after the header), JSONL line 1, Parquet row 1
    assert by_source["1"]["source_line"] == {"csv": 2, "tsv": 2, "jsonl": 1, "parquet": 1}[fmt]
    assert set(table.column("split").to_pylist()) <= {"train", "val", "test"}


def test_example_ids_are_stable_and_depend_on_query_and_item(tmp_path):
    a, _ = load_examples(esci_source(WRITERS["csv"](tmp_path)))
    b, _ = load_examples(esci_source(WRITERS["parquet"](tmp_path)))
    assert a.column("example_id").to_pylist() == b.column("example_id").to_pylist()
    assert make_example_id("Cordless  Drill ", "P1") == make_example_id("cordless drill", "P1")
    assert make_example_id("cordless drill", "P1") != make_example_id("cordless drill", "P2")


def test_encodings_utf8_bom_and_cp1252_fallback(tmp_path):
    rows = [r[:] for r in ROWS]
    rows[0][2] = "Voltara 20V Drill – 1/2\u00a0in. Chuck °"
    bom = write_delimited(tmp_path / "bom.csv", rows, encoding="utf-8-sig")
    t, rep = load_examples(esci_source(bom))
    assert t.column("query").to_pylist()[0] == "cordless drill" and not rep.warnings  # BOM not in first header
    cp = write_delimited(tmp_path / "cp.csv", rows, encoding="cp1252")
    t2, rep2 = load_examples(esci_source(cp))
    assert any("read as cp1252" in w for w in rep2.warnings)
    assert t2.to_pylist()[0]["title"] == rows[0][2]
    # a byte cp1252 leaves undefined (0x90) decodes to the C1 control U+0090, not an error (WHATWG
    # windows-1252); the control-character policy then strips it (default) or keeps it, counted either way
    raw = cp.read_bytes().replace("°".encode("cp1252"), b"\x90")
    cp.write_bytes(raw)
    t3, rep3 = load_examples(esci_source(cp))
    assert t3.to_pylist()[0]["title"].endswith("Chuck") and "undefined in cp1252" in rep3.warnings[0]
    assert rep3.control_chars == {"title": 1}
    t4, rep4 = load_examples(esci_source(cp, control_chars="keep"))
    assert t4.to_pylist()[0]["title"].endswith("\x90") and rep4.control_chars == {"title": 1}


def test_esci_two_parquet_layout(tmp_path):
    ex = pa.table(
        {
            "example_id": [10, 11, 12],
            "query": ["drill", "drill", "saw"],
            "product_id": ["B1", "B2", "B9"],
            "product_locale": ["us", "us", "us"],
            "esci_label": ["E", "I", "S"],
        }
    )
    prod = pa.table(
        {
            "product_id": ["B1", "B2", "B1"],
            "product_locale": ["us", "us", "jp"],
            "product_title": ["Drill", "Lamp", "ドリル"],
            "product_brand": ["V", "L", "V"],
            "product_color": [None, "red", None],
            "product_description": ["", "", ""],
            "product_bullet_point": ["fast", None, None],
        }
    )
    pq.write_table(ex, tmp_path / "shopping_queries_dataset_examples.parquet")
    pq.write_table(prod, tmp_path / "shopping_queries_dataset_products.parquet")
    src = DataSource(
        path=str(tmp_path / "shopping_queries_dataset_examples.parquet"),
        preset="esci",
        products=str(tmp_path / "shopping_queries_dataset_products.parquet"),
        on_error="quarantine",
        quarantine_path=str(tmp_path / "q.jsonl"),
    )
    table, report = load_examples(src)
    rows = {r["source_id"]: r for r in table.to_pylist()}
    assert rows["10"]["title"] == "Drill" and rows["10"]["bullets"] == "fast" and rows["10"]["label"] == 3
    assert rows["11"]["color"] == "red" and rows["11"]["label"] == 0
    # B9 has no product: reported at its row, not dropped silently
    assert report.rejected == {"missing_product": 1}
    q = [json.loads(x) for x in Path(report.quarantine_path).read_text().splitlines()]
    assert q[0]["row"] == 3 and q[0]["problems"][0]["kind"] == "missing_product"


def test_homedepot_preset_keeps_raw_grade(tmp_path):
    p = write_delimited(
        tmp_path / "hd.csv",
        [
            ["1", "100001", "Angle Bracket", "angle bracket", "3"],
            ["2", "100001", "Angle Bracket", "l bracket", "2.33"],
            ["3", "100002", "Paint", "deck stain", "1.67"],
        ],
        header=["id", "product_uid", "product_title", "search_term", "relevance"],
    )
    t, _ = load_examples(DataSource(path=str(p), preset="homedepot"))
    got = {r["query"]: (r["label"], r["grade"]) for r in t.to_pylist()}
    assert got["angle bracket"] == (2, 3.0)
    assert got["l bracket"][0] == 1 and got["l bracket"][1] == pytest.approx(2.33)
    assert got["deck stain"][0] == 0


# --------------------------------------------------------------------------------- bad input
def test_missing_or_misnamed_column_names_the_column_and_suggests(tmp_path):
    p = write_delimited(
        tmp_path / "d.csv", [r[:4] + [r[4]] for r in ROWS], header=["id", "querry", "title", "brand", "label"]
    )
    probs = problems_of(esci_source(p))
    assert probs[0].kind == "missing_column" and probs[0].field == "query"
    with pytest.raises(DataError, match=r"d\.csv.*'query'.*did you mean 'querry'"):
        load_examples(esci_source(p))


@pytest.mark.parametrize(
    "col,value,kind", [(1, "  ", "empty_field"), (2, "", "empty_field"), (4, "X", "bad_label"), (4, "", "bad_label")]
)
def test_bad_field_values_are_located(tmp_path, col, value, kind):
    rows = [r[:] for r in ROWS]
    rows[2][col] = value
    probs = problems_of(esci_source(write_delimited(tmp_path / "d.csv", rows)))
    assert len(probs) == 1
    p = probs[0]
    assert (p.kind, p.line, p.field) == (kind, 4, HEADER[col])
    assert "d.csv:4: column" in str(p)


@pytest.mark.parametrize(
    "scheme,value,msg",
    [
        ({"name": "graded", "low": 1, "high": 3}, "3.5", "expected a grade in"),
        ({"name": "graded", "low": 1, "high": 3}, "high", "expected a number"),
        ({"name": "ordinal", "low": 1, "high": 4}, "2.5", "expected an integer rating"),
        ({"name": "binary"}, "maybe", "expected a binary label"),
        ("esci", "Exactish", "expected an ESCI label"),
    ],
)
def test_out_of_scheme_labels(tmp_path, scheme, value, msg):
    rows = [r[:] for r in ROWS]
    rows[0][4] = value
    src = DataSource(
        path=str(write_delimited(tmp_path / "d.csv", rows)),
        mapping=ColumnMapping(query="query", title="title", label="label"),
        scheme=scheme,
    )
    probs = [p for p in problems_of(src) if p.line == 2]
    assert probs and probs[0].kind == "bad_label" and msg in probs[0].message


def test_duplicate_ids_and_pairs(tmp_path):
    rows = [r[:] for r in ROWS] + [
        ["1", "saw", "Saw", "R", "E"],  # duplicate id
        ["7", "cordless drill", "Voltara 20V Cordless Drill", "Voltara", "E"],  # exact dup pair
        ["8", "CIRCULAR  saw", "Ridgeway 7-1/4 in. Circular Saw", "Ridgeway", "I"],
    ]  # conflict
    src = esci_source(
        write_delimited(tmp_path / "d.csv", rows), on_error="quarantine", quarantine_path=str(tmp_path / "q.jsonl")
    )
    table, report = load_examples(src)
    assert report.rejected == {"duplicate_id": 1, "conflicting_duplicate": 2}
    assert report.duplicates_merged == 1
    # nothing lost: every record is loaded, merged, or quarantined
    assert report.rows_read == table.num_rows + report.duplicates_merged + report.rows_rejected
    lines = sorted(json.loads(x)["line"] for x in Path(report.quarantine_path).read_text().splitlines())
    assert lines == [6, 7, 9]  # both sides of the conflict (lines 6 and 9) and the duplicate id (line 7)
    assert "circular saw" not in [q.lower() for q in table.column("query").to_pylist()]


def test_conflicting_graded_duplicates_are_averaged(tmp_path):
    p = write_delimited(
        tmp_path / "hd.csv",
        [["1", "9", "Deer Barrier", "fence  mesh", "3"], ["2", "9", "Deer Barrier", "fence mesh", "2"]],
        header=["id", "product_uid", "product_title", "search_term", "relevance"],
    )
    t, rep = load_examples(DataSource(path=str(p), preset="homedepot"))
    assert t.num_rows == 1 and t.to_pylist()[0]["grade"] == pytest.approx(2.5) and rep.conflicts_averaged == 1
    with pytest.raises(DataError, match="conflicting_duplicate"):
        load_examples(DataSource(path=str(p), preset="homedepot", on_conflict="problem"))


def test_undecodable_bytes_in_utf8_file(tmp_path):
    rows = [r[:] for r in ROWS]
    rows[0][2] = "Voltara – drill"
    rows[1][2] = "Kestrel – bits, 1/4″ shank"
    p = write_delimited(tmp_path / "d.csv", rows)
    p.write_bytes(p.read_bytes().replace(b"Voltara \xe2\x80\x93", b"Voltara \xff"))
    probs = problems_of(esci_source(p))  # auto: still UTF-8 (valid multi-byte text elsewhere)
    assert [(x.kind, x.line, x.field) for x in probs] == [("undecodable", 2, "title")]
    assert "0xff" in probs[0].message
    probs = problems_of(esci_source(p, encoding="utf-8"))
    assert probs[0].kind == "undecodable"


def test_broken_quoting_mid_file_and_unterminated(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('id,query,title,brand,label\n1,drill,"Voltara" Drill,V,E\n2,saw,Saw,R,E\n', encoding="utf-8")
    probs = problems_of(esci_source(p))
    assert [(x.kind, x.line) for x in probs] == [("broken_quoting", 2)]
    p.write_text(
        'id,query,title,brand,label\n1,drill,Drill,V,E\n2,saw,"Saw, 7 in,R,E\n3,bit,Bit,K,C\n', encoding="utf-8"
    )
    probs = problems_of(esci_source(p))
    assert (
        probs[0].kind == "broken_quoting" and probs[0].line == 3 and "runs to the end of the file" in probs[0].message
    )
    assert "3,bit,Bit" in probs[0].raw  # the swallowed lines are kept for the quarantine file
    t, rep = load_examples(esci_source(p, on_error="quarantine", quarantine_path=str(tmp_path / "q.jsonl")))
    assert t.num_rows == 1 and rep.rows_rejected == 1


def test_field_count_mismatch(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("id,query,title,brand,label\n1,drill,Drill,V,E,extra\n2,saw,Saw,R,E\n", encoding="utf-8")
    probs = problems_of(esci_source(p))
    assert probs[0].kind == "field_count" and probs[0].line == 2 and "expected 5 fields, found 6" in probs[0].message


@pytest.mark.parametrize(
    "content,match",
    [(b"", "file is empty"), (b"id,query,title,brand,label\n", "no usable rows"), (b"\n\n", "no header line")],
)
def test_empty_files(tmp_path, content, match):
    p = tmp_path / "d.csv"
    p.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_examples(esci_source(p))


def test_truncated_files(tmp_path):
    csv_path = WRITERS["csv"](tmp_path)
    g = gz(csv_path)
    g.write_bytes(g.read_bytes()[:-12])
    with pytest.raises(DataError, match=r"d\.csv\.gz: truncated or corrupt gzip"):
        load_examples(esci_source(g))
    z = zipped(csv_path)
    z.write_bytes(z.read_bytes()[:40])
    with pytest.raises(DataError, match=r"d\.csv\.zip: truncated or corrupt zip"):
        load_examples(esci_source(z))
    pqp = WRITERS["parquet"](tmp_path)
    pqp.write_bytes(pqp.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        load_examples(esci_source(pqp))
    j = WRITERS["jsonl"](tmp_path)
    j.write_bytes(j.read_bytes()[:-15])
    probs = problems_of(esci_source(j))
    assert probs[0].kind == "truncated" and probs[0].line == 5 and "cut off" in probs[0].message


def test_invalid_json_line(tmp_path):
    j = WRITERS["jsonl"](tmp_path)
    lines = j.read_text().splitlines()
    lines[1] = '{"id": "2", "query": oops}'
    lines.insert(3, "[1, 2]")
    j.write_text("\n".join(lines) + "\n")
    probs = problems_of(esci_source(j))
    assert [(p.kind, p.line) for p in probs] == [("invalid_json", 2), ("invalid_json", 4)]


def test_absurdly_long_field(tmp_path):
    rows = [r[:] for r in ROWS]
    rows[3][2] = "x" * 50_000
    probs = problems_of(esci_source(write_delimited(tmp_path / "d.csv", rows)))
    assert [(p.kind, p.line, p.field) for p in probs] == [("too_long", 5, "title")]
    assert "50000 characters" in probs[0].message


def test_wrong_delimiter(tmp_path):
    p = write_delimited(tmp_path / "d.csv", ROWS, delim="\t")
    with pytest.raises(DataError, match=r"d\.csv:1: the header has one column .* set delimiter: '\\t'") as ei:
        load_examples(esci_source(p))
    assert ei.value.problems[0].kind == "wrong_delimiter"
    t, _ = load_examples(esci_source(p, delimiter="\t"))
    assert t.num_rows == 5


def test_error_policy_lists_every_problem_and_quarantine_keeps_them(tmp_path):
    rows = [r[:] for r in ROWS]
    rows[0][4] = "Z"
    rows[2][1] = ""
    p = write_delimited(tmp_path / "d.csv", rows)
    with pytest.raises(DataError) as ei:
        load_examples(esci_source(p))
    text = str(ei.value)
    assert (
        "2 problem(s) in 5 record(s)" in text
        and "d.csv:2: column 'label'" in text
        and "d.csv:4: column 'query'" in text
    )
    q = tmp_path / "out" / "rejected.jsonl"
    t, rep = load_examples(esci_source(p, on_error="quarantine", quarantine_path=str(q)))
    assert t.num_rows == 3 and rep.rejected == {"bad_label": 1, "empty_field": 1}
    recs = [json.loads(x) for x in q.read_text().splitlines()]
    assert {(r["line"], r["problems"][0]["field"]) for r in recs} == {(2, "label"), (4, "query")}
    assert all(r["raw"].startswith(("1,", "3,")) for r in recs)  # the original text, for repair


def test_unlabelled_rows_allowed_when_configured(tmp_path):
    rows = [r[:] for r in ROWS]
    rows[1][4] = ""
    t, _ = load_examples(esci_source(write_delimited(tmp_path / "d.csv", rows), require_label=False))
    assert t.to_pylist()[1]["label"] is None


def test_unknown_preset_and_scheme_options():
    with pytest.raises(ValueError, match="unknown preset"):
        DataSource(path="x", preset="amazon")
    with pytest.raises(ValueError, match="has no option"):
        DataSource(path="x", scheme={"name": "graded", "cuts": [2]}).resolved_scheme()


def test_two_valid_accents_keep_a_file_utf8_beside_a_stray_bom(tmp_path):
    """Valid UTF-8 text is never turned into mojibake by a few corrupt bytes in another row: the file stays
    UTF-8 (``café`` intact) and the corrupt row is reported, located."""
    rows = [r[:] for r in ROWS]
    rows[0][2] = "café latte maker"
    rows[1][2] = "crème brûlée torch"  # two more valid multi-byte characters (three in all)
    p = write_delimited(tmp_path / "d.csv", rows)
    p.write_bytes(p.read_bytes().replace(b"Kestrel", b"Kestrel\xff\xfe", 1) if b"Kestrel" in p.read_bytes() else b"")
    data = p.read_bytes()
    assert b"\xff\xfe" in data and "café".encode() in data
    t, rep = load_examples(esci_source(p, on_error="quarantine", quarantine_path=str(tmp_path / "q.jsonl")))
    titles = t.column("title").to_pylist()
    assert "café latte maker" in titles and not any("Ã" in x for x in titles)
    assert not any("cp1252" in w for w in rep.warnings) and rep.rejected == {"undecodable": 1}
    # the quarantined row keeps its bytes: JSON escapes of the undecodable ones, valid UTF-8 around them
    (bad,) = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text(encoding="utf-8").splitlines()]
    assert b"Kestrel\xff\xfe" in bad["raw"].encode("utf-8", "surrogateescape")


def test_an_example_directory_quarantines_every_split_in_one_file(tmp_path):
    """Bad rows in train and in val of one example directory: both reach the one quarantine file."""
    d = catalog_with_empty_queries(tmp_path / "catalog", seed=0, row=0)
    q = tmp_path / "q.jsonl"
    table, rep = load_examples(DataSource(path=str(d), on_error="quarantine", quarantine_path=str(q)))
    records = [json.loads(x) for x in q.read_text().splitlines()]
    assert rep.rows_rejected == 2 and len(records) == 2
    assert sorted(Path(r["file"]).name for r in records) == ["train.parquet", "val.parquet"]
    assert rep.rows_read == table.num_rows + rep.rows_rejected  # nothing lost
