"""Temperature scaling of the teacher's level distributions: the fit, and ``CachedTeacher(temperature=...)``."""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers import rule_signals, write_cache

from ellm_mkd.calibration import (
    apply_temperature,
    cross_fitted_ece,
    cross_validate_bias,
    fit_temperature,
    fit_temperature_and_bias,
    fit_temperature_bias,
    nll_and_ece,
)

ITEM_FIELDS = ["title", "brand", "color", "attributes"]


def test_fit_recovers_the_temperature_of_an_overconfident_model():
    g = torch.Generator().manual_seed(0)
    truth = torch.distributions.Dirichlet(torch.ones(4)).sample((20000,))  # calibrated distributions
    labels = torch.multinomial(truth, 1, generator=g)[:, 0]
    for true_t in (0.5, 2.0):  # overconfident (sharpened by 1/0.5) and underconfident
        seen = apply_temperature(truth, 1 / true_t)
        fit = fit_temperature(seen, labels)
        assert fit.temperature == pytest.approx(true_t, rel=0.05)
        assert fit.nll_after < fit.nll_before and fit.ece_after < fit.ece_before
        assert fit.ece_after < 0.02 and fit.pairs == 20000
        assert torch.equal(apply_temperature(seen, fit.temperature).argmax(-1), seen.argmax(-1))  # same levels
    already = fit_temperature(truth, labels)  # a calibrated model keeps T close to 1
    assert already.temperature == pytest.approx(1.0, abs=0.05)


def test_temperature_and_biases_recover_a_label_shift():
    """Logits of a model trained towards another level mix (a bias per level) and overconfident (1 / T): the fit
    recovers both, and its NLL is at most that of the best temperature alone and of any nearby (T, b)."""
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(20000, 4, generator=g, dtype=torch.float64) * 1.5  # calibrated logits
    labels = torch.multinomial(truth.softmax(-1), 1, generator=g)[:, 0]
    true_t, shift = 2.0, torch.tensor([-0.6, 0.1, 0.9, -0.4], dtype=torch.float64)  # the model's bias
    seen = (truth - shift) * true_t  # so truth = seen / T + shift; the fit's b is shift centred
    t, bias = fit_temperature_bias(seen, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    assert torch.allclose(bias.double(), shift - shift.mean(), atol=0.06) and abs(float(bias.sum())) < 1e-5

    def nll(tt: float, b: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(seen / tt + b, labels))

    best = nll(t, bias.double())
    t_only = fit_temperature(seen.softmax(-1), labels).temperature
    assert best < nll(t_only, torch.zeros(4, dtype=torch.float64)) - 0.01  # the biases carry the shift
    for dt, db in ((1.02, 0.0), (0.98, 0.0), (1.0, 0.05), (1.0, -0.05)):
        nudged = bias.double() + db * torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float64)
        assert best <= nll(t * dt, nudged) + 1e-9


def test_teacher_distributions_get_temperature_and_biases():
    """Level distributions of a teacher that says level 3 too seldom and is overconfident: the fit on them recovers
    both, the figures are those of softmax(log p / T + b), and it beats the temperature alone."""
    g = torch.Generator().manual_seed(1)
    truth = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    labels = torch.multinomial(truth.softmax(-1), 1, generator=g)[:, 0]
    shift = torch.tensor([0.3, 0.2, 0.1, -0.6], dtype=torch.float64)
    said = ((truth - shift) * 1.5).softmax(-1)  # log(said) / T + b = truth + const with T = 1.5, b = shift centred
    fit = fit_temperature_and_bias(said, labels)
    assert fit.temperature == pytest.approx(1.5, rel=0.05) and fit.pairs == 20000
    assert torch.allclose(torch.tensor(fit.bias, dtype=torch.float64), shift - shift.mean(), atol=0.05)
    after = apply_temperature(said, fit.temperature, fit.bias)
    by_hand = torch.softmax(said.log() / fit.temperature + torch.tensor(fit.bias, dtype=torch.float64), -1)
    assert torch.allclose(after, by_hand)
    nll = float(-after.log().gather(1, labels[:, None]).mean())
    assert fit.nll_after == pytest.approx(nll) and fit.nll_after < fit.nll_before
    assert fit.ece_after < 0.02 < fit.ece_before
    assert fit.nll_after < fit_temperature(said, labels).nll_after - 0.01
    assert "b=[+0.29" in fit.describe() and fit_temperature(said, labels).bias is None


