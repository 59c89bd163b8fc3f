"""MKD loss terms (callbacks.losses) against expected values worked out by hand.

Every expected value below is written out with plain Python floats and ``math``
(exp / log / sqrt on 2-3 element vectors), independently of the torch code
under test.
"""

from __future__ import annotations

import doctest
import math
from pathlib import Path

import pytest
import torch

import callbacks.losses as losses
from callbacks.losses import (
    RationaleProjection,
    cls_attention,
    dimension_kd,
    dimension_kd_loss,
    distribution_kd_loss,
    kd,
    rationale_attention,
    rationale_attention_loss,
    rationale_embedding,
    rationale_embedding_loss,
)

# --------------------------------------------------------------------------- helpers
# (plain-float arithmetic only; no torch)


def softmax3(a: float, b: float, c: float) -> list[float]:
    ea, eb, ec = math.exp(a), math.exp(b), math.exp(c)
    z = ea + eb + ec
    return [ea / z, eb / z, ec / z]


def kl3(p: list[float], q: list[float]) -> float:
    """KL(p || q) = sum_k p_k (log p_k - log q_k), with 0 log 0 = 0."""
    total = 0.0
    for pk, qk in zip(p, q):
        if pk > 0:
            total += pk * (math.log(pk) - math.log(qk))
    return total


def sigmoid_pair(a: float, b: float) -> list[float]:
    """softmax([a, b]) written as a sigmoid of the difference."""
    s = 1.0 / (1.0 + math.exp(-(a - b)))
    return [s, 1.0 - s]


def bkl(p: float, q: float) -> float:
    """Binary KL([p, 1-p] || [q, 1-q])."""
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


# --------------------------------------------------------------------------- distribution_kd_loss

S1, S2 = [1.0, 0.0, -1.0], [0.5, 0.5, 0.0]
P1, P2 = [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]


def _kd_inputs(dtype=torch.float32, requires_grad=False):
    s = torch.tensor([S1, S2], dtype=dtype, requires_grad=requires_grad)
    p = torch.tensor([P1, P2], dtype=dtype)
    return s, p


def test_kd_t1_two_rows_matches_hand_value():
    # row 1: softmax([1, 0, -1]) = [e, 1, 1/e] / (e + 1 + 1/e)
    z1 = math.e + 1 + 1 / math.e
    q1 = [math.e / z1, 1 / z1, (1 / math.e) / z1]
    # row 2: softmax([.5, .5, 0]) = [e^.5, e^.5, 1] / (2 e^.5 + 1)
    z2 = 2 * math.exp(0.5) + 1
    q2 = [math.exp(0.5) / z2, math.exp(0.5) / z2, 1 / z2]
    kl1 = 0.7 * math.log(0.7 / q1[0]) + 0.2 * math.log(0.2 / q1[1]) + 0.1 * math.log(0.1 / q1[2])
    kl2 = 0.1 * math.log(0.1 / q2[0]) + 0.3 * math.log(0.3 / q2[1]) + 0.6 * math.log(0.6 / q2[2])
    expected = (kl1 + kl2) / 2
    assert expected == pytest.approx(0.18293088749564, abs=1e-12)  # stored value

    s, p = _kd_inputs()
    loss = distribution_kd_loss(s, p)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kd_t2_tempers_teacher_and_scales_by_t_squared():
    t = 2.0
    # teacher tempered: softmax(log p / 2) = sqrt(p) / sum sqrt(p)
    r1 = [math.sqrt(0.7), math.sqrt(0.2), math.sqrt(0.1)]
    r2 = [math.sqrt(0.1), math.sqrt(0.3), math.sqrt(0.6)]
    tp1 = [v / sum(r1) for v in r1]
    tp2 = [v / sum(r2) for v in r2]
    sq1 = softmax3(0.5, 0.0, -0.5)
    sq2 = softmax3(0.25, 0.25, 0.0)
    expected = t * t * (kl3(tp1, sq1) + kl3(tp2, sq2)) / 2
    assert expected == pytest.approx(0.20823846819912, abs=1e-12)  # stored value

    s, p = _kd_inputs()
    assert distribution_kd_loss(s, p, temperature=t).item() == pytest.approx(expected, rel=1e-5)


