"""Interaction-based student: a BERT-family cross-encoder over ``[CLS] query [SEP] item fields``.

The item side is the rendered item text (``datamodules.text``), whose ``Title: ... | Brand: ...``
markers let the encoder tell fields apart. The pair representation is the ``[CLS]`` vector (or
the masked mean of the tokens), on which the base class puts the level head, the expected grade and
one head per chain-of-thought dimension.

Example (YAML)::

    model:
      class_path: lightning_modules.CrossEncoderStudent
      init_args: {encoder: minilm-l6, pooling: cls, lr: 5.0e-5}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from callbacks.losses.rationale_attention import cls_attention
from datamodules.teacher_batch import evidence_token_mask, side_spans
from ellm_mkd.models import load_encoder, load_tokenizer

from .base import RelevanceStudent, StudentOutput


@dataclass
class PairInputs:
    """The cross-encoder's input: ``[CLS] query [SEP] item [SEP]``, the item truncated first, with one
    evidence mask over the pair (``rationale_mask``; the tokenizer's sequence ids say which side each
    token is on)."""

    tokenizer: Any
    max_seq_length: int

    def encode(self, batch: dict[str, Any], with_offsets: bool) -> dict[str, Any]:
        enc = self.tokenizer(
            batch["query"],
            batch["item_text"],
            truncation="only_second",
            max_length=self.max_seq_length,
            padding=True,
            return_tensors="pt",
            return_offsets_mapping=with_offsets,
        )
        batch.update({k: v for k, v in enc.items() if k != "offset_mapping"})
        return {"pair": enc}

    def rationale_masks(self, batch: dict[str, Any], signals: list[Any], encodings: dict[str, Any]) -> None:
        spans = [{0: side_spans(s, "query"), 1: side_spans(s, "item")} for s in signals]
        batch["rationale_mask"] = evidence_token_mask(encodings["pair"], spans)


# encoders whose self-attention is softmax(q k^T * scale + mask) over absolute positions, with ``query`` /
# ``key`` projections: their [CLS] row can be read from the projections (anything else: eager maps)
PROJECTION_ATTENTION_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra"})


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class CrossEncoderStudent(RelevanceStudent):
    """Cross-encoder student. Args as :class:`~lightning_modules.base.RelevanceStudent`, plus:

    Args:
        pooling: ``cls`` (the first token's vector) or ``mean`` (masked mean of all tokens).
        gradient_checkpointing: trade compute for memory in the encoder.
    """

    def __init__(
        self, *args: Any, pooling: Literal["cls", "mean"] = "cls", gradient_checkpointing: bool = False, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        self.pooling = pooling
        self.tokenizer = load_tokenizer(self.hparams.encoder, trust_remote_code=self.hparams.trust_remote_code)
        self.encoder = self._drop_pooler(
            load_encoder(self.hparams.encoder, trust_remote_code=self.hparams.trust_remote_code)
        )
        if gradient_checkpointing:
            self.encoder.gradient_checkpointing_enable()
        self._build_heads(self.encoder.config.hidden_size)
        self._attentions: Literal["off", "projections", "eager"] = "off"
        self._attention_layers: list[int] = []
        self._projections: dict[tuple[int, str], Tensor] = {}
        self._capturing = False

    def input_layout(self) -> PairInputs:
        return PairInputs(self.tokenizer, self.hparams.max_seq_length)

    def chain_encoder(self) -> nn.Module:
        return self.encoder

    def prepare_rationale_alignment(self, attention_layers: Sequence[int]) -> None:
        self.request_attentions(attention_layers)

    def rationale_alignment(
        self, batch: dict[str, Any], out: StudentOutput, attention_heads: Sequence[int] | None
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        rows = out.extras["attentions"]  # the requested layers' [CLS] rows, in order
        att = cls_attention(rows, range(len(rows)), attention_heads, batch["attention_mask"])
        return [(att, batch["rationale_mask"], batch["attention_mask"])]

    def request_attentions(self, layers: Sequence[int] = (-1,)) -> None:
        """While training, return the [CLS]-to-token attention of ``layers`` as ``extras["attentions"]``
        (one ``[B, heads, T]`` row per layer, in order).

        On BERT-family encoders with absolute positions (``PROJECTION_ATTENTION_TYPES``) the rows are
        computed from the query/key projections the layer itself produced in the student's forward
        (forward hooks), so the encoder keeps its fused attention kernel and nothing is recomputed.
        Other encoders switch to eager attention, which returns the full maps, and the rows are cut
        from them. Repeated layers count once."""
        n = self.encoder.config.num_hidden_layers
        chosen = [int(li) for li in layers]
        if not chosen or any(not -n <= li < n for li in chosen):
            raise ValueError(
                f"attention_layers: expected non-empty indices in [-{n}, {n}) for this encoder, got {chosen}"
            )
        self._attention_layers = list(dict.fromkeys(li % n for li in chosen))
        cfg = self.encoder.config
        mods = [
            m
            for m in self.encoder.modules()
            if isinstance(getattr(m, "query", None), nn.Linear)
            and isinstance(getattr(m, "key", None), nn.Linear)
            and hasattr(m, "num_attention_heads")
            and hasattr(m, "attention_head_size")
        ]
        for handle in getattr(self, "_hook_handles", []):  # a second request replaces the first
            handle.remove()
        self._hook_handles = []
        if (
            len(mods) != n
            or cfg.model_type not in PROJECTION_ATTENTION_TYPES
            or getattr(cfg, "position_embedding_type", "absolute") != "absolute"
        ):
            self.encoder.set_attn_implementation("eager")
            self._attentions = "eager"
            return
        self._attention_modules = {li: mods[li] for li in self._attention_layers}
        self._hook_handles = [
            getattr(m, part).register_forward_hook(self._keep_projection(li, part))
            for li, m in self._attention_modules.items()
            for part in ("query", "key")
        ]
        self._attentions = "projections"

    def _keep_projection(self, layer: int, part: str):
        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            if self._capturing:  # the student's own forward, not a recomputation in backward or a copy's
                self._projections[(layer, part)] = output

        return hook

    def _cls_rows(self, mask: Tensor) -> list[Tensor]:
        rows = []
        taken, self._projections = self._projections, {}
        for li in self._attention_layers:
            m = self._attention_modules[li]
            q, k = taken[(li, "query")], taken[(li, "key")]
            b, t = k.shape[:2]
            q0 = q[:, 0].view(b, m.num_attention_heads, m.attention_head_size)
            keys = k.view(b, t, m.num_attention_heads, m.attention_head_size)
            scale = getattr(m, "scaling", m.attention_head_size**-0.5)
            scores = torch.einsum("bhd,bthd->bht", q0, keys).float() * scale
            scores = scores.masked_fill(mask[:, None, :] == 0, torch.finfo(scores.dtype).min)
            rows.append(scores.softmax(-1))
        return rows

    def encode_batch(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        want = self._attentions != "off" and self.training
        eager = want and self._attentions == "eager"
        self._capturing = want and not eager
        try:
            res = self.encoder(**kw, output_attentions=True) if eager else self.encoder(**kw)
        finally:
            self._capturing = False
        hidden = res.last_hidden_state
        pooled = hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, batch["attention_mask"])
        extras = {"token_states": hidden, "attention_mask": batch["attention_mask"]}
        if eager:
            extras["attentions"] = [res.attentions[li] for li in self._attention_layers]
        elif want:
            extras["attentions"] = self._cls_rows(batch["attention_mask"])
        return pooled, extras
