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

from typing import Any, Literal

from torch import Tensor

from ellm_mkd.models import load_encoder, load_tokenizer

from .base import RelevanceStudent


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class CrossEncoderStudent(RelevanceStudent):
    """Cross-encoder student. Args as :class:`~lightning_modules.base.RelevanceStudent`, plus:

    Args:
        pooling: ``cls`` (the first token's vector) or ``mean`` (masked mean of all tokens).
        gradient_checkpointing: trade compute for memory in the encoder.
    """

    inputs = "pair"

    def __init__(self, *args: Any, pooling: Literal["cls", "mean"] = "cls", gradient_checkpointing: bool = False,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        self.pooling = pooling
        self.tokenizer = load_tokenizer(self.hparams.encoder, trust_remote_code=self.hparams.trust_remote_code)
        self.encoder = self._drop_pooler(load_encoder(self.hparams.encoder, trust_remote_code=self.hparams.trust_remote_code))
        if gradient_checkpointing:
            self.encoder.gradient_checkpointing_enable()
        self._build_heads(self.encoder.config.hidden_size)
        self._attentions = False

    def request_attentions(self) -> None:
        self.encoder.set_attn_implementation("eager")
        self._attentions = True

    def encode_batch(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        want = self._attentions and self.training
        res = self.encoder(**kw, output_attentions=True) if want else self.encoder(**kw)
        hidden = res.last_hidden_state
        pooled = hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, batch["attention_mask"])
        extras = {"token_states": hidden, "attention_mask": batch["attention_mask"]}
        if want:
            extras["attentions"] = res.attentions
        return pooled, extras