def test_kd_mask_selects_rows_and_ignores_garbage_in_unselected_rows():
    expected_row1 = kl3(P1, softmax3(*S1))
    assert expected_row1 == pytest.approx(0.0057874119010429, abs=1e-12)  # stored value
    s, p = _kd_inputs(requires_grad=True)
    p_bad = p.clone()
    p_bad[1] = float("nan")  # row without a teacher signal may hold anything
    loss = distribution_kd_loss(s, p_bad, mask=torch.tensor([True, False]))
    assert loss.item() == pytest.approx(expected_row1, rel=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad[0].abs().sum() > 0
    assert torch.equal(s.grad[1], torch.zeros(3))


def test_kd_all_masked_returns_connected_zero():
    s, p = _kd_inputs(requires_grad=True)
    loss = distribution_kd_loss(s, p, temperature=2.0, mask=torch.tensor([False, False]))
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_kd_is_zero_when_student_equals_teacher():
    s = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]])
    p = torch.tensor([[0.7, 0.2, 0.1]])
    for t in (1.0, 3.0):
        assert distribution_kd_loss(s, p, temperature=t).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_gradient_flows_to_student_logits():
    s, p = _kd_inputs(requires_grad=True)
    distribution_kd_loss(s, p, temperature=2.0).backward()
    assert s.grad is not None and (s.grad.abs() > 0).all()


def test_kd_bf16_inputs_give_float32_result():
    s32, p32 = _kd_inputs()
    s16, p16 = _kd_inputs(dtype=torch.bfloat16)
    ref = distribution_kd_loss(s32, p32, temperature=2.0)
    out = distribution_kd_loss(s16, p16, temperature=2.0)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=5e-2, abs=1e-3)


