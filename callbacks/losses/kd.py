"""Distribution knowledge distillation on the relevance levels (the MKD "KD" term).

The LLM teacher's relevance judgement is cached as a probability vector over the
``K`` relevance levels.  The student (a BERT cross-encoder or a two-tower model)
produces level logits.  This term pulls the student's tempered distribution
towards the teacher's tempered distribution with a KL divergence, scaled by
``T^2`` so that the gradient magnitude does not shrink as the temperature grows.

References:
    Zhao et al., Explainable LLM-driven Multi-dimensional Distillation for
    E-Commerce Relevance Learning, WWW 2025, arXiv 2411.13045.

    Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network",
    NIPS Deep Learning Workshop 2015, arXiv 1503.02531 (the temperature term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["distribution_kd_loss"]

#: Floor applied to the teacher's probabilities before taking their log.
PROB_FLOOR = 1e-8


def _upcast(x: Tensor) -> Tensor:
    """Return ``x`` as a floating tensor of at least float32 precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _row_mask(mask: Tensor | None, batch: int, device: torch.device, name: str = "mask") -> Tensor:
    """Validate a per-row mask of shape ``[B]`` and return it as bool (non-zero = selected)."""
    if mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    if not isinstance(mask, Tensor):
        mask = torch.as_tensor(mask, device=device)
    if tuple(mask.shape) != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},) i.e. [B], got {tuple(mask.shape)}")
    return mask.to(device=device).bool()


def _check_student_teacher(
    student: Tensor, s_name: str, teacher: Tensor, t_name: str, layout: str, temperature: float
) -> None:
    """Temperature > 0, the student tensor of ``layout`` (e.g. ``"B, K"``), the teacher tensor of the same shape."""
    if not float(temperature) > 0:
        raise ValueError(f"temperature: expected a value > 0, got {temperature!r}")
    n = layout.count(",") + 1
    if student.dim() != n:
        raise ValueError(f"{s_name}: expected shape [{layout}] ({n}-D), got {tuple(student.shape)}")
    if tuple(teacher.shape) != tuple(student.shape):
        raise ValueError(
            f"{t_name}: expected shape {tuple(student.shape)} [{layout}] (as {s_name}), got {tuple(teacher.shape)}"
        )


def distribution_kd_loss(
    student_logits: Tensor, teacher_probs: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    r"""Tempered KL divergence from the teacher's level distribution to the student's.

    For every selected row ``i``:

    .. math::

        s^T_i = \mathrm{softmax}(z_i / T), \qquad
        t^T_i = \mathrm{softmax}(\log(\max(p_i, 10^{-8})) / T)

        \mathcal{L}_{KD} = T^2 \cdot \frac{1}{|S|} \sum_{i \in S}
            \mathrm{KL}(t^T_i \,\|\, s^T_i)
            = T^2 \cdot \frac{1}{|S|} \sum_{i \in S} \sum_k t^T_{ik}
              (\log t^T_{ik} - \log s^T_{ik})

    where ``z`` are the student's logits, ``p`` the teacher's cached probabilities
    and ``S`` the rows selected by ``mask``.  Since the teacher cache stores
    probabilities rather than logits, the teacher is tempered through its log
    probabilities (``t^T`` is proportional to ``p^{1/T}``).  Each row's KL is
    ``torch.nn.functional.kl_div(log s^T, t^T, reduction="none").sum(-1)``.

    The computation runs in (at least) float32, even for bf16/fp16 inputs.

    Args:
        student_logits: ``[B, K]`` floating tensor (any float dtype), the student's
            unnormalised scores over the ``K`` relevance levels.
        teacher_probs: ``[B, K]`` floating tensor, the teacher's probabilities over
            the same levels (rows sum to 1).  Values in unselected rows are
            ignored (they may be zeros or NaN).
        temperature: softening temperature ``T > 0`` (default 1.0).
        mask: optional ``[B]`` bool tensor (e.g. ``batch["teacher_present"]``);
            ``True`` (or non-zero) marks rows that carry a teacher signal and count
            in the mean.  ``None`` selects every row.

    Returns:
        A scalar float32 tensor.  When no row is selected it returns
        ``student_logits.sum() * 0.0``: an exact zero that stays connected to the
        graph (so DDP sees every parameter used), never NaN.

    Raises:
        ValueError: on a non-positive temperature or mismatched shapes (the
            message names the argument and the shapes received vs expected).

    Example:
        >>> import torch
        >>> from callbacks.losses import distribution_kd_loss
        >>> student_logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]], requires_grad=True)
        >>> teacher_probs = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
        >>> loss = distribution_kd_loss(student_logits, teacher_probs, temperature=2.0,
        ...                             mask=torch.tensor([True, True]))
        >>> loss.backward()
        >>> round(loss.item(), 4)
        0.0366
        >>> # the uniform teacher row against all-equal logits contributes exactly 0
        >>> distribution_kd_loss(student_logits[1:], teacher_probs[1:]).item()
        0.0

    Reference:
        Zhao et al., Explainable LLM-driven Multi-dimensional Distillation for
        E-Commerce Relevance Learning, WWW 2025, arXiv 2411.13045.
        Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".
    """
    _check_student_teacher(student_logits, "student_logits", teacher_probs, "teacher_probs", "B, K", temperature)
    batch = student_logits.shape[0]
    sel = _row_mask(mask, batch, student_logits.device)
    if not bool(sel.any()):
        return _upcast(student_logits).sum() * 0.0

    t = float(temperature)
    logits = _upcast(student_logits)
    teacher = _upcast(teacher_probs.detach()).to(logits.dtype)
    # unselected rows may hold garbage (zeros, NaN): replace them so neither the
    # forward nor the backward pass can produce NaN through them
    teacher = torch.where(sel[:, None], teacher, torch.ones_like(teacher))
    log_student_t = F.log_softmax(logits / t, dim=-1)
    teacher_t = F.softmax(torch.log(teacher.clamp_min(PROB_FLOOR)) / t, dim=-1)
    per_row = F.kl_div(log_student_t, teacher_t, reduction="none").sum(-1)
    return (t * t) * per_row[sel].mean()
