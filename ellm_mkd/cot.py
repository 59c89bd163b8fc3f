"""The ELLM-rele chain of thought: schema, one renderer, one strict parser.

A relevance judgement is decomposed into fixed dimensions, judged in order, then concluded::

    category: query "cordless drill" | item "Cordless Drill" => match
    brand: query "voltara" | item "Voltara" => match
    model: query - | item "VX-2041" => absent
    attributes: query "red" | item "Blue" => mismatch
    usage: query "cordless drill" | item "Cordless Drill" => match
    level: substitute

Each dimension line carries *extractive evidence*: the words of the query and of the item text
it rests on, as JSON strings (so quotes and backslashes inside product text are escaped, never
ambiguous), or ``-`` when that side says nothing about the dimension. The verdict is one of
``match``, ``partial``, ``mismatch``, ``absent``. The last line names the relevance level.

:func:`parse` is strict: every line must be present, in order, well formed; evidence must be a
substring of the query / item text it claims to quote (so a model cannot invent evidence); the
level must be one of the scheme's level names. Any deviation raises :class:`CoTParseError` saying
which line and why; the parser never guesses a label.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ellm_mkd.schema import DIMENSIONS, VERDICTS

SCHEMA_VERSION = 1
_LINE = re.compile(
    r'^(?P<dim>[a-z]+): query (?P<q>-|"(?:[^"\\]|\\.)*") \| item (?P<i>-|"(?:[^"\\]|\\.)*") => (?P<verdict>[a-z]+)$'
)
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits at
_LEVEL = re.compile(r"^level: (?P<level>[a-z0-9_ -]+)$")


class CoTParseError(ValueError):
    """A chain of thought that does not follow the schema; ``line`` is 1-based (0: whole text)."""

    def __init__(self, reason: str, line: int = 0, text: str = ""):
        self.reason, self.line, self.text = reason, line, text
        where = f"line {line}: " if line else ""
        shown = f" ({text!r})" if text else ""
        super().__init__(f"{where}{reason}{shown}")


@dataclass(frozen=True)
class Judgement:
    """One dimension: evidence from each side (None: that side is silent) and a verdict."""

    dimension: str
    query_evidence: str | None
    item_evidence: str | None
    verdict: str

    def __post_init__(self) -> None:
        if self.dimension not in DIMENSIONS:
            raise ValueError(f"unknown dimension {self.dimension!r}; dimensions: {list(DIMENSIONS)}")
        if self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}; verdicts: {list(VERDICTS)}")


@dataclass(frozen=True)
class ChainOfThought:
    """Judgements for every dimension, in :data:`~ellm_mkd.schema.DIMENSIONS` order, and a level."""

    judgements: tuple[Judgement, ...]
    level: str

    def __post_init__(self) -> None:
        dims = tuple(j.dimension for j in self.judgements)
        if dims != DIMENSIONS:
            raise ValueError(f"judgements must cover {list(DIMENSIONS)} in that order, got {list(dims)}")

    def verdicts(self) -> dict[str, str]:
        return {j.dimension: j.verdict for j in self.judgements}


def _quote(evidence: str | None) -> str:
    return "-" if evidence is None else json.dumps(evidence, ensure_ascii=False)


def render(chain: ChainOfThought) -> str:
    """Compact text of a chain (what the teacher learns to write)."""
    return "\n".join([*map(_render_line, chain.judgements), f"level: {chain.level}"])


def _render_line(j: Judgement) -> str:
    return f"{j.dimension}: query {_quote(j.query_evidence)} | item {_quote(j.item_evidence)} => {j.verdict}"


def parse(
    text: str, query: str, item_text: str, level_names: tuple[str, ...] | list[str], require_level: bool = True
) -> ChainOfThought:
    """Text -> :class:`ChainOfThought`, or :class:`CoTParseError` naming the line and the reason.

    Leading/trailing blank space is ignored; anything after the level line is an error (a model
    that keeps talking has not followed the schema). With ``require_level=False`` a text that
    stops after the dimension lines is accepted with ``level=""`` (direct-readout prompts end there).
    """
    lines = text.strip().splitlines()
    n_dims = len(DIMENSIONS)
    if not lines:
        raise CoTParseError("empty chain of thought")
    judgements = []
    for k, dim in enumerate(DIMENSIONS):
        if k >= len(lines):
            raise CoTParseError(f"missing the {dim!r} line (the chain stops after {len(lines)} line(s))", k + 1)
        judgements.append(_dimension_line(k, lines[k].strip(), query, item_text))
    rest = [ln.strip() for ln in lines[n_dims:]]
    if not rest:
        if require_level:
            raise CoTParseError("missing the final 'level: ...' line", n_dims + 1)
        return ChainOfThought(tuple(judgements), "")
    level = _level_line(rest[0], level_names, n_dims + 1)
    if len(rest) > 1:
        raise CoTParseError("text after the level line", n_dims + 2, rest[1])
    return ChainOfThought(tuple(judgements), level)


def unfinishable(
    text: str, query: str, item_text: str, level_names: tuple[str, ...] | list[str], laid_out: bool = False
) -> CoTParseError | None:
    """For the beginning of a chain still being written: a :class:`CoTParseError` when no continuation
    of ``text`` can parse, or None while some continuation still could.

    Every line of the stripped text but the last is final: it gets the checks of :func:`parse`, in
    order. The last line is judged as a beginning: it must be able to grow into the line expected
    there (the dimension's name and layout, quoted evidence that still occurs in the query / item
    text, a verdict or level name it is the start of). The error names the line :func:`parse` fails
    on; errors only the end of a chain reveals (a missing line) are never raised. A last line followed
    by a line break is final too. ``laid_out``: the text must also keep to the layout :func:`render`
    writes (nothing before the first line, one line break between lines, no blank space at a line's
    ends), which a writer constrained to parseable text needs: blank space alone never ends.
    """
    if laid_out:
        if any(c in _LINE_BREAKS[1:] for c in text):  # a line break other than "\n" (the parser splits there too)
            return CoTParseError("blank space outside the chain's layout", text.count("\n") + 1)
        raw = text.split("\n")
        for k, line in enumerate(raw):
            if line != line.lstrip() or (k < len(raw) - 1 and (not line or line != line.rstrip())):
                return CoTParseError("blank space outside the chain's layout", k + 1, line)
    lines = text.strip().splitlines()
    n_dims = len(DIMENSIONS)

    def whole(k: int, line: str) -> None:  # a finished line: parse's checks (and, laid out, render's text)
        if k < n_dims:
            laid = _render_line(_dimension_line(k, line.strip(), query, item_text))
        else:
            laid = f"level: {_level_line(line.strip(), level_names, n_dims + 1)}"
        if laid_out and line != laid:
            raise CoTParseError("not laid out as the chain is written", k + 1, line)

    try:
        for k, line in enumerate(lines[:-1]):
            whole(k, line)
            if k >= n_dims:  # the level line is final: something follows it
                raise CoTParseError("text after the level line", n_dims + 2, lines[k + 1].strip())
    except CoTParseError as e:
        return e
    if not lines:
        return None
    k, last, tail = len(lines) - 1, lines[-1].lstrip(), text[len(text.rstrip()) :]

    def final() -> CoTParseError | None:
        try:
            whole(k, last)
        except CoTParseError as e:
            return e
        return None

    if any(c in _LINE_BREAKS for c in tail):  # a line break after the last line: it is final
        return final()
    # blank space the line ends with so far is part of it (``category:\t`` cannot grow into the line), unless
    # the line is already whole (the parser strips each line)
    grown = last + tail
    err = (
        _dimension_line_start(k, grown, query, item_text, laid_out)
        if k < n_dims
        else _level_line_start(grown, level_names, n_dims + 1, laid_out)
    )
    return None if err is not None and tail and not laid_out and final() is None else err


def _dimension_line_start(
    k: int, line: str, query: str, item_text: str, laid_out: bool = False
) -> CoTParseError | None:
    """Whether ``line`` can still grow into dimension ``k``'s line (see :func:`unfinishable`; ``laid_out``: with
    evidence quoted as :func:`render` quotes it, so an escape can only begin one the source's quoting has)."""
    dim = DIMENSIONS[k]
    shape = _shape_error(k, line)
    rest = line
    for part, side, source in (
        ("literal", f"{dim}: query ", ""),
        ("evidence", "query", query),
        ("literal", " | item ", ""),
        ("evidence", "item", item_text),
        ("literal", " => ", ""),
    ):
        if part == "literal":
            if not rest.startswith(side):
                return None if side.startswith(rest) else shape
            rest = rest[len(side) :]
            continue
        if not rest:
            return None
        if rest[0] == "-":
            rest = rest[1:]
            continue
        if rest[0] != '"':
            return shape
        end = _closing_quote(rest)
        if end < 0:  # the quote is still open: what it holds so far must occur in the source
            body = rest[1:]
            pending = len(body) - len(body.rstrip("\ufffd"))  # bytes of a character still being written
            body = body[: len(body) - pending] if pending <= 3 else body
            value = _decoded_start(body)
            if value is False or (laid_out and body not in _quote(source)[1:-1]):
                return CoTParseError(f"{side} evidence is not a valid quoted string", k + 1, line)
            if (
                pending
                and pending <= 3
                and value is not None
                and not any(value + c in source for c in source if ord(c) > 127)
            ):
                return CoTParseError(f"{side} evidence {value!r} is followed by no character here", k + 1, line)
            if value is not None and value not in source:
                return CoTParseError(f"{side} evidence {value!r} does not occur in the {side} text", k + 1, line)
            return None
        try:
            value = _evidence(side, rest[: end + 1], source, k, line)
        except CoTParseError as e:
            return e
        if laid_out and rest[: end + 1] != _quote(value):
            return CoTParseError(f"{side} evidence is not quoted as the chain quotes it", k + 1, line)
        rest = rest[end + 1 :]
    if any(v.startswith(rest) for v in VERDICTS):
        return None
    if re.fullmatch(r"[a-z]+", rest):
        return CoTParseError(f"verdict {rest!r} is not one of {list(VERDICTS)}", k + 1, line)
    return shape


