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

Several processes (DDP, one node or many): every rank must stop at the same batch, because saving is a
collective (every rank joins the barrier of ``trainer.save_checkpoint``) and so is every training step. A
scheduler's SIGTERM reaches the ranks at different moments, and under torchrun a signal to one node's launcher
reaches that node's ranks only. Lightning 2.6's own SIGTERM handler runs a ``dist.broadcast`` inside the signal
handler, at whatever point the signal interrupts: the peers are not in a matching collective, so the signalled
rank waits for ever (one node signalled: its launcher SIGKILLs it after 30 s and nothing is saved) or the
collectives of the ranks fall out of step (every node signalled: gloo aborts with ``EnforceNotMet``). So in a
fit this callback puts a flag in place of Lightning's notifier (the other handlers stay), and at every
training batch's end the ranks agree in one ``all_reduce`` whether any of them got the signal; if one did,
every rank stops there together and ``last.ckpt`` is saved at that step (``tests/test_multinode.py`` signals
one of two torchrun nodes).

YAML (after the ModelCheckpoint callbacks, whose directory it shares)::

    trainer:
      callbacks:
        - class_path: callbacks.CheckpointOnPreemption
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from typing import Any

import torch
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
        self._signalled = False  # this rank got SIGTERM (the ranks agree at the next training batch's end)

    def _resolve_dir(self, trainer: Any) -> None:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                self.dirpath = cb.dirpath
                return
        self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._resolve_dir(trainer)  # checkpoint callbacks run after the others: their directory is set
        self._signalled = False

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

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        self._take_sigterm(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._take_sigterm(trainer)

    def _take_sigterm(self, trainer: Any) -> None:
        """Lightning registered its handlers when the run started (after on_fit_start): swap its notifier."""
        connector = getattr(trainer, "_signal_connector", None)
        notifier = getattr(connector, "_sigterm_notifier_fn", None)
        composite = signal.getsignal(signal.SIGTERM)
        handlers = getattr(composite, "signal_handlers", None)  # Lightning's _HandlersCompose
        if notifier is None or not isinstance(handlers, list) or notifier not in handlers:
            return  # swapped already, or not Lightning's handler: leave the handlers as they are
        ours = functools.partial(self._on_sigterm, trainer)
        composite.signal_handlers = [ours if h == notifier else h for h in handlers]

    def _on_sigterm(self, trainer: Any, signum: int, frame: Any) -> None:
        """Lightning's notifier without its collective: note the signal; the ranks agree at the batch end."""
        log.info("rank %d: received SIGTERM; stopping at the end of this training batch", trainer.global_rank)
        if not self._signalled:
            launcher = trainer.strategy.launcher
            if launcher is not None:  # as Lightning does: the ranks this process started get the signal too
                launcher.kill(signum)
        self._signalled = True
        if trainer.world_size == 1:
            trainer._signal_connector.received_sigterm = True

    def _agree(self, trainer: Any) -> None:
        """One all_reduce at every training batch's end: any rank signalled, every rank stops here."""
        if trainer.world_size > 1 and not trainer.received_sigterm:
            flag = torch.tensor([float(self._signalled)], device=trainer.strategy.root_device)
            if trainer.strategy.reduce(flag, reduce_op="sum").item() > 0:
                trainer._signal_connector.received_sigterm = True

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self._agree(trainer)
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