def _cv_by_hand(probs, labels, groups, folds=5):
    """The rule cross_validate_bias documents: sorted queries, shuffled with seed 0, dealt round the folds."""
    import random

    names = sorted(set(groups))
    random.Random(0).shuffle(names)
    fold = torch.tensor([names.index(g) % folds for g in groups])
    total_t = total_b = 0.0
    for k in range(folds):
        a, h = fold != k, fold == k
        t = fit_temperature(probs[a], labels[a]).temperature
        tb = fit_temperature_and_bias(probs[a], labels[a])
        p_t, p_b = apply_temperature(probs[h], t), apply_temperature(probs[h], tb.temperature, tb.bias)
        total_t -= float(p_t.log().gather(1, labels[h][:, None]).sum())
        total_b -= float(p_b.log().gather(1, labels[h][:, None]).sum())
    return total_t / len(labels), total_b / len(labels)


def test_cross_validation_keeps_biases_only_where_they_generalise():
    """Biases are kept where every query shares the teacher's shift (they carry over to held-out queries), left out
    where each query has a level mix of its own (a bias fitted on some queries does not carry over); the held-out
    NLLs are those computed fold by fold by hand."""
    g = torch.Generator().manual_seed(2)
    n, queries = 2000, 40
    groups = [f"q{i % queries}" for i in range(n)]
    truth = torch.randn(n, 4, generator=g, dtype=torch.float64)
    shared = torch.tensor([0.3, 0.2, 0.1, -0.6], dtype=torch.float64)
    own = torch.randn(queries, 4, generator=g, dtype=torch.float64) * 1.5  # each query's own level mix
    for shift, keep in ((shared.expand(n, 4), True), (own[torch.arange(n) % queries], False)):
        labels = torch.multinomial(truth.softmax(-1), 1, generator=g)[:, 0]
        said = ((truth - shift) * 1.5).softmax(-1)
        cv = cross_validate_bias(said, labels, groups)
        assert cv["bias"] is keep and cv["folds"] == 5 and cv["groups"] == queries
        nll_t, nll_b = _cv_by_hand(said, labels, groups)
        assert cv["nll_temperature"] == pytest.approx(nll_t) and cv["nll_temperature_bias"] == pytest.approx(nll_b)
    with pytest.raises(ValueError, match="needs at least 5 queries, got 3"):
        cross_validate_bias(said[:30], labels[:30], [f"q{i % 3}" for i in range(30)])
    with pytest.raises(ValueError, match="groups has 2 entries, labels 30"):
        cross_validate_bias(said[:30], labels[:30], ["a", "b"])


