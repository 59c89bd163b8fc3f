"""The LightningCLI behind ``ellm-mkd fit|validate|test|predict``.

Models are chosen in YAML with ``model: {class_path: ..., init_args: ...}``; the data module is
always :class:`~datamodules.RelevanceDataModule` (its ``source`` section says what to read). The
number of levels and the relevant level come from the data's label scheme and are linked into
the model, so the two sections cannot disagree.
"""

from __future__ import annotations

import logging
import os

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI

from datamodules.datamodule import RelevanceDataModule

log = logging.getLogger(__name__)
KEEP_BF16_ENV = "ELLM_MKD_KEEP_BF16"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); else autocast emulates it."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str | int | None, accelerator: str | None) -> str | int | None:
    """``bf16-mixed`` where it helps: on an x86 CPU without native bf16 (AVX2 only, e.g. many AMD EPYC
    and older Xeons) bf16 autocast is emulated and far slower than float32 (measured on a 2-core
    AVX2 EPYC: a MiniLM-L6 training step at batch 32 x 34 tokens takes 16.4-16.8 s under bf16
    autocast, 0.72-0.81 s in float32), so there it becomes ``32-true`` with a warning. Set
    ``ELLM_MKD_KEEP_BF16=1`` to keep what was asked."""
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    x86 = torch.backends.cpu.get_cpu_capability().startswith("AVX")
    if (str(precision).startswith("bf16") and on_cpu and x86 and not cpu_has_native_bf16()
            and not os.environ.get(KEEP_BF16_ENV)):
        log.warning("precision %s asked for on a CPU without native bf16 (%s): using 32-true, which is faster here "
                    "(set %s=1 to keep %s)", precision, torch.backends.cpu.get_cpu_capability(), KEEP_BF16_ENV,
                    precision)
        return "32-true"
    return precision


class EllmCLI(LightningCLI):
    """LightningCLI with the project's data module fixed, any LightningModule as model, and a
    ``distill`` section (:class:`callbacks.mkd.MKDistillation`, off unless ``distill.enabled: true``)."""

    def add_arguments_to_parser(self, parser) -> None:
        from callbacks.mkd import MKDistillation

        parser.add_lightning_class_args(MKDistillation, "distill")
        parser.set_defaults({"distill.enabled": False})
        parser.link_arguments("data.num_levels", "model.init_args.num_levels", apply_on="instantiate")
        parser.link_arguments("data.relevant_level", "model.init_args.relevant_level", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.get("trainer")
        if trainer is not None:
            accelerator = trainer.get("accelerator")
            trainer["precision"] = resolve_precision(trainer.get("precision"), accelerator if isinstance(accelerator, str) else None)


def cli_main(args: list[str] | None = None, run: bool = True) -> EllmCLI:
    return EllmCLI(
        LightningModule,
        RelevanceDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "ellm-mkd"},
    )
