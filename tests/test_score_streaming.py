"""``ellm-mkd score`` streams its input (``datamodules.streaming``): in every format the streamed scores equal
the scores of the whole table ``load_examples`` gives, bad rows meet the same ``on_error`` policy with the
same messages and quarantine records, and the reader holds a chunk, not the file. Real files on disk."""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import catalog_with_empty_queries
from shipping import export_both
from test_reliability_data import esci_files

from datamodules.file_bytes import _CHUNK
from datamodules.readers import DataError, iter_delimited, iter_jsonl
from datamodules.stream_reader import STREAM_READ, StreamStats
from datamodules.streaming import stream_examples
from datamodules.text import render_item
from datamodules.validation import ColumnMapping, DataSource, SplitOptions, load_examples
from ellm_mkd.commands.main import main
from ellm_mkd.commands.score import score_file, score_rows
from ellm_mkd.serving import Scorer
from ellm_mkd.serving.item_index import ItemIndex
from ellm_mkd.serving.writer import ScoreWriter

FIELDS = ["query", "title", "brand", "color", "description", "bullets", "attributes", "item_id"]
HEADER = ["id", *FIELDS, "label", "split"]
MAPPING = ColumnMapping(**{f: f for f in FIELDS}, label="label", source_id="id")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_encoder, synth_dir) -> dict[str, Path]:
    runs = export_both(tmp_path_factory.mktemp("stream"), tiny_encoder, synth_dir, "--sentence_transformers", "false")
    return {kind: export for kind, (_, export) in runs.items()}


@pytest.fixture(scope="module")
def scorers(exports) -> dict[str, Scorer]:
    return {kind: Scorer.from_export(export) for kind, export in exports.items()}  # the command's batch size


def pair_rows(synth_dir: Path, n: int = 90) -> list[dict]:
    """``n`` real pairs of the synthetic catalog (a text label, no split) and rows that test the checks."""
    t = pq.read_table(synth_dir / "train.parquet").slice(0, n).to_pylist()
    rows = [
        {"id": f"r{i}", **{f: r[f] for f in FIELDS}, "label": str(r["label"]), "split": ""} for i, r in enumerate(t)
    ]
    rows += [
        {**rows[0], "id": "dup-pair"},  # the same pair, same label: merged
        {**rows[1], "id": "r5"},  # a source id used twice: duplicate_id
        {**rows[2], "id": "conflict", "label": str((int(rows[2]["label"]) + 1) % 4)},  # both rows rejected
        {**rows[3], "id": "no-title", "item_id": "X1", "title": " "},  # empty_field
        {**rows[4], "id": "bad-label", "item_id": "X2", "label": "9"},  # bad_label
        {**rows[5], "id": "ctrl", "item_id": "X3", "title": "Drill\x1b[31m red"},  # stripped, counted
        {**rows[6], "id": "unlabelled", "item_id": "X4", "label": ""},  # require_label: false
    ]
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    """``rows`` as ``path`` says: .csv, .tsv, .jsonl or .parquet, each plain, .gz or .zip."""
    name = path.name.removesuffix(".gz").removesuffix(".zip")
    inner = path.with_name(name)
    if name.endswith(".parquet"):
        pq.write_table(pa.table({h: [r[h] for r in rows] for h in HEADER}), inner)
    elif name.endswith(".jsonl"):
        inner.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        buf = io.StringIO()
        w = csv.DictWriter(buf, HEADER, delimiter="\t" if name.endswith(".tsv") else ",", lineterminator="\r\n")
        w.writeheader()
        w.writerows(rows)
        inner.write_text(buf.getvalue(), encoding="utf-8", newline="")
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(inner.read_bytes()))
    elif path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.write(inner, inner.name)
    return path


def pairs_source(path: Path, **kw) -> DataSource:
    kw = {"on_error": "quarantine", "quarantine_path": str(path.parent / "q.jsonl"), "require_label": False, **kw}
    return DataSource(path=str(path), mapping=kw.pop("mapping", MAPPING), **kw)


