"""Dimension-level knowledge distillation (the MKD per-dimension verdict term).

The LLM teacher's chain of thought judges ``D`` dimensions of a (query, item)
pair -- category, brand, model, attributes, usage -- each with a verdict among
``V`` classes (match, partial, mismatch, absent).  The student has a verdict
head that produces ``[B, D, V]`` logits.  This term distils the teacher's
per-dimension verdict distributions into that head with a tempered KL
divergence, averaged over rows and then combined over dimensions with
(optional) per-dimension weights.

Reference:
    Zhao et al., Explainable LLM-driven Multi-dimensional Distillation for
    E-Commerce Relevance Learning, WWW 2025, arXiv 2411.13045.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .kd import PROB_FLOOR, _check_student_teacher, _row_mask, _upcast

__all__ = ["dimension_kd_loss"]


def _dim_weights(
    dim_weights: Sequence[float] | Tensor | None, num_dims: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    if dim_weights is None:
        return torch.ones(num_dims, device=device, dtype=dtype)
    w = torch.as_tensor(dim_weights, dtype=dtype).to(device=device, dtype=dtype).detach()
    if w.dim() != 1 or w.shape[0] != num_dims:
        raise ValueError(
            f"dim_weights: expected shape ({num_dims},) i.e. one weight per dimension D={num_dims}, "
            f"got {tuple(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"dim_weights: expected finite non-negative weights, got {w.tolist()}")
    if not float(w.sum()) > 0:
        raise ValueError(f"dim_weights: expected a positive sum, got {w.tolist()}")
    return w


def dimension_kd_loss(
    student_dim_logits: Tensor,
    teacher_verdict_probs: Tensor,
    mask: Tensor | None = None,
    dim_weights: Sequence[float] | Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    r"""Weighted, tempered KL divergence between teacher and student per-dimension verdicts.

    With ``z_{id}`` the student's verdict logits and ``p_{id}`` the teacher's
    verdict probabilities for row ``i`` and dimension ``d``:

    .. math::

        s^T_{id} = \mathrm{softmax}(z_{id} / T), \qquad
        t^T_{id} = \mathrm{softmax}(\log(\max(p_{id}, 10^{-8})) / T)

        \ell_d = \frac{1}{|S|} \sum_{i \in S} \mathrm{KL}(t^T_{id} \,\|\, s^T_{id})

        \mathcal{L}_{dim} = T^2 \cdot \frac{\sum_d w_d \, \ell_d}{\sum_d w_d}

    where ``S`` is the set of rows selected by ``mask``.  A weight ``w_d = 0``
    removes dimension ``d`` from the loss.  The computation runs in (at least)
    float32, even for bf16/fp16 inputs.

    Args:
        student_dim_logits: ``[B, D, V]`` floating tensor, the student's verdict
            logits (``D`` dimensions, ``V`` verdict classes).
        teacher_verdict_probs: ``[B, D, V]`` floating tensor, the teacher's verdict
            probabilities (each ``[i, d, :]`` sums to 1).  Values in unselected
            rows are ignored (they may be zeros or NaN).
        mask: optional ``[B]`` bool tensor (e.g. ``batch["teacher_verdicts_present"]``);
            ``True`` (or non-zero) marks rows whose teacher verdicts were parsed
            and count in the mean.  ``None`` selects every row.
        dim_weights: optional ``D`` non-negative weights with a positive sum (a
            sequence of floats or a 1-D tensor); default all ones.
        temperature: softening temperature ``T > 0`` (default 1.0).

    Returns:
        A scalar float32 tensor.  When no row is selected it returns
        ``student_dim_logits.sum() * 0.0``: an exact zero that stays connected to
        the graph (so DDP sees every parameter used), never NaN.

    Raises:
        ValueError: on mismatched shapes, a wrong number of weights, negative
            weights or weights summing to 0, or a non-positive temperature (the
            message names the argument and the shapes received vs expected).

    Example:
        >>> import torch
        >>> from callbacks.losses import dimension_kd_loss
        >>> student = torch.zeros(2, 5, 4, requires_grad=True)        # uniform verdicts
        >>> teacher = torch.full((2, 5, 4), 0.25)                        # uniform teacher
        >>> teacher[0, 0] = torch.tensor([0.85, 0.05, 0.05, 0.05])      # row 0 is sure of "category: match"
        >>> loss = dimension_kd_loss(student, teacher, mask=torch.tensor([True, False]),
        ...                          dim_weights=[2.0, 1.0, 1.0, 1.0, 1.0])
        >>> loss.backward()
        >>> round(loss.item(), 4)
        0.2663

    Reference:
        Zhao et al., Explainable LLM-driven Multi-dimensional Distillation for
        E-Commerce Relevance Learning, WWW 2025, arXiv 2411.13045.
    """
    _check_student_teacher(
        student_dim_logits, "student_dim_logits", teacher_verdict_probs, "teacher_verdict_probs", "B, D, V", temperature
    )
    batch, num_dims, _ = student_dim_logits.shape
    logits = _upcast(student_dim_logits)
    w = _dim_weights(dim_weights, num_dims, logits.device, logits.dtype)
    sel = _row_mask(mask, batch, logits.device)
    if not bool(sel.any()):
        return logits.sum() * 0.0

    t = float(temperature)
    teacher = _upcast(teacher_verdict_probs.detach()).to(logits.dtype)
    teacher = torch.where(sel[:, None, None], teacher, torch.ones_like(teacher))
    log_student_t = F.log_softmax(logits / t, dim=-1)
    teacher_t = F.softmax(torch.log(teacher.clamp_min(PROB_FLOOR)) / t, dim=-1)
    per_row_dim = F.kl_div(log_student_t, teacher_t, reduction="none").sum(-1)  # [B, D]
    per_dim = per_row_dim[sel].mean(0)  # [D]
    return (t * t) * (w * per_dim).sum() / w.sum()
