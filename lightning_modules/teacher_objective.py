"""The teacher's training objective: the judgement carries the loss, not the chain's wording.

Next-token loss over a whole chain spends almost all of its weight on format and copied evidence
(~78 tokens) and about 1% on the ``level: <name>`` answer, so a teacher trained that way barely
moves off its zero-shot prior. Here every response is read the way the readout reads it
(:func:`~ellm_mkd.candidate_scoring.teacher_forced_scores`, one differentiable pass) and four terms
are weighted apart:

``level``     cross-entropy of the true level under the level distribution at the readout point
              (the candidate words renormalised, exactly what the direct readout returns), after the
              direct prompt and after the chain's ``level:``;
``grade``     squared error of the expected grade of that distribution, on the 0..1 scale of the
              level grades (an ordinal signal: ``substitute`` for ``exact`` costs less than ``irrelevant``);
``verdicts``  cross-entropy of each dimension's annotated verdict at the chain's ``=>``;
``tokens``    next-token loss over the rest of the response (format, evidence, end of turn);
``invariance`` with planted text (injection training): KL(clean || planted) of the direct level
              distribution, the clean one read by the same model without gradient, at each example
              whose product text got an injection: the judgement must not move, not only the label.

``loss = w_level * level + w_grade * grade + w_verdicts * verdicts + w_tokens * tokens
+ w_invariance * invariance``, each term a
mean over its own points (or tokens), so one weight means the same whatever the chain's length.
With ``w_tokens=1`` and the other weights 0 it is the plain language-model loss of the responses
(the candidate tokens excepted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ellm_mkd.candidate_scoring import ReadoutPoint, teacher_forced_scores
from ellm_mkd.cot import CoTParseError, parse
from ellm_mkd.prompts import neutralize_special_tokens
from ellm_mkd.schema import DIMENSIONS, VERDICTS

TERMS = ("level", "grade", "verdicts", "tokens", "invariance")


@dataclass
class ResponseBatch:
    """Token sequences of prompt + response, where their responses start, and the readout points with
    their targets (``kinds[j]``: ``level`` or ``verdict``; ``targets[j]``: candidate index)."""

    sequences: list[list[int]] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)
    points: list[ReadoutPoint] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)  # the batch position of each point's example
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.sequences)


def build_responses(
    readout: Any, batch: dict[str, Any], mode: str, max_seq_length: int, level_names: Sequence[str]
) -> ResponseBatch:
    """One ``mode`` response (``direct``: ``level: <name>``; ``cot``: the annotated chain) per example of
    ``batch`` as token sequences with their readout points. Examples without a label get no direct response;
    ``cot`` needs each example's chain (``batch["rationale"]``). Sequences longer than ``max_seq_length``
    are cut (their points past the cut dropped) and counted in ``truncated``."""
    template, tok = readout.template, readout.tokenizer
    eos = readout.stop_ids[:1] or [tok.eos_token_id]

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def text_ids(text: str) -> list[int]:  # a chain quotes the data: never a special token
        return ids(neutralize_special_tokens(text, tok))

    out = ResponseBatch()
    rationales = batch.get("rationale") or [None] * len(batch["query"])
    for pos, (q, d, lab, rationale, eid) in enumerate(
        zip(batch["query"], batch["item_text"], batch["labels"].tolist(), rationales, batch["example_id"])
    ):
        prompt = template.prompt(tok, q, d, level_names, mode)
        p_ids = ids(prompt)
        points: list[tuple[list[int], str, int]] = []  # (prefix ids, kind, target)
        if mode == "direct":
            if lab < 0:
                continue
            seq = p_ids + ids(f"{template.answer_prefix} {level_names[lab]}") + eos
            points.append((ids(prompt + template.answer_prefix), "level", lab))
        else:
            if not rationale:
                raise ValueError(f"example {eid} has no annotated chain of thought to learn")
            body = rationale.strip()
            try:
                chain = parse(body, q, d, level_names)
            except CoTParseError as e:
                raise ValueError(f"example {eid}: its annotated chain does not parse: {e}") from None
            verdicts = chain.verdicts()
            level = lab if lab >= 0 else list(level_names).index(chain.level)
            seq = p_ids + text_ids(body) + eos
            for k, cut_text, _ in readout.chain_cuts(body):
                if k < 0:
                    points.append((p_ids + text_ids(cut_text), "level", level))
                else:
                    points.append((p_ids + text_ids(cut_text), "verdict", VERDICTS.index(verdicts[DIMENSIONS[k]])))
        if len(seq) > max_seq_length:
            out.truncated += 1
            seq = seq[:max_seq_length]
        i = len(out.sequences)
        out.sequences.append(seq)
        out.prompt_lengths.append(len(p_ids))
        for prefix, kind, target in points:
            if len(prefix) >= len(seq):  # its answer was cut off
                continue
            cset = readout.levels if kind == "level" else readout.verdicts
            out.points.append(ReadoutPoint(i, len(prefix), cset, prefix_ids=prefix))
            out.kinds.append(kind)
            out.targets.append(target)
            out.examples.append(pos)
    return out


def objective_terms(
    model: Any,
    responses: ResponseBatch,
    pad_id: int,
    level_grades: Tensor,
    reference: dict[int, Tensor] | None = None,
    pack_tokens: int = 0,
) -> dict[str, Tensor]:
    """Per-term sums and counts over ``responses`` (one forward pass): ``{term: sum}`` and ``{term_n: count}``;
    :func:`combine` turns them, summed over several calls, into the weighted loss. ``reference``: for the
    batch positions it holds, the clean level distribution (probabilities) the ``invariance`` term keeps
    each level point of that example at. ``pack_tokens``: rows of sequences sharing a prefix
    (:func:`~ellm_mkd.candidate_scoring.teacher_forced_scores`)."""
    seqs = responses.sequences
    token_positions = [range(max(n - 1, 0), len(s) - 1) for s, n in zip(seqs, responses.prompt_lengths)]
    point_logp, token_logp = teacher_forced_scores(
        model, seqs, responses.points, pad_id, token_positions, pack_tokens=pack_tokens
    )
    device = token_logp.device
    zero = token_logp.sum() * 0.0
    terms: dict[str, Tensor] = {"tokens": -token_logp.sum(), "tokens_n": torch.tensor(float(token_logp.numel()))}
    for kind, name in (("level", "level"), ("verdict", "verdicts")):
        idx = [j for j, k in enumerate(responses.kinds) if k == kind]
        if not idx:
            terms[name], terms[f"{name}_n"] = zero, torch.tensor(0.0)
            continue
        logp = torch.stack([point_logp[j] for j in idx])
        target = torch.tensor([responses.targets[j] for j in idx], device=device)
        terms[name] = -logp.gather(1, target[:, None]).sum()
        terms[f"{name}_n"] = torch.tensor(float(len(idx)))
        if kind == "level":
            grades = level_grades.to(device=device, dtype=logp.dtype)
            span = (grades.max() - grades.min()).clamp_min(1e-6)
            expected = (logp.exp() @ grades - grades[target]) / span
            terms["grade"], terms["grade_n"] = (expected**2).sum(), torch.tensor(float(len(idx)))
            kept = [(r, j) for r, j in enumerate(idx) if reference and responses.examples[j] in reference]
            if kept:
                p = torch.stack([reference[responses.examples[j]] for _, j in kept]).to(device=device, dtype=logp.dtype)
                q_logp = logp[[r for r, _ in kept]]
                kl = (p * (p.clamp_min(1e-12).log() - q_logp)).sum()
                terms["invariance"], terms["invariance_n"] = kl, torch.tensor(float(len(kept)))
    for name in ("grade", "invariance"):
        if name not in terms:
            terms[name], terms[f"{name}_n"] = zero, torch.tensor(0.0)
    return terms


def combine(parts: Sequence[dict[str, Tensor]], weights: dict[str, float]) -> tuple[Tensor, dict[str, float]]:
    """The weighted loss over several :func:`objective_terms` results, and each term's mean (for logging).
    A term without points (e.g. no chains in a direct-only run) adds nothing."""
    loss = None
    means: dict[str, float] = {}
    for term in TERMS:
        total = sum(p[term] for p in parts)
        n = float(sum(p[f"{term}_n"] for p in parts))
        if n == 0:
            continue
        mean = total / n
        means[term] = float(mean.detach())
        if weights.get(term, 0.0):
            loss = weights[term] * mean if loss is None else loss + weights[term] * mean
    if loss is None:
        loss = sum(p["tokens"] for p in parts) * 0.0
    return loss, means