def test_kd_wrong_shapes_and_temperature_raise():
    s, p = _kd_inputs()
    with pytest.raises(ValueError, match=r"student_logits.*\(3,\)"):
        distribution_kd_loss(s[0], p)
    with pytest.raises(ValueError, match=r"teacher_probs.*\(2, 3\).*\(2, 4\)"):
        distribution_kd_loss(s, torch.full((2, 4), 0.25))
    with pytest.raises(ValueError, match=r"mask.*\(2,\).*\(3,\)"):
        distribution_kd_loss(s, p, mask=torch.tensor([True, True, False]))
    with pytest.raises(ValueError, match="temperature"):
        distribution_kd_loss(s, p, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        distribution_kd_loss(s, p, temperature=-1.0)


# --------------------------------------------------------------------------- dimension_kd_loss
# B=2 rows, D=3 dimensions, V=2 verdicts (binary KL keeps the arithmetic short)

DIM_STUDENT = [[[1.0, 0.0], [0.0, 2.0], [0.5, -0.5]], [[0.0, 0.0], [1.0, -1.0], [-1.0, 0.0]]]
DIM_TEACHER_P = [  # probability of verdict 0 per (row, dim)
    [0.8, 0.3, 0.6],
    [0.5, 0.9, 0.2],
]


def _dim_inputs(dtype=torch.float32, requires_grad=False):
    s = torch.tensor(DIM_STUDENT, dtype=dtype, requires_grad=requires_grad)
    t = torch.tensor([[[p, 1 - p] for p in row] for row in DIM_TEACHER_P], dtype=dtype)
    return s, t


def _dim_hand_kl(row: int, dim: int, temperature: float = 1.0) -> float:
    a, b = DIM_STUDENT[row][dim]
    q = sigmoid_pair(a / temperature, b / temperature)[0]
    p = DIM_TEACHER_P[row][dim]
    pt = p ** (1 / temperature) / (p ** (1 / temperature) + (1 - p) ** (1 / temperature))
    return bkl(pt, q)


def test_dimension_kd_default_weights_matches_hand_value():
    # per-dimension mean over the 2 rows, then plain mean over the 3 dimensions
    l0 = (_dim_hand_kl(0, 0) + _dim_hand_kl(1, 0)) / 2
    l1 = (_dim_hand_kl(0, 1) + _dim_hand_kl(1, 1)) / 2
    l2 = (_dim_hand_kl(0, 2) + _dim_hand_kl(1, 2)) / 2
    expected = (l0 + l1 + l2) / 3
    # spot-check one cell by hand: row 0, dim 0: q = 1/(1+e^-1), p = 0.8
    q = 1 / (1 + math.exp(-1))
    assert _dim_hand_kl(0, 0) == pytest.approx(0.8 * math.log(0.8 / q) + 0.2 * math.log(0.2 / (1 - q)))

    s, t = _dim_inputs()
    loss = dimension_kd_loss(s, t)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dimension_kd_weights_and_zero_weight_removes_dimension():
    s, t = _dim_inputs()
    l0 = (_dim_hand_kl(0, 0) + _dim_hand_kl(1, 0)) / 2
    l1 = (_dim_hand_kl(0, 1) + _dim_hand_kl(1, 1)) / 2
    l2 = (_dim_hand_kl(0, 2) + _dim_hand_kl(1, 2)) / 2

    assert dimension_kd_loss(s, t, dim_weights=[2.0, 1.0, 0.0]).item() == pytest.approx((2 * l0 + 1 * l1) / 3, rel=1e-5)
    w = torch.tensor([1.0, 0.0, 1.0])
    loss = dimension_kd_loss(s, t, dim_weights=w)
    assert loss.item() == pytest.approx((l0 + l2) / 2, rel=1e-5)
    # whatever dimension 1 holds no longer matters
    s2, t2 = s.clone(), t.clone()
    s2[:, 1] = torch.tensor([5.0, -5.0])
    t2[:, 1] = torch.tensor([0.01, 0.99])
    assert dimension_kd_loss(s2, t2, dim_weights=w).item() == pytest.approx(loss.item(), rel=1e-6)


def test_dimension_kd_temperature_mask_and_all_masked():
    s, t = _dim_inputs(requires_grad=True)
    # T = 2, only row 1 selected
    expected = 4.0 * (_dim_hand_kl(1, 0, 2.0) + _dim_hand_kl(1, 1, 2.0) + _dim_hand_kl(1, 2, 2.0)) / 3
    t_bad = t.clone()
    t_bad[0] = float("nan")
    loss = dimension_kd_loss(s, t_bad, mask=torch.tensor([False, True]), temperature=2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad[1].abs().sum() > 0
    assert torch.equal(s.grad[0], torch.zeros(3, 2))

    s.grad = None
    zero = dimension_kd_loss(s, t, mask=torch.tensor([False, False]))
    assert zero.item() == 0.0 and zero.grad_fn is not None
    zero.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_dimension_kd_gradient_and_bf16():
    s, t = _dim_inputs(requires_grad=True)
    ref = dimension_kd_loss(s, t, dim_weights=[1.0, 2.0, 3.0])
    ref.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    s16, t16 = _dim_inputs(dtype=torch.bfloat16)
    out = dimension_kd_loss(s16, t16, dim_weights=[1.0, 2.0, 3.0])
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=5e-2, abs=1e-3)


def test_dimension_kd_wrong_shapes_and_weights_raise():
    s, t = _dim_inputs()
    with pytest.raises(ValueError, match=r"student_dim_logits.*\(2, 6\)"):
        dimension_kd_loss(s.reshape(2, 6), t)
    with pytest.raises(ValueError, match=r"teacher_verdict_probs.*\(2, 3, 2\).*\(2, 3, 4\)"):
        dimension_kd_loss(s, torch.full((2, 3, 4), 0.25))
    with pytest.raises(ValueError, match=r"mask.*\(2,\).*\(1,\)"):
        dimension_kd_loss(s, t, mask=torch.tensor([True]))
    with pytest.raises(ValueError, match=r"dim_weights.*\(3,\).*\(5,\)"):
        dimension_kd_loss(s, t, dim_weights=[1.0] * 5)
    with pytest.raises(ValueError, match="dim_weights.*non-negative"):
        dimension_kd_loss(s, t, dim_weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="dim_weights.*positive sum"):
        dimension_kd_loss(s, t, dim_weights=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="temperature"):
        dimension_kd_loss(s, t, temperature=0.0)


# --------------------------------------------------------------------------- rationale_attention_loss

EPS = 1e-8


def test_rationale_attention_one_row_with_padding():
    weights = torch.tensor([[0.1, 0.6, 0.3, 0.0]])
    rationale = torch.tensor([[0.0, 1.0, 1.0, 1.0]])  # evidence also marked on the padding token
    attention = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # token 3 is padding
    # target q = [0, 1/2, 1/2, 0]
    expected = 0.5 * (math.log(0.5) - math.log(0.6 + EPS)) + 0.5 * (math.log(0.5) - math.log(0.3 + EPS))
    assert expected == pytest.approx(0.5 * math.log(0.25 / 0.18), rel=1e-6)
    loss = rationale_attention_loss(weights, rationale, attention)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    # without the attention mask the padding token enters the target (q = 1/3 each),
    # and its zero weight costs log(1/3) - log(0 + eps)
    third = 1.0 / 3.0
    expected_nomask = third * (
        (math.log(third) - math.log(0.6 + EPS))
        + (math.log(third) - math.log(0.3 + EPS))
        + (math.log(third) - math.log(0.0 + EPS))
    )
    assert rationale_attention_loss(weights, rationale).item() == pytest.approx(expected_nomask, rel=1e-5)


def test_rationale_attention_rows_with_empty_evidence_are_ignored():
    weights = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.2, 0.2, 0.6, 0.0], [0.7, 0.3, 0.0, 0.0]], requires_grad=True)
    rationale = torch.tensor(
        [
            [0.0, 1.0, 1.0, 1.0],
            [0.0, 0.0, 0.0, 0.0],  # no evidence at all
            [0.0, 0.0, 1.0, 1.0],  # evidence only on padding -> empty after masking
        ]
    )
    attention = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    expected = 0.5 * (math.log(0.5) - math.log(0.6 + EPS)) + 0.5 * (math.log(0.5) - math.log(0.3 + EPS))
    loss = rationale_attention_loss(weights, rationale, attention)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert weights.grad[0].abs().sum() > 0
    assert torch.equal(weights.grad[1:], torch.zeros(2, 4))