def _level_line_start(
    line: str, level_names: tuple[str, ...] | list[str], lineno: int, exact: bool = False
) -> CoTParseError | None:
    """Whether ``line`` can still grow into the level line (see :func:`unfinishable`; ``exact``: with no blank
    space beside the name)."""
    head = "level: "
    if not line.startswith(head):
        return None if head.startswith(line) else CoTParseError("expected 'level: <name>'", lineno, line)
    name = line[len(head) :]
    if not re.fullmatch(r"[a-z0-9_ -]*", name):
        return CoTParseError("expected 'level: <name>'", lineno, line)
    name = name if exact else name.strip()
    if any(level.startswith(name) for level in level_names):
        return None
    return CoTParseError(f"level {name!r} is not one of {list(level_names)}", lineno, line)


def _closing_quote(text: str) -> int:
    """Index of the quote that closes the JSON string opening at ``text[0]``, or -1."""
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i
        else:
            i += 1
    return -1


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _decoded_start(body: str) -> str | None | bool:
    """The value that the beginning ``body`` of an open JSON string decodes to, an unfinished escape at
    the end left out; None when it cannot be told (a surrogate), False when no JSON string begins so (an
    escape JSON does not know)."""
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(body):
            break
        e = body[i + 1]
        if e == "u":
            if not re.fullmatch(r"[0-9a-fA-F]*", body[i + 2 : i + 6]):
                return False
            if i + 6 > len(body):
                break
            code = int(body[i + 2 : i + 6], 16)
            if 0xD800 <= code <= 0xDFFF:
                return None
            out.append(chr(code))
            i += 6
        elif e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        else:
            return False
    return "".join(out)


