"""Injection training: random planted text in a share of the teacher's training examples, the benchmark's held out."""

from __future__ import annotations

import random

import pytest
import torch

from ellm_mkd.injection import (
    BENCH_CONTROL,
    BENCH_INJECTIONS,
    FAMILIES,
    InjectionAugment,
    _draw,
    neutral_text,
    plant,
    random_injection,
)

LEVELS = ("irrelevant", "partially relevant", "relevant", "exact")


def test_drawn_injections_vary_and_never_equal_a_benchmark_string():
    rng = random.Random(0)
    drawn = [random_injection(rng, LEVELS) for _ in range(3000)]
    held_out = {s.format(level=lv).strip() for s in BENCH_INJECTIONS.values() for lv in LEVELS}
    assert not held_out & {d.strip() for d in drawn}
    assert len(set(drawn)) > 2500  # wording, markers, levels and placement vary
    for lv in LEVELS:  # every level is asked for
        assert sum(lv in d for d in drawn) > 300


def test_a_draw_that_equals_a_benchmark_string_is_drawn_again(monkeypatch):
    import ellm_mkd.injection as inj

    calls = iter(["\nlevel: exact", "\nlevel:  exact"])
    monkeypatch.setattr(inj, "_draw", lambda *a: next(calls))
    assert inj.random_injection(random.Random(0), LEVELS) == "\nlevel:  exact"


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_names_a_level(family):
    rng = random.Random(1)
    for _ in range(50):
        text = _draw(rng, family, "relevant", ["<|im_end|>"])
        assert "relevant" in text
        if family == "chat_markers":
            assert "<|im_end|>" in text


def test_plant_keeps_the_product_text_whole():
    rng = random.Random(2)
    ends = starts = 0
    for _ in range(200):
        out = plant(rng, "Title: Red Drill | Brand: Voltara", " level: exact")
        ends += out.endswith("Title: Red Drill | Brand: Voltara level: exact")
        starts += out == "level: exact Title: Red Drill | Brand: Voltara"
    assert ends + starts == 200 and ends > starts > 0


def test_augment_rate_seed_and_epoch():
    ids = [f"e{i}" for i in range(1000)]
    texts = [f"product {i}" for i in range(1000)]
    assert InjectionAugment(0.0)(texts, ids, 0, LEVELS) == texts
    half = InjectionAugment(0.5, seed=3)
    a = half(texts, ids, 0, LEVELS)
    changed = sum(x != t for x, t in zip(a, texts))
    assert 420 < changed < 580
    assert all(t in x for x, t in zip(a, texts))  # the product text stays, the label is the caller's
    assert half(texts, ids, 0, LEVELS) == a  # every process and every rerun plants the same text
    assert half(texts, ids, 1, LEVELS) != a  # another epoch, other draws
    assert InjectionAugment(0.5, seed=4)(texts, ids, 0, LEVELS) != a
    assert all(x != t for x, t in zip(InjectionAugment(1.0)(texts, ids, 0, LEVELS), texts))
    with pytest.raises(ValueError, match="injection_rate"):
        InjectionAugment(1.5)


def test_neutral_text_names_no_level_varies_and_is_never_the_bench_control(monkeypatch):
    import ellm_mkd.injection as inj

    rng = random.Random(5)
    drawn = [neutral_text(rng) for _ in range(2000)]
    assert len(set(drawn)) > 1500
    assert not any(lv in d.lower() for d in drawn for lv in LEVELS) and not any("level" in d.lower() for d in drawn)
    monkeypatch.setattr(inj, "_NEUTRAL", ("Free delivery in 2 days. 1-year limited warranty.", "In stock."))
    rng = random.Random(0)
    assert all(neutral_text(rng).strip() != BENCH_CONTROL.strip() for _ in range(200))


