"""Length-grouped shuffling of training rows: batches of similar text length, in random order.

A causal LM teacher pays for every padding token of its longest sequence in a batch; the students
barely notice. :class:`LengthGroupedSampler` shuffles the rows, cuts the shuffled order into windows
of ``batch_size * window_batches`` rows, sorts each window by length and shuffles the resulting
batches, so each batch holds rows of similar length while the epoch stays random (the scheme of
``transformers``' ``group_by_length``). It is a plain index sampler: under DDP Lightning wraps it in a
distributed sampler like any other, and each process still draws neighbours of similar length.

:class:`ResumableLoader` is the training loader: a run resumed from a checkpoint saved in the middle of an
epoch goes on with the batches that epoch had left instead of training its first batches again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class LengthGroupedSampler(Sampler[int]):
    """Indices of ``lengths`` in random, length-grouped order (see the module docstring); a new order each
    epoch from ``seed + epoch`` (call :meth:`set_epoch`; Lightning does for samplers it wraps)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, window_batches: int = 50, seed: int = 0):
        if batch_size < 1 or window_batches < 1:
            raise ValueError("batch_size and window_batches must be >= 1")
        self.lengths = list(lengths)
        self.batch_size, self.window = batch_size, batch_size * window_batches
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1  # a sampler nobody sets the epoch of still reshuffles each pass
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), self.window):
            window = sorted(order[start : start + self.window], key=lambda i: self.lengths[i], reverse=True)
            batches += [window[j : j + self.batch_size] for j in range(0, len(window), self.batch_size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield from batches[b]


class ResumableLoader(DataLoader):
    """A DataLoader that drops, after a restore, the batches of the epoch that were trained before it.

    Lightning restores a run's counters from a checkpoint saved mid-epoch (a preemption's ``last.ckpt``, a step
    checkpoint) but restarts a plain DataLoader at the top of the epoch ("your dataloader is not resumable"): the
    resumed run would train the epoch's first batches twice and never its last ones. The data module saves, with
    every checkpoint, the epoch and how many of its batches were trained (``RelevanceDataModule.state_dict``);
    ``skip()`` hands that count over once, at the first batch asked for after the restore, when the epoch is the
    same (0 otherwise), and that many batches of the epoch's order are drawn and dropped. The order is the
    sampler's, a function of the seed and the epoch (Lightning's DistributedSampler under DDP,
    :class:`LengthGroupedSampler`), so the resumed run trains the batches an uninterrupted run trains; a plain
    shuffle in one process draws its order from the global RNG, which a restore does not bring back.

    Args:
        skip: called at the first batch of every pass: how many batches to drop (the data module's).
    """

    def __init__(self, *args: Any, skip: Callable[[], int] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skip = skip  # Lightning rebuilds the loader with its sampler from these arguments

    # Lightning's protocol of a resumable loader: the position itself is in the data module's state (it reads the
    # trainer's counters); these only tell Lightning that the loader resumes (no "not resumable" warning)
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __iter__(self) -> Iterator[Any]:
        it = super().__iter__()
        return it if self.skip is None else self._skipping(it)

    def _skipping(self, it: Iterator[Any]) -> Iterator[Any]:
        # lazily: Lightning sets the sampler's epoch after iter() and before the first batch
        for _ in range(self.skip()):
            if next(it, None) is None:
                return
        yield from it