def test_rationale_attention_no_evidence_anywhere_returns_connected_zero():
    weights = torch.tensor([[0.5, 0.5, 0.0]], requires_grad=True)
    loss = rationale_attention_loss(weights, torch.zeros(1, 3), torch.tensor([[1, 1, 0]]))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(weights.grad, torch.zeros(1, 3))


def test_rationale_attention_zero_when_weights_equal_target_and_gradient_flows():
    target = torch.tensor([[0.0, 0.25, 0.75]])
    rationale = torch.tensor([[0.0, 1.0, 1.0]])
    # KL(q || q) with q = [0, 1/2, 1/2] is 0 up to eps
    perfect = rationale_attention_loss(torch.tensor([[0.0, 0.5, 0.5]]), rationale)
    assert perfect.item() == pytest.approx(0.0, abs=1e-6)
    weights = target.clone().requires_grad_(True)
    loss = rationale_attention_loss(weights, rationale)
    expected = 0.5 * (math.log(0.5) - math.log(0.25 + EPS)) + 0.5 * (math.log(0.5) - math.log(0.75 + EPS))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    # d/dw_t of -sum q_t log(w_t + eps) = -q_t / (w_t + eps)
    assert weights.grad[0, 1].item() == pytest.approx(-0.5 / 0.25, rel=1e-5)
    assert weights.grad[0, 2].item() == pytest.approx(-0.5 / 0.75, rel=1e-5)
    assert weights.grad[0, 0].item() == 0.0


def test_rationale_attention_bf16_gives_float32():
    w32 = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    r = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
    a = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    ref = rationale_attention_loss(w32, r, a)
    out = rationale_attention_loss(w32.bfloat16(), r.bfloat16(), a.bfloat16())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=2e-2, abs=1e-3)


def test_rationale_attention_wrong_shapes_raise():
    w = torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match=r"student_weights.*\(4,\)"):
        rationale_attention_loss(w[0], torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"rationale_mask.*\(2, 4\).*\(2, 5\)"):
        rationale_attention_loss(w, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"attention_mask.*\(2, 4\).*\(1, 4\)"):
        rationale_attention_loss(w, torch.ones(2, 4), torch.ones(1, 4))


# --------------------------------------------------------------------------- cls_attention


def _hand_attentions(requires_grad=False):
    """2 layers of [B=1, Hh=2, T=3, T=3]; only query row 0 ([CLS]) is used by cls_attention."""
    other = [0.9, 0.05, 0.05]  # rows 1 and 2: must be ignored
    layer0 = [
        [[0.5, 0.3, 0.2], other, other],  # head 0
        [[0.1, 0.1, 0.8], other, other],  # head 1
    ]
    layer1 = [[[0.2, 0.2, 0.6], other, other], [[0.4, 0.4, 0.2], other, other]]
    return (torch.tensor([layer0], requires_grad=requires_grad), torch.tensor([layer1], requires_grad=requires_grad))


