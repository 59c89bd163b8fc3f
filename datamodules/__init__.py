"""Data: readers, validation, label schemes, splits, the synthetic catalog and RelevanceDataModule."""

from .validation import ColumnMapping, DataSource, SplitOptions

__all__ = ["RelevanceDataModule", "DataSource", "ColumnMapping", "SplitOptions"]


def __getattr__(name: str):
    # RelevanceDataModule pulls in torch and Lightning; load them only when it is asked for.
    if name == "RelevanceDataModule":
        from .datamodule import RelevanceDataModule

        return RelevanceDataModule
    raise AttributeError(name)
