"""Save ``last.ckpt`` when a run is stopped, so ``--ckpt_path last`` resumes at the step it reached.

A cluster scheduler preempts a job, or ends it at its time limit, with SIGTERM (SLURM sends it before
SIGKILL; ``kill`` sends it too). Lightning notes the signal and stops the run at the end of the batch
being trained (``SIGTERMException``). :class:`CheckpointOnPreemption` writes the trainer's whole state
(weights, optimizer, loops: epoch and step) to ``last.ckpt`` in the checkpoint directory, the file
``--ckpt_path last`` reads, at that batch's end hook: the point where ModelCheckpoint's step checkpoints
are written, which Lightning's loops resume from exactly (a state saved later, after the batch was
counted, would resume with its epochs miscounted). A signal that arrives after that hook, or during
validation, is saved when the run stops, with the batch counted as at its end hook. Other errors and
Ctrl-C save nothing (the periodic ``last.ckpt`` stays). The file is kept when the run ends well: it is
the run's last checkpoint.

YAML (after the ModelCheckpoint callbacks, whose directory it shares)::

    trainer:
      callbacks:
        - class_path: callbacks.CheckpointOnPreemption
"""

from __future__ import annotations

import logging
import os
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class CheckpointOnPreemption(OnExceptionCheckpoint):
    """On SIGTERM, save the trainer's state as ``<checkpoint dir>/<filename>.ckpt``; see the module docstring.

    Args:
        filename: the checkpoint's name without extension (``last``: what ``--ckpt_path last`` resumes from).
    """

    def __init__(self, filename: str = "last") -> None:
        super().__init__(dirpath="", filename=filename)
        self._saved_step: int | None = None

    def _resolve_dir(self, trainer: Any) -> None:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                self.dirpath = cb.dirpath
                return
        self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._resolve_dir(trainer)  # checkpoint callbacks run after the others: their directory is set

    def _save(self, trainer: Any) -> None:
        if not self.dirpath:
            self._resolve_dir(trainer)
        trainer.save_checkpoint(self.ckpt_path)
        self._saved_step = trainer.global_step
        if trainer.is_global_zero:
            log.warning(
                "SIGTERM at epoch %d, step %d: saved %s (resume with --ckpt_path last)",
                trainer.current_epoch,
                trainer.global_step,
                self.ckpt_path,
            )

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if getattr(trainer, "received_sigterm", False) and self._saved_step != trainer.global_step:
            self._save(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or self._saved_step == trainer.global_step:
            return
        # the batch was counted complete after its end hook: save it as of that hook, as a step checkpoint is
        progress = trainer.fit_loop.epoch_loop.batch_progress
        counted = progress.total.completed == progress.total.processed > 0
        if counted:
            progress.total.completed -= 1
            progress.current.completed -= 1
        try:
            self._save(trainer)
        finally:
            if counted:
                progress.total.completed += 1
                progress.current.completed += 1

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Keep the file (Lightning's OnExceptionCheckpoint removes its own on a clean end)."""
