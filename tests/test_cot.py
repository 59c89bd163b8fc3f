"""Chain-of-thought schema: render -> parse round trip and every way a chain can be wrong."""

from __future__ import annotations

import pytest

from ellm_mkd.cot import ChainOfThought, CoTParseError, Judgement, evidence_spans, parse, render, unfinishable
from ellm_mkd.schema import DIMENSIONS

LEVELS = ("irrelevant", "complement", "substitute", "exact")
QUERY = 'voltara 20v "max" drill'
ITEM = 'Title: Voltara 20V "MAX" Cordless Drill VX-2041 | Brand: Voltara | Color: red'


def chain(level="exact") -> ChainOfThought:
    return ChainOfThought(
        (
            Judgement("category", "drill", "Cordless Drill", "match"),
            Judgement("brand", "voltara", "Voltara", "match"),
            Judgement("model", None, "VX-2041", "absent"),
            Judgement("attributes", '20v "max"', '20V "MAX"', "match"),
            Judgement("usage", None, None, "absent"),
        ),
        level,
    )


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


PARSE_ERRORS = [
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
]


@pytest.mark.parametrize("mutate,line,reason", PARSE_ERRORS)
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


def test_a_chain_being_written_is_never_stopped_while_it_can_parse():
    text = render(chain())
    for whole in (text, "\n " + text + "\n\n"):
        assert all(unfinishable(whole[:i], QUERY, ITEM, LEVELS) is None for i in range(len(whole) + 1))


@pytest.mark.parametrize("mutate,line,reason", PARSE_ERRORS)
def test_a_broken_chain_stops_on_its_broken_line(mutate, line, reason):
    """Over every prefix of a broken chain: nothing, then, from some point on the line parse fails on,
    always an error naming that line, and parse's own error on the whole text; errors that only the
    end reveals (a missing line) never stop a chain."""
    text = mutate(render(chain()))
    with pytest.raises(CoTParseError) as ei:
        parse(text, QUERY, ITEM, LEVELS)
    found = [unfinishable(text[:i], QUERY, ITEM, LEVELS) for i in range(len(text) + 1)]
    first = next((i for i, e in enumerate(found) if e is not None), None)
    assert (first is None) == (reason.startswith("missing") or reason == "empty chain")
    if first is not None:
        assert all(e is not None and e.line == ei.value.line for e in found[first:])
        assert str(found[-1]) == str(ei.value)


@pytest.mark.parametrize(
    "text,stop_after",
    [
        ("The product is relevant to the query.", "T"),  # not the schema at all
        ('category: query "drill" | item "Hammer', 'item "H'),  # evidence that is not in the item
        ('category: query "drill" | item "Cordless Drill" => maybe', "=> may"),
        (
            'category: query "drill" | item "Cordless Drill" => match\n'
            'brand: query "voltara" | item "Voltara" => match\n'
            "model: query - | item - => absent\nattributes: query - | item - => absent\n"
            "usage: query - | item - => absent\n"
            "level: relevant",
            "level: r",
        ),
        ('category: query "drill" | item "Cordless Drill" => match\nmodel: query', "\nm"),  # the wrong dimension
        ('category: query "\\u0076oltara" | item', None),  # an escape that decodes into the query text
        ('category: query "dri\\ ll" | item', "dri\\ "),  # an escape JSON does not know
        ('category: query "dri\\u00zz" | item', "dri\\u00z"),
        ('category: query "dri\\umbo" | item', "dri\\um"),
        ('category: query "20v \\"max\\" drill" | item', None),
    ],
)
def test_a_chain_stops_at_the_first_character_that_rules_it_out(text, stop_after):
    stops = [i for i in range(len(text) + 1) if unfinishable(text[:i], QUERY, ITEM, LEVELS) is not None]
    if stop_after is None:
        assert stops == []
    else:
        first = text.index(stop_after) + len(stop_after)
        assert stops == list(range(first, len(text) + 1))


def test_a_chain_with_escapes_is_never_stopped_while_it_can_parse():
    text = render(chain()).replace('item "Voltara"', 'item "\\u0056oltara"')  # JSON escapes, decoded as they come
    assert parse(text, QUERY, ITEM, LEVELS) == chain()
    assert all(unfinishable(text[:i], QUERY, ITEM, LEVELS) is None for i in range(len(text) + 1))


def test_a_line_break_makes_the_line_before_it_final():
    line = render(chain()).splitlines()[0]
    assert unfinishable(line[:5], QUERY, ITEM, LEVELS) is None
    assert unfinishable(line[:5] + "\n", QUERY, ITEM, LEVELS).line == 1  # "categ" cannot grow any more
    assert unfinishable(line + "\n", QUERY, ITEM, LEVELS) is None
    assert unfinishable(line + "  ", QUERY, ITEM, LEVELS) is None  # the parser strips a line's ends


@pytest.mark.parametrize(
    "text",
    [
        " category",  # blank space before the chain
        "\ncategory",
        "category:\t",  # blank space inside the layout
        "category:  query",
        "LINE0  ",  # after a whole line
        "LINE0\n\nbrand",  # a blank line
        "LINE0\n brand",
        "LINE0\x1e",  # a line break the renderer never writes
        "LINE0\r\nbrand",
        "LINES\nlevel: exact ",
        "LINES\nlevel:  exact",
    ],
)
def test_a_laid_out_chain_has_no_blank_space_the_renderer_would_not_write(text):
    lines = render(chain()).splitlines()
    text = text.replace("LINES", "\n".join(lines[:-1])).replace("LINE0", lines[0])
    assert unfinishable(text, QUERY, ITEM, LEVELS, laid_out=True) is not None
    whole = render(chain())
    assert all(unfinishable(whole[:i], QUERY, ITEM, LEVELS, laid_out=True) is None for i in range(len(whole) + 1))


def test_a_character_written_byte_by_byte_is_not_ruled_out_half_way():
    """A tokenizer may write "é" in two byte tokens: after the first, the text ends in a replacement character."""
    for laid_out in (False, True):
        assert unfinishable('category: query "caf\ufffd', "café", ITEM, LEVELS, laid_out) is None
        assert unfinishable('category: query "caf\ufffdx', "café", ITEM, LEVELS, laid_out) is not None


@pytest.mark.parametrize(
    "text,query",
    [
        ('category: query "dr\\/ill" | item', "dr/ill"),  # an escape the renderer does not write, closed at once
        ("LINES\nlevel:  exact\n", QUERY),  # blank space the renderer does not write, in a line ended at once
    ],
)
def test_a_laid_out_chain_quotes_and_names_as_the_renderer_does(text, query):
    text = text.replace("LINES", "\n".join(render(chain()).splitlines()[:-1]))
    assert unfinishable(text, query, ITEM, LEVELS) is None  # the parser takes either
    assert unfinishable(text, query, ITEM, LEVELS, laid_out=True) is not None
