"""How a model's inputs are laid out: the contract between the data module and each model.

The data module renders every example to two strings (``query`` and ``item_text``) and knows
nothing of tokens. A model hands it an :class:`InputLayout` through
:meth:`~datamodules.RelevanceDataModule.connect`; the collator asks the layout to tokenize each
batch its own way and, with a teacher, to mark the input tokens that the teacher's evidence covers.
The layouts of the students live beside them (:class:`lightning_modules.cross_encoder.PairInputs`,
:class:`lightning_modules.two_tower.TowerInputs`), so a new kind of student touches only
``lightning_modules/``. :class:`TextInputs` (strings only) is the layout of the causal-LM teacher,
which builds its own prompts.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class InputLayout(Protocol):
    """What the collator needs from a model (see the module docstring).

    ``tokenizer`` also writes the teacher's chain in the model's tokens (``rationale_ids``, for the
    rationale embedding); None means the model takes strings and gets no token fields at all.
    """

    tokenizer: Any

    def encode(self, batch: dict[str, Any], with_offsets: bool) -> dict[str, Any]:
        """Add the model's input tensors to ``batch`` (in place) from ``batch["query"]`` and
        ``batch["item_text"]``; return the tokenizer encodings, with character offsets when
        ``with_offsets``, for :meth:`rationale_masks`."""

    def rationale_masks(self, batch: dict[str, Any], signals: list[Any], encodings: dict[str, Any]) -> None:
        """Add to ``batch`` the masks over the model's input tokens that each teacher signal's evidence
        covers (:func:`datamodules.teacher_batch.evidence_token_mask`)."""


class TextInputs:
    """Strings only: no tokenization, no token masks (the teacher builds its own prompts)."""

    tokenizer = None

    def encode(self, batch: dict[str, Any], with_offsets: bool) -> dict[str, Any]:
        return {}

    def rationale_masks(self, batch: dict[str, Any], signals: list[Any], encodings: dict[str, Any]) -> None:
        return None
