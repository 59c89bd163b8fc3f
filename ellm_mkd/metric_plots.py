"""Matplotlib helpers of :meth:`~ellm_mkd.metrics.RelevanceMetrics.figures`: the empty-plot notice and
the reliability diagram's bars."""

from __future__ import annotations

import torch
from torch import Tensor


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no labelled rows", ha="center", va="center", transform=ax.transAxes)


def _reliability(ax, ax_n, conf: Tensor, acc: Tensor, n_bins: int) -> None:
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    counts = torch.bincount(idx, minlength=n_bins).float()
    acc_bin = torch.bincount(idx, weights=acc, minlength=n_bins) / counts.clamp(min=1)
    conf_bin = torch.bincount(idx, weights=conf, minlength=n_bins) / counts.clamp(min=1)
    centers = ((edges[:-1] + edges[1:]) / 2).numpy()
    width = 1.0 / n_bins
    filled = (counts > 0).numpy()
    acc_np, conf_np = acc_bin.numpy(), conf_bin.numpy()
    ax.bar(centers[filled], acc_np[filled], width=width, edgecolor="black", label="accuracy")
    ax.bar(
        centers[filled],
        (conf_np - acc_np)[filled],
        bottom=acc_np[filled],
        width=width,
        color="red",
        alpha=0.3,
        edgecolor="red",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.legend(loc="upper left")
    ax_n.bar(centers, counts.numpy(), width=width, edgecolor="black")
