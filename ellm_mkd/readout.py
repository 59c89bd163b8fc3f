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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import StoppingCriteria, StoppingCriteriaList

from datamodules.schema import DIMENSIONS, VERDICTS

from .cot import ChainOfThought, CoTParseError, parse, unfinishable
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


class _TokenTree:
    """One text plus candidate continuations hung off it.

    A readout point's prefix and candidate are followed along the text while the text has the same
    tokens (and the position's next-token distribution is available); where they part, the rest
    become *nodes*: extra tokens that see their own prefix only and carry the position ids they would
    have in place. Continuations that share tokens (`` level`` of `` level0`` and `` level1``) share
    nodes. ``readable`` says which text positions already have their distribution (a generation
    step recorded it); ``None`` means every text position is computed by the scoring pass.
    """

    def __init__(self, tokens: Sequence[int], readable: range | None = None):
        self.tokens = list(tokens)
        self.n_text = len(self.tokens)
        self.readable = readable
        self.parent: list[int] = list(range(-1, self.n_text - 1))
        self.position_ids: list[int] = list(range(self.n_text))
        self._children: dict[tuple[int, int], int] = {}
        self._bases: dict[tuple[int, ...], tuple[int, bool]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_nodes(self) -> int:
        return len(self.tokens) - self.n_text

    def _extend(self, pos: int, on_text: bool, tokens: Sequence[int], need_last_only: bool) -> tuple[list[int], bool]:
        out = []
        for j, tok in enumerate(tokens):
            nxt = pos + 1
            need = not need_last_only or j == len(tokens) - 1
            if (on_text and nxt < self.n_text and self.tokens[nxt] == tok
                    and (not need or self.readable is None or nxt in self.readable)):
                pos = nxt
            else:
                on_text = False
                node = self._children.get((pos, tok))
                if node is None:
                    node = len(self.tokens)
                    self.tokens.append(tok)
                    self.parent.append(pos)
                    self.position_ids.append(self.position_ids[pos] + 1 if pos >= 0 else 0)
                    self._children[(pos, tok)] = node
                pos = node
            out.append(pos)
        return out, on_text

    def reading_positions(self, prefix: Sequence[int], cand: Sequence[int]) -> list[int]:
        """Positions whose next-token distributions score ``cand`` written after ``prefix``."""
        if not prefix:
            raise ValueError("a readout point needs a non-empty prefix")
        key = tuple(prefix)
        if key not in self._bases:
            placed, on_text = self._extend(-1, True, prefix, need_last_only=True)
            self._bases[key] = (placed[-1], on_text)
        last, on_text = self._bases[key]
        rest, _ = self._extend(last, on_text, cand[:-1], need_last_only=False)
        return [last] + rest

    def visible(self) -> Tensor:
        """``[T, T]`` bool: the positions each position attends to (its own prefix and itself)."""
        n = len(self.tokens)
        mask = torch.zeros((n, n), dtype=torch.bool)
        mask[:self.n_text, :self.n_text] = torch.ones((self.n_text, self.n_text), dtype=torch.bool).tril()
        for node in range(self.n_text, n):
            if self.parent[node] >= 0:
                mask[node] = mask[self.parent[node]]
            mask[node, node] = True
        return mask


def _plan(trees: list[_TokenTree], tree_of: Sequence[int], sequences: Sequence[Sequence[int]],
          points: Sequence[ReadoutPoint]) -> list[list[tuple[int, list[int], list[int]]]]:
    """Per point, per candidate: ``(tree, reading positions, candidate tokens)``."""
    plan = []
    for p in points:
        t = tree_of[p.seq]
        prefix = list(sequences[p.seq][:p.cut]) if p.prefix_ids is None else list(p.prefix_ids)
        plan.append([(t, trees[t].reading_positions(prefix, cand), list(cand)) for cand in p.cset.token_ids])
    return plan


def _renormalise(plan: list[list[tuple[int, list[int], list[int]]]], logp_of) -> list[Tensor]:
    out = []
    for cands in plan:
        vals = [sum(logp_of(t, pos, tok) for pos, tok in zip(positions, toks)) for t, positions, toks in cands]
        out.append(torch.stack([torch.as_tensor(v).float().cpu() for v in vals]).log_softmax(-1))
    return out


def _attention_kind(backbone: Any) -> str:
    impl = getattr(getattr(backbone, "config", None), "_attn_implementation", None) or "sdpa"
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"the readout needs 'sdpa' or 'eager' attention (it scores candidate words beside the text "
                         f"with a tree attention mask); this model uses {impl!r}")
    return impl


