"""Graded-relevance evaluation: one torchmetrics-backed module for every model.

:class:`RelevanceMetrics` is fed per batch (``update``) and returns a flat ``dict[str, float]``
(``compute``), overall and per query bucket (``head``/``torso``/``tail``/``unseen``). Every number
comes from a torchmetrics metric, so states live in registered submodules (``.to(device)`` moves
them) and are synchronised across DDP processes by torchmetrics itself inside ``compute()``.

Keys (``<k>`` = ``ndcg_k``, ``<level>`` = a level name); per bucket the same keys prefixed
``<bucket>/`` (e.g. ``tail/auc``), computed over that bucket's rows only:

==========================  =====================================================================
``count``                   labelled rows (``labels != -100``)
``rmse``                    ``MeanSquaredError(squared=False)`` of expected grade vs raw grade
``spearman``                ``SpearmanCorrCoef`` of expected grade vs raw grade
``auc``                     ``BinaryAUROC``; target ``label >= relevant_level``, score = probability
                            mass on levels ``>= relevant_level``
``ndcg<k>``                 ``RetrievalNormalizedDCG(top_k=k)``: preds = expected grade, target =
                            graded gains, grouped by ``query_ids``, mean over queries
``accuracy``                ``MulticlassAccuracy(average="micro")`` of the argmax level
``macro_f1``                ``MulticlassF1Score(average="macro")``
``ece``                     ``MulticlassCalibrationError(n_bins=calibration_bins, norm="l1")``
``precision/<level>``       ``MulticlassPrecision(average=None)``
``recall/<level>``          ``MulticlassRecall(average=None)``
``irrelevant_precision``    precision of level 0 (same number as ``precision/<level 0>``)
``irrelevant_recall``       recall of level 0
==========================  =====================================================================

Conventions for undefined values (decided from DDP-synchronised counts, so every process takes
the same branch and the collective calls stay matched):

* a bucket without labelled rows has no keys at all (not even ``count``);
* ``auc`` is omitted where the rows hold one class only (ROC AUC is undefined; torchmetrics would
  return 0 with a warning);
* ``spearman`` is NaN where either side is constant or there are fewer than two graded rows
  (scipy's convention; torchmetrics itself would return 0.0 because of its ``eps``);
* ``recall/<level>`` (and ``irrelevant_recall``) is omitted where the level has no true rows;
  ``precision/<level>`` where the level is never predicted is 0 (torchmetrics/sklearn ``zero_division``);
* ``macro_f1`` averages over levels present in targets or predictions (torchmetrics drops levels
  with ``tp + fp + fn == 0``, i.e. sklearn's default ``labels``);
* nDCG: torchmetrics ``RetrievalNormalizedDCG`` accepts *float* targets (``allow_non_binary_target``)
  and keeps them float, with linear gains and sklearn's tie averaging, so graded gains go in as
  they are; it equals ``sklearn.metrics.ndcg_score`` per query. Queries whose gains are all zero
  have no defined nDCG; by default (``ndcg_empty_target_action="skip"``) they are left out of the
  mean, and the key is omitted where no query has a positive gain (torchmetrics would return 0).
  ``"neg"`` counts them as 0 (what averaging sklearn's per-query ``ndcg_score`` gives).

Rows whose grade (gain) is not finite are left out of ``rmse``/``spearman`` (``ndcg``) only.
Probabilities and the AUC score are clamped to ``[0, 1]``: torchmetrics applies softmax/sigmoid to
a whole batch if a single value falls outside, which rounding error would otherwise trigger.

DDP: call ``compute``/``figures``/``pr_curve_data`` on every process (they are collective).
Before synchronising, every list ("cat") state is made exactly one tensor of its proper dtype
(see :meth:`RelevanceMetrics._consolidate_list_states`): torchmetrics gathers
``RetrievalNormalizedDCG`` states entry by entry (``dist_reduce_fx=None``), which mismatches
collectives when processes made different numbers of updates (a bucket absent from some
batches), and pads a process without entries with a float32 tensor, which mismatches long states.
Rows of one query spread over several processes are regrouped by ``query_ids`` after the gather.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from ellm_mkd.schema import BUCKETS

from .metric_plots import _no_data, _reliability
from .metric_slice import _quiet, _Slice

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["RelevanceMetrics", "format_table", "ALL"]

#: The name of the slice holding every labelled row (bare keys in ``compute()``).
ALL = "all"
IGNORE_INDEX = -100
DEFAULT_TABLE_METRICS = ("rmse", "auc", "spearman", "ndcg10", "macro_f1", "ece")


class RelevanceMetrics(nn.Module):
    """Graded-relevance metrics, overall and per query bucket (see the module docstring).

    Args:
        num_levels: number of relevance levels ``K`` (labels ``0..K-1``).
        level_names: a name per level (used in ``precision/<name>``, ``recall/<name>``, plots).
        relevant_level: the lowest level counted as relevant for ``auc`` and the PR curve.
        ndcg_k: cut-off of nDCG; the key is ``f"ndcg{ndcg_k}"``.
        calibration_bins: equal-width confidence bins of ``ece`` and the reliability diagram.
        buckets: bucket names, indexed by ``bucket_ids``.
        ndcg_empty_target_action: torchmetrics' treatment of queries without a positive gain:
            ``"skip"`` (default, leave them out of the mean) or ``"neg"`` (count them as 0).
    """

    def __init__(
        self,
        num_levels: int,
        level_names: Sequence[str],
        relevant_level: int,
        ndcg_k: int = 10,
        calibration_bins: int = 15,
        buckets: Sequence[str] = BUCKETS,
        ndcg_empty_target_action: str = "skip",
    ):
        super().__init__()
        level_names = tuple(str(n) for n in level_names)
        if num_levels < 2:
            raise ValueError(f"num_levels must be >= 2, got {num_levels}")
        if len(level_names) != num_levels:
            raise ValueError(f"got {len(level_names)} level names for {num_levels} levels")
        if not 0 < relevant_level < num_levels:
            raise ValueError(f"relevant_level must be in 1..{num_levels - 1}, got {relevant_level}")
        if ndcg_k < 1 or calibration_bins < 1:
            raise ValueError("ndcg_k and calibration_bins must be >= 1")
        if ndcg_empty_target_action not in ("skip", "neg"):
            raise ValueError(f"ndcg_empty_target_action must be 'skip' or 'neg', got {ndcg_empty_target_action!r}")
        buckets = tuple(buckets)
        if ALL in buckets or len(set(buckets)) != len(buckets):
            raise ValueError(f"bucket names must be unique and not {ALL!r}: {buckets}")
        self.num_levels = num_levels
        self.level_names = level_names
        self.relevant_level = relevant_level
        self.ndcg_k = ndcg_k
        self.calibration_bins = calibration_bins
        self.buckets = buckets
        self.ndcg_empty_target_action = ndcg_empty_target_action
        args = (num_levels, ndcg_k, calibration_bins, ndcg_empty_target_action)
        with _quiet():
            self.slices = nn.ModuleDict({name: _Slice(*args) for name in (ALL, *buckets)})
            self._list_state_specs = self._probe_list_states(args)

    # ------------------------------------------------------------------------------------------
    def _probe_list_states(self, args) -> dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
        """Dtype and trailing shape of every list ("cat") state, from one update of a scratch slice.

        Used to pad the states of a process that saw no row of a slice with *typed* empty tensors
        before DDP synchronisation (torchmetrics would pad with float32, breaking ``all_gather``
        for long states such as AUROC targets and retrieval indexes).
        """
        probe = _Slice(*args)
        k = self.num_levels
        probs = torch.full((2, k), 1.0 / k)
        probe.update(
            probs,
            torch.tensor([0.5, 1.0]),
            torch.tensor([0, k - 1]),
            torch.tensor([0.0, 1.0]),
            torch.tensor([0.0, 1.0]),
            torch.tensor([0, 0]),
            self.relevant_level,
        )
        specs: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]] = {}
        for name, m in probe.named_modules():
            if not isinstance(m, Metric):
                continue
            for attr, default in m._defaults.items():
                if isinstance(default, list):
                    value = dim_zero_cat(getattr(m, attr))
                    specs.setdefault(name, {})[attr] = (value.dtype, tuple(value.shape[1:]))
        return specs

    def _consolidate_list_states(self, sl: _Slice) -> None:
        """Make every list state exactly one tensor of the right dtype, before a (DDP) sync.

        Two torchmetrics behaviours make raw list states unsafe to gather across processes:
        ``RetrievalNormalizedDCG`` registers its states with ``dist_reduce_fx=None``, so they are
        gathered *entry by entry* (one ``all_gather`` per ``update`` call) and processes with a
        different number of updates issue mismatched collectives; and a process with no entry
        gets a float32 empty tensor, whose dtype differs from other processes' long states (AUROC
        targets, retrieval indexes). Concatenating locally, or padding with a typed empty tensor,
        gives every process one entry of one dtype per state.
        """
        for name, m in sl.named_modules():
            for attr, (dtype, tail) in self._list_state_specs.get(name, {}).items():
                state = getattr(m, attr)
                if not isinstance(state, list):
                    continue
                if not state:
                    state.append(torch.empty((0, *tail), dtype=dtype, device=m.device))
                elif len(state) > 1:
                    state[:] = [dim_zero_cat(state)]

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(
        self,
        probs: Tensor,
        expected_grade: Tensor,
        labels: Tensor,
        grades: Tensor,
        gains: Tensor,
        query_ids: Tensor,
        bucket_ids: Tensor,
    ) -> None:
        """Accumulate one batch. Rows with ``labels == -100`` are ignored entirely.

        ``probs`` [B, K] are level probabilities (softmax), ``expected_grade`` [B] the model's
        expected grade; ``grades``/``gains`` [B] float (NaN: left out of rmse/spearman/ndcg);
        ``query_ids``/``bucket_ids`` [B] long.
        """
        if probs.ndim != 2 or probs.shape[1] != self.num_levels:
            raise ValueError(f"probs must be [B, {self.num_levels}], got {tuple(probs.shape)}")
        n = probs.shape[0]
        for name, t in (
            ("expected_grade", expected_grade),
            ("labels", labels),
            ("grades", grades),
            ("gains", gains),
            ("query_ids", query_ids),
            ("bucket_ids", bucket_ids),
        ):
            if t.reshape(-1).shape[0] != n:
                raise ValueError(f"{name} has {t.numel()} rows, probs {n}")
        keep = labels.reshape(-1) != IGNORE_INDEX
        probs = probs.detach().float().clamp(0.0, 1.0)[keep]
        expected = expected_grade.detach().reshape(-1).float()[keep]
        labels = labels.reshape(-1).long()[keep]
        grades = grades.detach().reshape(-1).float()[keep]
        gains = gains.detach().reshape(-1).float()[keep]
        query_ids = query_ids.reshape(-1).long()[keep]
        bucket_ids = bucket_ids.reshape(-1).long()[keep]
        if labels.numel() == 0:
            return
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_levels:
            raise ValueError(f"labels must be -100 or in 0..{self.num_levels - 1}")
        rl = self.relevant_level
        self.slices[ALL].update(probs, expected, labels, grades, gains, query_ids, rl)
        for b, name in enumerate(self.buckets):
            m = bucket_ids == b
            if bool(m.any()):
                self.slices[name].update(probs[m], expected[m], labels[m], grades[m], gains[m], query_ids[m], rl)

    def reset(self) -> None:
        for sl in self.slices.values():
            for m in sl.modules():
                if isinstance(m, Metric):
                    m.reset()

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _value(metric: Metric) -> float:
        return float(metric.compute())

    def _compute_slice(self, sl: _Slice) -> dict[str, float]:
        count = self._value(sl.count)
        if count <= 0:
            return {}
        self._consolidate_list_states(sl)
        out: dict[str, float] = {"count": count}
        graded = self._value(sl.graded)
        if graded > 0:
            out["rmse"] = self._value(sl.rmse)
        constant = graded < 2 or (
            self._value(sl.grade_min) == self._value(sl.grade_max)
            or self._value(sl.pred_min) == self._value(sl.pred_max)
        )
        out["spearman"] = math.nan if constant else self._value(sl.spearman)
        positives = self._value(sl.positives)
        if 0 < positives < count:
            out["auc"] = self._value(sl.auc)
        ranked, ranked_pos = self._value(sl.ranked), self._value(sl.ranked_positive)
        if ranked > 0 and (ranked_pos > 0 or self.ndcg_empty_target_action != "skip"):
            out[f"ndcg{self.ndcg_k}"] = self._value(sl.ndcg)
        cls = sl.classification.compute()
        out["accuracy"] = float(cls["accuracy"])
        out["macro_f1"] = float(cls["macro_f1"])
        out["ece"] = float(cls["ece"])
        support = cls["confusion_matrix"].sum(dim=1)
        for i, level in enumerate(self.level_names):
            out[f"precision/{level}"] = float(cls["precision"][i])
            if support[i] > 0:
                out[f"recall/{level}"] = float(cls["recall"][i])
        out["irrelevant_precision"] = out[f"precision/{self.level_names[0]}"]
        if f"recall/{self.level_names[0]}" in out:
            out["irrelevant_recall"] = out[f"recall/{self.level_names[0]}"]
        return out

    def compute(self) -> dict[str, float]:
        """All metrics as floats: overall keys bare, bucket keys ``<bucket>/<metric>``. Collective in DDP."""
        out: dict[str, float] = {}
        with _quiet():
            for name, sl in self.slices.items():
                values = self._compute_slice(sl)
                prefix = "" if name == ALL else f"{name}/"
                out.update({prefix + k: v for k, v in values.items()})
        return out

    # ------------------------------------------------------------------------------------------
    def _synced_cat(self, metric: Metric, *attrs: str) -> list[Tensor]:
        """The concatenated (all-process) values of list states. Collective in DDP."""
        with metric.sync_context():
            return [dim_zero_cat(getattr(metric, a)).detach().cpu() for a in attrs]

    def pr_curve_data(self) -> tuple[Tensor, Tensor]:
        """``(targets, scores)`` over all labelled rows, for ``SummaryWriter.add_pr_curve``.

        ``targets`` is ``label >= relevant_level`` (long 0/1), ``scores`` the probability mass on
        relevant levels; CPU tensors, gathered from every process (collective in DDP).
        """
        sl = self.slices[ALL]
        with _quiet():
            self._consolidate_list_states(sl)
            target, preds = self._synced_cat(sl.auc, "target", "preds")
        return target.long(), preds.float()

    def figures(self) -> dict[str, Figure]:
        """``confusion_matrix``, ``reliability_diagram`` and ``pr_curve`` over all rows (collective in DDP).

        Figures are built with :class:`matplotlib.figure.Figure` on an Agg canvas, not through
        pyplot, so no display is needed whatever the global backend, the global backend is left
        alone (no ``matplotlib.use``), and nothing is registered in pyplot (no leak if they are not
        closed). ``SummaryWriter.add_figure`` and ``fig.savefig`` work on them. Needs matplotlib.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from torchmetrics.classification import BinaryPrecisionRecallCurve
        from torchmetrics.functional.classification import binary_average_precision, binary_precision_recall_curve

        def new(size=(6.0, 5.0)) -> Figure:
            fig = Figure(figsize=size, layout="constrained")
            FigureCanvasAgg(fig)
            return fig

        sl = self.slices[ALL]
        figs: dict[str, Figure] = {}
        with _quiet():
            # torchmetrics hands torch tensors to imshow; numpy 2 warns about their __array__
            warnings.filterwarnings("ignore", message=r".*__array__ implementation.*", category=DeprecationWarning)
            count = self._value(sl.count)
            self._consolidate_list_states(sl)

            # confusion matrix: torchmetrics' own plot
            fig = new()
            ax = fig.add_subplot()
            cm_metric = sl.classification["confusion_matrix"]
            if count > 0:
                cm_metric.plot(val=cm_metric.compute(), ax=ax, labels=list(self.level_names))
            else:
                _no_data(ax)
            ax.set_title(f"Confusion matrix (n={int(count)})")
            ax.set_xlabel("Predicted level")
            ax.set_ylabel("True level")
            figs["confusion_matrix"] = fig

            # reliability diagram: no torchmetrics plot for it; bins as MulticlassCalibrationError's
            fig = new((6.0, 6.0))
            ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
            ece_metric = sl.classification["ece"]
            if count > 0:
                conf, acc = self._synced_cat(ece_metric, "confidences", "accuracies")
                ece = float(ece_metric.compute())
                _reliability(ax, ax_n, conf.float(), acc.float(), self.calibration_bins)
                ax.set_title(f"Reliability diagram (top-label ECE={ece:.3f}, n={int(count)})")
            else:
                _no_data(ax)
                ax.set_title("Reliability diagram")
            ax.set_ylabel("Accuracy")
            ax_n.set_xlabel("Confidence (max level probability)")
            ax_n.set_ylabel("Rows")
            figs["reliability_diagram"] = fig

            # precision-recall curve, relevant vs not: torchmetrics' own plot
            fig = new()
            ax = fig.add_subplot()
            title = f"Precision-recall: level >= {self.level_names[self.relevant_level]} vs rest"
            if count > 0:
                target, preds = self._synced_cat(sl.auc, "target", "preds")
                curve = binary_precision_recall_curve(preds, target.long())
                BinaryPrecisionRecallCurve().plot(curve=curve, ax=ax)
                ap = float(binary_average_precision(preds, target.long()))
                title += f"\nAP={ap:.3f}, positives={int(target.sum())}/{target.numel()}"
            else:
                _no_data(ax)
            ax.set_title(title)
            ax.set_xlabel("Recall")
            ax.set_ylabel("Precision")
            ax.set_xlim(0.0, 1.0)
            ax.set_ylim(0.0, 1.05)
            figs["pr_curve"] = fig
        return figs


def format_table(
    results: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str] = DEFAULT_TABLE_METRICS,
    buckets: Sequence[str] = (ALL, *BUCKETS),
) -> str:
    """Plain-text table: a row per (model, bucket), a column per metric, 3 decimals, ``-`` if missing.

    ``results`` maps a model name to its ``RelevanceMetrics.compute()`` dict; bucket ``"all"``
    reads the bare keys, any other bucket ``<bucket>/<metric>``.
    """
    header = ["model", "bucket", *metrics]
    rows = [header]
    for model, values in results.items():
        for bucket in buckets:
            prefix = "" if bucket == ALL else f"{bucket}/"
            cells = [str(model), str(bucket)]
            for m in metrics:
                v = values.get(prefix + m)
                cells.append("-" if v is None else f"{float(v):.3f}")
            rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:])])