def test_cls_attention_on_hand_built_tensor():
    attn = _hand_attentions()
    # default: last layer, all heads -> mean([.2,.2,.6], [.4,.4,.2]) = [.3,.3,.4]
    out = cls_attention(attn)
    assert out.shape == (1, 3) and out.dtype == torch.float32
    assert out[0].tolist() == pytest.approx([0.3, 0.3, 0.4], abs=1e-6)
    # padding on token 2: [.3, .3, 0] / .6
    out = cls_attention(attn, attention_mask=torch.tensor([[1, 1, 0]]))
    assert out[0].tolist() == pytest.approx([0.5, 0.5, 0.0], abs=1e-6)
    # both layers, head 0: mean([.5,.3,.2], [.2,.2,.6]) = [.35, .25, .4]
    out = cls_attention(attn, layers=(0, 1), heads=[0])
    assert out[0].tolist() == pytest.approx([0.35, 0.25, 0.4], abs=1e-6)
    # first layer, head 1, token 1 padded: [.1, 0, .8] / .9
    out = cls_attention(attn, layers=(0,), heads=[1], attention_mask=torch.tensor([[1.0, 0.0, 1.0]]))
    assert out[0].tolist() == pytest.approx([0.1 / 0.9, 0.0, 0.8 / 0.9], abs=1e-6)


def test_cls_attention_feeds_rationale_loss_with_gradients():
    attn = _hand_attentions(requires_grad=True)
    weights = cls_attention(attn, layers=(0, 1), attention_mask=torch.tensor([[1, 1, 1]]))
    # weights = mean of the 4 head rows = [.3, .25, .45]; evidence on token 2 only
    loss = rationale_attention_loss(weights, torch.tensor([[0.0, 0.0, 1.0]]))
    assert loss.item() == pytest.approx(-math.log(0.45 + EPS), rel=1e-5)
    loss.backward()
    for a in attn:
        assert a.grad is not None and a.grad[0, :, 0].abs().sum() > 0
        assert torch.equal(a.grad[0, :, 1:], torch.zeros(2, 2, 3))


def test_cls_attention_takes_cls_rows_alone():
    """Each layer's [CLS] row ``[B, Hh, T]`` gives what the full ``[B, Hh, T, T]`` maps give."""
    attn = _hand_attentions()
    mask = torch.tensor([[1, 1, 0]])
    rows = tuple(a[:, :, 0, :] for a in attn)
    for layers, heads in (((-1,), None), ((0, 1), [1])):
        assert torch.allclose(cls_attention(rows, layers, heads, mask), cls_attention(attn, layers, heads, mask))


def test_cls_attention_bad_inputs_raise():
    attn = _hand_attentions()
    with pytest.raises(ValueError, match="attentions"):
        cls_attention(())
    with pytest.raises(ValueError, match=r"attentions.*\(1, 2, 3, 4\)"):
        cls_attention((torch.zeros(1, 2, 3, 4),))
    with pytest.raises(ValueError, match=r"attentions.*\(1, 2\)"):
        cls_attention((torch.zeros(1, 2),))
    with pytest.raises(ValueError, match=r"attentions.*\(1, 2, 3, 3\).*\(1, 2, 4, 4\)"):
        cls_attention((attn[0], torch.zeros(1, 2, 4, 4)))
    with pytest.raises(ValueError, match="layers"):
        cls_attention(attn, layers=(2,))
    with pytest.raises(ValueError, match="heads"):
        cls_attention(attn, heads=[2])
    with pytest.raises(ValueError, match=r"attention_mask.*\(1, 3\).*\(1, 4\)"):
        cls_attention(attn, attention_mask=torch.ones(1, 4))


# --------------------------------------------------------------------------- rationale_embedding_loss


def test_rationale_embedding_identical_opposite_orthogonal():
    e = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    r = torch.tensor([[2.0, 4.0], [-1.0, -2.0], [-2.0, 1.0], [2.0, 1.0]])
    # cos = 1, -1, 0, (1*2 + 2*1) / (sqrt(5) sqrt(5)) = 4/5
    assert rationale_embedding_loss(e[:1], e[:1]).item() == pytest.approx(0.0, abs=1e-6)
    assert rationale_embedding_loss(e[:1], r[:1]).item() == pytest.approx(0.0, abs=1e-6)
    assert rationale_embedding_loss(e[1:2], r[1:2]).item() == pytest.approx(2.0, abs=1e-6)
    assert rationale_embedding_loss(e[2:3], r[2:3]).item() == pytest.approx(1.0, abs=1e-6)
    loss = rationale_embedding_loss(e, r)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx((0.0 + 2.0 + 1.0 + (1 - 4 / 5)) / 4, abs=1e-6)
    # mask keeps rows 1 and 3 only
    masked = rationale_embedding_loss(e, r, mask=torch.tensor([False, True, False, True]))
    assert masked.item() == pytest.approx((2.0 + 0.2) / 2, abs=1e-6)


