"""The torchmetrics of one slice of rows (all rows, or one query bucket's) that
:class:`~ellm_mkd.metrics.RelevanceMetrics` keeps per slice, and the warning filter it runs them under."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.aggregation import MaxMetric, MinMetric, SumMetric
from torchmetrics.classification import (
    BinaryAUROC,
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.regression import MeanSquaredError, SpearmanCorrCoef
from torchmetrics.retrieval import RetrievalNormalizedDCG

_QUIET = (
    r".*was called before the ``update`` method.*",  # a process that saw no row of a bucket
    r".*will save all targets and predictions in (the )?buffer.*",  # cat-state metrics, by design
)


class _quiet(warnings.catch_warnings):
    def __enter__(self):
        out = super().__enter__()
        for msg in _QUIET:
            warnings.filterwarnings("ignore", message=msg)
        return out


class _Slice(nn.Module):
    """The torchmetrics of one slice of rows: all rows, or one query bucket's."""

    def __init__(self, num_levels: int, ndcg_k: int, calibration_bins: int, ndcg_empty_target_action: str):
        super().__init__()
        # synchronised counts: they decide what is computable, identically on every process
        self.count = SumMetric()
        self.positives = SumMetric()
        self.graded = SumMetric()
        self.ranked = SumMetric()
        self.ranked_positive = SumMetric()
        self.grade_min, self.grade_max = MinMetric(), MaxMetric()
        self.pred_min, self.pred_max = MinMetric(), MaxMetric()
        k = num_levels
        self.classification = MetricCollection(
            {
                "accuracy": MulticlassAccuracy(k, average="micro"),
                "macro_f1": MulticlassF1Score(k, average="macro"),
                "precision": MulticlassPrecision(k, average=None),
                "recall": MulticlassRecall(k, average=None),
                "ece": MulticlassCalibrationError(k, n_bins=calibration_bins, norm="l1"),
                "confusion_matrix": MulticlassConfusionMatrix(k),
            },
            compute_groups=False,
        )
        self.rmse = MeanSquaredError(squared=False)
        self.spearman = SpearmanCorrCoef()
        self.auc = BinaryAUROC()
        self.ndcg = RetrievalNormalizedDCG(top_k=ndcg_k, empty_target_action=ndcg_empty_target_action)

    def update(
        self,
        probs: Tensor,
        expected: Tensor,
        labels: Tensor,
        grades: Tensor,
        gains: Tensor,
        query_ids: Tensor,
        relevant_level: int,
    ) -> None:
        if labels.numel() == 0:
            return
        positive = labels >= relevant_level
        self.count.update(torch.tensor(float(labels.numel()), device=labels.device))
        self.positives.update(positive.sum().float())
        self.classification.update(probs, labels)
        self.auc.update(probs[:, relevant_level:].sum(dim=1).clamp(0.0, 1.0), positive.long())
        graded = torch.isfinite(grades)
        n_graded = int(graded.sum())
        if n_graded:
            e, g = expected[graded], grades[graded]
            self.graded.update(torch.tensor(float(n_graded), device=labels.device))
            self.rmse.update(e, g)
            self.spearman.update(e, g)
            self.grade_min.update(g)
            self.grade_max.update(g)
            self.pred_min.update(e)
            self.pred_max.update(e)
        ranked = torch.isfinite(gains)
        n_ranked = int(ranked.sum())
        if n_ranked:
            self.ranked.update(torch.tensor(float(n_ranked), device=labels.device))
            self.ranked_positive.update((gains[ranked] > 0).sum().float())
            self.ndcg.update(expected[ranked], gains[ranked], indexes=query_ids[ranked])