def _as_mask(visible: Tensor, impl: str, dtype: torch.dtype) -> Tensor:
    """A bool visibility mask as the attention implementation wants it (eager adds it to the scores)."""
    if impl == "sdpa":
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


@torch.no_grad()
def score_points(model: Any, sequences: Sequence[Sequence[int]], points: Sequence[ReadoutPoint], pad_id: int,
                 rows_per_pass: int = 16) -> list[Tensor]:
    """Normalised log-probabilities over each point's candidates (one 1-D tensor per point).

    ``sequences`` are token ids (no padding); each point reads after ``seq[:cut]`` (or after its
    own ``prefix_ids``). One forward pass per ``rows_per_pass`` texts scores every point and every
    candidate (see the module docstring).
    """
    backbone, head = lm_parts(model)
    impl = _attention_kind(backbone)
    device = next(model.parameters()).device
    used = sorted({p.seq for p in points})
    trees = [_TokenTree(sequences[s]) for s in used]
    tree_of = {s: i for i, s in enumerate(used)}
    plan = _plan(trees, tree_of, sequences, points)
    wanted: dict[int, set[int]] = {}
    for cands in plan:
        for t, positions, _ in cands:
            wanted.setdefault(t, set()).update(positions)
    logp_at: dict[tuple[int, int], Tensor] = {}
    order = sorted(wanted, key=lambda t: len(trees[t]))
    dtype = next(backbone.parameters()).dtype
    for start in range(0, len(order), rows_per_pass):
        chunk = order[start:start + rows_per_pass]
        width = max(len(trees[t]) for t in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        pos = torch.zeros((len(chunk), width), dtype=torch.long)
        visible = torch.eye(width, dtype=torch.bool).repeat(len(chunk), 1, 1)  # padding sees itself only
        for i, t in enumerate(chunk):
            n = len(trees[t])
            ids[i, :n] = torch.tensor(trees[t].tokens)
            pos[i, :n] = torch.tensor(trees[t].position_ids)
            visible[i, :n, :n] = trees[t].visible()
        hidden = backbone(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False,
                          attention_mask=_as_mask(visible[:, None].to(device), impl, dtype)).last_hidden_state
        keys = [(row, t, p) for row, t in enumerate(chunk) for p in sorted(wanted[t])]
        logp = _head_logits(model, head, hidden[[k[0] for k in keys], [k[2] for k in keys]]).log_softmax(-1)
        for i, (_, t, p) in enumerate(keys):
            logp_at[(t, p)] = logp[i]
    return _renormalise(plan, lambda t, p, tok: logp_at[(t, p)][tok])


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
                     stop_ids: Sequence[int] | None = None, **generate_kwargs: Any) -> list[list[str]]:
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
                              num_return_sequences=num_return_sequences, **generate_kwargs)
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


