"""Chain-of-thought schema: render -> parse round trip and every way a chain can be wrong."""

from __future__ import annotations

import pytest

from datamodules.schema import DIMENSIONS
from ellm_mkd.cot import ChainOfThought, CoTParseError, Judgement, evidence_spans, parse, render

LEVELS = ("irrelevant", "complement", "substitute", "exact")
QUERY = 'voltara 20v "max" drill'
ITEM = 'Title: Voltara 20V "MAX" Cordless Drill VX-2041 | Brand: Voltara | Color: red'


def chain(level="exact") -> ChainOfThought:
    return ChainOfThought((
        Judgement("category", "drill", "Cordless Drill", "match"),
        Judgement("brand", "voltara", "Voltara", "match"),
        Judgement("model", None, "VX-2041", "absent"),
        Judgement("attributes", '20v "max"', '20V "MAX"', "match"),
        Judgement("usage", None, None, "absent"),
    ), level)


def test_round_trip_with_quotes_in_evidence():
    text = render(chain())
    assert text.splitlines()[3] == 'attributes: query "20v \\"max\\"" | item "20V \\"MAX\\"" => match'
    assert parse(text, QUERY, ITEM, LEVELS) == chain()
    assert parse("\n  " + text + "\n\n", QUERY, ITEM, LEVELS) == chain()


def test_spans_point_at_the_evidence():
    for dim, side, s, e in evidence_spans(chain(), QUERY, ITEM):
        src = QUERY if side == "query" else ITEM
        ev = {j.dimension: j for j in chain().judgements}[dim]
        assert src[s:e] == (ev.query_evidence if side == "query" else ev.item_evidence)


@pytest.mark.parametrize("mutate,line,reason", [
    (lambda t: t.replace("Cordless Drill", "Hammer Drill"), 1, "does not occur in the item"),
    (lambda t: t.replace('query "voltara"', 'query "dewalt"'), 2, "does not occur in the query"),
    (lambda t: t.replace("=> match", "=> maybe", 1), 1, "verdict 'maybe'"),
    (lambda t: "\n".join(t.splitlines()[1:]), 1, "expected the 'category' line"),
    (lambda t: t.replace("level: exact", "level: perfect"), 6, "level 'perfect' is not one of"),
    (lambda t: t.replace("\nlevel: exact", ""), 6, "missing the final"),
    (lambda t: t + "\nI hope this helps!", 7, "text after the level line"),
    (lambda t: t.replace('query "voltara"', "query voltara"), 2, "expected 'brand: query"),
    (lambda t: t.replace('query "voltara"', 'query ""'), 2, "evidence is empty"),
    (lambda t: "\n".join(t.splitlines()[:2]), 3, "missing the 'model' line"),
    (lambda t: "", 0, "empty chain"),
])
def test_strict_parser_says_what_is_wrong(mutate, line, reason):
    with pytest.raises(CoTParseError) as ei:
        parse(mutate(render(chain())), QUERY, ITEM, LEVELS)
    assert ei.value.line == line and reason in str(ei.value)


def test_direct_prompts_may_stop_before_the_level():
    text = "\n".join(render(chain()).splitlines()[:5])
    assert parse(text, QUERY, ITEM, LEVELS, require_level=False).level == ""


def test_schema_objects_validate():
    with pytest.raises(ValueError, match="unknown verdict"):
        Judgement("brand", None, None, "yes")
    with pytest.raises(ValueError, match="in that order"):
        ChainOfThought(tuple(reversed(chain().judgements)), "exact")
    assert tuple(chain().verdicts()) == DIMENSIONS
