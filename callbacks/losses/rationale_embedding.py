"""Rationale embedding alignment (the MKD explanation/embedding term).

The teacher's rationale (its chain-of-thought text) is embedded once and cached.
For students without token-level attention to supervise -- notably a two-tower
model -- this term pulls the student's (query, item) pair embedding towards the
rationale's embedding, optionally after a learned linear projection of the
rationale embedding into the pair embedding space, with a cosine distance.

Reference:
    Zhao et al., Explainable LLM-driven Multi-dimensional Distillation for
    E-Commerce Relevance Learning, WWW 2025, arXiv 2411.13045.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kd import _row_mask, _upcast

__all__ = ["rationale_embedding_loss", "RationaleProjection"]


class RationaleProjection(nn.Module):
    """The learned projection of the rationale's embedding into the pair embedding space.

    A single ``Linear(H2 -> H)``: ``rationale_dim`` is the size ``H2`` of the
    cached rationale embeddings, ``pair_dim`` the size ``H`` of the student's
    pair embedding.  It is trained jointly with the student by
    :func:`rationale_embedding_loss`.

    Example:
        >>> import torch
        >>> proj = RationaleProjection(rationale_dim=8, pair_dim=4)
        >>> proj(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(self, rationale_dim: int, pair_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.rationale_dim = int(rationale_dim)
        self.pair_dim = int(pair_dim)
        self.linear = nn.Linear(self.rationale_dim, self.pair_dim, bias=bias)

    def forward(self, rationale_embedding: Tensor) -> Tensor:
        """Map ``[B, H2]`` rationale embeddings to ``[B, H]``."""
        return self.linear(rationale_embedding)


def _module_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        return p.dtype
    return None


def rationale_embedding_loss(
    pair_embedding: Tensor, rationale_embedding: Tensor, projection: nn.Module | None = None, mask: Tensor | None = None
) -> Tensor:
    r"""Cosine distance between the student's pair embedding and the (projected) rationale embedding.

    .. math::

        \mathcal{L}_{emb} = \frac{1}{|S|} \sum_{i \in S}
            \left(1 - \cos\left(e_i, \; P(r_i)\right)\right)

    where ``e_i`` is the student's pair embedding, ``r_i`` the cached rationale
    embedding, ``P`` the learned projection (identity when ``projection`` is
    ``None``) and ``S`` the rows selected by ``mask``.  Each term lies in
    ``[0, 2]``: 0 for parallel vectors, 1 for orthogonal, 2 for opposite.  The
    cosine is computed in (at least) float32, even for bf16/fp16 inputs.

    Args:
        pair_embedding: ``[B, H]`` floating tensor, the student's embedding of the
            (query, item) pair (e.g. the [CLS] vector, or a fusion of the two
            towers).
        rationale_embedding: ``[B, H2]`` floating tensor, the embedding of the
            teacher's rationale, treated as a fixed target (detached; gradients
            reach ``projection``, not the rationale).  Values in unselected rows
            are ignored.
        projection: optional module mapping ``[B, H2] -> [B, H]`` (e.g.
            :class:`RationaleProjection`).  If ``None``, ``H2`` must equal ``H``.
        mask: optional ``[B]`` bool tensor (e.g. ``batch["teacher_present"]``);
            ``True`` (or non-zero) marks rows that have a rationale and count in
            the mean.  ``None`` selects every row.

    Returns:
        A scalar float32 tensor.  When no row is selected it returns
        ``pair_embedding.sum() * 0.0`` (plus ``0 *`` the projection's parameters,
        so they too stay in the graph): an exact zero, never NaN.

    Raises:
        ValueError: on mismatched shapes (the message names the argument and the
            shapes received vs expected).

    Example:
        >>> import torch
        >>> from callbacks.losses import rationale_embedding_loss
        >>> e = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
        >>> r = torch.tensor([[3.0, 0.0], [0.0, -1.0]])
        >>> loss = rationale_embedding_loss(e, r)   # (0 + 2) / 2
        >>> loss.backward()
        >>> loss.item()
        1.0

    Reference:
        Zhao et al., Explainable LLM-driven Multi-dimensional Distillation for
        E-Commerce Relevance Learning, WWW 2025, arXiv 2411.13045.
    """
    if pair_embedding.dim() != 2:
        raise ValueError(f"pair_embedding: expected shape [B, H] (2-D), got {tuple(pair_embedding.shape)}")
    batch, hidden = pair_embedding.shape
    if rationale_embedding.dim() != 2 or rationale_embedding.shape[0] != batch:
        raise ValueError(
            f"rationale_embedding: expected shape ({batch}, H2) [B, H2] (B as pair_embedding), "
            f"got {tuple(rationale_embedding.shape)}"
        )
    if projection is None and rationale_embedding.shape[1] != hidden:
        raise ValueError(
            f"rationale_embedding: expected shape {(batch, hidden)} [B, H] (as pair_embedding) "
            f"when projection is None, got {tuple(rationale_embedding.shape)}"
        )
    sel = _row_mask(mask, batch, pair_embedding.device)
    pair = _upcast(pair_embedding)
    rationale = rationale_embedding.detach()
    rationale = torch.where(sel[:, None], rationale, torch.zeros_like(rationale))
    if projection is not None:
        dtype = _module_dtype(projection)
        projected = projection(rationale.to(dtype) if dtype is not None else rationale)
        if tuple(projected.shape) != (batch, hidden):
            raise ValueError(
                f"projection: expected output shape {(batch, hidden)} [B, H] (as pair_embedding), "
                f"got {tuple(projected.shape)} from rationale_embedding {tuple(rationale_embedding.shape)}"
            )
    else:
        projected = rationale
    projected = _upcast(projected).to(pair.dtype)
    if not bool(sel.any()):
        return pair.sum() * 0.0 + projected.sum() * 0.0
    cos = F.cosine_similarity(pair, projected, dim=-1)
    return (1.0 - cos)[sel].mean()
