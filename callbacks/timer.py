"""Wall-clock timing of a run's loops, as the benchmarks report it.

* training: a batch's time runs from the end of the previous training batch (or the start of the
  epoch) to the end of this one, so it includes fetching and tokenizing the batch, forward,
  backward and the optimizer step, and excludes validation, checkpointing and epoch-end hooks (the
  interval after a validation restarts at the next batch start);
* test and predict: from the start of the epoch to the end of its last batch (metric computation
  and figures after the last batch are excluded).

On a GPU each mark synchronises the device first.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback


class ThroughputTimer(Callback):
    """Wall time of training batches, validation, the test loop and the predict loop (see the module
    docstring); what every benchmark and the demo time their runs with."""

    def __init__(self) -> None:
        self.train_s = 0.0
        self.train_pairs = 0
        self.train_batches = 0
        self.val_s = 0.0
        self.test_s = 0.0
        self.test_pairs = 0
        self.predict_s = 0.0
        self.predict_pairs = 0
        self._mark: float | None = None
        self._val_t0: float | None = None
        self._test_t0: float | None = None
        self._test_last: float | None = None

    @staticmethod
    def _now(pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._mark = self._now(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._mark is None:  # a validation ran since the last batch: restart here
            self._mark = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self._now(pl_module)
        self.train_s += now - self._mark
        self.train_pairs += len(batch["example_id"])
        self.train_batches += 1
        self._mark = now

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_t0 = self._now(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_s += self._now(pl_module) - self._val_t0
        self._mark = None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._test_t0 = self._test_last = self._now(pl_module)
        self.test_pairs = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._test_last = self._now(pl_module)
        self.test_pairs += len(batch["example_id"])

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.test_s = self._test_last - self._test_t0

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._test_t0 = self._test_last = self._now(pl_module)
        self.predict_pairs = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._test_last = self._now(pl_module)
        self.predict_pairs += len(batch["example_id"])

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self.predict_s = self._test_last - self._test_t0
