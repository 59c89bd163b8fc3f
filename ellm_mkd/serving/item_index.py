"""A two-tower student's item vectors, computed once and reused: ``vectors.npy`` (float32 ``[N, H]``),
``items.json`` (item ids and a hash of each item's text, row by row) and ``index.json`` (the model
fingerprint and item fields they were computed with). A lookup computes only the items that are new or
whose text changed; an index made by another model or item rendering is refused."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class ItemIndex:
    def __init__(self, directory: str | Path, model_fingerprint: str, item_fields: Sequence[str]):
        self.dir = Path(directory)
        self.meta = {"model_fingerprint": model_fingerprint, "item_fields": list(item_fields)}
        self.ids: list[str] = []
        self.hashes: list[str] = []
        self.vectors = np.zeros((0, 0), np.float32)
        self.row: dict[str, int] = {}
        self.reused = self.added = 0
        meta_file = self.dir / "index.json"
        if meta_file.is_file():
            saved = json.loads(meta_file.read_text(encoding="utf-8"))
            for key, ours in self.meta.items():
                if saved.get(key) != ours:
                    raise ValueError(
                        f"{self.dir}: this item index was built with {key}={saved.get(key)!r}, not {ours!r}; "
                        "give another --item_index directory (or delete this one) to build a new one"
                    )
            items = json.loads((self.dir / "items.json").read_text(encoding="utf-8"))
            self.ids, self.hashes = items["ids"], items["hashes"]
            self.vectors = np.load(self.dir / "vectors.npy")
            self.row = {i: k for k, i in enumerate(self.ids)}
        elif self.dir.exists() and any(self.dir.iterdir()):
            raise ValueError(f"{self.dir}: exists, is not empty and holds no index.json (not an item index)")
        self._storage = self.vectors  # ``vectors`` is its first rows

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, ids: Sequence[str], texts: Sequence[str], embed: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """Vectors of the items ``ids`` (with texts ``texts``), embedding those missing or changed."""
        todo: dict[str, str] = {}
        for i, t in zip(ids, texts):
            k = self.row.get(i)
            if k is None or self.hashes[k] != text_hash(t):
                todo[i] = t
        if todo:
            vecs = embed(list(todo.values()))
            if not len(self.vectors):
                self.vectors = np.zeros((0, vecs.shape[1]), np.float32)
            new_rows = []
            for (i, t), v in zip(todo.items(), vecs):
                k = self.row.get(i)
                if k is None:
                    self.row[i] = len(self.ids)
                    self.ids.append(i)
                    self.hashes.append(text_hash(t))
                    new_rows.append(v)
                else:
                    self.vectors[k] = v
                    self.hashes[k] = text_hash(t)
            if new_rows:
                self._append(np.stack(new_rows).astype(np.float32))
            self.added += len(todo)
        self.reused += len(set(ids)) - len(todo)
        return self.vectors[[self.row[i] for i in ids]]

    def _append(self, rows: np.ndarray) -> None:
        """Add vectors at the end. The storage grows by a quarter, so a catalog looked up a chunk at a time is
        copied a bounded number of times per doubling, not once per chunk, and a large saved index that gains a
        few items holds 1.25x its size, not 2x."""
        n, k = len(self.vectors), len(rows)
        if len(self._storage) < n + k or self._storage.shape[1:] != rows.shape[1:]:
            grown = np.zeros((max(n + n // 4, n + k), rows.shape[1]), np.float32)
            grown[:n] = self.vectors
            self._storage = grown
        self._storage[n : n + k] = rows
        self.vectors = self._storage[: n + k]

    def get(self, ids: Sequence[str]) -> np.ndarray:
        """Vectors of items already in the index."""
        return self.vectors[[self.row[i] for i in ids]]

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        files: dict[str, Any] = {
            "vectors.npy": self.vectors,
            "items.json": {"ids": self.ids, "hashes": self.hashes},
            "index.json": {**self.meta, "count": len(self.ids), "dim": int(self.vectors.shape[1]) if self.ids else 0},
        }
        for name, content in files.items():  # index.json last: it marks the index complete
            tmp = self.dir / f".{name}.tmp"
            if name.endswith(".npy"):
                with open(tmp, "wb") as f:
                    np.save(f, content)
            else:
                tmp.write_text(json.dumps(content), encoding="utf-8")
            os.replace(tmp, self.dir / name)
