"""Length-grouped shuffling of training rows: batches of similar text length, in random order.

A causal LM teacher pays for every padding token of its longest sequence in a batch; the students
barely notice. :class:`LengthGroupedSampler` shuffles the rows, cuts the shuffled order into windows
of ``batch_size * window_batches`` rows, sorts each window by length and shuffles the resulting
batches, so each batch holds rows of similar length while the epoch stays random (the scheme of
``transformers``' ``group_by_length``). It is a plain index sampler: under DDP Lightning wraps it in a
distributed sampler like any other, and each process still draws neighbours of similar length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


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
