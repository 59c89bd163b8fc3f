"""Rationale-guided attention distillation (the MKD explanation/attention term).

The LLM teacher's chain of thought cites evidence in the item text; the data
pipeline projects that evidence onto the student's input tokens as a 0/1
``rationale_mask``.  This term asks the student to put its attention (for a
cross-encoder: the [CLS]-to-token attention averaged over chosen layers and
heads, see :func:`cls_attention`; for a two-tower model: its pooling weights)
on those tokens, by minimising the KL divergence from the normalised rationale
mask to the student's token distribution.

Reference:
    Zhao et al., Explainable LLM-driven Multi-dimensional Distillation for
    E-Commerce Relevance Learning, WWW 2025, arXiv 2411.13045.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .kd import _upcast

__all__ = ["rationale_attention_loss", "cls_attention"]


def _check_bt(x: Tensor, name: str, expected: tuple[int, int], ref: str) -> None:
    if tuple(x.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected} [B, T] (as {ref}), got {tuple(x.shape)}")


def rationale_attention_loss(
    student_weights: Tensor, rationale_mask: Tensor, attention_mask: Tensor | None = None, eps: float = 1e-8
) -> Tensor:
    r"""KL divergence from the normalised rationale mask to the student's token distribution.

    With ``a_i`` the student's token distribution for row ``i``, ``r_i`` the
    rationale mask and ``m_i`` the attention mask:

    .. math::

        q_{it} = \frac{r_{it} \, m_{it}}{\sum_u r_{iu} \, m_{iu}}

        \mathcal{L}_{rat} = \frac{1}{|R|} \sum_{i \in R} \sum_t
            q_{it} \left(\log q_{it} - \log(a_{it} + \epsilon)\right)

    with ``q log q = 0`` where ``q = 0``, and ``R`` the rows whose target has
    any mass (``sum_t r_{it} m_{it} > 0``).  Rows with an empty rationale mask
    (no evidence, or no teacher) do not count.  Rationale positions that are
    padding (``attention_mask == 0``) are dropped from the target.  The
    computation runs in (at least) float32, even for bf16/fp16 inputs.

    Args:
        student_weights: ``[B, T]`` floating tensor, a distribution over the
            student's input tokens per row (rows sum to 1 over real tokens),
            e.g. :func:`cls_attention` of a cross-encoder or a two-tower pooling
            weight vector.
        rationale_mask: ``[B, T]`` float (or bool/int) 0/1 tensor, 1 on the
            student's input tokens covered by the teacher's evidence.
        attention_mask: optional ``[B, T]`` 0/1 tensor, 1 on real tokens and 0
            on padding.  ``None`` treats every position as real.
        eps: added to ``student_weights`` inside the log (default 1e-8).

    Returns:
        A scalar float32 tensor.  When no row has any evidence it returns
        ``student_weights.sum() * 0.0``: an exact zero that stays connected to
        the graph (so DDP sees every parameter used), never NaN.

    Raises:
        ValueError: on mismatched shapes (the message names the argument and the
            shapes received vs expected).

    Example:
        >>> import torch
        >>> from callbacks.losses import rationale_attention_loss
        >>> weights = torch.tensor([[0.25, 0.25, 0.5, 0.0]], requires_grad=True)
        >>> rationale = torch.tensor([[0.0, 0.0, 1.0, 1.0]])   # evidence on token 2 (and on padding)
        >>> attention = torch.tensor([[1.0, 1.0, 1.0, 0.0]])   # token 3 is padding
        >>> loss = rationale_attention_loss(weights, rationale, attention)  # = -log(0.5)
        >>> loss.backward()
        >>> round(loss.item(), 4)
        0.6931

    Reference:
        Zhao et al., Explainable LLM-driven Multi-dimensional Distillation for
        E-Commerce Relevance Learning, WWW 2025, arXiv 2411.13045.
    """
    if student_weights.dim() != 2:
        raise ValueError(f"student_weights: expected shape [B, T] (2-D), got {tuple(student_weights.shape)}")
    shape = tuple(student_weights.shape)
    _check_bt(rationale_mask, "rationale_mask", shape, "student_weights")
    weights = _upcast(student_weights)
    target = _upcast(rationale_mask.detach()).to(weights.dtype)
    if attention_mask is not None:
        _check_bt(attention_mask, "attention_mask", shape, "student_weights")
        target = target * _upcast(attention_mask.detach()).to(weights.dtype)
    mass = target.sum(-1)
    rows = mass > 0
    if not bool(rows.any()):
        return weights.sum() * 0.0
    q = target / mass.clamp_min(torch.finfo(weights.dtype).tiny)[:, None]
    per_row = (torch.xlogy(q, q) - q * torch.log(weights.clamp_min(0.0) + eps)).sum(-1)
    return per_row[rows].mean()


def cls_attention(
    attentions: Sequence[Tensor],
    layers: Sequence[int] = (-1,),
    heads: Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    r"""The [CLS]-to-token attention, averaged over chosen layers and heads.

    .. math::

        a_{it} = \frac{1}{|L|\,|H|} \sum_{l \in L} \sum_{h \in H} A^{(l)}_{i h 0 t},
        \qquad
        \tilde a_{it} = \frac{a_{it} \, m_{it}}{\sum_u a_{iu} \, m_{iu}}

    i.e. attention from position 0 ([CLS]) to every token, padding positions
    zeroed and rows renormalised to sum to 1.  It stays differentiable, so it can
    feed :func:`rationale_attention_loss` directly.

    Args:
        attentions: a tuple/list of per-layer attention tensors, each
            ``[B, Hh, T, T]`` (as returned by a Hugging Face encoder with
            ``output_attentions=True``), or each layer's [CLS] row alone,
            ``[B, Hh, T]``.
        layers: indices into ``attentions`` to average over (negative indices
            count from the last layer); default ``(-1,)``, the last layer.
        heads: head indices to average over; ``None`` (default) means all heads.
        attention_mask: optional ``[B, T]`` 0/1 tensor, 1 on real tokens.

    Returns:
        A ``[B, T]`` float32 (at least) tensor whose rows sum to 1 over real
        tokens (a row whose attention mass on real tokens is 0 stays all zeros).

    Raises:
        ValueError: on an empty ``attentions``, mismatched shapes, or
            out-of-range layer/head indices (the message names the argument).

    Example:
        >>> import torch
        >>> from callbacks.losses import cls_attention
        >>> attn = torch.zeros(1, 2, 3, 3)
        >>> attn[0, 0, 0] = torch.tensor([0.2, 0.2, 0.6])
        >>> attn[0, 1, 0] = torch.tensor([0.4, 0.4, 0.2])
        >>> cls_attention((attn,), attention_mask=torch.tensor([[1, 1, 0]]))
        tensor([[0.5000, 0.5000, 0.0000]])

    Reference:
        Zhao et al., Explainable LLM-driven Multi-dimensional Distillation for
        E-Commerce Relevance Learning, WWW 2025, arXiv 2411.13045.
    """
    if isinstance(attentions, Tensor) or len(attentions) == 0:
        raise ValueError(
            "attentions: expected a non-empty tuple/list of [B, Hh, T, T] tensors, got "
            + (
                f"a tensor of shape {tuple(attentions.shape)}"
                if isinstance(attentions, Tensor)
                else "an empty sequence"
            )
        )
    first = attentions[0]
    if not (first.dim() == 3 or (first.dim() == 4 and first.shape[-1] == first.shape[-2])):
        raise ValueError(
            f"attentions: expected each layer of shape [B, Hh, T, T] (or its [CLS] row [B, Hh, T]), "
            f"got {tuple(first.shape)}"
        )
    ref_shape = tuple(first.shape)
    for k, a in enumerate(attentions):
        if tuple(a.shape) != ref_shape:
            raise ValueError(
                f"attentions: expected every layer of shape {ref_shape} [B, Hh, T, T], "
                f"got {tuple(a.shape)} at layer {k}"
            )
    n_layers = len(attentions)
    batch, n_heads, seq = ref_shape[:3]
    layers = list(layers)
    if not layers or any(not -n_layers <= li < n_layers for li in layers):
        raise ValueError(f"layers: expected non-empty indices in [-{n_layers}, {n_layers}), got {layers}")
    if heads is not None:
        heads = list(heads)
        if not heads or any(not -n_heads <= h < n_heads for h in heads):
            raise ValueError(f"heads: expected non-empty indices in [-{n_heads}, {n_heads}), got {heads}")
    rows = []
    for li in layers:
        a = _upcast(attentions[li])
        a = a[:, :, 0, :] if a.dim() == 4 else a  # [B, Hh, T]
        if heads is not None:
            a = a[:, heads, :]
        rows.append(a.mean(1))
    cls = torch.stack(rows, 0).mean(0)  # [B, T]
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(
                f"attention_mask: expected shape {(batch, seq)} [B, T] (as attentions), "
                f"got {tuple(attention_mask.shape)}"
            )
        cls = cls * _upcast(attention_mask).to(device=cls.device, dtype=cls.dtype)
    total = cls.sum(-1, keepdim=True)
    return cls / total.clamp_min(torch.finfo(cls.dtype).tiny)