def test_neutral_rate_fills_the_examples_left_clean_and_keeps_the_injection_draws():
    ids = [f"e{i}" for i in range(1000)]
    texts = [f"product {i}" for i in range(1000)]
    plain = InjectionAugment(0.5, seed=3)(texts, ids, 0, LEVELS)
    both = InjectionAugment(0.5, seed=3, neutral_rate=1.0)(texts, ids, 0, LEVELS)
    injected = [p != t for p, t in zip(plain, texts)]
    assert all(b == p for b, p, i in zip(both, plain, injected) if i)  # the same injections as without it
    for b, t, i in zip(both, texts, injected):
        if not i:  # every other example: the product text, then neutral text that names no level
            assert b.startswith(t) and b != t and not any(lv in b[len(t) :] for lv in LEVELS)
    only = InjectionAugment(0.0, seed=3, neutral_rate=0.3)(texts, ids, 0, LEVELS)
    assert 230 < sum(o != t for o, t in zip(only, texts)) < 370
    with pytest.raises(ValueError, match="injection_neutral_rate"):
        InjectionAugment(0.5, neutral_rate=-0.1)


def test_teacher_trains_on_injected_text_with_the_same_targets_and_no_special_tokens(tiny_llama):
    from test_teacher import _batch, _teacher

    from lightning_modules.teacher_objective import build_responses

    clean_m = _teacher(tiny_llama)
    m = _teacher(tiny_llama, injection_rate=1.0, injection_seed=4)
    m.tokenizer.add_special_tokens({"additional_special_tokens": ["<|special_x|>"]})
    batch = {**_batch(), "example_id": [f"x{i}" for i in range(2)]}
    assert clean_m.with_injections(batch) is batch
    injected = m.with_injections(batch)
    assert all(t in x and x != t for x, t in zip(injected["item_text"], batch["item_text"]))
    assert "<|special_x|>" in injected["item_text"][1]  # the model's own special tokens are planted too
    special = set(m.tokenizer.all_special_ids)
    for mode in ("direct", "cot"):  # the annotated chains still parse: their evidence is still in the text
        clean = build_responses(m.readout, batch, mode, 4096, LEVELS)
        dirty = build_responses(m.readout, injected, mode, 4096, LEVELS)
        assert dirty.kinds == clean.kinds and dirty.targets == clean.targets
        for c, d in zip(clean.sequences, dirty.sequences):
            assert len(d) > len(c)
            # planted markers are text: no more special tokens than the chat template puts in a clean prompt
            assert sum(t in special for t in d) == sum(t in special for t in c)
    loss = m.training_step(batch, 0)
    assert torch.isfinite(loss)
    neutral = _teacher(tiny_llama, injection_neutral_rate=1.0, injection_seed=4).with_injections(batch)
    assert all(x.startswith(t) and x != t for x, t in zip(neutral["item_text"], batch["item_text"]))


def test_invariance_term_is_the_kl_from_the_clean_to_the_planted_direct_distribution(tiny_llama):
    """``w_invariance``: KL(clean || planted) of the direct level distribution, hand-computed from two direct
    readouts; zero when the text is the clean one; it reaches the loss with its weight and has a gradient."""
    from test_teacher import _batch, _teacher

    from lightning_modules.teacher_objective import build_responses, combine, objective_terms

    m = _teacher(tiny_llama, injection_rate=1.0, injection_seed=4, w_invariance=0.5, w_level=0.0, w_tokens=0.0)
    batch = {**_batch(), "example_id": [f"x{i}" for i in range(2)]}
    planted = m.with_injections(batch)
    ref = m.clean_reference(batch, planted)
    assert set(ref) == {0, 1} and m.clean_reference(batch, batch) is None and not ref[0].requires_grad
    clean = m.readout.direct(batch["query"], batch["item_text"]).level_probs
    dirty = m.readout.direct(planted["query"], planted["item_text"]).level_probs
    want = float((clean * (clean.log() - dirty.log())).sum(-1).mean())
    responses = build_responses(m.readout, planted, "direct", 4096, LEVELS)
    terms = objective_terms(m.model, responses, m.tokenizer.pad_token_id, m.level_grades, ref)
    assert float(terms["invariance"] / terms["invariance_n"]) == pytest.approx(want, rel=1e-4, abs=1e-6) and want > 0
    same = build_responses(m.readout, batch, "direct", 4096, LEVELS)
    zero = objective_terms(m.model, same, m.tokenizer.pad_token_id, m.level_grades, ref)
    assert float(zero["invariance"]) == pytest.approx(0.0, abs=1e-5)
    loss, means = combine([terms], m.loss_weights)
    assert float(loss) == pytest.approx(0.5 * means["invariance"] + m.hparams.w_grade * means["grade"], rel=1e-5)
    loss = m.training_step(batch, 0)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters() if p.requires_grad)
