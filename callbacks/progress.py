"""Progress as plain log lines, for runs whose output goes to a file instead of a terminal.

A progress bar redraws one line with carriage returns; written to a log file (``nohup``, SLURM,
``> run.log 2>&1``) it shows nothing readable for as long as an epoch lasts. :class:`LogProgress`
is a Lightning progress bar that instead logs one line every ``every_s`` seconds (and, if set,
every ``every_n_batches`` batches) of training, validation, test and predict, plus one at the end
of each loop, on rank zero only::

    fit epoch 1/3: batch 120/500 (24%), 1.92 batches/s, 1m02s elapsed, about 3m18s left; loss=0.693
    validate epoch 1/3 done: batch 50/50 (100%), 8.1 batches/s, 6s elapsed; loss=0.52 val_auc=0.71

``ellm-mkd fit|validate|test|predict`` uses it in place of the default bar when stderr is not a
terminal (:mod:`ellm_mkd.commands.lightning_cli`); list it under ``trainer.callbacks`` to choose
its interval (``class_path: callbacks.LogProgress``, ``init_args: {every_s: 10}``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _metric(value: Any) -> str:
    if hasattr(value, "item"):
        value = value.item()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class LogProgress(ProgressBar):
    """A progress bar that writes plain log lines (see the module docstring).

    Args:
        every_s: seconds between two lines of one loop (0: a line after every batch).
        every_n_batches: also a line every this many batches (None: by time only).
    """

    def __init__(self, every_s: float = 30.0, every_n_batches: int | None = None):
        super().__init__()
        if every_s < 0 or (every_n_batches is not None and every_n_batches < 1):
            raise ValueError(f"every_s must be >= 0 and every_n_batches >= 1, got {every_s}, {every_n_batches}")
        self.every_s, self.every_n_batches = float(every_s), every_n_batches
        self._enabled = True
        self._t0 = self._last = 0.0
        self._done = 0  # batches of the running loop run by this process
        self._offset = 0  # batches of it run before (a run resumed mid-epoch)
        self._train_total: int | float | None = None
        self._outer: tuple[float, float, int, int] = (0.0, 0.0, 0, 0)  # the training loop's clock during validation

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    # -- one loop's clock ------------------------------------------------------------------------

    def _start(self) -> None:
        self._t0 = self._last = time.monotonic()
        self._done = self._offset = 0

    def _batch(self, what: str, total: int | float, metrics: bool = True) -> None:
        self._done += 1
        self._line(what, self._done, total, metrics=metrics)

    def _line(self, what: str, done: int, total: int | float, force: bool = False, metrics: bool = True) -> None:
        if not self._enabled or not self.trainer.is_global_zero:
            return
        now = time.monotonic()
        due = now - self._last >= self.every_s or (self.every_n_batches and done % self.every_n_batches == 0)
        if not (force or due):
            return
        self._last = now
        elapsed = now - self._t0
        rate = done / elapsed if elapsed > 0 else float("nan")  # of the batches this process ran
        known = isinstance(total, int) or (isinstance(total, float) and math.isfinite(total))
        at = self._offset + done
        text = f"{what}: batch {at}/{int(total)} ({100 * at / max(total, 1):.0f}%)" if known else f"{what}: {at}"
        speed = f"{1 / rate:.3g} s/batch" if 0 < rate < 1 else f"{rate:.3g} batches/s" if rate < 1000 else "fast"
        text += f", {speed}, {_duration(elapsed)} elapsed"
        if known and at < total and rate > 0:
            text += f", about {_duration((total - at) / rate)} left"
        if metrics:
            shown = {k: v for k, v in self.get_metrics(self.trainer, self.trainer.lightning_module).items()}
            if shown:
                text += "; " + " ".join(f"{k}={_metric(v)}" for k, v in shown.items())
        log.info("%s", text)

    def _epoch(self) -> str:
        epochs = self.trainer.max_epochs
        return f"epoch {self.trainer.current_epoch + 1}" + (f"/{epochs}" if epochs and epochs > 0 else "")

    # -- hooks -----------------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        self._start()
        self._train_total = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start()
        # fixed for the epoch: under max_steps Lightning's total is the steps still to go, which shrinks as they go
        self._train_total = self.total_train_batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._train_total is None:  # resumed mid-epoch: Lightning does not start the epoch again
            self._train_total = self.total_train_batches
            self._offset = batch_idx
        self._batch(f"fit {self._epoch()}", self._train_total)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._line(f"fit {self._epoch()} done", self._done, self._train_total, force=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._outer = (self._t0, self._last, self._done, self._offset)  # validation runs inside a training epoch
        self._start()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._batch(f"validate {self._epoch()}", self.total_val_batches)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._line(f"validate {self._epoch()} done", self._done, self.total_val_batches, force=True)
        self._t0, self._last, self._done, self._offset = self._outer

    def on_test_start(self, trainer, pl_module) -> None:
        self._start()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch("test", sum(trainer.num_test_batches), metrics=False)

    def on_test_end(self, trainer, pl_module) -> None:
        self._line("test done", self._done, sum(trainer.num_test_batches), force=True, metrics=False)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._start()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch("predict", sum(trainer.num_predict_batches), metrics=False)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._line("predict done", self._done, sum(trainer.num_predict_batches), force=True, metrics=False)