@dataclass
class RecordedGeneration:
    """A batch of chains written by :func:`generate_recorded`, with what scoring them needs.

    ``tokens[i]`` is pair ``i``'s prompt plus the tokens it wrote (stop token excluded); generation
    step ``s`` gave the distribution after text position ``prompt_len[i] - 1 + s``, of which
    ``step_logp[i, s]`` keeps the recorded ids' log-probabilities (columns in ``columns``).
    ``cache`` holds the keys and values of every written position (row ``i`` starts at slot
    ``pads[i]``); slots from ``free_from`` on are free for the candidate nodes.
    """

    texts: list[str]
    tokens: list[list[int]]
    prompt_len: list[int]
    step_logp: Tensor  # [B, S, len(columns)]
    columns: dict[int, int]
    cache: Any  # a StaticCache, or None when the model has none
    pads: list[int]
    free_from: int
    cache_len: int = 0  # slots in ``cache``
    stopped: list[bool] = field(default_factory=list)  # per pair: stopped as no longer viable

    def readable(self, i: int) -> range:
        start = self.prompt_len[i] - 1
        return range(start, min(start + self.step_logp.shape[1], len(self.tokens[i])))

    @torch.inference_mode()  # the cache was written in inference mode; it may only be updated in it
    def score(self, model: Any, points: Sequence[ReadoutPoint], pad_id: int) -> list[Tensor]:
        """:func:`score_points` over the written chains without reading them again: distributions at
        text positions come from the generation steps; only the candidate nodes run, one pass over
        the generation's cache. Falls back to :func:`score_points` where the cache cannot hold them."""
        backbone, head = lm_parts(model)
        impl = _attention_kind(backbone)
        trees = [_TokenTree(t, self.readable(i)) for i, t in enumerate(self.tokens)]
        plan = _plan(trees, list(range(len(trees))), self.tokens, points)
        width = max(t.n_nodes for t in trees)
        node_logp: dict[tuple[int, int], Tensor] = {}
        if width:
            cache = self.cache
            views = [t.visible()[t.n_text:] for t in trees]
            fits = (cache is not None and not any(getattr(cache, "is_sliding", [False]))
                    and self.free_from + width <= self.cache_len)
            for tree, vis, pad in zip(trees, views, self.pads):  # every text position a node sees is in the cache
                seen = vis[:, :tree.n_text].any(0).nonzero()
                fits = fits and (not len(seen) or pad + int(seen.max()) < self.free_from)
            if not fits:
                return score_points(model, self.tokens, points, pad_id)
            device = next(model.parameters()).device
            ids = torch.full((len(trees), width), pad_id, dtype=torch.long)
            pos = torch.zeros((len(trees), width), dtype=torch.long)
            visible = torch.zeros((len(trees), width, self.cache_len), dtype=torch.bool)
            for i, (tree, vis, pad) in enumerate(zip(trees, views, self.pads)):
                m = tree.n_nodes
                ids[i, :m] = torch.tensor(tree.tokens[tree.n_text:], dtype=torch.long)
                pos[i, :m] = torch.tensor(tree.position_ids[tree.n_text:], dtype=torch.long)
                visible[i, :m, pad:pad + tree.n_text] = vis[:, :tree.n_text]
                visible[i, :m, self.free_from:self.free_from + m] = vis[:, tree.n_text:]
                visible[i, torch.arange(m, width), self.free_from + torch.arange(m, width)] = True  # padding
            dtype = next(backbone.parameters()).dtype
            hidden = backbone(input_ids=ids.to(device), position_ids=pos.to(device), past_key_values=cache,
                              cache_position=torch.arange(self.free_from, self.free_from + width, device=device),
                              attention_mask=_as_mask(visible[:, None].to(device), impl, dtype),
                              use_cache=True).last_hidden_state
            keys = sorted({(t, p) for cands in plan for t, positions, _ in cands for p in positions
                           if p >= trees[t].n_text})
            if keys:
                rows = [t for t, _ in keys]
                cols = [p - trees[t].n_text for t, p in keys]
                logp = _head_logits(model, head, hidden[rows, cols]).log_softmax(-1).cpu()
                node_logp = {k: logp[j] for j, k in enumerate(keys)}

        def logp_of(t: int, p: int, tok: int) -> Tensor:
            if p >= trees[t].n_text:
                return node_logp[(t, p)][tok]
            return self.step_logp[t, p - self.readable(t).start, self.columns[tok]]

        return _renormalise(plan, logp_of)


