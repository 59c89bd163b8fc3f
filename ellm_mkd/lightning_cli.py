"""The LightningCLI behind ``ellm-mkd fit|validate|test|predict``.

Models are chosen in YAML with ``model: {class_path: ..., init_args: ...}``; the data module is
always :class:`~datamodules.RelevanceDataModule` (its ``source`` section says what to read). The
number of levels and the relevant level come from the data's label scheme and are linked into
the model, so the two sections cannot disagree.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI

from datamodules.datamodule import RelevanceDataModule


class EllmCLI(LightningCLI):
    """LightningCLI with the project's data module fixed and any LightningModule as model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_levels", "model.init_args.num_levels", apply_on="instantiate")
        parser.link_arguments("data.relevant_level", "model.init_args.relevant_level", apply_on="instantiate")


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
