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

Cost: one teacher-forced pass over the whole texts gives every readout point's first-token
distribution and the later tokens of whichever candidate the text itself continues with; only
candidates that are several tokens long *and* not written in the text need an extra forward over
``prefix + candidate`` (none with the bundled model, whose level and verdict words are single
tokens). Only the hidden states at readout positions go through the output layer (a 49k-word
vocabulary times every position would dominate memory).

:class:`TeacherReadout` puts it together for the two modes of :mod:`ellm_mkd.prompts`:

``direct``  one forward over ``prompt + "level:"``: level distribution only.
``cot``     batched generation of the chain (left-padded, one ``generate`` call per batch), strict
            parse, then one scoring pass reading the level after ``level:`` and every verdict after
            ``=>``. A chain that does not parse is counted as a parse failure; its level
            distribution is read after ``prompt + "level:"`` (the direct question) and its verdict
            distributions are uniform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from datamodules.schema import DIMENSIONS, VERDICTS

from .cot import ChainOfThought, CoTParseError, parse
from .prompts import PromptTemplate


def ensure_pad_token(tokenizer: Any) -> None:
    """Causal LM tokenizers often have no pad token; padding positions are masked, so EOS serves."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def lm_parts(model: Any) -> tuple[Any, Any]:
    """``(backbone, output layer)`` of a causal LM, through a peft wrapper if there is one
    (LoRA layers live inside the backbone's modules, so calling the backbone uses them)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.base_model, lm.get_output_embeddings()


def _head_logits(model: Any, head: Any, hidden: Tensor) -> Tensor:
    logits = head(hidden).float()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class CandidateSet:
    """A closed set of words read at one kind of readout point, as token sequences.

    Args:
        tokenizer: the model's tokenizer.
        words: the candidates (level names, verdicts), written after ``anchor`` with a space.
        anchor: text the words follow in the chain (``level:``, ``=>``); the words are tokenized
            *in context* (``anchor + " " + word`` minus the anchor's tokens) so tokenizers that
            merge across the space still agree with what the model reads and writes.
        terminator_ids: tokens that end the word in the chain (newline, end of turn); appended to
            every candidate only when one candidate's tokens are a prefix of another's.
    """

    def __init__(self, tokenizer: Any, words: Sequence[str], anchor: str, terminator_ids: Sequence[int] = ()):
        self.words = tuple(words)
        if len(set(self.words)) != len(self.words) or not self.words:
            raise ValueError(f"candidate words must be distinct and non-empty: {self.words}")
        base = tokenizer(anchor, add_special_tokens=False)["input_ids"]
        seqs = []
        for w in self.words:
            full = tokenizer(f"{anchor} {w}", add_special_tokens=False)["input_ids"]
            ids = full[len(base):] if full[:len(base)] == base else tokenizer(f" {w}", add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"candidate {w!r} tokenizes to nothing")
            seqs.append(list(ids))
        self.ambiguous = any(a != b and b[:len(a)] == a for a in seqs for b in seqs)
        if self.ambiguous:
            if not terminator_ids:
                raise ValueError(f"candidates {self.words} are token prefixes of each other and no terminator was given")
            seqs = [s + list(terminator_ids) for s in seqs]
        self.token_ids: list[list[int]] = seqs

    @property
    def max_len(self) -> int:
        return max(map(len, self.token_ids))


@dataclass
class ReadoutPoint:
    """Read candidate set ``cset`` after the first ``cut`` tokens of sequence ``seq``."""

    seq: int
    cut: int
    cset: CandidateSet
    prefix_ids: list[int] | None = None  # the prefix when it is not the sequence's own first ``cut`` tokens


@torch.no_grad()
def score_points(model: Any, sequences: Sequence[Sequence[int]], points: Sequence[ReadoutPoint], pad_id: int,
                 extra_batch_size: int = 16) -> list[Tensor]:
    """Normalised log-probabilities over each point's candidates (one 1-D tensor per point).

    ``sequences`` are token ids (no padding); each point reads after ``seq[:cut]`` (or after its
    own ``prefix_ids``). See the module docstring for the cost.
    """
    backbone, head = lm_parts(model)
    device = next(model.parameters()).device
    seq_logp: list[list[Tensor | None]] = [[None] * len(p.cset.token_ids) for p in points]
    extra: list[tuple[int, int, list[int], list[int]]] = []  # (point, candidate, prefix, candidate ids)

    # 1. one teacher-forced pass over the sequences, output layer only at the positions needed
    needed: dict[tuple[int, int], None] = {}
    plan: list[tuple[int, int, list[int]]] = []  # (point, candidate, positions whose logits score the tokens)
    for pi, p in enumerate(points):
        seq = list(sequences[p.seq]) if p.prefix_ids is None else None
        for ci, cand in enumerate(p.cset.token_ids):
            if seq is None:
                extra.append((pi, ci, list(p.prefix_ids), cand))
                continue
            # token j of the candidate is read at cut-1+j, which is only right when the text itself
            # continues with the candidate's first j tokens; otherwise score prefix + candidate apart
            k = len(cand) - 1
            if k and seq[p.cut:p.cut + k] != cand[:k]:
                extra.append((pi, ci, seq[:p.cut], cand))
                continue
            positions = [p.cut - 1 + j for j in range(len(cand))]
            plan.append((pi, ci, positions))
            for pos in positions:
                needed[(p.seq, pos)] = None
    used_seqs = sorted({s for s, _ in needed})
    if used_seqs:
        idx = {s: i for i, s in enumerate(used_seqs)}
        hidden = _hidden_states(backbone, [list(sequences[s]) for s in used_seqs], pad_id, device)
        keys = list(needed)
        rows = torch.tensor([idx[s] for s, _ in keys], device=device)
        cols = torch.tensor([pos for _, pos in keys], device=device)
        logp = _head_logits(model, head, hidden[rows, cols]).log_softmax(-1)
        where = {k: i for i, k in enumerate(keys)}
        for pi, ci, positions in plan:
            p = points[pi]
            cand = p.cset.token_ids[ci]
            seq_logp[pi][ci] = sum(logp[where[(p.seq, pos)], tok] for pos, tok in zip(positions, cand))

    # 2. candidates the text does not continue with and that are longer than one token
    for start in range(0, len(extra), extra_batch_size):
        chunk = extra[start:start + extra_batch_size]
        seqs = [prefix + cand for _, _, prefix, cand in chunk]
        hidden = _hidden_states(backbone, seqs, pad_id, device)
        for row, (pi, ci, prefix, cand) in enumerate(chunk):
            pos = torch.arange(len(prefix) - 1, len(prefix) - 1 + len(cand), device=device)
            lp = _head_logits(model, head, hidden[row, pos]).log_softmax(-1)
            seq_logp[pi][ci] = lp[torch.arange(len(cand), device=device), torch.tensor(cand, device=device)].sum()

    return [torch.stack(vals).float().log_softmax(-1).cpu() for vals in seq_logp]


def _hidden_states(backbone: Any, seqs: list[list[int]], pad_id: int, device: torch.device) -> Tensor:
    """Last hidden states of right-padded sequences ``[B, L, H]``."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return backbone(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state


@torch.no_grad()
def generate_batched(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                     temperature: float = 0.0, top_p: float = 1.0, num_return_sequences: int = 1,
                     stop_ids: Sequence[int] | None = None) -> list[list[str]]:
    """Completions of ``prompts`` in one ``generate`` call (left padding): ``num_return_sequences``
    strings per prompt, special tokens removed. ``temperature == 0`` is greedy decoding."""
    ensure_pad_token(tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    eos = list(stop_ids) if stop_ids else _stop_ids(model, tokenizer)
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                              num_return_sequences=num_return_sequences)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        if num_return_sequences > 1:
            raise ValueError("several completions per prompt need a sampling temperature > 0")
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device), **kw)
    new = out[:, enc["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [texts[i * num_return_sequences:(i + 1) * num_return_sequences] for i in range(len(prompts))]


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (gen_eos, tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif v:
            ids.update(v)
    for special in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
            ids.add(tid)
    return sorted(ids)


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
    """

    def __init__(self, model: Any, tokenizer: Any, level_names: Sequence[str], template: PromptTemplate | None = None,
                 max_new_tokens: int = 160):
        self.model, self.tokenizer = model, tokenizer
        ensure_pad_token(tokenizer)
        self.level_names = tuple(level_names)
        self.template = template or PromptTemplate()
        self.max_new_tokens = max_new_tokens
        self.stop_ids = _stop_ids(model, tokenizer)
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        anchor = self.template.answer_prefix
        self.levels = CandidateSet(tokenizer, self.level_names, anchor, self.stop_ids[:1])
        self.verdicts = CandidateSet(tokenizer, VERDICTS, "=>", newline)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompts(self, queries: Sequence[str], items: Sequence[str], mode: Literal["cot", "direct"]) -> list[str]:
        return [self.template.prompt(self.tokenizer, q, d, self.level_names, mode) for q, d in zip(queries, items)]

    def direct(self, queries: Sequence[str], items: Sequence[str]) -> Readout:
        """One forward pass per pair over ``prompt + "level:"``."""
        seqs = [self._ids(p + self.template.answer_prefix) for p in self.prompts(queries, items, "direct")]
        pts = [ReadoutPoint(i, len(s), self.levels) for i, s in enumerate(seqs)]
        logp = score_points(self.model, seqs, pts, self.tokenizer.pad_token_id)
        n = len(seqs)
        uniform = torch.full((n, len(DIMENSIONS), len(VERDICTS)), 1.0 / len(VERDICTS))
        return Readout(torch.stack(logp).exp(), uniform, [""] * n, [None] * n, [None] * n, seqs)

    def cot(self, queries: Sequence[str], items: Sequence[str], temperature: float = 0.0,
            responses: Sequence[str] | None = None) -> Readout:
        """Generate the chains in one batch (or take given ``responses``), parse, read every point."""
        prompts = self.prompts(queries, items, "cot")
        if responses is None:
            responses = [r[0] for r in generate_batched(self.model, self.tokenizer, prompts, self.max_new_tokens,
                                                        temperature=temperature, stop_ids=self.stop_ids)]
        n = len(prompts)
        seqs: list[list[int]] = []
        pts: list[ReadoutPoint] = []
        chains: list[ChainOfThought | None] = []
        errors: list[str | None] = []
        owners: list[tuple[int, str, int]] = []  # (pair, "level"|"dim", dim index) per point
        prefixes: list[list[int]] = []  # per pair: the tokens up to the level readout point
        for i, (prompt, resp, q, d) in enumerate(zip(prompts, responses, queries, items)):
            prompt_ids = self._ids(prompt)
            try:
                chain = parse(resp, q, d, self.level_names)
            except CoTParseError as e:
                chains.append(None)
                errors.append(str(e))
                seq = self._ids(prompt + self.template.answer_prefix)
                seqs.append(seq)
                pts.append(ReadoutPoint(len(seqs) - 1, len(seq), self.levels))
                owners.append((i, "level", -1))
                prefixes.append(seq)
                continue
            chains.append(chain)
            errors.append(None)
            body = resp.strip()
            seq = prompt_ids + self._ids(body) + self.stop_ids[:1]
            seqs.append(seq)
            s = len(seqs) - 1
            for k, cut_text, cset in self._cuts(body):
                cut_ids = prompt_ids + self._ids(cut_text)
                if seq[:len(cut_ids)] == cut_ids:
                    pts.append(ReadoutPoint(s, len(cut_ids), cset))
                else:  # the tokenizer merged across the cut: read after the prefix as its own sequence
                    pts.append(ReadoutPoint(s, len(cut_ids), cset, prefix_ids=cut_ids))
                owners.append((i, "level" if k < 0 else "dim", k))
                if k < 0:
                    prefixes.append(cut_ids)
        logp = score_points(self.model, seqs, pts, self.tokenizer.pad_token_id)
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
            for i, r in zip(todo, generate_batched(self.model, self.tokenizer, prompts, self.max_new_tokens,
                                                   stop_ids=self.stop_ids)):
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

    def _cuts(self, body: str) -> list[tuple[int, str, CandidateSet]]:
        """``(dimension index or -1 for the level, text up to the readout point, candidates)``."""
        out = []
        offset = 0
        lines = body.splitlines(keepends=True)
        for k, line in enumerate(lines):
            stripped = line.rstrip("\r\n")
            if k < len(DIMENSIONS):
                j = stripped.rfind("=>")
                out.append((k, body[:offset + j + 2], self.verdicts))
            elif k == len(DIMENSIONS):
                j = stripped.find(self.template.answer_prefix)
                out.append((-1, body[:offset + j + len(self.template.answer_prefix)], self.levels))
            offset += len(line)
        return out