class _StopDeadRows(StoppingCriteria):
    """A ``generate`` stopping criterion: a row is done once ``viable(row, text so far)`` is False.

    Remembers how many tokens each stopped row had written (``stopped``); rows that wrote a stop
    token are left to ``generate``."""

    def __init__(self, tokenizer: Any, width: int, viable: Callable[[int, str], bool], stop_ids: Sequence[int]):
        self.tokenizer, self.width, self.viable, self.stop_ids = tokenizer, width, viable, set(stop_ids)
        self.stopped: dict[int, int] = {}

    def __call__(self, input_ids: Tensor, scores: Tensor | None = None, **kwargs: Any) -> Tensor:
        new = input_ids[:, self.width:].tolist()
        done = torch.zeros(len(new), dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(new):
            if i in self.stopped:
                done[i] = True
            elif not self.stop_ids.intersection(row) and not self.viable(
                    i, self.tokenizer.decode(row, skip_special_tokens=True)):
                self.stopped[i] = len(row)
                done[i] = True
        return done


@torch.inference_mode()
def generate_recorded(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                      record_ids: Sequence[int], stop_ids: Sequence[int], temperature: float = 0.0,
                      node_room: int = 32, viable: Callable[[int, str], bool] | None = None) -> RecordedGeneration:
    """One ``generate`` call over ``prompts`` (left padding, a static key/value cache when the model
    supports one) that also records, at every step, the log-probabilities of ``record_ids`` (the
    readout's candidate tokens) from the output layer, so the chain need not be read a second time.
    ``temperature == 0`` is greedy decoding; recorded distributions are the model's own, before any
    sampling warper. With ``viable``, a row stops as soon as ``viable(row, its text so far)`` is
    False (a chain that can no longer parse): the batch ends when every row has stopped or written a
    stop token, and the stopped row's text ends where it was stopped."""
    ensure_pad_token(tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    backbone, head = lm_parts(model)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    width = enc["input_ids"].shape[1]
    cache, cache_len = None, width + max_new_tokens + node_room
    if getattr(lm, "_can_compile_fullgraph", False):
        from transformers import StaticCache

        cache = StaticCache(config=lm.config, max_cache_len=cache_len)
    columns = {tok: j for j, tok in enumerate(dict.fromkeys(record_ids))}
    index = torch.tensor(list(columns), device=device)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    steps: list[Tensor] = []

    def record(_module: Any, _inputs: Any, logits: Tensor) -> None:
        last = logits[:, -1].float()
        if cap:
            last = torch.tanh(last / cap) * cap
        steps.append(last.log_softmax(-1)[:, index])

    # disable_compile: generate would compile the decoding step around a static cache on GPUs, and a
    # compiled step keeps the hooks it was traced with
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=list(stop_ids), disable_compile=True)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if cache is not None:
        kw["past_key_values"] = cache
    dead = None
    if viable is not None:
        dead = _StopDeadRows(tokenizer, width, viable, stop_ids)
        kw["stopping_criteria"] = StoppingCriteriaList([dead])
    hook = head.register_forward_hook(record)
    try:
        out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                             **kw)
    finally:
        hook.remove()
    new = out[:, width:].cpu()
    stops = set(stop_ids)
    pads = (enc["attention_mask"] == 0).sum(-1).tolist()
    tokens, prompt_len, written = [], [], []
    for i, row in enumerate(new.tolist()):
        end = next((j for j, t in enumerate(row) if t in stops), len(row))
        if dead is not None and i in dead.stopped:
            end = min(end, dead.stopped[i])
        prompt = enc["input_ids"][i, pads[i]:].tolist()
        tokens.append(prompt + row[:end])
        prompt_len.append(len(prompt))
        written.append(row[:end])
    texts = tokenizer.batch_decode(written, skip_special_tokens=True)
    free_from = width + len(steps) - 1  # the last token written is never fed back
    if cache is not None and int(cache.get_seq_length()) != free_from:
        raise RuntimeError(f"generation left {int(cache.get_seq_length())} cache slots written, expected {free_from} "
                           f"({width} prompt + {len(steps)} steps - 1): the recorded steps do not match the cache")
    return RecordedGeneration(texts, tokens, prompt_len, torch.stack(steps, 1).cpu(), columns, cache, pads,
                              free_from, cache_len, [dead is not None and i in dead.stopped for i in range(len(texts))])


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
        stop_unparseable: in ``cot``, stop writing a chain as soon as a finished line breaks the schema
            or can no longer grow into a valid line (:func:`~ellm_mkd.cot.unfinishable`): it fails to
            parse either way (its error names the same line), its distributions come from the direct
            question either way; only its text is shorter. A batch then runs as long as its longest
            viable chain instead of to the token budget.
    """

    def __init__(self, model: Any, tokenizer: Any, level_names: Sequence[str], template: PromptTemplate | None = None,
                 max_new_tokens: int = 160, stop_unparseable: bool = True):
        self.model, self.tokenizer = model, tokenizer
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
        gen = None
        if responses is None:
            viable = None
            if self.stop_unparseable:
                def viable(i: int, text: str) -> bool:
                    return unfinishable(text, queries[i], items[i], self.level_names) is None
            gen = generate_recorded(self.model, self.tokenizer, prompts, self.max_new_tokens, self.record_ids,
                                    self.stop_ids, temperature=temperature, viable=viable)
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
            lead = resp[:len(resp) - len(resp.lstrip())]  # what the model wrote before the chain
            texts.append(gen.tokens[i] if gen is not None else prompt_ids + self._ids(lead + body) + self.stop_ids[:1])
            try:
                chain = parse(resp, q, d, self.level_names)
            except CoTParseError as e:
                if gen is not None and gen.stopped[i]:  # cut short: say why it could not go on
                    e = unfinishable(resp, q, d, self.level_names) or e
                chains.append(None)
                errors.append(str(e))
                prefix = self._ids(prompt + self.template.answer_prefix)
                pts.append(ReadoutPoint(i, len(prefix), self.levels, prefix_ids=prefix))
                owners.append((i, "level", -1))
                prefixes.append(prefix)
                continue
            chains.append(chain)
            errors.append(None)
            for k, cut_text, cset in self._cuts(body):
                cut_ids = prompt_ids + self._ids(lead + cut_text)
                pts.append(ReadoutPoint(i, len(cut_ids), cset, prefix_ids=cut_ids))
                owners.append((i, "level" if k < 0 else "dim", k))
                if k < 0:
                    prefixes.append(cut_ids)
        pad = self.tokenizer.pad_token_id
        logp = score_points(self.model, texts, pts, pad) if gen is None else gen.score(self.model, pts, pad)
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

