"""The LightningCLI behind ``ellm-mkd fit|validate|test|predict``.

Models are chosen in YAML with ``model: {class_path: ..., init_args: ...}``; the data module is
always :class:`~datamodules.RelevanceDataModule` (its ``source`` section says what to read).
"""

from __future__ import annotations

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI

from datamodules.datamodule import RelevanceDataModule


class EllmCLI(LightningCLI):
    """LightningCLI with the project's data module fixed and any LightningModule as model."""


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
