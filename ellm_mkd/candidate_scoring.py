"""Scoring closed sets of candidate words at readout points in one teacher-forced pass.

:class:`CandidateSet` (a set of words as token sequences), :class:`ReadoutPoint` (where to read
one), the token tree that hangs candidate continuations off a text, and :func:`score_points`,
which returns each point's log-probabilities renormalised over its candidates; plus the small
model helpers the readout and generation share. The method is described in :mod:`ellm_mkd.readout`.

A tree can also hold several texts (:func:`_pack`): texts that begin alike (the prompt's fixed instructions)
share those tokens in one row, computed once, and each goes on from where it parts from the others, seeing its
own path only, with the position ids it would have alone; the model's sliding-window layers keep their window
along each path (:func:`_layer_masks`). Scores, losses and gradients are those of a row per text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


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
            ids = (
                full[len(base) :]
                if full[: len(base)] == base
                else tokenizer(f" {w}", add_special_tokens=False)["input_ids"]
            )
            if not ids:
                raise ValueError(f"candidate {w!r} tokenizes to nothing")
            seqs.append(list(ids))
        self.ambiguous = any(a != b and b[: len(a)] == a for a in seqs for b in seqs)
        if self.ambiguous:
            if not terminator_ids:
                raise ValueError(
                    f"candidates {self.words} are token prefixes of each other and no terminator was given"
                )
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
            if (
                on_text
                and nxt < self.n_text
                and self.tokens[nxt] == tok
                and (not need or self.readable is None or nxt in self.readable)
            ):
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

    def added(self, tokens: Sequence[int]) -> int:
        """How many tokens :meth:`add` would append for ``tokens`` (those after the part already here)."""
        if self.readable is not None:
            raise ValueError("texts are added to trees whose every position is computed (readable None)")
        pos, on_text = -1, True
        for j, tok in enumerate(tokens):
            nxt = pos + 1
            if on_text and nxt < self.n_text and self.tokens[nxt] == tok:
                pos = nxt
                continue
            on_text = False
            node = self._children.get((pos, tok))
            if node is None:
                return len(tokens) - j
            pos = node
        return 0

    def add(self, tokens: Sequence[int]) -> list[int]:
        """Hang another text off the tree where it parts from what is already here (the shared prefix is
        computed once, for both); returns the position of each of its tokens."""
        if self.readable is not None:
            raise ValueError("texts are added to trees whose every position is computed (readable None)")
        return self._extend(-1, True, tokens, need_last_only=False)[0]

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
        mask[: self.n_text, : self.n_text] = torch.ones((self.n_text, self.n_text), dtype=torch.bool).tril()
        for node in range(self.n_text, n):
            if self.parent[node] >= 0:
                mask[node] = mask[self.parent[node]]
            mask[node, node] = True
        return mask


def _pack(sequences: Sequence[Sequence[int]], pack_tokens: int) -> tuple[list[_TokenTree], list[int], list[list[int]]]:
    """``sequences`` as token trees: ``(trees, tree of each sequence, position of each of its tokens)``.

    With ``pack_tokens`` > 0 a sequence joins the previous one's tree while the tree's text stays within that
    many tokens (the candidate words a readout adds come on top): sequences that begin alike (the prompt's
    fixed instructions, the same query) share those tokens, computed once, and the rest hang off where they
    part, seeing their own prefix only, with the position ids they would have alone. 0: one tree per
    sequence."""
    trees: list[_TokenTree] = []
    tree_of: list[int] = []
    where: list[list[int]] = []
    for seq in sequences:
        if pack_tokens > 0 and trees and len(trees[-1]) + trees[-1].added(seq) <= pack_tokens:
            where.append(trees[-1].add(seq))
        else:
            trees.append(_TokenTree(seq))
            where.append(list(range(len(seq))))
        tree_of.append(len(trees) - 1)
    return trees, tree_of, where


def _plan(
    trees: list[_TokenTree], tree_of: Sequence[int], sequences: Sequence[Sequence[int]], points: Sequence[ReadoutPoint]
) -> list[list[tuple[int, list[int], list[int]]]]:
    """Per point, per candidate: ``(tree, reading positions, candidate tokens)``."""
    plan = []
    for p in points:
        t = tree_of[p.seq]
        prefix = list(sequences[p.seq][: p.cut]) if p.prefix_ids is None else list(p.prefix_ids)
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
        raise ValueError(
            f"the readout needs 'sdpa' or 'eager' attention (it scores candidate words beside the text "
            f"with a tree attention mask); this model uses {impl!r}"
        )
    return impl


def _as_mask(visible: Tensor, impl: str, dtype: torch.dtype) -> Tensor:
    """A bool visibility mask as the attention implementation wants it (eager adds it to the scores)."""
    if impl == "sdpa":
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


def _layer_masks(backbone: Any, visible: Tensor, position_ids: Tensor, impl: str, dtype: torch.dtype) -> Any:
    """The attention mask(s) of a batch of trees: ``visible`` ``[B, T, T]`` as one 4-D mask, or, for a model with
    sliding-window layers (Gemma 2/3, Qwen with ``use_sliding_window``), ``{layer type: mask}`` where the sliding
    layers also drop what lies ``sliding_window`` or more positions back along the path (what the model's own
    masks do to a plain text; a 4-D mask given to the model is used as it is)."""
    cfg = getattr(backbone, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    window = getattr(cfg, "sliding_window", None)
    types = set(getattr(cfg, "layer_types", None) or ())
    full = _as_mask(visible[:, None], impl, dtype)
    if not window or "sliding_attention" not in types:
        return full
    near = (position_ids[:, :, None] - position_ids[:, None, :]) < window
    sliding = _as_mask((visible & near)[:, None], impl, dtype)
    return sliding if types == {"sliding_attention"} else {"full_attention": full, "sliding_attention": sliding}


#: a batch of rows is right-padded to a multiple of this many tokens: rows of every length would each make the CPU
#: kernels (oneDNN) build and cache their own variant (a Gemma 3 270M LoRA fit held 4.6 GiB after 100 steps with
#: exact widths); a few padded tokens, which only see themselves, cost less
ROW_MULTIPLE = 32


def _tree_inputs(trees: Sequence[_TokenTree], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """``input_ids``, ``position_ids`` and the ``[B, T, T]`` visibility of a batch of trees (right-padded to a
    multiple of :data:`ROW_MULTIPLE`)."""
    width = -(-max(len(t) for t in trees) // ROW_MULTIPLE) * ROW_MULTIPLE
    ids = torch.full((len(trees), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(trees), width), dtype=torch.long)
    visible = torch.eye(width, dtype=torch.bool).repeat(len(trees), 1, 1)  # padding sees itself only
    for i, t in enumerate(trees):
        n = len(t)
        ids[i, :n] = torch.tensor(t.tokens)
        pos[i, :n] = torch.tensor(t.position_ids)
        visible[i, :n, :n] = t.visible()
    return ids, pos, visible


def _tree_hidden(model: Any, trees: Sequence[_TokenTree], pad_id: int) -> Tensor:
    """Last hidden states ``[B, T, H]`` of a batch of trees, one forward pass (differentiable)."""
    backbone, _ = lm_parts(model)
    impl = _attention_kind(backbone)
    device = next(model.parameters()).device
    dtype = next(backbone.parameters()).dtype
    ids, pos, visible = _tree_inputs(trees, pad_id)
    pos, visible = pos.to(device), visible.to(device)
    return backbone(
        input_ids=ids.to(device),
        position_ids=pos,
        use_cache=False,
        attention_mask=_layer_masks(backbone, visible, pos, impl, dtype),
    ).last_hidden_state


@torch.no_grad()
def score_points(
    model: Any,
    sequences: Sequence[Sequence[int]],
    points: Sequence[ReadoutPoint],
    pad_id: int,
    rows_per_pass: int = 16,
    pack_tokens: int = 0,
) -> list[Tensor]:
    """Normalised log-probabilities over each point's candidates (one 1-D tensor per point).

    ``sequences`` are token ids (no padding); each point reads after ``seq[:cut]`` (or after its
    own ``prefix_ids``). One forward pass per ``rows_per_pass`` rows scores every point and every
    candidate (see the module docstring); ``pack_tokens`` > 0 packs texts that share a prefix into
    rows of up to that many tokens (:func:`_pack`), computing the shared part once.
    """
    _, head = lm_parts(model)
    used = sorted({p.seq for p in points})
    trees, packed_of, _ = _pack([sequences[s] for s in used], pack_tokens)
    tree_of = {s: packed_of[i] for i, s in enumerate(used)}
    plan = _plan(trees, tree_of, sequences, points)
    wanted: dict[int, set[int]] = {}
    for cands in plan:
        for t, positions, _ in cands:
            wanted.setdefault(t, set()).update(positions)
    logp_at: dict[tuple[int, int], Tensor] = {}
    order = sorted(wanted, key=lambda t: len(trees[t]))
    for start in range(0, len(order), rows_per_pass):
        chunk = order[start : start + rows_per_pass]
        hidden = _tree_hidden(model, [trees[t] for t in chunk], pad_id)
        keys = [(row, t, p) for row, t in enumerate(chunk) for p in sorted(wanted[t])]
        logp = _head_logits(model, head, hidden[[k[0] for k in keys], [k[2] for k in keys]]).log_softmax(-1)
        for i, (_, t, p) in enumerate(keys):
            logp_at[(t, p)] = logp[i]
    return _renormalise(plan, lambda t, p, tok: logp_at[(t, p)][tok])


def teacher_forced_scores(
    model: Any,
    sequences: Sequence[Sequence[int]],
    points: Sequence[ReadoutPoint],
    pad_id: int,
    token_positions: Sequence[Sequence[int]] = (),
    skip_read: bool = True,
    pack_tokens: int = 0,
) -> tuple[list[Tensor], Tensor]:
    """The training counterpart of :func:`score_points`, differentiable and in one forward pass.

    Returns ``(point_logp, token_logp)``: ``point_logp`` holds, per point, its log-probabilities
    renormalised over its candidates (1-D, on the model's device); ``token_logp`` ``[N]`` the
    log-probability of the text's own next token at every position in ``token_positions[s]``
    (positions of sequence ``s``, each before its last token), in that order, leaving out
    (``skip_read``) the text positions some point reads: where the text writes a level or verdict
    itself, the candidate terms own it. One pass computes both; ``pack_tokens`` as in :func:`score_points`
    (the whole batch in one row shares its prompts' common prefix: fewer tokens through the model).
    """
    _, head = lm_parts(model)
    trees, tree_of, at = _pack(sequences, pack_tokens)
    plan = _plan(trees, tree_of, sequences, points)
    keys: dict[tuple[int, int], int] = {}
    for cands in plan:
        for t, positions, _ in cands:
            for p in positions:
                keys.setdefault((t, p), len(keys))
    # (sequence, tree position) its own points read: a packed neighbour's points never hide its tokens
    read = {(pt.seq, q) for pt, cands in zip(points, plan) for _, qs, _ in cands for q in qs} if skip_read else set()
    for s, positions in enumerate(token_positions):
        for p in positions:
            if not 0 <= p < len(sequences[s]) - 1:
                raise ValueError(f"token position {p} of sequence {s} has no next token in the text")
    token_positions = [
        [p for p in positions if (s, at[s][p]) not in read] for s, positions in enumerate(token_positions)
    ]
    for s, positions in enumerate(token_positions):
        for p in positions:
            keys.setdefault((tree_of[s], at[s][p]), len(keys))
    hidden = _tree_hidden(model, trees, pad_id)
    device = hidden.device
    if not keys:
        return [], hidden.sum() * 0.0 + hidden.new_zeros((0,)).float()
    offsets = [0]
    for cands in plan:
        offsets.append(offsets[-1] + len(cands))
    where = list(keys)
    logp = _head_logits(model, head, hidden[[t for t, _ in where], [p for _, p in where]]).log_softmax(-1)
    rows, cols, owner = [], [], []
    for i, cands in enumerate(plan):
        for j, (t, positions, toks) in enumerate(cands):
            for p, tok in zip(positions, toks):
                rows.append(keys[(t, p)])
                cols.append(tok)
                owner.append(offsets[i] + j)
    picked = logp[
        torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device)
    ]
    seq_logp = torch.zeros(offsets[-1], device=device).index_add(
        0, torch.tensor(owner, dtype=torch.long, device=device), picked
    )
    point_logp = [v.log_softmax(-1) for v in seq_logp.split([len(c) for c in plan])]
    t_rows = [keys[(tree_of[s], at[s][p])] for s, positions in enumerate(token_positions) for p in positions]
    t_cols = [sequences[s][p + 1] for s, positions in enumerate(token_positions) for p in positions]
    token_logp = logp[
        torch.tensor(t_rows, dtype=torch.long, device=device), torch.tensor(t_cols, dtype=torch.long, device=device)
    ]
    return point_logp, token_logp


def _hidden_states(backbone: Any, seqs: list[list[int]], pad_id: int, device: torch.device) -> Tensor:
    """Last hidden states of right-padded sequences ``[B, L, H]``."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return backbone(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
