"""Scoring (query, item text) pairs with a shipped student: the one runtime behind ``score``, ``serve`` and
the serving benchmark.

A :class:`Scorer` tokenizes exactly as the student did in training (cross-encoder: the pair, the item
truncated first; two-tower: each side alone), batches by length (less padding) and runs the student's
graphs through a runner: :class:`OnnxRunner` (an exported directory, fp32 or int8, onnxruntime) or
:class:`TorchRunner` (the same graphs in PyTorch, from a checkpoint). Both give the same
:class:`PairScores`; a two-tower scorer also embeds texts and scores precomputed vectors, so a catalog's
item vectors are computed once (:mod:`ellm_mkd.serving.item_index`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .card import ModelCard

SCORE_OUTPUTS = ("level_probs", "expected_grade", "dim_probs")
PRECISIONS = ("fp32", "int8")


@dataclass
class PairScores:
    """What a student says about N pairs."""

    level_probs: np.ndarray  # [N, K]
    expected_grade: np.ndarray  # [N]
    dim_probs: np.ndarray  # [N, D, V]

    def __len__(self) -> int:
        return len(self.expected_grade)

    def take(self, index: np.ndarray | slice) -> PairScores:
        return PairScores(self.level_probs[index], self.expected_grade[index], self.dim_probs[index])

    @staticmethod
    def concat(parts: Sequence[PairScores], num_levels: int, dims: int, verdicts: int) -> PairScores:
        if not parts:
            return PairScores(
                np.zeros((0, num_levels), np.float32),
                np.zeros(0, np.float32),
                np.zeros((0, dims, verdicts), np.float32),
            )
        return PairScores(*(np.concatenate([getattr(p, k) for p in parts]) for k in SCORE_OUTPUTS))


class GraphRunner(Protocol):
    """Runs one named graph of a student on numpy inputs; returns its outputs in order."""

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class OnnxRunner:
    """The ONNX graphs of an exported directory in onnxruntime (CPU)."""

    def __init__(self, directory: str | Path, card: ModelCard, precision: str = "fp32", threads: int | None = None):
        import onnxruntime as ort

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.sessions = {}
        self.inputs: dict[str, list[str]] = {}
        for name, g in card.graphs.items():
            file = g.get(precision)
            if file is None:
                raise ValueError(
                    f"{directory}: graph {name!r} has no {precision} file (export with --quantize true for int8)"
                )
            self.sessions[name] = ort.InferenceSession(
                str(Path(directory) / file), opts, providers=["CPUExecutionProvider"]
            )
            self.inputs[name] = [i.name for i in self.sessions[name].get_inputs()]

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[graph].run(None, {k: feeds[k] for k in self.inputs[graph]})


class TorchRunner:
    """The same graphs as PyTorch modules (``lightning_modules.serving_graphs``)."""

    def __init__(self, graphs: dict[str, Any], inputs: dict[str, list[str]]):
        self.graphs = graphs
        self.inputs = inputs

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.graphs[graph](*(torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in self.inputs[graph]))
        out = out if isinstance(out, tuple | list) else (out,)
        return [o.float().numpy() for o in out]


class Scorer:
    """Scores pairs with a student's graphs. ``batch_size`` pairs (or texts) per graph call."""

    def __init__(self, card: ModelCard, tokenizer: Any, runner: GraphRunner, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.card = card
        self.tokenizer = tokenizer
        self.runner = runner
        self.batch_size = batch_size

    @classmethod
    def from_export(
        cls, directory: str | Path, precision: str = "fp32", batch_size: int = 64, threads: int | None = None
    ) -> Scorer:
        from transformers import AutoTokenizer

        card = ModelCard.load(directory)
        tokenizer = AutoTokenizer.from_pretrained(str(Path(directory) / card.tokenizer))
        return cls(card, tokenizer, OnnxRunner(directory, card, precision, threads), batch_size)

    # -- tokens ----------------------------------------------------------------------------------
    def _feeds(self, enc: Any, prefix: str = "") -> dict[str, np.ndarray]:
        return {k: np.asarray(enc[k], dtype=np.int64) for k in self.card.inputs if k in enc}

    def encode_pairs(self, queries: Sequence[str], items: Sequence[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(
            list(queries),
            list(items),
            truncation="only_second",
            max_length=self.card.max_seq_length,
            padding=True,
            return_tensors="np",
        )
        return self._feeds(enc)

    def encode_texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(
            list(texts), truncation=True, max_length=self.card.max_seq_length, padding=True, return_tensors="np"
        )
        return self._feeds(enc)

    def _chunks(self, lengths: Sequence[int]) -> list[np.ndarray]:
        order = np.argsort(np.asarray(lengths), kind="stable")
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    # -- scoring ---------------------------------------------------------------------------------
    def _empty(self) -> PairScores:
        return PairScores.concat([], self.card.num_levels, len(self.card.dimensions), len(self.card.verdicts))

    def _assemble(self, n: int, chunks: list[np.ndarray], parts: list[list[np.ndarray]]) -> PairScores:
        if not n:
            return self._empty()
        out = self._empty()
        arrays = []
        for k, tmpl in enumerate((out.level_probs, out.expected_grade, out.dim_probs)):
            full = np.zeros((n, *tmpl.shape[1:]), np.float32)
            for idx, p in zip(chunks, parts):
                full[idx] = p[k]
            arrays.append(full)
        return PairScores(*arrays)

    def score_pairs(self, queries: Sequence[str], items: Sequence[str]) -> PairScores:
        """Scores of ``(queries[i], items[i])``: item texts rendered as in training (``card.item_fields``)."""
        if len(queries) != len(items):
            raise ValueError(f"{len(queries)} queries but {len(items)} items")
        if self.card.kind == "two_tower":
            uq, qi = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
            ui, ii = np.unique(np.asarray(items, dtype=object), return_inverse=True)
            return self.score_vectors(self.embed("query", list(uq))[qi], self.embed("item", list(ui))[ii])
        chunks = self._chunks([len(q) + len(d) for q, d in zip(queries, items)])
        parts = [
            self.runner.run("cross_encoder", self.encode_pairs([queries[i] for i in c], [items[i] for i in c]))
            for c in chunks
        ]
        return self._assemble(len(queries), chunks, parts)

    def embed(self, tower: str, texts: Sequence[str]) -> np.ndarray:
        """Two-tower: vectors ``[N, H]`` of ``texts`` from the ``query`` or ``item`` tower."""
        if self.card.kind != "two_tower":
            raise ValueError("embed: only a two-tower student has towers")
        chunks = self._chunks([len(t) for t in texts])
        parts = [self.runner.run(f"{tower}_tower", self.encode_texts([texts[i] for i in c]))[0] for c in chunks]
        if not parts:
            return np.zeros((0, 0), np.float32)
        out = np.zeros((len(texts), parts[0].shape[1]), np.float32)
        for c, p in zip(chunks, parts):
            out[c] = p
        return out

    def score_vectors(self, query_vecs: np.ndarray, item_vecs: np.ndarray) -> PairScores:
        """Two-tower: scores of precomputed vector pairs (row i with row i)."""
        n = len(query_vecs)
        step = max(self.batch_size, 1024)  # the scorer is an MLP: large batches cost nothing
        chunks = [np.arange(i, min(i + step, n)) for i in range(0, n, step)]
        parts = [
            self.runner.run(
                "scorer", {"query_vec": query_vecs[c].astype(np.float32), "item_vec": item_vecs[c].astype(np.float32)}
            )
            for c in chunks
        ]
        return self._assemble(n, chunks, parts)

    # -- what a person reads ------------------------------------------------------------------------
    def columns(self, scores: PairScores) -> dict[str, list[Any]]:
        """Flat output columns (:func:`score_columns`)."""
        card = self.card
        return score_columns(scores, card.level_names, card.dimensions, card.verdicts)


def score_columns(
    scores: PairScores, level_names: Sequence[str], dimensions: Sequence[str], verdicts: Sequence[str]
) -> dict[str, list[Any]]:
    """``expected_grade``, ``level`` (most likely), ``p_<level>`` per level and, per dimension, its most
    likely verdict and that verdict's probability (``<dim>``, ``<dim>_p``)."""
    cols: dict[str, list[Any]] = {
        "expected_grade": [float(x) for x in scores.expected_grade],
        "level": [level_names[k] for k in scores.level_probs.argmax(-1)] if len(scores) else [],
    }
    for k, name in enumerate(level_names):
        cols[f"p_{name}"] = [float(x) for x in scores.level_probs[:, k]]
    best = scores.dim_probs.argmax(-1)  # [N, D]
    for j, dim in enumerate(dimensions):
        cols[dim] = [verdicts[v] for v in best[:, j]]
        cols[f"{dim}_p"] = [float(scores.dim_probs[i, j, v]) for i, v in enumerate(best[:, j])]
    return cols