def test_rationale_embedding_with_projection_matches_hand_value_and_trains_it():
    proj = RationaleProjection(rationale_dim=3, pair_dim=2)
    assert isinstance(proj.linear, torch.nn.Linear)
    assert proj.linear.in_features == 3 and proj.linear.out_features == 2
    with torch.no_grad():
        proj.linear.weight.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]))
        proj.linear.bias.zero_()
    e = torch.tensor([[3.0, 4.0]], requires_grad=True)
    r = torch.tensor([[1.0, 1.0, 1.0]])
    # P(r) = [1 + 1, 2] = [2, 2]; cos([3,4],[2,2]) = 14 / (5 * 2 sqrt 2)
    expected = 1 - 14 / (5 * 2 * math.sqrt(2))
    loss = rationale_embedding_loss(e, r, projection=proj)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert e.grad.abs().sum() > 0
    assert proj.linear.weight.grad is not None and proj.linear.weight.grad.abs().sum() > 0


def test_rationale_embedding_all_masked_returns_connected_zero():
    proj = RationaleProjection(3, 2)
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    r = torch.tensor([[float("nan")] * 3, [1.0, 2.0, 3.0]])
    loss = rationale_embedding_loss(e, r, projection=proj, mask=torch.tensor([False, False]))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(e.grad, torch.zeros(2, 2))
    assert proj.linear.weight.grad is not None
    assert torch.equal(proj.linear.weight.grad, torch.zeros(2, 3))


def test_rationale_embedding_bf16_gives_float32():
    e = torch.tensor([[1.0, 2.0, 0.5], [-1.0, 0.3, 2.0]])
    r = torch.tensor([[0.5, 1.0, 1.0], [1.0, 1.0, -1.0]])
    ref = rationale_embedding_loss(e, r)
    out = rationale_embedding_loss(e.bfloat16(), r.bfloat16())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=2e-2, abs=1e-3)
    # a float32 projection accepts bf16 rationale embeddings
    proj = RationaleProjection(3, 3)
    out = rationale_embedding_loss(e.bfloat16(), r.bfloat16(), projection=proj)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_rationale_embedding_wrong_shapes_raise():
    e, r = torch.ones(2, 4), torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"pair_embedding.*\(4,\)"):
        rationale_embedding_loss(e[0], r)
    with pytest.raises(ValueError, match=r"rationale_embedding.*\(2, 4\).*\(2, 6\)"):
        rationale_embedding_loss(e, torch.ones(2, 6))  # H2 != H without a projection
    with pytest.raises(ValueError, match=r"rationale_embedding.*\(3, 4\)"):
        rationale_embedding_loss(e, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"projection.*\(2, 4\).*\(2, 5\)"):
        rationale_embedding_loss(e, torch.ones(2, 6), projection=RationaleProjection(6, 5))
    with pytest.raises(ValueError, match=r"mask.*\(2,\).*\(4,\)"):
        rationale_embedding_loss(e, r, mask=torch.ones(4, dtype=torch.bool))


# --------------------------------------------------------------------------- package


def test_package_exports_and_no_lightning_import():
    # the losses are plain torch: usable (and tested) without a Trainer
    assert set(losses.__all__) == {
        "distribution_kd_loss",
        "dimension_kd_loss",
        "rationale_attention_loss",
        "cls_attention",
        "rationale_embedding_loss",
        "RationaleProjection",
    }
    for mod in (losses, kd, dimension_kd, rationale_attention, rationale_embedding):
        src = Path(mod.__file__).read_text()
        for banned in ("import lightning", "from lightning", "pytorch_lightning"):
            assert banned not in src, (mod.__name__, banned)


@pytest.mark.parametrize("mod", [kd, dimension_kd, rationale_attention, rationale_embedding])
def test_docstring_examples_run(mod):
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