def _dimension_line(k: int, line: str, query: str, item_text: str) -> Judgement:
    dim = DIMENSIONS[k]
    m = _LINE.match(line)
    if not m:
        raise _shape_error(k, line)
    if m["dim"] != dim:
        raise CoTParseError(f"expected the {dim!r} line here, found {m['dim']!r}", k + 1, line)
    if m["verdict"] not in VERDICTS:
        raise CoTParseError(f"verdict {m['verdict']!r} is not one of {list(VERDICTS)}", k + 1, line)
    return Judgement(
        dim, _evidence("query", m["q"], query, k, line), _evidence("item", m["i"], item_text, k, line), m["verdict"]
    )


def _shape_error(k: int, line: str) -> CoTParseError:
    return CoTParseError(f'expected \'{DIMENSIONS[k]}: query "..."|- | item "..."|- => verdict\'', k + 1, line)


def _evidence(side: str, raw: str, source: str, k: int, line: str) -> str | None:
    """A side's evidence on dimension line ``k``: ``-`` (None) or a JSON string that occurs in ``source``."""
    if raw == "-":
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise CoTParseError(f"{side} evidence is not a valid quoted string", k + 1, line) from None
    if not value:
        raise CoTParseError(f"{side} evidence is empty; write - when the {side} says nothing", k + 1, line)
    if value not in source:
        raise CoTParseError(f"{side} evidence {value!r} does not occur in the {side} text", k + 1, line)
    return value


def _level_line(line: str, level_names: tuple[str, ...] | list[str], lineno: int) -> str:
    m = _LEVEL.match(line)
    if not m:
        raise CoTParseError("expected 'level: <name>'", lineno, line)
    level = m["level"].strip()
    if level not in level_names:
        raise CoTParseError(f"level {level!r} is not one of {list(level_names)}", lineno, line)
    return level


def evidence_spans(chain: ChainOfThought, query: str, item_text: str) -> list[tuple[str, str, int, int]]:
    """``(dimension, side, start, end)`` character offsets of each piece of evidence (first occurrence)."""
    out = []
    for j in chain.judgements:
        for side, ev, source in (("query", j.query_evidence, query), ("item", j.item_evidence, item_text)):
            if ev is not None:
                start = source.find(ev)
                out.append((j.dimension, side, start, start + len(ev)))
    return out
