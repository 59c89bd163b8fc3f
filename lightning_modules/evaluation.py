"""Evaluation shared by the teacher and the students, so their figures sit side by side.

:class:`RelevanceEvaluation` is a mixin for a LightningModule that has ``num_levels``,
``level_names``, ``relevant_level``, the buffers ``level_grades`` / ``level_grades_set`` and a
``log_figures`` hyper-parameter. Per stage (``val``, ``test``) it keeps

* :class:`~ellm_mkd.metrics.RelevanceMetrics` (AUC, macro-F1, per-level P/R, nDCG@10, RMSE,
  Spearman, ECE; overall and per query bucket),
* the accuracy of each chain-of-thought dimension against the data's known verdicts,

all torchmetrics, so DDP ranks are reduced by the library; at epoch end everything is logged as
``<stage>/<metric>``, kept in ``last_results[stage]``, and the confusion matrix, reliability diagram
and PR curve go to TensorBoard.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from ellm_mkd.schema import DIMENSIONS, VERDICTS

log = logging.getLogger(__name__)
STAGES = ("val", "test")


class RelevanceEvaluation:
    """Mixin: relevance metrics per stage; see the module docstring."""

    def init_levels(self, num_levels: int, relevant_level: int | None, level_grades: list[float] | None) -> int:
        """Check the level arguments, set ``num_levels`` / ``relevant_level`` / placeholder names and
        register the expected-grade buffers; returns the resolved relevant level (default: the top one)."""
        if num_levels < 2:
            raise ValueError(f"num_levels must be >= 2, got {num_levels}")
        relevant_level = num_levels - 1 if relevant_level is None else relevant_level
        if not 0 < relevant_level < num_levels:
            raise ValueError(f"relevant_level must be in 1..{num_levels - 1}, got {relevant_level}")
        if level_grades is not None and len(level_grades) != num_levels:
            raise ValueError(f"level_grades has {len(level_grades)} values for {num_levels} levels")
        self.num_levels = num_levels
        self.relevant_level = relevant_level
        self.level_names: tuple[str, ...] = tuple(f"level{i}" for i in range(num_levels))
        grades = torch.tensor(
            level_grades if level_grades is not None else list(range(num_levels)), dtype=torch.float32
        )
        self.register_buffer("level_grades", grades)
        self.register_buffer("level_grades_set", torch.tensor(level_grades is not None))
        return relevant_level

    def connect_levels(self, dm: Any, stage: str) -> None:
        """Take the level names from the data; measure each level's mean training grade (the expected
        grade's weights) unless they were given or restored from a checkpoint: at fit start, and at any other
        stage too (a model loaded without its checkpoint, e.g. a teacher from its merged directory, would
        otherwise weigh graded data with the level indices)."""
        if getattr(dm, "num_levels", self.num_levels) != self.num_levels:
            raise ValueError(f"the data has {dm.num_levels} levels but the model was built for {self.num_levels}")
        self.level_names = tuple(dm.level_names)
        if not bool(self.level_grades_set):
            grades = dm.level_grade_means()
            self.level_grades.copy_(torch.tensor(grades, dtype=torch.float32))
            self.level_grades_set.fill_(True)
            log.info("expected grade uses level grades %s (train means)", [round(g, 3) for g in grades])

    def _build_metrics(self) -> None:
        from torchmetrics import SumMetric
        from torchmetrics.classification import MulticlassAccuracy

        from ellm_mkd.metrics import RelevanceMetrics

        self.eval_metrics = nn.ModuleDict(
            {s: RelevanceMetrics(self.num_levels, self.level_names, self.relevant_level) for s in STAGES}
        )
        self.dim_metrics = nn.ModuleDict(
            {
                s: nn.ModuleDict(
                    {d: MulticlassAccuracy(len(VERDICTS), average="micro", ignore_index=-100) for d in DIMENSIONS}
                )
                for s in STAGES
            }
        )
        self.dim_known = nn.ModuleDict({s: SumMetric() for s in STAGES})

    def update_eval_metrics(
        self,
        stage: str,
        batch: dict[str, Any],
        probs: Tensor,
        expected_grade: Tensor,
        dim_scores: Tensor,
        dims: bool = True,
    ) -> None:
        """``probs [B, K]``, ``expected_grade [B]``, ``dim_scores [B, D, V]`` (logits or probabilities;
        ``dims=False``: the model gave no verdicts for this batch, so dimension accuracy is not updated)."""
        self.eval_metrics[stage].update(
            probs,
            expected_grade,
            batch["labels"],
            batch["grades"],
            batch["gains"],
            batch["query_ids"],
            batch["bucket_ids"],
        )
        if not dims:
            return
        tgt = batch["dim_targets"]
        for i, d in enumerate(DIMENSIONS):
            self.dim_metrics[stage][d].update(dim_scores[:, i], tgt[:, i])
        self.dim_known[stage].update((tgt != -100).sum().float())

    def extra_epoch_results(self, stage: str) -> dict[str, float]:
        """Further figures of a stage (computed, reset by the subclass); the teacher adds its parse failures."""
        return {}

    def _eval_epoch_end(self, stage: str) -> None:
        m = self.eval_metrics[stage]
        results = m.compute()
        if float(self.dim_known[stage].compute()) > 0:
            for d in DIMENSIONS:
                results[f"dim_acc/{d}"] = float(self.dim_metrics[stage][d].compute())
        results.update(self.extra_epoch_results(stage))
        self.log_dict({f"{stage}/{k}": v for k, v in results.items() if not math.isnan(v)}, sync_dist=False)
        self.last_results = {**getattr(self, "last_results", {}), stage: results}
        self._log_figures(stage, m)
        self._reset_stage(stage)

    def _reset_stage(self, stage: str) -> None:
        self.eval_metrics[stage].reset()
        self.dim_known[stage].reset()
        for d in DIMENSIONS:
            self.dim_metrics[stage][d].reset()

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._eval_epoch_end("val")
        else:
            self._reset_stage("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _log_figures(self, stage: str, m) -> None:
        """Confusion matrix, reliability diagram and PR curve to TensorBoard.

        The figures gather every process's rows (collectives), so under DDP every rank builds them
        and rank 0 alone writes them; a rank that skipped the gather would leave the others waiting
        in it for ever. Whether to log is decided from the configuration, the same on every rank."""
        if not self.hparams.log_figures:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers = [lg for lg in self.trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        figures = m.figures()
        targets, scores = m.pr_curve_data()
        if self.trainer.global_rank != 0:
            return
        exp = loggers[0].experiment
        step = self.global_step
        for name, fig in figures.items():
            exp.add_figure(f"{stage}/{name}", fig, global_step=step, close=True)
        if targets.numel():
            exp.add_pr_curve(f"{stage}/pr_relevant", targets.int(), scores.float(), global_step=step)
