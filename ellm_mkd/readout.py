"""Reading the teacher's judgement out of a causal LM: batched generation and word-level readout.

The teacher's relevance is not the text it writes but a *distribution*: at the position after
``level:`` the model assigns a probability to every level name, and after each dimension line's
``=>`` to every verdict. :class:`CandidateSet` turns a closed set of words into token sequences
(a word may be several tokens: ``" partially relevant"`` is two for SmolLM2), and
:func:`score_points` computes, for any number of readout points in a batch of texts, the
log-probability of each candidate *sequence* — ``log p(t1|prefix) + log p(t2|prefix,t1) + ...`` —
renormalised over the set. When one candidate's tokens are a prefix of another's, the candidates
are completed with the terminator that follows the word in the chain (end of line / end of turn),
so "relevant" and "relevant enough" cannot both claim the same tokens.

Cost: one teacher-forced pass per batch of texts scores every readout point and every candidate.
The first token of each candidate is read where the text reaches the point; later tokens are read
along the text where the text itself continues with the candidate, and otherwise from *tree
nodes*: the candidate's tokens appended after the text, each attending only to the text up to the
point and to its own earlier tokens, with the position ids they would have in place (a 4-D
attention mask; ``sdpa`` and ``eager`` attention). Candidates that share tokens share nodes, so the
four two-token levels `` level0``..`` level3`` add at most one node per point. Only the hidden states at
reading positions go through the output layer (a 49k-word vocabulary times every position would
dominate memory).

:class:`TeacherReadout` puts it together for the two modes of :mod:`ellm_mkd.prompts`:

``direct``  one forward over ``prompt + "level:"``: level distribution only.
``cot``     batched generation of the chain (left-padded, one ``generate`` call per batch, a static
            key/value cache where the model has one) that records, at every step, the
            log-probabilities of the candidate tokens (:func:`generate_recorded`), then a strict
            parse. Points inside the written chain are read from those records; only candidate
            tokens the chain did not write run, as tree nodes over the generation's cache, so the
            chain is never read a second time. A chain that does not parse is counted as a parse
            failure; its level distribution is read after ``prompt + "level:"`` (the direct
            question, as nodes after the prompt) and its verdict distributions are uniform. Given
            ``responses`` (or ``forced`` chains) are scored by one pass of :func:`score_points`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ellm_mkd.schema import DIMENSIONS, VERDICTS

from .candidate_scoring import CandidateSet, ReadoutPoint, _hidden_states, ensure_pad_token, lm_parts, score_points
from .cot import ChainOfThought, CoTParseError, _quote, parse, unfinishable
from .generation import RecordedGeneration as RecordedGeneration
from .generation import _stop_ids, generate_batched, generate_recorded
from .prompts import PromptTemplate, neutralize_special_tokens


@dataclass
class Readout:
    """The teacher's reading of a batch of pairs."""

    level_probs: Tensor  # [B, K]
    verdict_probs: Tensor  # [B, D, V]; uniform where the chain did not parse or mode is direct
    rationales: list[str]  # generated chains ("" in direct mode)
    chains: list[ChainOfThought | None]  # parsed chains (None: parse failure or direct mode)
    errors: list[str | None] = field(default_factory=list)  # parse error per pair (None: parsed)
    level_prefixes: list[list[int]] = field(default_factory=list)  # token ids up to the level readout point

    @property
    def parse_failures(self) -> int:
        return sum(e is not None for e in self.errors)