def whole_table_scores(scorer, source, out, split="all", chunk_rows=4096, item_index=None):
    """What ``score_file`` wrote before it streamed: ``load_examples``'s table, filtered to ``split``, every
    item of it looked up at once, then scored ``chunk_rows`` rows at a time."""
    table, report = load_examples(source)
    if split != "all":
        table = table.filter(pc.equal(table.column("split"), split))
    labelled = table.column("label").null_count < table.num_rows
    if item_index is not None:
        fields = scorer.card.item_fields
        items = {r["item_id"]: render_item(r, fields)[0] for r in table.select(["item_id", *fields]).to_pylist()}
        item_index.lookup(list(items), list(items.values()), lambda texts: scorer.embed("item", texts))
    with ScoreWriter(out) as w:
        for start in range(0, table.num_rows, chunk_rows):
            w.write(score_rows(scorer, table.slice(start, chunk_rows).to_pylist(), labelled, item_index))
    return report


def both(scorer, source: DataSource, tmp_path: Path, split="all", chunk_rows=4096, **kw):
    """The whole-table and the streamed output (tables) and reports, each with its own quarantine file."""
    q = Path(source.quarantine_path or tmp_path / "q.jsonl")
    whole_src = replace(source, quarantine_path=str(q.with_name("whole." + q.name)))
    whole = whole_table_scores(scorer, whole_src, tmp_path / "whole.parquet", split, chunk_rows, kw.get("whole_index"))
    out = tmp_path / "streamed.parquet"
    index, stats = kw.get("index"), kw.get("stats")
    n, streamed = score_file(scorer, source, out, "auto", split, chunk_rows, index, False, stats)
    a, b = pq.read_table(tmp_path / "whole.parquet"), pq.read_table(out)
    assert n == b.num_rows
    assert {**whole.to_json(), "quarantine_path": None} == {**streamed.to_json(), "quarantine_path": None}
    if whole.quarantine_path:
        assert Path(whole.quarantine_path).read_text() == Path(streamed.quarantine_path).read_text()
    return a, b, streamed


