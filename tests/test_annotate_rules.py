"""The rules annotator: every chain parses against its own texts; on the catalog it renders the truth."""

from __future__ import annotations

import pyarrow.parquet as pq

from datamodules.text import DEFAULT_ITEM_FIELDS, render_item
from ellm_mkd.annotate_rules import RuleAnnotator
from ellm_mkd.cot import parse, render, unfinishable

LEVELS = ("irrelevant", "complement", "substitute", "exact")


def test_catalog_chains_render_truth_and_parse(synth_dir):
    rows = pq.read_table(synth_dir / "train.parquet").to_pylist()
    ann = RuleAnnotator(LEVELS, brands={r["brand"] for r in rows})
    with_evidence = 0
    for r in rows:
        item = render_item(r, DEFAULT_ITEM_FIELDS)[0]
        chain = ann.annotate(r, item)
        back = parse(render(chain), r["query"], item, LEVELS)  # evidence really is in the texts
        assert back == chain
        assert chain.verdicts() == {d: r[f"dim_{d}"] for d in chain.verdicts()}
        assert chain.level == LEVELS[r["label"]]
        for j in chain.judgements:
            if j.verdict == "absent":
                assert j.query_evidence is None
        with_evidence += sum(j.query_evidence is not None for j in chain.judgements if j.verdict == "match")
    assert with_evidence > len(rows)  # matched dimensions mostly cite the query's words


def test_no_beginning_of_a_catalog_chain_is_ruled_out(synth_dir):
    """Every prefix of every rule chain on the catalog (real titles, quotes, unicode) can still parse:
    the readout never stops a chain that would have parsed."""
    rows = pq.read_table(synth_dir / "train.parquet").to_pylist()[:60]
    ann = RuleAnnotator(LEVELS, brands={r["brand"] for r in rows})
    for r in rows:
        item = render_item(r, DEFAULT_ITEM_FIELDS)[0]
        text = render(ann.annotate(r, item))
        bad = [i for i in range(len(text) + 1) if unfinishable(text[:i], r["query"], item, LEVELS) is not None]
        assert not bad, (text[: bad[0]], r["query"], item)


def test_lexical_rules_without_truth():
    ann = RuleAnnotator(LEVELS, brands=["Voltara", "Kestrel"])
    row = {
        "query": "voltra cordless drill vx-2041 red",
        "title": "Voltara 20V Cordless Drill VX-2041, Blue",
        "brand": "Voltara",
        "attributes": "model: VX-2041; color: blue",
        "label": 2,
    }
    item = render_item(row, ("title", "brand", "attributes"))[0]
    v = {j.dimension: j for j in ann.annotate(row, item).judgements}
    assert (v["brand"].verdict, v["brand"].query_evidence, v["brand"].item_evidence) == ("match", "voltra", "Voltara")
    assert (v["model"].verdict, v["model"].query_evidence) == ("match", "vx-2041")
    assert (v["attributes"].verdict, v["attributes"].query_evidence) == ("mismatch", "red")
    assert v["category"].verdict == "match" and v["usage"].verdict == "match"
    other = dict(row, query="kestrel drill")
    assert {j.dimension: j.verdict for j in ann.annotate(other, item).judgements}["brand"] == "mismatch"
