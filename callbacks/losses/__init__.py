r"""Loss terms of Multi-dimensional Knowledge Distillation (MKD), functional and torch-only.

Each term is a plain function returning a scalar float32 tensor; rows not
selected by a mask do not count, and when no row is selected the result is an
exact zero still connected to the student's graph (never NaN).

* :func:`distribution_kd_loss` -- relevance-level KD (Hinton et al. 2015 temperature):
  ``L_KD = T^2 * mean_{i in S} KL(softmax(log p_i / T) || softmax(z_i / T))``
  with ``z`` the student's ``[B, K]`` level logits and ``p`` the teacher's
  ``[B, K]`` probabilities (floored at 1e-8).
* :func:`dimension_kd_loss` -- per-dimension verdict KD:
  ``L_dim = T^2 * sum_d w_d * mean_{i in S} KL(t_{id}^T || s_{id}^T) / sum_d w_d``
  over ``[B, D, V]`` verdict logits/probabilities (D dimensions, V verdicts).
* :func:`rationale_attention_loss` -- rationale-guided attention:
  ``L_rat = mean_{i in R} sum_t q_{it} (log q_{it} - log(a_{it} + eps))`` with
  ``q = rationale_mask * attention_mask`` normalised per row, ``a`` the student's
  ``[B, T]`` token distribution (e.g. :func:`cls_attention`) and ``R`` the rows
  with any evidence.
* :func:`rationale_embedding_loss` -- rationale embedding alignment:
  ``L_emb = mean_{i in S} (1 - cos(e_i, P(r_i)))`` with ``e`` the ``[B, H]`` pair
  embedding, ``r`` the ``[B, H2]`` rationale embedding and ``P`` a learned
  :class:`RationaleProjection` (or the identity).

Reference:
    Zhao et al., Explainable LLM-driven Multi-dimensional Distillation for
    E-Commerce Relevance Learning, WWW 2025, arXiv 2411.13045.
"""

from .dimension_kd import dimension_kd_loss
from .kd import distribution_kd_loss
from .rationale_attention import cls_attention, rationale_attention_loss
from .rationale_embedding import RationaleProjection, rationale_embedding_loss

__all__ = [
    "distribution_kd_loss",
    "dimension_kd_loss",
    "rationale_attention_loss",
    "cls_attention",
    "rationale_embedding_loss",
    "RationaleProjection",
]
