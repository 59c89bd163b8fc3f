"""Batched generation with a causal LM: plain completions (:func:`generate_batched`) and chains written
in one ``generate`` call that record the candidate tokens' log-probabilities at every step
(:func:`generate_recorded`, :class:`RecordedGeneration`), so the readout need not read them again."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .candidate_scoring import (
    ReadoutPoint,
    _as_mask,
    _attention_kind,
    _head_logits,
    _plan,
    _renormalise,
    _TokenTree,
    ensure_pad_token,
    lm_parts,
    score_points,
)


@torch.no_grad()
def generate_batched(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    stop_ids: Sequence[int] | None = None,
    **generate_kwargs: Any,
) -> list[list[str]]:
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
    kw: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        num_return_sequences=num_return_sequences,
        **generate_kwargs,
    )
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        if num_return_sequences > 1:
            raise ValueError("several completions per prompt need a sampling temperature > 0")
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device), **kw)
    new = out[:, enc["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [texts[i * num_return_sequences : (i + 1) * num_return_sequences] for i in range(len(prompts))]


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
            views = [t.visible()[t.n_text :] for t in trees]
            fits = (
                cache is not None
                and not any(getattr(cache, "is_sliding", [False]))
                and self.free_from + width <= self.cache_len
            )
            for tree, vis, pad in zip(trees, views, self.pads):  # every text position a node sees is in the cache
                seen = vis[:, : tree.n_text].any(0).nonzero()
                fits = fits and (not len(seen) or pad + int(seen.max()) < self.free_from)
            if not fits:
                return score_points(model, self.tokens, points, pad_id)
            device = next(model.parameters()).device
            ids = torch.full((len(trees), width), pad_id, dtype=torch.long)
            pos = torch.zeros((len(trees), width), dtype=torch.long)
            visible = torch.zeros((len(trees), width, self.cache_len), dtype=torch.bool)
            for i, (tree, vis, pad) in enumerate(zip(trees, views, self.pads)):
                m = tree.n_nodes
                ids[i, :m] = torch.tensor(tree.tokens[tree.n_text :], dtype=torch.long)
                pos[i, :m] = torch.tensor(tree.position_ids[tree.n_text :], dtype=torch.long)
                visible[i, :m, pad : pad + tree.n_text] = vis[:, : tree.n_text]
                visible[i, :m, self.free_from : self.free_from + m] = vis[:, tree.n_text :]
                visible[i, torch.arange(m, width), self.free_from + torch.arange(m, width)] = True  # padding
            dtype = next(backbone.parameters()).dtype
            hidden = backbone(
                input_ids=ids.to(device),
                position_ids=pos.to(device),
                past_key_values=cache,
                cache_position=torch.arange(self.free_from, self.free_from + width, device=device),
                attention_mask=_as_mask(visible[:, None].to(device), impl, dtype),
                use_cache=True,
            ).last_hidden_state
            keys = sorted(
                {(t, p) for cands in plan for t, positions, _ in cands for p in positions if p >= trees[t].n_text}
            )
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
        new = input_ids[:, self.width :].tolist()
        done = torch.zeros(len(new), dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(new):
            if i in self.stopped:
                done[i] = True
            elif not self.stop_ids.intersection(row) and not self.viable(
                i, self.tokenizer.decode(row, skip_special_tokens=True)
            ):
                self.stopped[i] = len(row)
                done[i] = True
        return done


class _KeepViable(LogitsProcessor):
    """A ``generate`` logits processor for constrained chains: a row may write only a token after which
    ``viable(row, text)`` still holds, and a stop token only once ``complete(row, text)``.

    Candidates are tried in score order, first among the ``top_k`` most likely tokens, then, when none
    of those passes, among ``fallback(row)`` (the tokens the row could need at all): greedy decoding
    keeps the first that passes (a few checks per step when the model's own choice is viable), sampling
    keeps up to ``top_k`` that pass. A token kept gives way to the likeliest candidate that writes its text and
    more and passes too, as long as there is one (``" "`` to ``" q"`` to ``" query"``): a model that has not
    learned the chain's wording would otherwise spell it a piece at a time and run out of budget. A row none
    of them keeps is left as it is (the stopping criterion then ends it)."""

    def __init__(self, tokenizer: Any, dead: _StopDeadRows, complete: Callable, top_k, greedy, fallback):
        self.tokenizer, self.width, self.viable, self.complete = tokenizer, dead.width, dead.viable, complete
        self.stop_ids, self.top_k, self.greedy, self.fallback = dead.stop_ids, top_k, greedy, fallback
        self.dead = dead.stopped  # rows the stopping criterion ended (generate pads them)
        self.pieces: dict[int, str] = {}  # token -> its text alone

    def _piece(self, tok: int) -> str:
        if tok not in self.pieces:
            self.pieces[tok] = self.tokenizer.decode([tok], skip_special_tokens=True)
        return self.pieces[tok]

    def _ok(self, i: int, row: list[int], text: str, tok: int) -> bool:
        if tok in self.stop_ids:
            return self.complete(i, text)
        # a token that writes nothing (a special token, dropped from the text) never gets a chain further
        grown = self.tokenizer.decode(row + [tok], skip_special_tokens=True)
        return grown != text and self.viable(i, grown)

    def _grown(self, i: int, row: list[int], text: str, tok: int, pool: Sequence[int]) -> int:
        """``tok``, or the likeliest token of ``pool`` (in score order) whose text starts with ``tok``'s and is longer
        and that passes, climbing while there is one."""
        while tok not in self.stop_ids and self._piece(tok):
            piece = self._piece(tok)
            longer = (d for d in pool if len(self._piece(d)) > len(piece) and self._piece(d).startswith(piece))
            nxt = next((d for d in longer if self._ok(i, row, text, d)), None)
            if nxt is None:
                return tok
            tok = nxt
        return tok

    def _keep(self, i: int, row: list[int], order: Sequence[int], pool: Sequence[int]) -> list[int]:
        kept: list[int] = []
        text = self.tokenizer.decode(row, skip_special_tokens=True)
        for tok in order:
            if self._ok(i, row, text, tok):
                tok = self._grown(i, row, text, tok, pool)
                if tok not in kept:
                    kept.append(tok)
                if self.greedy or len(kept) >= self.top_k:
                    break
        return kept

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        out = torch.full_like(scores, float("-inf"))
        top = scores.topk(min(self.top_k, scores.shape[-1]), -1).indices.tolist()
        for i, row in enumerate(input_ids[:, self.width :].tolist()):
            if i in self.dead or self.stop_ids.intersection(row):  # finished: generate pads it from here on
                out[i] = scores[i]
                continue
            order: list[int] = []
            if self.fallback is not None:  # what the row could need, likeliest first
                cands = (set(self.fallback(i)) | self.stop_ids) - set(top[i])
                cands = torch.tensor(sorted(t for t in cands if t < scores.shape[-1]), dtype=torch.long)
                order = cands[scores[i, cands.to(scores.device)].argsort(descending=True).cpu()].tolist()
            kept = self._keep(i, row, top[i], top[i] + order)
            if not kept and order:
                kept = self._keep(i, row, order, order)
            if kept:
                out[i, kept] = scores[i, kept]
            else:
                out[i] = scores[i]
        return out


@torch.inference_mode()
def generate_recorded(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    record_ids: Sequence[int],
    stop_ids: Sequence[int],
    temperature: float = 0.0,
    node_room: int = 32,
    viable: Callable[[int, str], bool] | None = None,
    complete: Callable[[int, str], bool] | None = None,
    constrain_top_k: int = 64,
    fallback: Callable[[int], Sequence[int]] | None = None,
) -> RecordedGeneration:
    """One ``generate`` call over ``prompts`` (left padding, a static key/value cache when the model
    supports one) that also records, at every step, the log-probabilities of ``record_ids`` (the
    readout's candidate tokens) from the output layer, so the chain need not be read a second time.
    ``temperature == 0`` is greedy decoding; recorded distributions are the model's own, before any
    sampling warper. With ``viable``, a row stops as soon as ``viable(row, its text so far)`` is
    False (a chain that can no longer parse): the batch ends when every row has stopped or written a
    stop token, and the stopped row's text ends where it was stopped. With ``complete`` as well, decoding
    is constrained (:class:`_KeepViable`): each step writes the best token among the ``constrain_top_k``
    most likely that keep the row viable (a stop token only once ``complete(row, text)``), else among
    ``fallback(row)``, so a row stops only when none of them does or the budget runs out."""
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
    kw: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=list(stop_ids),
        disable_compile=True,
    )
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
        if complete is not None:
            keep = _KeepViable(tokenizer, dead, complete, constrain_top_k, temperature <= 0, fallback)
            kw["logits_processor"] = LogitsProcessorList([keep])
    hook = head.register_forward_hook(record)
    try:
        out = model.generate(
            input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device), **kw
        )
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
        prompt = enc["input_ids"][i, pads[i] :].tolist()
        tokens.append(prompt + row[:end])
        prompt_len.append(len(prompt))
        written.append(row[:end])
    texts = tokenizer.batch_decode(written, skip_special_tokens=True)
    free_from = width + len(steps) - 1  # the last token written is never fed back
    if cache is not None and int(cache.get_seq_length()) != free_from:
        raise RuntimeError(
            f"generation left {int(cache.get_seq_length())} cache slots written, expected {free_from} "
            f"({width} prompt + {len(steps)} steps - 1): the recorded steps do not match the cache"
        )
    return RecordedGeneration(
        texts,
        tokens,
        prompt_len,
        torch.stack(steps, 1).cpu(),
        columns,
        cache,
        pads,
        free_from,
        cache_len,
        [dead is not None and i in dead.stopped for i in range(len(texts))],
    )


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
