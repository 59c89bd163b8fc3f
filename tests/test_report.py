"""The demo report says when a student collapses onto one level, when the teacher is at chance, and which
direction is better for each metric; its plots are drawn from the predictions they name."""

from __future__ import annotations

import pytest

from ellm_mkd.commands.report import delta_table, level_shares, plots, teacher_note

LEVELS = ["irrelevant", "complement", "substitute", "exact"]


def truth_rows(labels):
    return {f"e{i}": {"example_id": f"e{i}", "label": lab} for i, lab in enumerate(labels)}


def one_hot(levels, k=4, p=0.7):
    rest = (1 - p) / (k - 1)
    return [[p if j == lv else rest for j in range(k)] for lv in levels]


def test_a_student_that_predicts_one_level_is_flagged_and_a_varied_one_is_not():
    labels = [0, 1, 2, 3] * 5
    truth = truth_rows(labels)
    ids = list(truth)
    runs = {
        "collapsed": {"predictions": {"example_id": ids, "probs": one_hot([0] * 20)}},
        "varied": {"predictions": {"example_id": ids, "probs": one_hot(labels)}},
    }
    table, warnings = level_shares(runs, truth, LEVELS)
    assert "| (true labels) | 0.25 | 0.25 | 0.25 | 0.25 | 20 |" in table
    assert "| collapsed | 1.00 | 0.00 | 0.00 | 0.00 | 20 |" in table
    assert len(warnings) == 1 and "collapsed has collapsed onto one level" in warnings[0]
    assert "`irrelevant` for 100%" in warnings[0]


def test_teacher_at_chance_and_below_the_baselines_is_said():
    notes = teacher_note({"auc": 0.51}, {"cross_encoder_baseline": {"auc": 0.62}, "cross_encoder_mkd": {"auc": 0.7}})
    assert any("ranks at chance" in n and "0.510" in n for n in notes)
    assert any("below the baseline student(s)" in n and "cross-encoder-baseline 0.620" in n for n in notes)
    above = teacher_note({"auc": 0.9}, {"cross_encoder_baseline": {"auc": 0.62}, "two_tower_baseline": {"auc": 0.8}})
    assert len(above) == 1 and "above every baseline student" in above[0] and "two-tower-baseline 0.800" in above[0]
    # above one baseline only: no such claim, the other is named
    mixed = teacher_note({"auc": 0.7}, {"cross_encoder_baseline": {"auc": 0.62}, "two_tower_baseline": {"auc": 0.8}})
    assert not any("above every" in n for n in mixed) and any("two-tower-baseline 0.800" in n for n in mixed)
    assert any("worse than chance" in n and "0.143" in n for n in teacher_note({"auc": 0.143}, {}))


def test_delta_table_says_better_or_worse_by_each_metrics_direction():
    base = {"auc": 0.70, "rmse": 1.00, "ece": 0.07, "macro_f1": 0.30}
    mkd = {"auc": 0.75, "rmse": 1.20, "ece": 0.05, "macro_f1": 0.10}
    row = delta_table({"ce_baseline": base, "ce_mkd": mkd}, ["ce"])[2]
    assert "0.750 vs 0.700 (+0.050, better)" in row  # AUC up: better
    assert "1.200 vs 1.000 (+0.200, worse)" in row  # RMSE up: worse
    assert "0.050 vs 0.070 (-0.020, better)" in row  # ECE down: better
    assert "0.100 vs 0.300 (-0.200, worse)" in row  # macro-F1 down: worse


def test_plots_name_what_they_draw(tmp_path):
    labels = [0, 1, 2, 3] * 10
    truth = truth_rows(labels)
    ids = list(truth)
    test = {"auc": 0.8, "ndcg10": 0.7, "count": 40, "tail/auc": 0.6, "tail/ndcg10": 0.5, "tail/count": 40}
    runs = {"model": {"predictions": {"example_id": ids, "probs": one_hot(labels)}, "test": test}}
    files = plots(tmp_path, runs, truth, rel=2)
    assert files == ["plots/pr_curves.png", "plots/calibration.png", "plots/buckets.png"]
    for f in files:
        assert (tmp_path / f).stat().st_size > 1000


@pytest.mark.parametrize("auc", [0.46, 0.5, 0.54])
def test_chance_band(auc):
    assert any("ranks at chance" in n for n in teacher_note({"auc": auc}, {}))
