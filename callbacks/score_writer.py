"""``ellm-mkd predict`` on a student writes a scores file: the columns ``ellm-mkd score`` writes.

:class:`StudentScoreWriter` streams every predicted batch to ``<log dir>/scores.parquet`` (or ``out``;
``.csv``/``.jsonl`` by the name): ``example_id``, ``query``, ``item_id``, ``label``/``grade`` (when the data
has labels), ``expected_grade``, ``level``, ``p_<level>`` and each dimension's verdict and its probability.
``ellm-mkd predict`` adds one to a student's run (:func:`add_score_writer`, called by the CLI before it
predicts) unless the config lists one already, e.g. to choose the file::

    trainer:
      callbacks:
        - class_path: callbacks.StudentScoreWriter
          init_args: {out: runs/scores/test.csv}

A ``trainer.predict`` called from Python (a benchmark timing the predict loop) writes nothing unless its
trainer has one. Under DDP each rank writes the pairs it predicted to its own file
(``scores.rank<N>.parquet``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from ellm_mkd.schema import DIMENSIONS, VERDICTS
from ellm_mkd.serving.scorer import PairScores, score_columns
from ellm_mkd.serving.writer import ScoreWriter


class StudentScoreWriter(BasePredictionWriter):
    """Args:
    out: the scores file (default: ``scores.parquet`` in the run's log directory).
    """

    def __init__(self, out: str | None = None):
        super().__init__(write_interval="batch")
        self.out = out
        self.path: Path | None = None
        self._writer: ScoreWriter | None = None
        self._item_ids: dict[str, str] = {}
        self._grades: dict[str, Any] = {}

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.out or os.path.join(trainer.log_dir or trainer.default_root_dir, "scores.parquet"))
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        self.path = path
        self._writer = ScoreWriter(path)
        dm = trainer.datamodule
        ds = getattr(dm, "predict_dataset", None) or (dm.full_predict_dataset() if dm is not None else None)
        rows = ds.rows if ds is not None else []
        self._item_ids = {r["example_id"]: r["item_id"] for r in rows}
        self._grades = {r["example_id"]: r["grade"] for r in rows}
        self._labelled = any(r["label"] is not None for r in rows)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        ids = list(prediction["example_id"])
        scores = PairScores(
            prediction["probs"].float().numpy(),
            prediction["expected_grade"].float().numpy(),
            prediction["dim_probs"].float().numpy(),
        )
        names = list(pl_module.level_names)
        cols: dict[str, list[Any]] = {
            "example_id": ids,
            "query": list(batch["query"]),
            "item_id": [self._item_ids.get(e) for e in ids],
        }
        if self._labelled:
            cols["label"] = [None if int(k) < 0 else names[int(k)] for k in batch["labels"].tolist()]
            cols["grade"] = [self._grades.get(e) for e in ids]
        cols.update(score_columns(scores, names, DIMENSIONS, VERDICTS))
        self._writer.write(cols)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._writer is not None:
            self._writer.close()
            if trainer.is_global_zero:
                print(f"scores: {self.path} ({self._writer.rows:,} pairs)", flush=True)
            self._writer = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def add_score_writer(trainer: L.Trainer, module: L.LightningModule) -> StudentScoreWriter | None:
    """Give a student's predict run a :class:`StudentScoreWriter` unless ``trainer`` has one; returns the writer
    added (None: not a student, or the config's own writer is used)."""
    from lightning_modules.base import RelevanceStudent

    if not isinstance(module, RelevanceStudent):
        return None
    if any(isinstance(cb, StudentScoreWriter) for cb in trainer.callbacks):
        return None
    writer = StudentScoreWriter()
    trainer.callbacks.append(writer)
    return writer