def test_cross_fitted_ece_calibrates_each_query_on_the_others():
    """Each fold's pairs are calibrated by the fit on the other folds' queries (by hand, the fold rule of
    cross_validate_bias), the ECE taken over all of them; an overconfident model's cross-fitted ECE falls well below
    its raw ECE; a model whose queries each have a level mix of their own keeps a larger ECE cross-fitted than
    after a fit on the same pairs (what the validation split's own calibrated ECE would flatter)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    g = torch.Generator().manual_seed(3)
    n, queries = 1200, 24
    groups = [i % queries for i in range(n)]
    truth = torch.randn(n, 4, generator=g, dtype=torch.float64) * 2
    labels = torch.multinomial(truth.softmax(-1), 1, generator=g)[:, 0]
    logits = truth * 3.0  # overconfident
    raw = float(multiclass_calibration_error(logits.softmax(-1).float(), labels, num_classes=4, n_bins=15, norm="l1"))
    for bias in (False, True):
        names = sorted(set(groups))
        random.Random(0).shuffle(names)
        fold = torch.tensor([names.index(q) % 2 for q in groups])
        probs = torch.empty_like(logits)
        for k in range(2):
            a, h = fold != k, fold == k
            if bias:
                t, b = fit_temperature_bias(logits[a], labels[a])
                probs[h] = (logits[h] / t + b.double()).softmax(-1)
            else:
                t = fit_temperature(logits[a].softmax(-1), labels[a]).temperature
                probs[h] = (logits[h] / t).softmax(-1)
        hand = float(multiclass_calibration_error(probs.float(), labels, num_classes=4, n_bins=15, norm="l1"))
        ece = cross_fitted_ece(logits, labels, groups, bias=bias)
        assert ece == pytest.approx(hand, abs=1e-6) and ece < raw / 3
    few = [q % 3 for q in groups]  # three queries, each with a level mix of its own
    shifted = truth - (torch.randn(3, 4, generator=g, dtype=torch.float64) * 2)[torch.tensor(few)]
    t, b = fit_temperature_bias(shifted, labels)
    in_sample = float(
        multiclass_calibration_error((shifted / t + b).softmax(-1).float(), labels, num_classes=4, n_bins=15)
    )
    assert cross_fitted_ece(shifted, labels, few, bias=True) > in_sample + 0.02
    with pytest.raises(ValueError, match="needs at least 2 queries, got 1"):
        cross_fitted_ece(logits[:10], labels[:10], [0] * 10)
    with pytest.raises(ValueError, match="groups has 2 entries, labels 10"):
        cross_fitted_ece(logits[:10], labels[:10], [0, 1])


def test_nll_and_ece_by_hand():
    probs = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.2, 0.7, 0.1, 0.0], [0.25, 0.25, 0.4, 0.1]])
    labels = torch.tensor([0, 2, 2])
    nll, ece = nll_and_ece(probs, labels)
    assert nll == pytest.approx(-(math.log(0.9) + math.log(0.1) + math.log(0.4)) / 3)
    # top-label confidences 0.9 (right), 0.7 (wrong), 0.4 (right), each alone in its bin of 15
    assert ece == pytest.approx((abs(0.9 - 1) + abs(0.7 - 0) + abs(0.4 - 1)) / 3, abs=1e-6)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        apply_temperature(torch.tensor([[0.5, 0.5]]), 0.0)
    with pytest.raises(ValueError, match="no labelled pairs"):
        fit_temperature(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="level indexes"):
        fit_temperature(torch.full((2, 4), 0.25), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="no labelled pairs"):
        fit_temperature_bias(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="level indexes"):
        fit_temperature_bias(torch.zeros((2, 4)), torch.tensor([0, 4]))


def _dm(synth_dir, **kw):
    from datamodules.datamodule import RelevanceDataModule

    return RelevanceDataModule({"path": str(synth_dir)}, item_fields=ITEM_FIELDS, **kw)


def test_cached_teacher_fits_on_validation_and_rescales_every_row(synth_dir, tmp_path):
    from datamodules.teacher_signal import CachedTeacher

    dm = _dm(synth_dir)
    dm.setup("fit")
    sigs = rule_signals(dm, splits=("train", "val"))
    labels = {r["example_id"]: r["label"] for r in dm.datasets["val"].rows}
    # validation readouts about 99% sure of a level that is right for 2 pairs in 3: the fit must soften them (T > 1)
    for i, s in enumerate(sigs):
        if s.example_id in labels:
            said = labels[s.example_id] if i % 3 else (labels[s.example_id] + 1) % 4
            s.level_probs = (torch.eye(4)[said] * 0.96 + 0.01).tolist()
    write_cache(tmp_path / "c", dm, sigs)
    cached = {s.example_id: s.level_probs for s in sigs}

    teacher = CachedTeacher(str(tmp_path / "c"), temperature="fit")
    _dm(synth_dir, teacher=teacher).setup("fit")
    fit = teacher.calibration
    assert fit.pairs == sum(v is not None for v in labels.values()) and fit.temperature > 1.0
    assert fit.nll_after < fit.nll_before
    train_ids = [r["example_id"] for r in dm.datasets["train"].rows]
    got = torch.tensor([teacher.signals([{"example_id": i}])[0].level_probs for i in train_ids])
    want = apply_temperature(torch.tensor([cached[i] for i in train_ids], dtype=torch.float64), fit.temperature)
    assert torch.allclose(got, want.float(), atol=1e-6)

    fixed = CachedTeacher(str(tmp_path / "c"), temperature=2.0)
    _dm(synth_dir, teacher=fixed).setup("fit")
    first = train_ids[0]
    expect = apply_temperature(torch.tensor([cached[first]], dtype=torch.float64), 2.0)[0]
    assert torch.allclose(torch.tensor(fixed.signals([{"example_id": first}])[0].level_probs), expect.float())

    write_cache(tmp_path / "train_only", dm, [s for s in sigs if s.example_id not in labels])
    with pytest.raises(ValueError, match=r"temperature: fit needs .* validation pairs in the cache, found 0"):
        _dm(synth_dir, teacher=CachedTeacher(str(tmp_path / "train_only"), temperature="fit")).setup("fit")
    with pytest.raises(ValueError, match="temperature must be a number > 0 or 'fit'"):
        CachedTeacher(str(tmp_path / "c"), temperature=-1.0)


def test_cached_teacher_fits_level_biases_with_the_temperature(synth_dir, tmp_path):
    from datamodules.teacher_signal import CachedTeacher

    dm = _dm(synth_dir)
    dm.setup("fit")
    sigs = rule_signals(dm, splits=("train", "val"))
    labels = {r["example_id"]: r["label"] for r in dm.datasets["val"].rows}
    # validation readouts that put the right level at 0.5 and 0.4 on the level below it (on level 3 for level 0):
    # the biases move probability back where the labels are, which no temperature can
    for s in sigs:
        if s.example_id in labels:
            y = labels[s.example_id]
            s.level_probs = (torch.eye(4)[y] * 0.4 + torch.eye(4)[(y - 1) % 4] * 0.3 + 0.075).tolist()
    write_cache(tmp_path / "c", dm, sigs)
    cached = {s.example_id: s.level_probs for s in sigs}

    teacher = CachedTeacher(str(tmp_path / "c"), temperature="fit", level_bias="fit")
    _dm(synth_dir, teacher=teacher).setup("fit")
    fit = teacher.calibration
    assert fit.bias is not None and len(fit.bias) == 4 and fit.nll_after < fit.nll_before
    t_only = CachedTeacher(str(tmp_path / "c"), temperature="fit")
    _dm(synth_dir, teacher=t_only).setup("fit")
    assert fit.nll_after < t_only.calibration.nll_after
    train_ids = [r["example_id"] for r in dm.datasets["train"].rows]
    got = torch.tensor([teacher.signals([{"example_id": i}])[0].level_probs for i in train_ids])
    probs = torch.tensor([cached[i] for i in train_ids], dtype=torch.float64)
    assert torch.allclose(got, apply_temperature(probs, fit.temperature, fit.bias).float(), atol=1e-6)

    fixed = CachedTeacher(str(tmp_path / "c"), temperature=2.0, level_bias=[0.0, 0.0, 0.0, 1.0])
    _dm(synth_dir, teacher=fixed).setup("fit")
    first = train_ids[0]
    expect = torch.softmax(torch.tensor(cached[first], dtype=torch.float64).log() / 2 + torch.eye(4)[3], -1)
    assert torch.allclose(torch.tensor(fixed.signals([{"example_id": first}])[0].level_probs), expect.float())

    # auto: the biases only where cross-validation over the validation queries keeps them
    auto = CachedTeacher(str(tmp_path / "c"), temperature="fit", level_bias="auto")
    _dm(synth_dir, teacher=auto).setup("fit")
    val = [r for r in dm.datasets["val"].rows if r["example_id"] in cached]
    cv = cross_validate_bias(
        torch.tensor([cached[r["example_id"]] for r in val]),
        torch.tensor([r["label"] for r in val]),
        [r["query"] for r in val],
    )
    assert auto.calibration.cv == cv and cv["bias"] is True  # the shift is every validation query's here
    assert auto.calibration.bias == pytest.approx(fit.bias) and "biases kept by 5-fold" in auto.calibration.describe()

    with pytest.raises(ValueError, match="level_bias has 3 values, the data has 4 levels"):
        _dm(synth_dir, teacher=CachedTeacher(str(tmp_path / "c"), level_bias=[0.0, 0.0, 1.0])).setup("fit")
    # a cache that read the validation pairs of 4 queries only: too few for 5 folds, the error names the cache
    query_of = {r["example_id"]: r["query"] for r in dm.datasets["val"].rows}
    four = sorted(set(query_of.values()))[:4]
    few = [s for s in sigs if query_of.get(s.example_id, four[0]) in four]
    write_cache(tmp_path / "few", dm, few)
    with pytest.raises(ValueError, match=r"few: level_bias: auto .* needs at least 5 queries, got 4"):
        _dm(synth_dir, teacher=CachedTeacher(str(tmp_path / "few"), temperature="fit", level_bias="auto")).setup("fit")
    for t, b in ((1.0, "fit"), (1.0, "auto"), ("fit", [0.0, 0.0, 0.0, 1.0])):
        with pytest.raises(ValueError, match="level_bias: fit and auto are fitted with the temperature"):
            CachedTeacher(str(tmp_path / "c"), temperature=t, level_bias=b)
