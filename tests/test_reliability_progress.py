"""Progress when output goes to a log file (issue 21, item 11): plain lines from a real Lightning run, and
the CLI's choice of them over the progress bar when stderr is not a terminal."""

from __future__ import annotations

import io
import logging
import re

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks.progress import RichProgressBar, TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from callbacks.progress import LogProgress
from ellm_mkd.commands.lightning_cli import plain_progress_when_not_a_terminal


class Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def _loss(self, batch):
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), prog_bar=True)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def predict_step(self, batch, batch_idx):
        return self.layer(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 4)), batch_size=4)


def _trainer(tmp_path, progress: LogProgress | None = None, **kw) -> Trainer:
    return Trainer(
        callbacks=[progress or LogProgress(every_s=0)],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        **kw,
    )


def test_fit_validate_test_predict_log_plain_lines(tmp_path, caplog):
    trainer = _trainer(tmp_path, max_epochs=2, num_sanity_val_steps=0)
    model = Tiny()
    with caplog.at_level(logging.INFO, logger="callbacks.progress"):
        trainer.fit(model, loader(16), loader(8))
        trainer.test(model, loader(12), verbose=False)
        trainer.predict(model, loader(8))
    lines = [r.getMessage() for r in caplog.records if r.name == "callbacks.progress"]
    assert lines[0].startswith("fit epoch 1/2: batch 1/4 (25%), ")
    assert re.search(r"(batches/s|s/batch|fast), 0s elapsed", lines[0]) and re.search(r"loss=[-0-9.e]+", lines[0])
    assert any(x.startswith("fit epoch 1/2 done: batch 4/4 (100%)") for x in lines)
    assert any(x.startswith("validate epoch 1/2 done: batch 2/2 (100%)") and "val_loss=" in x for x in lines)
    assert any(x.startswith("fit epoch 2/2: batch 4/4") for x in lines)
    assert [x.split(",")[0] for x in lines if x.startswith("test")] == [
        "test: batch 1/3 (33%)",
        "test: batch 2/3 (67%)",
        "test: batch 3/3 (100%)",
        "test done: batch 3/3 (100%)",
    ]
    assert lines[-1].startswith("predict done: batch 2/2 (100%)")


def test_a_run_bounded_by_max_steps_counts_to_a_fixed_total(tmp_path, caplog):
    trainer = _trainer(tmp_path, max_epochs=-1, max_steps=6, limit_val_batches=0)
    with caplog.at_level(logging.INFO, logger="callbacks.progress"):
        trainer.fit(Tiny(), loader(40))
    lines = [r.getMessage().split(",")[0] for r in caplog.records if r.name == "callbacks.progress"]
    expected = [f"fit epoch 1: batch {i}/6 ({100 * i / 6:.0f}%)" for i in range(1, 7)]
    assert lines == [*expected, "fit epoch 1 done: batch 6/6 (100%)"]


def test_a_run_resumed_mid_epoch_goes_on_counting_from_where_it_stopped(tmp_path, caplog):
    from lightning.pytorch.callbacks import ModelCheckpoint

    every4 = ModelCheckpoint(dirpath=tmp_path, filename="mid", every_n_train_steps=4, save_top_k=-1)
    first = Trainer(
        callbacks=[LogProgress(every_s=0), every4],
        max_epochs=1,
        max_steps=5,  # killed after batch 5: the checkpoint holds 4 of the epoch's 10 batches
        logger=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        limit_val_batches=0,
    )
    first.fit(Tiny(), loader(40))
    with caplog.at_level(logging.INFO, logger="callbacks.progress"):
        _trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(Tiny(), loader(40), ckpt_path=tmp_path / "mid.ckpt")
    lines = [r.getMessage().split(",")[0] for r in caplog.records if r.name == "callbacks.progress"]
    expected = [f"fit epoch 1/1: batch {i}/10 ({10 * i}%)" for i in range(5, 11)]
    assert lines == [*expected, "fit epoch 1/1 done: batch 10/10 (100%)"]


def test_lines_are_spaced_by_time_or_batches(tmp_path, caplog):
    trainer = _trainer(tmp_path, LogProgress(every_s=3600, every_n_batches=5), max_epochs=1)
    with caplog.at_level(logging.INFO, logger="callbacks.progress"):
        trainer.predict(Tiny(), loader(48))
    lines = [r.getMessage().split(",")[0] for r in caplog.records if r.name == "callbacks.progress"]
    assert lines == ["predict: batch 5/12 (42%)", "predict: batch 10/12 (83%)", "predict done: batch 12/12 (100%)"]
    with pytest.raises(ValueError, match="every_s"):
        LogProgress(every_s=-1)


def test_the_cli_replaces_the_bar_only_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    def trainer() -> Trainer:
        return Trainer(logger=False, enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu")

    monkeypatch.setattr("sys.stderr", io.StringIO())  # a log file
    t = trainer()
    plain_progress_when_not_a_terminal(t)
    assert isinstance(t.progress_bar_callback, LogProgress)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    t = trainer()
    plain_progress_when_not_a_terminal(t)
    assert type(t.progress_bar_callback) in (TQDMProgressBar, RichProgressBar)
