"""Teacher-labelled augmentation: unlabelled pairs that join training with the teacher's soft targets.

Two sources, usable together (:class:`Augmentation`, the data module's ``augment`` option):

* ``source``: a file of unlabelled pairs (any format the readers take, with
  ``require_label: false``); rows whose query is a validation or test query are left out (they
  would leak the held-out queries into training), and so are pairs already judged.
* ``items_per_query``: pairs formed by sampling, for each training query, that many catalog items
  of the training split the query was not judged against (seeded, so every process and every
  rerun draws the same pairs).

The rows have no label (``labels == -100``, grades NaN, verdicts unknown), so the student's own
terms ignore them; only the distillation terms see them, through the teacher's signal. Write the
teacher cache with the same ``augment`` setting (``ellm-mkd predict`` over ``predict_split: train``
or ``all`` includes them); augmented rows the teacher has no signal for carry nothing to learn
from and are left out of training (counted in the log).

YAML::

    data:
      augment: {items_per_query: 4, seed: 0}
      # or: augment: {source: {path: data/unlabelled.parquet, require_label: false}}
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from ellm_mkd.schema import make_example_id, normalize_text

from .validation import DataSource

log = logging.getLogger(__name__)


@dataclass
class Augmentation:
    """Unlabelled training pairs for the teacher to label; see the module docstring."""

    source: DataSource | None = None
    """a file of unlabelled (query, item) pairs (set require_label: false)"""
    items_per_query: int = 0
    """pairs sampled from the training items for each training query (0: none)"""
    seed: int = 0
    """seed of the sampling"""

    def __post_init__(self) -> None:
        if isinstance(self.source, dict):
            self.source = DataSource(**self.source)
        if self.items_per_query < 0:
            raise ValueError(f"augment.items_per_query must be >= 0, got {self.items_per_query}")
        if self.source is None and self.items_per_query == 0:
            raise ValueError("augment: give a source file of unlabelled pairs, items_per_query > 0, or both")


def _blank(row: dict[str, Any], example_id: str, query: str, item_id: str, item_text: str) -> dict[str, Any]:
    return {
        "example_id": example_id,
        "query": query,
        "item_id": item_id,
        "item_text": item_text,
        "label": None,
        "grade": None,
        "gain": None,
        "bucket": row["bucket"],
        "query_id": row["query_id"],
        "dims": [None] * len(row["dims"]),
        "augmented": True,
    }


def sample_pairs(train_rows: list[dict[str, Any]], items_per_query: int, seed: int) -> list[dict[str, Any]]:
    """For each training query, ``items_per_query`` training items it was not judged against."""
    items: dict[str, str] = {}
    judged: dict[int, set[str]] = {}
    first: dict[int, dict[str, Any]] = {}
    for r in train_rows:
        items.setdefault(r["item_id"], r["item_text"])
        judged.setdefault(r["query_id"], set()).add(r["item_id"])
        first.setdefault(r["query_id"], r)
    pool = sorted(items)
    out = []
    for qid in sorted(first):
        rng = random.Random(f"{seed}:{first[qid]['query']}")  # per query: adding queries leaves others' draws alone
        candidates = [i for i in pool if i not in judged[qid]]
        for item_id in rng.sample(candidates, min(items_per_query, len(candidates))):
            row = first[qid]
            out.append(_blank(row, make_example_id(row["query"], item_id), row["query"], item_id, items[item_id]))
    return out


def file_pairs(
    rows: list[dict[str, Any]], held_out_queries: set[str], known_ids: set[str], path: str
) -> list[dict[str, Any]]:
    """The rows of an augmentation file less held-out queries and already-judged pairs."""
    keep, held, dup = [], 0, 0
    for r in rows:
        if normalize_text(r["query"]) in held_out_queries:
            held += 1
        elif r["example_id"] in known_ids:
            dup += 1
        else:
            keep.append(_blank(r, r["example_id"], r["query"], r["item_id"], r["item_text"]))
    if held or dup:
        log.info(
            "augmentation %s: %d pairs with a validation/test query and %d already-judged pairs left out",
            path,
            held,
            dup,
        )
    return keep