class TeacherReadout:
    """Level and verdict distributions of a causal LM for (query, item) pairs; see the module docstring.

    Args:
        model: causal LM (plain or peft-wrapped), in eval mode when called.
        tokenizer: its tokenizer (chat template used when it has one).
        level_names: the label scheme's level names, in order.
        template: the prompt template (the same one the teacher was trained with).
        max_new_tokens: generation budget of one chain.
        stop_unparseable: in ``cot``, stop writing a chain as soon as a finished line breaks the schema
            or can no longer grow into a valid line (:func:`~ellm_mkd.cot.unfinishable`): it fails to
            parse either way (its error names the same line), its distributions come from the direct
            question either way; only its text is shorter. A batch then runs as long as its longest
            viable chain instead of to the token budget.
        pack_tokens: score texts that share a prefix in rows of up to this many tokens, the shared part
            computed once (:func:`~ellm_mkd.candidate_scoring.score_points`; 0: a row per text).
        constrain_chains: in ``cot``, write only what keeps the chain parseable: at each step the most
            likely token (or a sampled one) among those after which the chain can still parse, the end
            only once it does (:func:`~ellm_mkd.generation.generate_recorded`). The chain's words stay
            the model's choice within the schema; a chain fails only when it outruns ``max_new_tokens``
            or no likely token keeps it viable. Distributions are read from the model's own scores.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        level_names: Sequence[str],
        template: PromptTemplate | None = None,
        max_new_tokens: int = 160,
        stop_unparseable: bool = True,
        pack_tokens: int = 0,
        constrain_chains: bool = False,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.pack_tokens, self.constrain_chains = pack_tokens, constrain_chains
        self._pieces: dict[str, set[int]] | None = None  # token text -> ids, built on the first constrained chain
        self._longest = 0
        self.stop_unparseable = stop_unparseable
        ensure_pad_token(tokenizer)
        self.level_names = tuple(level_names)
        self.template = template or PromptTemplate()
        self.max_new_tokens = max_new_tokens
        self.stop_ids = _stop_ids(model, tokenizer)
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        anchor = self.template.answer_prefix
        self.levels = CandidateSet(tokenizer, self.level_names, anchor, self.stop_ids[:1])
        self.verdicts = CandidateSet(tokenizer, VERDICTS, "=>", newline)
        self.record_ids = sorted({t for cs in (self.levels, self.verdicts) for ids in cs.token_ids for t in ids})

    def _writable(self, query: str, item: str) -> set[int]:
        """Every token a chain of this pair could be written with: each token whose text (alone, or without
        its leading space) is a piece of the chain's fixed words, a verdict or level name, or the query or
        item text as written or quoted. The constrained readout's candidates when none of the model's
        likeliest tokens keeps the chain parseable."""
        if self._pieces is None:
            special = set(self.tokenizer.all_special_ids)
            pieces: dict[str, set[int]] = {}
            texts = self.tokenizer.batch_decode([[t] for t in range(len(self.tokenizer))])
            for t, text in enumerate(texts):
                if t not in special and text and "\ufffd" not in text:
                    for key in {text, text.lstrip(" ")} - {""}:
                        pieces.setdefault(key, set()).add(t)
                elif t not in special and text and not text.strip("\ufffd"):  # a byte of a longer character
                    pieces.setdefault("\ufffd", set()).add(t)
            self._pieces = pieces
            self._longest = min(32, max(map(len, pieces)))  # pieces longer than that are never needed
        longest = self._longest
        fixed = " ".join(
            [*(f'{d}: query "-" | item "-" =>' for d in DIMENSIONS), *VERDICTS, "level:", *self.level_names]
        )
        found: set[int] = set()
        for text in (fixed + "\n", query, item, _quote(query), _quote(item)):  # as written, and as a chain quotes it
            for a in range(len(text)):
                for b in range(a + 1, min(len(text), a + longest) + 1):
                    found |= self._pieces.get(text[a:b], set())
        if any(ord(c) > 127 for c in query + item):  # characters a tokenizer may write byte by byte
            found |= self._pieces.get("\ufffd", set())
        return found

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _text_ids(self, text: str) -> list[int]:
        """Token ids of response text (a given chain quotes the data): never a special token."""
        return self._ids(neutralize_special_tokens(text, self.tokenizer))

    def prompts(self, queries: Sequence[str], items: Sequence[str], mode: Literal["cot", "direct"]) -> list[str]:
        return [self.template.prompt(self.tokenizer, q, d, self.level_names, mode) for q, d in zip(queries, items)]

    def direct(self, queries: Sequence[str], items: Sequence[str]) -> Readout:
        """One forward pass per pair over ``prompt + "level:"``."""
        seqs = [self._ids(p + self.template.answer_prefix) for p in self.prompts(queries, items, "direct")]
        pts = [ReadoutPoint(i, len(s), self.levels) for i, s in enumerate(seqs)]
        logp = score_points(self.model, seqs, pts, self.tokenizer.pad_token_id, pack_tokens=self.pack_tokens)
        n = len(seqs)
        uniform = torch.full((n, len(DIMENSIONS), len(VERDICTS)), 1.0 / len(VERDICTS))
        return Readout(torch.stack(logp).exp(), uniform, [""] * n, [None] * n, [None] * n, seqs)

    def cot(
        self,
        queries: Sequence[str],
        items: Sequence[str],
        temperature: float = 0.0,
        responses: Sequence[str] | None = None,
    ) -> Readout:
        """Generate the chains in one batch (or take given ``responses``), parse, read every point."""
        prompts = self.prompts(queries, items, "cot")
        gen = None
        if responses is None:
            viable = complete = None
            if self.stop_unparseable or self.constrain_chains:

                def viable(i: int, text: str) -> bool:
                    return unfinishable(text, queries[i], items[i], self.level_names, self.constrain_chains) is None

            writable = None
            if self.constrain_chains:
                memo: dict[int, set[int]] = {}

                def writable(i: int) -> set[int]:  # built for the pairs that need it, once
                    if i not in memo:
                        memo[i] = self._writable(queries[i], items[i])
                    return memo[i]

                def complete(i: int, text: str) -> bool:
                    try:
                        parse(text, queries[i], items[i], self.level_names)
                    except CoTParseError:
                        return False
                    return True

            gen = generate_recorded(
                self.model,
                self.tokenizer,
                prompts,
                self.max_new_tokens,
                self.record_ids,
                self.stop_ids,
                temperature=temperature,
                viable=viable,
                complete=complete,
                fallback=writable,
            )
            responses = gen.texts
        n = len(prompts)
        texts: list[list[int]] = []
        pts: list[ReadoutPoint] = []
        chains: list[ChainOfThought | None] = []
        errors: list[str | None] = []
        owners: list[tuple[int, str, int]] = []  # (pair, "level"|"dim", dim index) per point
        prefixes: list[list[int]] = []  # per pair: the tokens up to the level readout point
        for i, (prompt, resp, q, d) in enumerate(zip(prompts, responses, queries, items)):
            prompt_ids = self._ids(prompt)
            body = resp.strip()
            lead = resp[: len(resp) - len(resp.lstrip())]  # what the model wrote before the chain
            texts.append(
                gen.tokens[i] if gen is not None else prompt_ids + self._text_ids(lead + body) + self.stop_ids[:1]
            )
            try:
                chain = parse(resp, q, d, self.level_names)
            except CoTParseError as e:
                if gen is not None and gen.stopped[i]:  # cut short: say why it could not go on
                    e = unfinishable(resp, q, d, self.level_names, self.constrain_chains) or e
                chains.append(None)
                errors.append(str(e))
                prefix = self._ids(prompt + self.template.answer_prefix)
                pts.append(ReadoutPoint(i, len(prefix), self.levels, prefix_ids=prefix))
                owners.append((i, "level", -1))
                prefixes.append(prefix)
                continue
            chains.append(chain)
            errors.append(None)
            for k, cut_text, cset in self.chain_cuts(body):
                cut_ids = prompt_ids + self._text_ids(lead + cut_text)
                pts.append(ReadoutPoint(i, len(cut_ids), cset, prefix_ids=cut_ids))
                owners.append((i, "level" if k < 0 else "dim", k))
                if k < 0:
                    prefixes.append(cut_ids)
        pad = self.tokenizer.pad_token_id
        logp = (
            score_points(self.model, texts, pts, pad, pack_tokens=self.pack_tokens)
            if gen is None
            else gen.score(self.model, pts, pad)
        )
        level = torch.zeros(n, len(self.level_names))
        verdict = torch.full((n, len(DIMENSIONS), len(VERDICTS)), 1.0 / len(VERDICTS))
        for (i, kind, k), lp in zip(owners, logp):
            if kind == "level":
                level[i] = lp.exp()
            else:
                verdict[i, k] = lp.exp()
        return Readout(level, verdict, [r.strip() for r in responses], chains, errors, prefixes)

    def forced(self, queries: Sequence[str], items: Sequence[str], given: Sequence[str | None]) -> Readout:
        """Score given chains (e.g. the annotations) instead of writing them: one forward pass per pair,
        reading the verdict and level distributions at their points after the given text. Pairs
        without a chain (None or empty) get a generated one, as in :meth:`cot`."""
        responses = list(given)
        todo = [i for i, r in enumerate(responses) if not r]
        if todo:
            prompts = self.prompts([queries[i] for i in todo], [items[i] for i in todo], "cot")
            for i, r in zip(
                todo, generate_batched(self.model, self.tokenizer, prompts, self.max_new_tokens, stop_ids=self.stop_ids)
            ):
                responses[i] = r[0]
        return self.cot(queries, items, responses=responses)

    @torch.no_grad()
    def hidden(self, readout: Readout) -> Tensor:
        """The last layer's hidden state ``[B, H]`` where each pair's level is read (after the chain in
        ``cot``, after the prompt in ``direct``): the teacher's pooled representation of its judgement.
        One more forward pass over the readout prefixes."""
        backbone, _ = lm_parts(self.model)
        device = next(self.model.parameters()).device
        seqs = readout.level_prefixes
        states = _hidden_states(backbone, seqs, self.tokenizer.pad_token_id, device)
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        return states[torch.arange(len(seqs), device=device), last].float().cpu()

    def chain_cuts(self, body: str) -> list[tuple[int, str, CandidateSet]]:
        """``(dimension index or -1 for the level, text up to the readout point, candidates)``."""
        out = []
        offset = 0
        lines = body.splitlines(keepends=True)
        for k, line in enumerate(lines):
            stripped = line.rstrip("\r\n")
            if k < len(DIMENSIONS):
                j = stripped.rfind("=>")
                out.append((k, body[: offset + j + 2], self.verdicts))
            elif k == len(DIMENSIONS):
                j = stripped.find(self.template.answer_prefix)
                out.append((-1, body[: offset + j + len(self.template.answer_prefix)], self.levels))
            offset += len(line)
        return out
