"""The LightningCLI behind ``ellm-mkd fit|validate|test|predict``.

Models are chosen in YAML with ``model: {class_path: ..., init_args: ...}``; the data module is
always :class:`~datamodules.RelevanceDataModule` (its ``source`` section says what to read). The
number of levels and the relevant level come from the data's label scheme and are linked into
the model, so the two sections cannot disagree.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI

from datamodules.datamodule import RelevanceDataModule
from ellm_mkd.models import cpu_has_native_bf16

log = logging.getLogger(__name__)
KEEP_BF16_ENV = "ELLM_MKD_KEEP_BF16"


class _NoAdverts(logging.Filter):
    """Drops Lightning's product tips ("💡 Tip: try installing ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def one_line_per_message() -> None:
    """Lightning gives some of its loggers a handler of their own and lets them propagate to the root
    logger as well, so once ``ellm-mkd`` configures the root every INFO line is printed twice. Loggers
    with their own handler stop propagating; Lightning's tips are dropped."""
    no_adverts = _NoAdverts()
    for name in list(logging.root.manager.loggerDict):
        logger = logging.getLogger(name)
        if name.split(".")[0] == "lightning" and logger.handlers:
            logger.propagate = False
            for h in logger.handlers:
                h.addFilter(no_adverts)
    for h in logging.getLogger().handlers:
        h.addFilter(no_adverts)


def resolve_precision(precision: str | int | None, accelerator: str | None) -> str | int | None:
    """``bf16-mixed`` where it helps: on an x86 CPU without native bf16 (AVX2 only, e.g. many AMD EPYC
    and older Xeons) bf16 autocast is emulated and far slower than float32 (measured on a 2-core
    AVX2 EPYC: a MiniLM-L6 training step at batch 32 x 34 tokens takes 16.4-16.8 s under bf16
    autocast, 0.72-0.81 s in float32), so there it becomes ``32-true`` with a warning. Set
    ``ELLM_MKD_KEEP_BF16=1`` to keep what was asked."""
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    x86 = torch.backends.cpu.get_cpu_capability().startswith("AVX")
    if (
        str(precision).startswith("bf16")
        and on_cpu
        and x86
        and not cpu_has_native_bf16()
        and not os.environ.get(KEEP_BF16_ENV)
    ):
        log.warning(
            "precision %s asked for on a CPU without native bf16 (%s): using 32-true, which is faster here "
            "(set %s=1 to keep %s)",
            precision,
            torch.backends.cpu.get_cpu_capability(),
            KEEP_BF16_ENV,
            precision,
        )
        return "32-true"
    return precision


class EllmCLI(LightningCLI):
    """LightningCLI with the project's data module fixed, any LightningModule as model, and a
    ``distill`` section (:class:`callbacks.mkd.MKDistillation`, off unless ``distill.enabled: true``)."""

    def init_parser(self, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)  # --trainer.max_epoch is a typo, not --trainer.max_epochs
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        # ellm-mkd hands over the arguments after its own command name; LightningCLI would warn that they
        # differ from sys.argv, which here they always do
        self.config = parser.parse_object(args) if isinstance(args, dict | Namespace) else parser.parse_args(args)

    def add_arguments_to_parser(self, parser) -> None:
        from callbacks.mkd import MKDistillation

        # the hardware every stage config shares, set once; configs/trainer/*.yaml overlays change it
        parser.set_defaults({"trainer.accelerator": "auto", "trainer.devices": 1, "trainer.precision": "bf16-mixed"})
        parser.add_lightning_class_args(MKDistillation, "distill")
        parser.set_defaults({"distill.enabled": False})
        parser.link_arguments("data.num_levels", "model.init_args.num_levels", apply_on="instantiate")
        parser.link_arguments("data.relevant_level", "model.init_args.relevant_level", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        plain_progress_when_not_a_terminal(trainer)
        return trainer

    def _say_where(self, what: list[tuple[str, str | None]]) -> None:
        if self.trainer.is_global_zero:
            for name, path in what:
                if path:
                    print(f"{name}: {path}", flush=True)

    def after_fit(self) -> None:
        cb = self.trainer.checkpoint_callback
        export = self.model.hparams.get("export_dir")  # the teacher's; students have none
        self._say_where(
            [
                ("best checkpoint", cb.best_model_path if cb else None),
                ("last checkpoint", cb.last_model_path if cb else None),
                ("teacher export (adapter/, merged/, teacher.json)", export),
                ("logs", self.trainer.log_dir),
            ]
        )

    def after_test(self) -> None:
        self._say_where([("logs", self.trainer.log_dir)])

    def before_predict(self) -> None:
        from callbacks.score_writer import add_score_writer

        add_score_writer(self.trainer, self.model)  # a student's predict writes a scores file

    def after_predict(self) -> None:
        from callbacks.teacher_cache_writer import TeacherCacheWriter

        caches = [str(cb.cache_dir) for cb in self.trainer.callbacks if isinstance(cb, TeacherCacheWriter)]
        self._say_where([("teacher cache", ", ".join(caches) or None)])

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # LightningCLI's instantiators hold this CLI, and jsonargparse keeps the parser reachable after parsing
        # (a context variable refers to it): left in place, they would keep every CLI of a process that runs
        # several stages (demo, bench) alive with its model, data and trainer. They are only needed above.
        self.parser._instantiators = None

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.get("trainer")
        if trainer is not None:
            accelerator = trainer.get("accelerator")
            trainer["precision"] = resolve_precision(
                trainer.get("precision"), accelerator if isinstance(accelerator, str) else None
            )
            checkpoints_under_root_dir(trainer)


def plain_progress_when_not_a_terminal(trainer: Any) -> None:
    """A progress bar cannot draw into a log file: when stderr is not a terminal, Lightning's default bar
    (TQDM or Rich) is replaced by :class:`callbacks.progress.LogProgress`, one plain line every 30 s."""
    from lightning.pytorch.callbacks.progress import RichProgressBar, TQDMProgressBar

    from callbacks.progress import LogProgress

    if sys.stderr.isatty():
        return
    for i, cb in enumerate(trainer.callbacks):
        if type(cb) in (TQDMProgressBar, RichProgressBar):
            trainer.callbacks[i] = LogProgress()
            return


def checkpoints_under_root_dir(trainer: Any) -> None:
    """A ``ModelCheckpoint`` without ``dirpath`` writes to ``<save_dir>/<name>/checkpoints`` of the run's
    logger (``<default_root_dir>/checkpoints`` without one): beside the logger's ``version_N`` folders
    instead of inside one, so a checkpoint path does not move when a later ``test`` or ``predict``
    opens a new version, and runs with different logger names (the MKD ablation rows) keep apart."""
    root = trainer.get("default_root_dir") or "."
    logger = trainer.get("logger")
    logger = logger[0] if isinstance(logger, list) and logger else logger
    init = getattr(logger, "init_args", None)
    where = os.path.join(str(root), "checkpoints")
    if init is not None and init.get("save_dir") and init.get("name"):
        where = os.path.join(str(init["save_dir"]), str(init["name"]), "checkpoints")
    for cb in trainer.get("callbacks") or []:
        class_path = getattr(cb, "class_path", "") or ""
        args = getattr(cb, "init_args", None)
        if class_path.rsplit(".", 1)[-1] == "ModelCheckpoint" and args is not None and not args.get("dirpath"):
            args["dirpath"] = where


def cli_main(args: list[str] | None = None, run: bool = True) -> EllmCLI:
    one_line_per_message()
    return EllmCLI(
        LightningModule,
        RelevanceDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "ellm-mkd"},
    )
