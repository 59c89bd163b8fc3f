"""Reading a served teacher's judgement out of the log-probabilities an OpenAI-compatible server returns.

A server (vLLM, SGLang, llama.cpp server) that is asked for ``logprobs`` answers, for every token it
wrote, the token, its log-probability and the ``top_logprobs`` most likely tokens at that position. Two
shapes exist and both are read, from either endpoint:

* chat (``/v1/chat/completions``, and llama.cpp's completions): ``choices[0].logprobs.content`` is a list
  of ``{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}``;
* legacy completions (``/v1/completions``, vLLM and SGLang): ``choices[0].logprobs`` is
  ``{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}``.

:func:`token_trace` turns either into a :class:`TokenTrace`: the written text, where each token starts in
it, and per position the log-probability of every token known there (the top ones and the one written).
The text is rebuilt from each token's UTF-8 ``bytes`` where the server sends them (a character split over
two tokens comes out whole), else from the token strings; byte-level spellings of a space (``Ġ``, ``▁``)
and a newline (``Ċ``) are read as such. ``-9999`` (OpenAI's "very unlikely") stays a log-probability.

:func:`read_words` reads a closed set of words (level names, verdicts) as the next word after a
character offset of that text (the end of ``level:`` or of ``=>``) and returns each word's
log-probability, the quantity the local readout renormalises (:mod:`ellm_mkd.readout`):

* a word is followed along the tokens the server wrote while they spell it (``" level"`` then ``"0"``:
  ``log p(" level") + log p("0" | " level")``, the exact sequence probability of a multi-token name);
* where the written tokens leave the word, the word's probability there is the sum of the top tokens that
  begin it (or are it, followed by no letter or digit) times the rest taken as certain (the first-token
  probability, exact when the word is one token, as every level and verdict word is for common
  tokenizers). A top token that begins several words at once is shared evenly between them;
* a word none of whose tokens is among the top ones gets the log-probability of the least likely top token
  there (a bound: it is no more likely than that) and is counted in ``missing``;
* matching ignores case (``Exact`` counts for ``exact``); tokens that are only white space are not read
  as a word.

The point is unreadable (None) when no word of the set could be read there (the server wrote something
else and none of the words is among its top tokens), or when the answer ends before the point.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: byte-level spellings some servers leave in token strings, as the text they stand for
_BYTE_LEVEL = str.maketrans({"Ġ": " ", "▁": " ", "Ċ": "\n"})


class NoLogprobsError(RuntimeError):
    """A server answer without the log-probabilities the served teacher reads."""


@dataclass
class TokenTrace:
    """What a server wrote, token by token: ``text``, ``starts[k]`` (character offset of token ``k`` in it),
    ``tokens[k]`` (its text), ``logprobs[k]`` and ``top[k]`` (log-probability of each token known at position
    ``k``: the top ones and the written one)."""

    text: str
    starts: list[int]
    tokens: list[str]
    logprobs: list[float]
    top: list[dict[str, float]]

    @property
    def has_top(self) -> bool:
        """Whether the server sent any alternative to the written tokens (``top_logprobs``)."""
        return any(len(t) > 1 or (t and self.tokens[k] not in t) for k, t in enumerate(self.top))


def _token_text(entry: dict[str, Any]) -> str:
    raw = entry.get("bytes")
    if isinstance(raw, list) and raw and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return bytes(raw).decode("utf-8", errors="replace").translate(_BYTE_LEVEL)
    token = entry.get("token")
    return token.translate(_BYTE_LEVEL) if isinstance(token, str) else ""


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise NoLogprobsError(f"{where} is {value!r}, not a log-probability")
    return float(value)


def _merge(top: dict[str, float], token: str, logprob: float) -> None:
    """Two entries that read as the same text (raw and decoded spellings): keep the likelier."""
    if token and logprob > top.get(token, -math.inf):
        top[token] = logprob


def token_trace(choice: Any, what: str = "the answer") -> TokenTrace:
    """The :class:`TokenTrace` of one answer choice; :class:`NoLogprobsError` when it carries no token
    log-probabilities (``what`` names the answer in the message)."""
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    if not isinstance(logprobs, dict):
        raise NoLogprobsError(f"{what} has no 'logprobs' (got {type(logprobs).__name__})")
    entries: list[tuple[str, bytes | None, float, dict[str, float]]] = []
    if isinstance(logprobs.get("content"), list):  # chat shape
        for k, e in enumerate(logprobs["content"]):
            if not isinstance(e, dict):
                raise NoLogprobsError(f"{what}: logprobs.content[{k}] is not an object")
            text = _token_text(e)
            raw = e.get("bytes")
            raw = (
                bytes(raw) if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw) else None
            )
            top: dict[str, float] = {}
            for j, t in enumerate(e.get("top_logprobs") or []):
                if isinstance(t, dict):
                    _merge(top, _token_text(t), _float(t.get("logprob"), f"{what}: content[{k}].top_logprobs[{j}]"))
            lp = _float(e.get("logprob"), f"{what}: logprobs.content[{k}].logprob")
            entries.append((text, raw, lp, top))
    elif isinstance(logprobs.get("tokens"), list):  # legacy completions shape
        tokens, lps = logprobs["tokens"], logprobs.get("token_logprobs")
        tops = logprobs.get("top_logprobs") or [None] * len(tokens)
        if not isinstance(lps, list) or len(lps) != len(tokens) or len(tops) != len(tokens):
            raise NoLogprobsError(f"{what}: logprobs.tokens, token_logprobs and top_logprobs differ in length")
        for k, (tok, lp, tp) in enumerate(zip(tokens, lps, tops)):
            top = {}
            for t, v in (tp or {}).items() if isinstance(tp, dict) else ():
                _merge(top, str(t).translate(_BYTE_LEVEL), _float(v, f"{what}: top_logprobs[{k}][{t!r}]"))
            entries.append((str(tok).translate(_BYTE_LEVEL), None, _float(lp, f"{what}: token_logprobs[{k}]"), top))
    else:
        raise NoLogprobsError(f"{what} has 'logprobs' without token entries (no 'content' or 'tokens' list)")

    if entries and all(raw is not None for _, raw, _, _ in entries):  # rebuild the text from the bytes
        data = b"".join(raw for _, raw, _, _ in entries)  # type: ignore[misc]
        text = data.decode("utf-8", errors="replace")
        starts, cum = [], 0
        for _, raw, _, _ in entries:
            starts.append(len(data[:cum].decode("utf-8", errors="ignore")))
            cum += len(raw)  # type: ignore[arg-type]
        tokens = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    else:
        tokens = [t for t, _, _, _ in entries]
        starts = [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
        text = "".join(tokens)
    tops = []
    for tok, (_, _, lp, top) in zip(tokens, entries):
        _merge(top, tok, lp)
        tops.append(top)
    return TokenTrace(text, starts, tokens, [e[2] for e in entries], tops)


def _matches(token: str, rest: str) -> bool:
    """Whether ``token`` (lower case) begins ``rest`` (lower case), or is all of it followed by no letter or digit."""
    if not token.strip():
        return False
    if rest.startswith(token):
        return True
    return token.startswith(rest) and not token[len(rest) : len(rest) + 1].isalnum()


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


@dataclass
class WordReading:
    """Log-probability of each word (unnormalised) and how many were read at the floor."""

    logprobs: list[float]
    missing: int

    def probs(self) -> list[float]:
        """The distribution over the words (renormalised)."""
        z = _logsumexp(self.logprobs)
        return [math.exp(v - z) for v in self.logprobs]


def read_words(trace: TokenTrace, offset: int, words: Sequence[str]) -> WordReading | None:
    """Each of ``words`` read as the next word after character ``offset`` of ``trace.text`` (see the module
    docstring); None when the point is unreadable."""
    n = len(trace.tokens)
    j = next((k for k in range(n) if trace.starts[k] + len(trace.tokens[k]) > offset), None)
    if j is None:
        return None
    word_start = offset
    while word_start < len(trace.text) and trace.text[word_start] in " \t":
        word_start += 1
    head = trace.text[trace.starts[j] : word_start].lower()
    fulls = [head + w.lower() for w in words]

    # follow each word along the written tokens: (position where it leaves them, characters spelt, log-prob, how)
    walks: list[tuple[int, int, float, str]] = []
    for full in fulls:
        k, done, lp, how = j, 0, 0.0, "left"
        while k < n:
            token, rest = trace.tokens[k].lower(), full[done:]
            if not token:  # the first bytes of a character the next token completes
                lp, k = lp + trace.logprobs[k], k + 1
            elif rest.startswith(token):
                done, lp, k = done + len(token), lp + trace.logprobs[k], k + 1
                if done == len(full):
                    how = "spelt"
                    break
            elif _matches(token, rest):
                lp, how = lp + trace.logprobs[k], "spelt"
                break
            else:
                break
        else:  # the answer ends inside the word (max_tokens): the rest is taken as written, if any of it was
            how = "cut" if done > len(head) else "unread"
        walks.append((k, done, lp, how))

    # where a word leaves the written tokens: the top tokens that begin it, shared with words that leave there too
    claims: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, (k, done, _, how) in enumerate(walks):
        if how == "left":
            for token in trace.top[k]:
                if _matches(token.lower(), fulls[i][done:]):
                    claims[(k, token)].append(i)
    out, missing = [], 0
    for i, (k, _, lp, how) in enumerate(walks):
        mine = [trace.top[k][t] - math.log(len(c)) for (kk, t), c in claims.items() if kk == k and i in c]
        if how in ("spelt", "cut"):
            out.append(lp)
        elif mine:
            out.append(lp + _logsumexp(mine))
        else:  # not among the top tokens: the least likely of them bounds it
            out.append(lp + (min(trace.top[k].values(), default=-9999.0) if how == "left" else -9999.0))
            missing += 1
    return WordReading(out, missing) if missing < len(words) else None
