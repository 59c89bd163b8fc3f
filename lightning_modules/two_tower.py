"""Representation-based student: two towers whose embeddings meet in a light scorer.

Query and item are encoded separately (one shared encoder, or one per tower), pooled to a vector
each, and combined by a small MLP over ``[q, d, q*d, |q-d|]``; the base class puts the level head,
expected grade and dimension heads on the MLP's output. Item vectors therefore do not depend on
the query and can be computed ahead of time (:meth:`TwoTowerStudent.embed_texts`), leaving only
the scorer for serving time (:meth:`TwoTowerStudent.score_vectors`).

Pooling: ``mean`` (masked mean), ``cls``, or ``weighted``: a learned score per token, softmaxed
over the sequence; the weights are returned as ``extras["query_pool_weights"]`` /
``extras["item_pool_weights"]`` (what rationale alignment trains in distillation).

Optional in-batch negatives (``w_in_batch``): for every relevant pair (label >= relevant level) in
a batch, InfoNCE over the cosine similarities of its query to all items of the batch, with the
items of the same query other than itself masked out (they may be relevant too).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.teacher_batch import evidence_token_mask, side_spans
from ellm_mkd.models import load_encoder, load_tokenizer

from .base import RelevanceStudent, StudentOutput

log = logging.getLogger(__name__)
SIDES = ("query", "item")


@dataclass
class TowerInputs:
    """The two-tower input: the query and the item tokenized apart (``query_input_ids``,
    ``item_input_ids`` and their attention masks), with one evidence mask per tower."""

    tokenizer: Any
    max_seq_length: int

    def encode(self, batch: dict[str, Any], with_offsets: bool) -> dict[str, Any]:
        kw = dict(
            truncation=True,
            max_length=self.max_seq_length,
            padding=True,
            return_tensors="pt",
            return_offsets_mapping=with_offsets,
        )
        encodings = {side: self.tokenizer(batch["query" if side == "query" else "item_text"], **kw) for side in SIDES}
        for side, enc in encodings.items():
            batch.update({f"{side}_{k}": v for k, v in enc.items() if k != "offset_mapping"})
        return encodings

    def rationale_masks(self, batch: dict[str, Any], signals: list[Any], encodings: dict[str, Any]) -> None:
        for side in SIDES:
            batch[f"{side}_rationale_mask"] = evidence_token_mask(
                encodings[side], [{0: side_spans(s, side)} for s in signals]
            )


class TwoTowerStudent(RelevanceStudent):
    """Two-tower student. Args as :class:`~lightning_modules.base.RelevanceStudent`, plus:

    Args:
        shared_towers: one encoder for queries and items (True) or one each (False).
        pooling: ``mean``, ``cls`` or ``weighted`` (learned token weights).
        scorer_hidden: width of the scorer MLP.
        w_in_batch: weight of the in-batch-negatives loss (0 turns it off).
        in_batch_temperature: temperature of that loss's softmax over cosine similarities.
    """

    def __init__(
        self,
        *args: Any,
        shared_towers: bool = True,
        pooling: Literal["mean", "cls", "weighted"] = "mean",
        scorer_hidden: int = 256,
        w_in_batch: float = 0.0,
        in_batch_temperature: float = 0.05,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.encoder, trust_remote_code=hp.trust_remote_code)
        self.query_encoder = self._drop_pooler(load_encoder(hp.encoder, trust_remote_code=hp.trust_remote_code))
        self.item_encoder = (
            self.query_encoder
            if shared_towers
            else self._drop_pooler(load_encoder(hp.encoder, trust_remote_code=hp.trust_remote_code))
        )
        h = self.query_encoder.config.hidden_size
        if pooling == "weighted":
            self.query_token_weight = nn.Linear(h, 1)
            self.item_token_weight = self.query_token_weight if shared_towers else nn.Linear(h, 1)
        self.scorer = nn.Sequential(
            nn.Linear(4 * h, scorer_hidden), nn.GELU(), nn.Linear(scorer_hidden, scorer_hidden), nn.GELU()
        )
        self._build_heads(scorer_hidden)

    def head_parameters(self) -> list[nn.Parameter]:
        extra = [*self.scorer.parameters()]
        if self.hparams.pooling == "weighted":
            extra += [*self.query_token_weight.parameters()]
            if not self.hparams.shared_towers:
                extra += [*self.item_token_weight.parameters()]
        return [*super().head_parameters(), *extra]

    def embed(
        self,
        tower: Literal["query", "item"],
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Vector ``[B, H]`` of one tower and its pooling weights ``[B, T]`` (rows sum to 1)."""
        enc = self.query_encoder if tower == "query" else self.item_encoder
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        hidden = enc(**kw).last_hidden_state
        mask = attention_mask.bool()
        if self.hparams.pooling == "cls":
            weights = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device)
            weights[:, 0] = 1.0
        elif self.hparams.pooling == "mean":
            weights = mask.to(hidden.dtype) / mask.sum(1, keepdim=True).clamp_min(1).to(hidden.dtype)
        else:
            layer = self.query_token_weight if tower == "query" else self.item_token_weight
            scores = layer(hidden).squeeze(-1).float().masked_fill(~mask, float("-inf"))
            weights = scores.softmax(-1).to(hidden.dtype)
        return torch.einsum("bt,bth->bh", weights, hidden), weights

    def input_layout(self) -> TowerInputs:
        return TowerInputs(self.tokenizer, self.hparams.max_seq_length)

    def chain_encoder(self) -> nn.Module:
        return self.item_encoder

    def prepare_rationale_alignment(self, attention_layers: Sequence[int]) -> None:
        if self.hparams.pooling != "weighted":
            log.warning(
                "distill: w_rationale aligns the towers' pooling weights, which only learn with "
                "pooling: weighted (this student pools by %s): the term will not train anything",
                self.hparams.pooling,
            )

    def rationale_alignment(
        self, batch: dict[str, Any], out: StudentOutput, attention_heads: Sequence[int] | None
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        return [
            (out.extras[f"{side}_pool_weights"], batch[f"{side}_rationale_mask"], batch[f"{side}_attention_mask"])
            for side in SIDES
        ]

    def score_vectors(self, q: Tensor, d: Tensor) -> Tensor:
        """Pair representation from precomputed query and item vectors."""
        return self.scorer(torch.cat([q, d, q * d, (q - d).abs()], dim=-1))

    @torch.no_grad()
    def embed_texts(self, texts: list[str], tower: Literal["query", "item"] = "item", batch_size: int = 64) -> Tensor:
        """Vectors of raw texts (e.g. the whole item catalog, ahead of serving)."""
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                texts[i : i + batch_size],
                truncation=True,
                max_length=self.hparams.max_seq_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            out.append(self.embed(tower, **enc)[0])
        return torch.cat(out) if out else torch.empty(0, self.query_encoder.config.hidden_size)

    def encode_batch(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        q, qw = self.embed(
            "query", batch["query_input_ids"], batch["query_attention_mask"], batch.get("query_token_type_ids")
        )
        d, dw = self.embed(
            "item", batch["item_input_ids"], batch["item_attention_mask"], batch.get("item_token_type_ids")
        )
        return self.score_vectors(q, d), {
            "query_vec": q,
            "item_vec": d,
            "query_pool_weights": qw,
            "item_pool_weights": dw,
        }

    def loss_terms(self, batch: dict[str, Any], out: StudentOutput) -> dict[str, Tensor]:
        terms = super().loss_terms(batch, out)
        if self.hparams.w_in_batch:
            terms["in_batch"] = self.hparams.w_in_batch * in_batch_negatives_loss(
                out.extras["query_vec"],
                out.extras["item_vec"],
                batch["labels"] >= self.relevant_level,
                batch["query_ids"],
                self.hparams.in_batch_temperature,
            )
        return terms


def in_batch_negatives_loss(q: Tensor, d: Tensor, positive: Tensor, query_ids: Tensor, temperature: float) -> Tensor:
    """InfoNCE of each positive pair's query against every item of the batch.

    Args:
        q, d: query and item vectors ``[B, H]`` (row i is one pair).
        positive: ``[B]`` bool, pair i is relevant.
        query_ids: ``[B]`` query group ids; items of the same query (other than the pair's own) are
            excluded from the negatives.
        temperature: softmax temperature on cosine similarity.
    Returns a scalar (0 connected to the graph when the batch has no positive pair).
    """
    sim = F.normalize(q.float(), dim=-1) @ F.normalize(d.float(), dim=-1).T / temperature  # [B, B]
    same_query = query_ids[:, None] == query_ids[None, :]
    eye = torch.eye(len(q), dtype=torch.bool, device=q.device)
    sim = sim.masked_fill(same_query & ~eye, float("-inf"))
    if not positive.any():
        return sim.diagonal().sum() * 0.0
    rows = positive.nonzero().squeeze(-1)
    return F.cross_entropy(sim[rows], rows)
