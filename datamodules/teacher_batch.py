"""Teacher signals -> batch tensors, including *rationale tokens* on the student's own tokens.

Evidence in a teacher signal is a list of character spans in the query and in the rendered item
text (``(dimension, side, start, end)``). The student never sees characters: its tokenizer's
offset mapping says which characters each input token covers, and a token belongs to the
rationale when it overlaps an evidence span of its own side. For a cross-encoder input
(``[CLS] query [SEP] item [SEP]``) the tokenizer's ``sequence_ids`` tell which side a token is
on; for two-tower inputs each tower has its own mask. Special and padding tokens never count.

Keys added to a batch (B examples, K levels, D dimensions, V verdicts):

==============================  ==================  ===============================================
key                             type                meaning
==============================  ==================  ===============================================
``teacher_present``             BoolTensor [B]      the example has a teacher signal
``teacher_probs``               FloatTensor [B, K]  teacher level distribution (0 where absent)
``teacher_verdicts_present``    BoolTensor [B]      the signal has verdicts (a parsed chain)
``teacher_verdict_probs``       FloatTensor [B,D,V] verdict distributions (uniform where absent)
``teacher_rationale``           list[str]           the teacher's chain ("" where none or unparsed)
``rationale_ids``               LongTensor [B, R]   the chain in student tokens (``[CLS]`` + ``[SEP]``
``rationale_attention_mask``    LongTensor [B, R]   where there is none), padded to the batch
``teacher_hidden``              FloatTensor [B, H]  pooled teacher vector, when the signals carry one
==============================  ==================  ===============================================

and the masks over the model's own input tokens that the model's input layout adds
(:meth:`datamodules.inputs.InputLayout.rationale_masks`): ``rationale_mask`` for the cross-encoder's
pair input, ``query_rationale_mask`` / ``item_rationale_mask`` for the two towers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ellm_mkd.schema import DIMENSIONS, VERDICTS


def spans_to_token_mask(
    offsets: Sequence[Sequence[int]], sequence_ids: Sequence[int | None], spans: dict[int, list[tuple[int, int]]]
) -> list[float]:
    """1.0 for each token that overlaps a span of its own sequence, else 0.0.

    Args:
        offsets: ``(start, end)`` character offsets per token, into the token's own text.
        sequence_ids: which text each token comes from (0, 1; None for special and padding tokens).
        spans: ``(start, end)`` character spans per sequence id.
    """
    out = []
    for (a, b), sid in zip(offsets, sequence_ids):
        hit = 0.0
        if sid is not None and b > a:
            for s, e in spans.get(sid, ()):
                if a < e and b > s:
                    hit = 1.0
                    break
        out.append(hit)
    return out


def side_spans(signal: Any, side: str) -> list[tuple[int, int]]:
    """The evidence spans of a teacher signal on one side (``query`` or ``item``); none without a signal."""
    return [(a, b) for _, s, a, b in signal.evidence if s == side] if signal is not None else []


def add_teacher_fields(
    batch: dict[str, Any],
    signals: list[Any],
    num_levels: int,
    layout: Any,
    encodings: dict[str, Any],
    rationale_max_length: int = 128,
) -> None:
    """Add the keys of the module docstring to ``batch`` (in place).

    ``layout`` is the model's :class:`~datamodules.inputs.InputLayout`; ``encodings`` what its
    ``encode`` returned for this batch (made with character offsets).
    """
    n = len(signals)
    present = [s is not None for s in signals]
    batch["teacher_present"] = torch.tensor(present, dtype=torch.bool)
    probs = torch.zeros(n, num_levels)
    verdict = torch.full((n, len(DIMENSIONS), len(VERDICTS)), 1.0 / len(VERDICTS))
    has_verdicts = []
    for i, s in enumerate(signals):
        if s is not None:
            probs[i] = torch.tensor(s.level_probs, dtype=torch.float32)
            if s.verdict_probs is not None:
                verdict[i] = torch.tensor(s.verdict_probs, dtype=torch.float32)
        has_verdicts.append(s is not None and s.verdict_probs is not None)
    batch["teacher_probs"] = probs
    batch["teacher_verdicts_present"] = torch.tensor(has_verdicts, dtype=torch.bool)
    batch["teacher_verdict_probs"] = verdict
    # a chain that did not parse is no rationale: its text stays in the cache, students see none
    batch["teacher_rationale"] = [s.rationale if s is not None and s.parse_error is None else "" for s in signals]
    hidden = [s.hidden for s in signals if s is not None and s.hidden is not None]
    if hidden:
        h = torch.zeros(n, len(hidden[0]))
        for i, s in enumerate(signals):
            if s is not None and s.hidden is not None:
                h[i] = torch.tensor(s.hidden, dtype=torch.float32)
        batch["teacher_hidden"] = h
    if layout.tokenizer is None:
        return
    rat = layout.tokenizer(
        batch["teacher_rationale"], truncation=True, max_length=rationale_max_length, padding=True, return_tensors="pt"
    )
    batch["rationale_ids"] = rat["input_ids"]
    batch["rationale_attention_mask"] = rat["attention_mask"]
    layout.rationale_masks(batch, signals, encodings)


def evidence_token_mask(enc: Any, spans: list[dict[int, list[tuple[int, int]]]]) -> Tensor:
    """``[B, T]`` float mask: per row, the tokens of ``enc`` (a batch encoding with ``offset_mapping``)
    that overlap the row's spans, given per sequence id (0: first text, 1: second text of a pair)."""
    rows = [
        spans_to_token_mask(enc["offset_mapping"][i].tolist(), enc.sequence_ids(i), spans[i]) for i in range(len(spans))
    ]
    return torch.tensor(rows, dtype=torch.float32)
