"""The students as the graphs that ship: pure functions from tokens (or vectors) to scores.

Training-time machinery (dropout, attention capture, loss terms) stays behind; what is left is what
:mod:`ellm_mkd.serving` runs, in PyTorch or as ONNX:

* cross-encoder: one graph, ``cross_encoder(input_ids, attention_mask[, token_type_ids])`` ->
  ``level_probs [B, K]``, ``expected_grade [B]``, ``dim_probs [B, D, V]``;
* two-tower: ``query_tower`` and ``item_tower`` (tokens -> vector ``[B, H]``) and ``scorer``
  (``query_vec [B, H]``, ``item_vec [B, H]`` -> the three outputs above), so item vectors can be
  computed ahead of serving.

Each graph gives exactly what the student's own ``forward`` gives in eval mode (tested).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ellm_mkd.schema import DIMENSIONS

from .base import RelevanceStudent
from .cross_encoder import CrossEncoderStudent, masked_mean
from .two_tower import TwoTowerStudent

SCORE_OUTPUTS = ("level_probs", "expected_grade", "dim_probs")


def _heads(student: RelevanceStudent, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    probs = (student.level_head(pooled).float() / student.level_temperature + student.level_bias).softmax(-1)
    dims = torch.stack([student.dim_heads[d](pooled) for d in DIMENSIONS], dim=1).float().softmax(-1)
    return probs, probs @ student.level_grades, dims


class CrossEncoderGraph(nn.Module):
    """Token ids of ``[CLS] query [SEP] item [SEP]`` -> level probs, expected grade, verdict probs."""

    def __init__(self, student: CrossEncoderStudent):
        super().__init__()
        self.student = student

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None):
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        hidden = self.student.encoder(**kw).last_hidden_state
        pooled = hidden[:, 0] if self.student.pooling == "cls" else masked_mean(hidden, attention_mask)
        return _heads(self.student, pooled)


class TowerGraph(nn.Module):
    """One tower of the two-tower student: tokens -> pooled vector."""

    def __init__(self, student: TwoTowerStudent, tower: str):
        super().__init__()
        self.student = student
        self.tower = tower

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        return self.student.embed(self.tower, input_ids, attention_mask, token_type_ids)[0]


class TowerScorerGraph(nn.Module):
    """Query and item vectors -> level probs, expected grade, verdict probs."""

    def __init__(self, student: TwoTowerStudent):
        super().__init__()
        self.student = student

    def forward(self, query_vec: Tensor, item_vec: Tensor):
        return _heads(self.student, self.student.score_vectors(query_vec, item_vec))


def student_kind(student: RelevanceStudent) -> str:
    if isinstance(student, CrossEncoderStudent):
        return "cross_encoder"
    if isinstance(student, TwoTowerStudent):
        return "two_tower"
    raise TypeError(f"{type(student).__name__} is not a student that can be shipped (cross-encoder or two-tower)")


def serving_graphs(student: RelevanceStudent) -> dict[str, nn.Module]:
    """The named graphs of a student (in eval mode): see the module docstring."""
    student.eval()
    if student_kind(student) == "cross_encoder":
        graphs: dict[str, nn.Module] = {"cross_encoder": CrossEncoderGraph(student)}
    else:
        graphs = {
            "query_tower": TowerGraph(student, "query"),
            "item_tower": TowerGraph(student, "item"),
            "scorer": TowerScorerGraph(student),
        }
    return {k: g.eval() for k, g in graphs.items()}


def load_student(checkpoint: str | Path, map_location: str = "cpu") -> RelevanceStudent:
    """A cross-encoder or two-tower student from a Lightning checkpoint, in eval mode."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(2, "checkpoint not found", str(path))
    ckpt: dict[str, Any] = torch.load(path, map_location=map_location, weights_only=False)
    hp = ckpt.get("hyper_parameters") or {}
    keys = set(ckpt.get("state_dict") or {})
    if any(k.startswith("query_encoder.") for k in keys):
        cls: type[RelevanceStudent] = TwoTowerStudent
    elif any(k.startswith("encoder.") for k in keys):
        cls = CrossEncoderStudent
    else:
        raise ValueError(
            f"{path}: not a student checkpoint (a teacher's, or not from ellm-mkd fit); hparams {sorted(hp)}"
        )
    student = cls.load_from_checkpoint(path, map_location=map_location)
    student.eval()
    return student