FORMATS = ["csv", "tsv", "jsonl", "parquet", "csv.gz", "jsonl.gz", "tsv.zip", "parquet.gz", "parquet.zip"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_scores_equal_whole_table_scores_in_every_format(fmt, scorers, synth_dir, tmp_path):
    src = pairs_source(write(tmp_path / f"pairs.{fmt}", pair_rows(synth_dir)))
    whole, streamed, report = both(scorers["cross_encoder"], src, tmp_path, chunk_rows=32)
    assert streamed.equals(whole) and streamed.num_rows == 90 - 1 + 2  # rows[2] lost to a conflict; ctrl, unlabelled
    assert report.rejected == {"duplicate_id": 1, "conflicting_duplicate": 2, "empty_field": 1, "bad_label": 1}
    assert report.duplicates_merged == 1 and report.control_chars == {"title": 1}
    assert streamed.column_names[:5] == ["example_id", "query", "item_id", "label", "grade"]


def test_an_examples_directory_streams_file_by_file(scorers, exports, tmp_path, capsys):
    """``ellm-mkd data prepare``'s layout: the split of each file (val has no split column here), one
    quarantine file for the directory, and ``--only_split``."""
    d = catalog_with_empty_queries(tmp_path / "catalog", seed=1, row=1, drop_val_split=True)
    src = DataSource(path=str(d), on_error="quarantine", quarantine_path=str(tmp_path / "q.jsonl"))
    for split in ("all", "val"):
        whole, streamed, report = both(scorers["cross_encoder"], src, tmp_path, split=split, chunk_rows=7)
        assert streamed.equals(whole) and streamed.num_rows > 0 and report.rows_rejected == 2
    # the command itself, end to end: the same rows and scores
    out = tmp_path / "cli.parquet"
    args = ["score", str(d), "--model", str(exports["cross_encoder"]), "--out", str(out), "--only_split", "val"]
    args += ["--chunk_rows", "7", "--on_error", "quarantine", "--quarantine_path", str(tmp_path / "cli.jsonl")]
    assert main([*args, "--progress", "false"]) == 0
    assert "rejected rows: 2" in capsys.readouterr().out and pq.read_table(out).equals(whole)


@pytest.mark.parametrize("chunk_rows", [1, 7])
def test_chunk_size_does_not_change_the_output(chunk_rows, scorers, synth_dir, tmp_path):
    src = pairs_source(write(tmp_path / "pairs.csv", pair_rows(synth_dir, 40)))
    stats = StreamStats()
    whole, streamed, _ = both(scorers["cross_encoder"], src, tmp_path, chunk_rows=chunk_rows, stats=stats)
    assert streamed.equals(whole) and stats.peak_rows == chunk_rows
    big = tmp_path / "big"
    big.mkdir()
    _, default, _ = both(scorers["cross_encoder"], src, big)
    # another chunk size batches the pairs otherwise (padding): the same rows, scores equal to float rounding
    assert streamed.select([0, 1, 2, 3, 4]).equals(default.select([0, 1, 2, 3, 4]))
    grades = [t.column("expected_grade").to_numpy() for t in (streamed, default)]
    assert np.abs(grades[0] - grades[1]).max() < 1e-5


def test_only_split_by_hash_and_by_column(scorers, synth_dir, tmp_path):
    """Hash splits per row, and a split column whose blank rows take their query's first split; a split whose
    rows carry no label gets no label column, as before, even where other splits are labelled."""
    rows = pair_rows(synth_dir, 60)
    # the catalog's own splits are seed 0's: another seed spreads its train queries over the three splits
    src = pairs_source(write(tmp_path / "pairs.jsonl", rows), split=SplitOptions(seed=1, test_fraction=0.5))
    for split in ("train", "test"):
        whole, streamed, _ = both(scorers["cross_encoder"], src, tmp_path, split=split, chunk_rows=5)
        assert streamed.equals(whole) and streamed.num_rows
    for i, r in enumerate(rows):
        r["split"] = "" if i % 3 else ("train" if i % 2 else "test")
        if r["split"] != "train" and i % 3 == 0:
            r["label"] = ""
    src = pairs_source(write(tmp_path / "split.csv", rows), mapping=replace(MAPPING, split="split"))
    for split in ("train", "test"):
        whole, streamed, _ = both(scorers["cross_encoder"], src, tmp_path, split=split, chunk_rows=5)
        assert streamed.equals(whole) and streamed.num_rows
    rows = [{**r, "label": r["label"] if r["split"] == "train" else ""} for r in rows if r["split"]]
    src = pairs_source(write(tmp_path / "labels.csv", rows), mapping=replace(MAPPING, split="split"))
    whole, streamed, _ = both(scorers["cross_encoder"], src, tmp_path, split="test")
    assert streamed.equals(whole) and "label" not in streamed.column_names


def test_two_tower_item_index_is_filled_chunk_by_chunk(scorers, synth_dir, tmp_path):
    rows = pair_rows(synth_dir, 60)
    rows.append({**rows[10], "id": "retitled", "query": "a new query", "title": "Retitled item"})  # last text wins
    src = pairs_source(write(tmp_path / "pairs.csv", rows))
    tower = scorers["two_tower"]
    fp = "fingerprint"
    whole_index = ItemIndex(tmp_path / "whole_index", fp, tower.card.item_fields)
    index = ItemIndex(tmp_path / "index", fp, tower.card.item_fields)
    whole, streamed, _ = both(tower, src, tmp_path, chunk_rows=7, whole_index=whole_index, index=index)
    assert streamed.select([0, 1, 2, 3, 4]).equals(whole.select([0, 1, 2, 3, 4]))
    # items are embedded in other batches than in one lookup: the same vectors to float rounding
    for col in ("expected_grade", "p_exact"):
        assert np.abs(streamed.column(col).to_numpy() - whole.column(col).to_numpy()).max() < 1e-5
    assert (len(index), index.added, index.reused) == (len(whole_index), whole_index.added, whole_index.reused)
    assert dict(zip(index.ids, index.hashes)) == dict(zip(whole_index.ids, whole_index.hashes))
    again = ItemIndex(tmp_path / "index", fp, tower.card.item_fields)
    score_file(tower, src, tmp_path / "again.parquet", chunk_rows=7, item_index=again, progress=False)
    assert again.added == 0 and again.reused == len(index)


# ------------------------------------------------------------------------------ bad input, same policy
BAD_CSV = (
    "id,query,title,label\n"
    "1,drill,Voltara Drill,3\n"
    '2,saw,"Saw, 7 in" blade,2\n'  # broken quoting
    "3,hose,Garden Hose,1,extra\n"  # field count
    "4,lamp,Desk \xff lamp,2\n"  # an undecodable byte (the file stays UTF-8: café, crème)
    "5,café,Crème Filter,9\n"  # bad label
    "6,drill,Voltara Drill,1.5\n"  # the pair of line 2 again, another grade: averaged or a conflict
    "1,paint,Red Paint,2\n"  # duplicate id
    "7,bulb,LED Bulb,2\n"
)


def bad_file(tmp_path: Path) -> Path:
    p = tmp_path / "bad.csv"
    p.write_bytes(BAD_CSV.encode("utf-8").replace("\xff".encode(), b"\xff"))
    return p


def problems_json(e: DataError) -> list[dict]:
    return [p.to_json() for p in e.problems]


@pytest.mark.parametrize("on_conflict", ["problem", "mean"])
def test_error_policy_refuses_with_the_same_message_before_writing(on_conflict, scorers, tmp_path):
    mapping = ColumnMapping(query="query", title="title", label="label", source_id="id")
    scheme = {"name": "graded", "low": 0, "high": 3}
    src = DataSource(path=str(bad_file(tmp_path)), mapping=mapping, scheme=scheme, on_conflict=on_conflict)
    with pytest.raises(DataError) as whole:
        load_examples(src)
    out = tmp_path / "s.csv"
    with pytest.raises(DataError) as streamed:
        score_file(scorers["cross_encoder"], src, out, progress=False)
    assert str(streamed.value) == str(whole.value) and not out.exists()
    assert problems_json(streamed.value) == problems_json(whole.value)
    kinds = {p.kind for p in whole.value.problems}
    assert {"broken_quoting", "field_count", "undecodable", "bad_label", "duplicate_id"} <= kinds
    assert ("conflicting_duplicate" in kinds) == (on_conflict == "problem")
    # the earlier side of a conflict carries its row, found again by the stream
    raws = [p.raw for p in streamed.value.problems]
    assert all(raws) and any(r.startswith('{"source_line": 2') for r in raws) == (on_conflict == "problem")
    # and quarantine keeps the same records
    q = replace(src, on_error="quarantine", quarantine_path=str(tmp_path / "q.jsonl"))
    _, whole_report = load_examples(replace(q, quarantine_path=str(tmp_path / "whole.jsonl")))
    with stream_examples(q) as stream:
        assert stream.report.to_json() == {**whole_report.to_json(), "quarantine_path": q.quarantine_path}
    assert (tmp_path / "q.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()


def table_of(stream) -> pa.Table:
    return pa.concat_tables(list(stream.chunks()))


def loaded_as_streamed(source: DataSource) -> pa.Table:
    """``load_examples``'s table without what needs the whole file (frequency, query_bucket)."""
    t = load_examples(source)[0]
    for c in ("frequency", "query_bucket"):
        t = t.set_column(t.column_names.index(c), c, pa.nulls(t.num_rows, t.schema.field(c).type))
    return t


def test_esci_products_join_streams_the_examples(tmp_path):
    src = esci_files(tmp_path, {}, {}, on_error="quarantine", quarantine_path=str(tmp_path / "q.jsonl"))
    with stream_examples(src, chunk_rows=2) as stream:
        assert table_of(stream).equals(loaded_as_streamed(src))
        assert stream.report.rejected == {"missing_product": 1}
    with pytest.raises(DataError, match=r"join column 'product_id' is double, not text or integers"):
        stream_examples(esci_files(tmp_path, {}, {"product_id": [1.0, 2.0, 1.0, 3.0]}))


def test_pairs_judged_twice_are_averaged_in_the_stream(tmp_path):
    """Home Depot's graded layout: a later judgment changes an earlier row's grade, which the stream gives."""
    p = tmp_path / "hd.csv"
    lines = [f"{i},{i % 7},Bracket {i % 7},bracket {i % 5},{1 + (i % 3) * 0.67:.2f}\n" for i in range(200)]
    p.write_text("id,product_uid,product_title,search_term,relevance\n" + "".join(lines), encoding="utf-8")
    src = DataSource(path=str(p), preset="homedepot")
    with stream_examples(src, chunk_rows=3) as stream:
        assert table_of(stream).equals(loaded_as_streamed(src)) and stream.report.conflicts_averaged > 0


def test_encodings_are_decided_over_the_whole_text(tmp_path):
    """cp1252 falls back with the same warning; valid UTF-8 with one bad byte stays UTF-8 (no mojibake)."""
    rows = [f"{i},query {i},Drill – 1/2\u00a0in. Chuck °,3\n" for i in range(3000)]
    p = tmp_path / "cp.csv"
    p.write_bytes(("id,query,title,label\n" + "".join(rows)).encode("cp1252"))
    mapping = ColumnMapping(query="query", title="title", label="label", source_id="id")
    src = DataSource(path=str(p), mapping=mapping)
    with stream_examples(src, chunk_rows=500) as stream:
        assert table_of(stream).equals(loaded_as_streamed(src))
        assert any("read as cp1252" in w for w in stream.report.warnings)
    p.write_bytes(p.read_bytes().decode("cp1252").encode("utf-8").replace(b"query 2999", b"query \xff"))
    src = replace(src, on_error="quarantine", quarantine_path=str(tmp_path / "q.jsonl"))
    with stream_examples(src, chunk_rows=500) as stream:
        t = table_of(stream)
        assert t.equals(loaded_as_streamed(src)) and t.column("title")[0].as_py().startswith("Drill – 1/2")
        assert stream.report.rejected == {"undecodable": 1} and not any("cp1252" in w for w in stream.report.warnings)


def test_caps_and_broken_files_fail_as_when_read_whole(tmp_path):
    from test_reliability_data import write_bomb

    bomb = write_bomb(tmp_path / "bomb.csv.gz", 20 << 20)
    for f in (load_examples, stream_examples):
        with pytest.raises(DataError, match=r"bomb\.csv\.gz:2: a line longer than 1,280,000 bytes"):
            f(DataSource(path=str(bomb), scheme="esci"))
    g = write(tmp_path / "d.csv.gz", [{h: "x" for h in HEADER}] * 500)
    g.write_bytes(g.read_bytes()[:-12])
    with pytest.raises(DataError, match=r"d\.csv\.gz: truncated or corrupt gzip"):
        stream_examples(pairs_source(g))
    pqp = write(tmp_path / "d.parquet", [{h: "x" for h in HEADER}] * 5)
    pqp.write_bytes(pqp.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        stream_examples(pairs_source(pqp))
    big = write(tmp_path / "big.parquet", [{h: "x" for h in HEADER}] * 5)
    with pytest.raises(DataError, match=r"more than max_input_bytes=100 bytes"):
        stream_examples(pairs_source(big, max_input_bytes=100))


# ------------------------------------------------------------------------------ bounded memory
def test_the_reader_holds_a_chunk_not_the_file(tmp_path):
    p = tmp_path / "big.csv"
    n = 36_000
    with open(p, "w", encoding="utf-8", newline="") as f:
        f.write("id,query,title,item_id\n")
        for i in range(n):
            title = f"Voltara 20V Cordless Drill Driver Kit with Two Batteries - Charger and Bag {i}"
            f.write(f"{i},query {i % 997},{title},P{i % 5000}\n")
    size = p.stat().st_size
    assert size > 3 * _CHUNK
    mapping = ColumnMapping(query="query", title="title", item_id="item_id", source_id="id")
    stats = StreamStats()
    with stream_examples(DataSource(path=str(p), mapping=mapping, require_label=False), 7, stats) as stream:
        assert stats.bytes_read == 2 * size  # the encoding pass and the checking pass, nothing kept
        chunks = stream.chunks()
        first = next(chunks)
        assert first.num_rows == 7 and stats.bytes_read - 2 * size <= STREAM_READ  # one read buffer so far
        sizes = [first.num_rows, *(c.num_rows for c in chunks)]
    assert sum(sizes) == n and max(sizes) == 7 and stats.peak_rows == 7
    assert stats.peak_read <= _CHUNK < size / 3 and stats.bytes_read == 3 * size


def test_record_iterators_pull_lines_as_records_are_read():
    """Fed an endless generator, the CSV and JSON Lines readers read one record's lines at a time (JSON Lines
    looks 1000 lines ahead for its columns)."""
    pulled = itertools.count()

    def endless(first: str, *lines: str):
        yield first
        for i in itertools.count():
            next(pulled)
            yield from (line.replace("{i}", str(i)) for line in lines)

    _, records = iter_delimited("gen.csv", endless("query,title\n", 'q{i},"t\n', '{i}"\r\n'), ",")
    for line, rec, raw, _ in itertools.islice(records, 500):
        assert rec["title"] == f"t\n{(line - 2) // 2}" and raw.endswith("\r\n")
    assert next(pulled) <= 502
    pulled = itertools.count()
    keys, records = iter_jsonl("gen.jsonl", endless('{"query": "q", "title": "t"}\n', '{"query": "q{i}"}\n'))
    assert keys == ["query", "title"] and len(list(itertools.islice(records, 3000))) == 3000
    assert next(pulled) <= 3001


def test_a_file_changed_between_passes_is_refused(synth_dir, tmp_path):
    """The passes must read the same rows: a file rewritten after the check is refused, not scored."""
    p = tmp_path / "pairs.csv"
    pq.read_table(synth_dir / "train.parquet").slice(0, 20).to_pandas().to_csv(p, index=False)
    with stream_examples(DataSource(path=str(p)), chunk_rows=5) as stream:
        with open(p, "a", encoding="utf-8") as f:
            f.write("x,y\n")
        with pytest.raises(DataError, match=r"pairs\.csv: the file changed while it was being read"):
            next(stream.chunks())


def test_compressed_parquet_leaves_no_temporary_file_or_handle(synth_dir, tmp_path):
    """A ``.gz`` Parquet file is inflated to a temporary file: closed and deleted with the stream."""
    import os

    p = tmp_path / "train.parquet.gz"
    p.write_bytes(gzip.compress((synth_dir / "train.parquet").read_bytes()))
    with stream_examples(DataSource(path=str(p)), chunk_rows=50) as stream:
        tmp = stream._files[0].input._tmp
        assert tmp and Path(tmp).exists() and table_of(stream).num_rows > 0
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    assert not Path(tmp).exists() and not any(tmp in f for f in open_files)


def test_directory_report_adds_up_averaged_conflicts_and_the_index_grows_by_a_quarter(tmp_path):
    from datamodules.load_report import LoadReport
    from datamodules.validation import merge_reports

    merged = merge_reports(
        DataSource(path=str(tmp_path)),
        [LoadReport(file="train.parquet", conflicts_averaged=2), LoadReport(file="val.parquet", conflicts_averaged=3)],
    )
    assert merged.conflicts_averaged == 5
    index = ItemIndex(tmp_path / "index", "fp", ["title"])
    rng = np.random.default_rng(0)
    index.lookup([f"i{k}" for k in range(1000)], ["t"] * 1000, lambda texts: rng.random((len(texts), 4)))
    index.lookup(["new"], ["t"], lambda texts: rng.random((len(texts), 4)))
    assert len(index) == 1001 and len(index._storage) == 1250  # not 2,000: a large index does not double
