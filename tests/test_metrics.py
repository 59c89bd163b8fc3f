"""RelevanceMetrics against sklearn/scipy/hand-computed references, buckets, masking, figures."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import accuracy_score, f1_score, ndcg_score, precision_score, recall_score, roc_auc_score

from ellm_mkd.metrics import RelevanceMetrics, format_table
from ellm_mkd.schema import BUCKETS

K = 4
LEVELS = ("irrelevant", "partial", "relevant", "exact")
REL = 2  # levels >= 2 are "relevant"


def make_batch(seed: int = 0, n: int = 72) -> dict[str, torch.Tensor]:
    """Fixed synthetic rows: 8 queries (query 0 has > 10 rows, query 7 only zero gains), 3 buckets."""
    g = torch.Generator().manual_seed(seed)
    query_ids = torch.cat([torch.zeros(14, dtype=torch.long), torch.randint(1, 8, (n - 14,), generator=g)])
    labels = torch.randint(0, K, (n,), generator=g)
    labels[query_ids == 7] = 0  # a query without any positive gain
    labels[:4] = torch.tensor([0, 1, 2, 3])  # every level present
    probs = (torch.randn(n, K, generator=g) * 1.5 + 0.8 * torch.nn.functional.one_hot(labels, K)).softmax(-1)
    expected = (probs * torch.arange(K, dtype=torch.float32)).sum(-1)
    expected[query_ids == 3] = expected[query_ids == 3].round()  # ties inside a query
    grades = labels.float() + torch.rand(n, generator=g) * 0.6 - 0.3
    gains = (2.0 ** labels.float()) - 1.0  # graded, non-binary gains
    bucket_ids = query_ids % 3  # head/torso/tail; "unseen" is empty
    return dict(
        probs=probs,
        expected_grade=expected,
        labels=labels,
        grades=grades,
        gains=gains,
        query_ids=query_ids,
        bucket_ids=bucket_ids,
    )


def subset(batch: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[mask] for k, v in batch.items()}


def concat(*batches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def run(*batches: dict[str, torch.Tensor], **kw) -> dict[str, float]:
    m = RelevanceMetrics(K, LEVELS, REL, **kw)
    for b in batches:
        m.update(**b)
    return m.compute()


def ndcg_reference(batch, k: int = 10, skip_empty: bool = True) -> float:
    scores = []
    for q in batch["query_ids"].unique():
        sel = batch["query_ids"] == q
        gains = batch["gains"][sel].numpy()[None]
        preds = batch["expected_grade"][sel].numpy()[None]
        if skip_empty and gains.sum() == 0:
            continue
        if gains.shape[1] == 1:  # sklearn refuses a single document; nDCG of one document is 1 (or 0 if no gain)
            scores.append(1.0 if gains.sum() > 0 else 0.0)
        else:
            scores.append(ndcg_score(gains, preds, k=k))
    return float(np.mean(scores))


def reference(batch) -> dict[str, float]:
    probs, labels = batch["probs"].numpy(), batch["labels"].numpy()
    expected, grades = batch["expected_grade"].numpy(), batch["grades"].numpy()
    pred = probs.argmax(1)
    out = {
        "count": float(len(labels)),
        "rmse": float(np.sqrt(np.mean((expected - grades) ** 2))),
        "spearman": float(spearmanr(expected, grades).statistic),
        "ndcg10": ndcg_reference(batch),
        "macro_f1": float(f1_score(labels, pred, average="macro")),
        "accuracy": float(accuracy_score(labels, pred)),
    }
    binary = labels >= REL
    if 0 < binary.sum() < len(binary):
        out["auc"] = float(roc_auc_score(binary, probs[:, REL:].sum(1)))
    prec = precision_score(labels, pred, labels=range(K), average=None, zero_division=0)
    rec = recall_score(labels, pred, labels=range(K), average=None, zero_division=0)
    for i, name in enumerate(LEVELS):
        out[f"precision/{name}"] = float(prec[i])
        if (labels == i).any():
            out[f"recall/{name}"] = float(rec[i])
    out["irrelevant_precision"] = out["precision/irrelevant"]
    if "recall/irrelevant" in out:
        out["irrelevant_recall"] = out["recall/irrelevant"]
    return out


def assert_close(got: dict[str, float], want: dict[str, float], prefix: str = "", tol: float = 1e-5) -> None:
    for key, value in want.items():
        assert prefix + key in got, f"missing {prefix + key}"
        g = got[prefix + key]
        if math.isnan(value):
            assert math.isnan(g), (prefix + key, g)
        else:
            assert g == pytest.approx(value, abs=tol), (prefix + key, g, value)


def bare(results: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in results.items() if not any(k.startswith(f"{b}/") for b in BUCKETS)}


# --------------------------------------------------------------------------------------------------
def test_overall_matches_sklearn_scipy():
    batch = make_batch()
    got = run(batch)
    assert_close(got, reference(batch))
    expected_keys = {
        "count",
        "rmse",
        "spearman",
        "auc",
        "ndcg10",
        "accuracy",
        "macro_f1",
        "ece",
        "irrelevant_precision",
        "irrelevant_recall",
        *(f"precision/{n}" for n in LEVELS),
        *(f"recall/{n}" for n in LEVELS),
    }
    assert set(bare(got)) == expected_keys
    assert all(isinstance(v, float) for v in got.values())


def test_ndcg_graded_gains_and_empty_queries():
    batch = make_batch()
    assert (batch["gains"][batch["query_ids"] == 7] == 0).all()  # there is a query without gain
    assert len(set(batch["gains"].tolist())) > 2  # gains are graded floats, not binary
    # default "skip": queries without a positive gain are left out of the mean
    assert run(batch)["ndcg10"] == pytest.approx(ndcg_reference(batch, skip_empty=True), abs=1e-5)
    # "neg": they count as 0, i.e. the plain mean of sklearn's per-query ndcg_score
    neg = run(batch, ndcg_empty_target_action="neg")["ndcg10"]
    assert neg == pytest.approx(ndcg_reference(batch, skip_empty=False), abs=1e-5)
    assert neg < run(batch)["ndcg10"]
    # the cut-off names the key
    got = run(batch, ndcg_k=3)
    assert "ndcg10" not in got and got["ndcg3"] == pytest.approx(ndcg_reference(batch, k=3), abs=1e-5)


def test_ndcg_omitted_when_no_query_has_gain():
    batch = make_batch()
    batch["gains"] = torch.zeros_like(batch["gains"])
    assert "ndcg10" not in run(batch)
    assert run(batch, ndcg_empty_target_action="neg")["ndcg10"] == 0.0


def test_ece_hand_computed():
    # top-label confidences 0.9 (right), 0.8 (wrong), 0.65 (right), 0.55 (right); 5 bins of width 0.2:
    # [0.8, 1): acc 0.5, conf 0.85 -> 0.5 * 0.35;  [0.6, 0.8): 0.25 * |1 - 0.65|;  [0.4, 0.6): 0.25 * |1 - 0.55|
    probs = torch.tensor([[0.9, 0.05, 0.05, 0.0], [0.1, 0.8, 0.1, 0.0], [0.2, 0.15, 0.65, 0.0], [0.3, 0.55, 0.15, 0.0]])
    labels = torch.tensor([0, 2, 2, 1])
    batch = dict(
        probs=probs,
        expected_grade=torch.tensor([0.15, 1.0, 1.45, 0.85]),
        labels=labels,
        grades=labels.float(),
        gains=labels.float(),
        query_ids=torch.zeros(4, dtype=torch.long),
        bucket_ids=torch.zeros(4, dtype=torch.long),
    )
    got = run(batch, calibration_bins=5)
    assert got["ece"] == pytest.approx(0.5 * 0.35 + 0.25 * 0.35 + 0.25 * 0.45, abs=1e-6)
    assert got["accuracy"] == pytest.approx(0.75)


def test_per_level_precision_recall_hand_computed():
    # argmax: 0, 0, 1, 2, 2, 2 ; labels: 0, 1, 1, 2, 2, 0 ; level 3 never true nor predicted
    preds = torch.tensor([0, 0, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    probs = torch.nn.functional.one_hot(preds, K).float() * 0.7 + 0.075
    batch = dict(
        probs=probs,
        expected_grade=preds.float(),
        labels=labels,
        grades=labels.float(),
        gains=labels.float(),
        query_ids=torch.arange(6),
        bucket_ids=torch.zeros(6, dtype=torch.long),
    )
    got = run(batch)
    assert got["precision/irrelevant"] == pytest.approx(1 / 2) and got["recall/irrelevant"] == pytest.approx(1 / 2)
    assert got["precision/partial"] == pytest.approx(1.0) and got["recall/partial"] == pytest.approx(1 / 2)
    assert got["precision/relevant"] == pytest.approx(2 / 3) and got["recall/relevant"] == pytest.approx(1.0)
    assert got["precision/exact"] == 0.0 and "recall/exact" not in got  # never true: recall undefined
    assert got["irrelevant_precision"] == got["precision/irrelevant"]
    assert got["irrelevant_recall"] == got["recall/irrelevant"]
    # macro F1 over the levels present (sklearn's default), not over all K
    assert got["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))


def test_buckets_equal_metrics_on_the_subset():
    batch = make_batch()
    got = run(batch)
    for b, name in enumerate(BUCKETS):
        mask = batch["bucket_ids"] == b
        if not mask.any():
            assert not any(k.startswith(f"{name}/") for k in got)  # empty bucket: absent
            continue
        alone = run(subset(batch, mask))
        assert set(bare(alone)) == {k[len(name) + 1 :] for k in got if k.startswith(f"{name}/")}
        assert_close(got, bare(alone), prefix=f"{name}/", tol=1e-6)
        assert_close(got, reference(subset(batch, mask)), prefix=f"{name}/")


def test_unlabelled_rows_are_ignored():
    batch = make_batch()
    noise = make_batch(seed=1, n=30)
    noise["labels"][:] = -100
    noise["grades"][:] = float("nan")
    noise["gains"][:] = float("nan")
    mixed = concat(batch, noise)
    perm = torch.randperm(len(mixed["labels"]), generator=torch.Generator().manual_seed(3))
    mixed = {k: v[perm] for k, v in mixed.items()}
    assert_close(run(mixed), run(batch), tol=1e-6)
    assert set(run(mixed)) == set(run(batch))
    # a batch of unlabelled rows only changes nothing
    assert_close(run(batch, noise), run(batch), tol=1e-6)


def test_several_updates_equal_one():
    batch = make_batch()
    cuts = [0, 5, 23, 24, 50, 72]
    parts = [{k: v[a:b] for k, v in batch.items()} for a, b in zip(cuts, cuts[1:])]
    assert parts[2]["labels"].numel() == 1  # a one-row batch, missing most buckets
    once, many = run(batch), run(*parts)
    assert set(once) == set(many)
    assert_close(many, once, tol=1e-6)


def test_nan_grades_only_leave_grade_metrics():
    batch = make_batch()
    holey = {k: v.clone() for k, v in batch.items()}
    holey["grades"][::5] = float("nan")
    keep = torch.isfinite(holey["grades"])
    got = run(holey)
    assert got["count"] == len(batch["labels"])
    assert got["rmse"] == pytest.approx(run(subset(batch, keep))["rmse"], abs=1e-6)
    assert got["auc"] == pytest.approx(run(batch)["auc"], abs=1e-6)


def test_degenerate_cases_do_not_crash_or_warn():
    batch = make_batch()
    # bucket 0 (head) only irrelevant rows; bucket 1 (torso) constant grades
    head = batch["bucket_ids"] == 0
    batch["labels"][head] = 0
    batch["gains"][head] = 0.0
    torso = batch["bucket_ids"] == 1
    batch["grades"][torso] = 2.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = RelevanceMetrics(K, LEVELS, REL)
        assert m.compute() == {}  # nothing seen yet: no keys, no "compute before update" warning
        m.update(**batch)
        got = m.compute()
    assert not caught, [str(w.message) for w in caught]
    assert "head/auc" not in got and "head/count" in got  # single class: AUC omitted
    assert "head/ndcg10" not in got  # no query with a positive gain
    assert "recall/exact" in got and "head/recall/exact" not in got
    assert math.isnan(got["torso/spearman"]) and math.isfinite(got["torso/rmse"])
    assert not any(k.startswith("unseen/") for k in got)
    assert "auc" in got and math.isfinite(got["spearman"])


def test_reset_and_empty_batches():
    m = RelevanceMetrics(K, LEVELS, REL)
    batch = make_batch()
    m.update(**batch)
    assert m.compute()["count"] == len(batch["labels"])
    m.reset()
    assert m.compute() == {}
    m.update(**subset(batch, torch.zeros(len(batch["labels"]), dtype=torch.bool)))
    assert m.compute() == {}
    m.update(**batch)
    assert_close(m.compute(), run(batch), tol=1e-6)


def test_input_validation():
    with pytest.raises(ValueError):
        RelevanceMetrics(K, LEVELS[:3], REL)
    with pytest.raises(ValueError):
        RelevanceMetrics(K, LEVELS, 0)
    m = RelevanceMetrics(K, LEVELS, REL)
    batch = make_batch()
    with pytest.raises(ValueError):
        m.update(**{**batch, "probs": batch["probs"][:, :3]})
    with pytest.raises(ValueError):
        m.update(**{**batch, "labels": batch["labels"] + 4})


def test_metrics_are_registered_and_states_ddp_ready():
    from torchmetrics import Metric

    m = RelevanceMetrics(K, LEVELS, REL)
    metrics = [mod for mod in m.modules() if isinstance(mod, Metric)]
    assert len(metrics) >= 5 * 10  # every metric of every slice is a submodule (moves with .to(device))
    batch = make_batch()
    cuts = [0, 10, 40, 72]
    for a, b in zip(cuts, cuts[1:]):
        m.update(**{k: v[a:b] for k, v in batch.items()})
    m.compute()
    # before a sync, every list state is one tensor of its own dtype, even for a slice this process never saw
    for name in ("all", "unseen"):
        sl = m.slices[name]
        for metric in (sl.auc, sl.ndcg, sl.spearman, sl.classification["ece"]):
            m._consolidate_list_states(sl)
            for attr, default in metric._defaults.items():
                if isinstance(default, list):
                    assert len(getattr(metric, attr)) == 1
        assert sl.auc.target[0].dtype == torch.long and sl.ndcg.indexes[0].dtype == torch.long
    assert m.slices["unseen"].auc.target[0].numel() == 0


def test_pr_curve_data():
    batch = make_batch()
    m = RelevanceMetrics(K, LEVELS, REL)
    m.update(**batch)
    target, scores = m.pr_curve_data()
    assert target.dtype == torch.long and target.shape == scores.shape == batch["labels"].shape
    assert torch.equal(target, (batch["labels"] >= REL).long())
    assert torch.allclose(scores, batch["probs"][:, REL:].sum(-1))
    assert roc_auc_score(target.numpy(), scores.numpy()) == pytest.approx(m.compute()["auc"], abs=1e-6)


def test_figures():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    m = RelevanceMetrics(K, LEVELS, REL)
    m.update(**make_batch())
    figs = m.figures()
    assert set(figs) == {"confusion_matrix", "reliability_diagram", "pr_curve"}
    for name, fig in figs.items():
        assert isinstance(fig, Figure), name
        ax = fig.axes[0]
        assert ax.get_title(), name
        assert fig.axes[-1].get_xlabel() and ax.get_ylabel(), name
        fig.canvas.draw()  # renders headless
    assert figs["confusion_matrix"].axes[0].get_xticklabels()[0].get_text() == LEVELS[0]
    m.reset()
    assert set(m.figures()) == {"confusion_matrix", "reliability_diagram", "pr_curve"}  # no data: still figures


def test_format_table():
    a = run(make_batch())
    b = run(make_batch(seed=5))
    table = format_table({"teacher": a, "student": b})
    lines = table.splitlines()
    assert lines[0].split() == ["model", "bucket", "rmse", "auc", "spearman", "ndcg10", "macro_f1", "ece"]
    assert len(lines) == 2 + 2 * (1 + len(BUCKETS))
    assert f"{a['rmse']:.3f}" in table and f"{b['tail/auc']:.3f}" in table
    unseen = next(line for line in lines if line.startswith("teacher") and " unseen" in line)
    assert unseen.split()[2:] == ["-"] * 6
    custom = format_table({"m": a}, metrics=("count", "accuracy"), buckets=("all", "head"))
    assert f"{a['head/accuracy']:.3f}" in custom and len(custom.splitlines()) == 4
