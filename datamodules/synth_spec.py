"""What the synthetic catalog is made of and how a pair is judged.

Levels and gains, query kinds, :class:`SynthConfig`, the :class:`Product` and :class:`Query`
records, and the labelling rules: :func:`judge` (the true verdict of each dimension) and
:func:`rule_level` (verdicts -> level). The rules are documented in :mod:`datamodules.synth`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ellm_mkd.schema import DIMENSIONS, VERDICTS

from .synth_vocab import CLOSE, COMPLEMENTS

LEVEL_NAMES: tuple[str, ...] = ("irrelevant", "complement", "substitute", "exact")
#: ESCI gains per level, used for ``gain``.
GAINS: tuple[float, ...] = (0.0, 0.01, 0.1, 1.0)
QUERY_KINDS: tuple[str, ...] = ("category", "brand_category", "model", "attribute", "long_tail", "misspelled")
DEFAULT_KIND_MIX: dict[str, float] = {
    "category": 0.08,
    "brand_category": 0.17,
    "model": 0.18,
    "attribute": 0.25,
    "long_tail": 0.17,
    "misspelled": 0.15,
}


@dataclass
class SynthConfig:
    """What the synthetic catalog generates. Every field is checked in ``__post_init__``."""

    seed: int = 0
    """Seed of every random choice: the same seed gives identical tables."""
    num_queries: int = 600
    """Distinct queries (after normalisation)."""
    items_per_query: int = 10
    """Judged candidate items per query; at least 4, so that every level can occur."""
    label_noise: float = 0.05
    """Probability that a pair's label moves to an adjacent level (the verdicts stay truthful)."""
    val_fraction: float = 0.1
    """Share of queries in the validation split (query-disjoint, by hash; see ``splits``)."""
    test_fraction: float = 0.2
    """Share of queries in the test split."""
    series_per_brand: int = 3
    """Most product series a brand has per category (each brand gets 1..this)."""
    variants_per_series: int = 3
    """Most models per series (1..this); sibling models give ``model: partial`` pairs."""
    kind_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KIND_MIX))
    """Share of each query kind (keys from QUERY_KINDS; normalised to sum 1)."""
    pool_items_per_query: int = 0
    """Further candidate items per training query, written to ``pool.parquet`` as a pool of pairs for the teacher
    to label (0: no pool). Drawn after the judged pairs from their own random stream, so the judged tables are the
    same whatever the pool size."""

    def __post_init__(self) -> None:
        if self.num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {self.num_queries}")
        if self.items_per_query < 4:
            raise ValueError(f"items_per_query must be >= 4 (one item per level), got {self.items_per_query}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1], got {self.label_noise}")
        if not (
            0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1
        ):
            raise ValueError(
                "need 0 <= val_fraction, test_fraction and their sum < 1; "
                f"got {self.val_fraction}, {self.test_fraction}"
            )
        if self.pool_items_per_query < 0:
            raise ValueError(f"pool_items_per_query must be >= 0, got {self.pool_items_per_query}")
        if self.series_per_brand < 1 or self.variants_per_series < 1:
            raise ValueError(
                "series_per_brand and variants_per_series must be >= 1, "
                f"got {self.series_per_brand}, {self.variants_per_series}"
            )
        unknown = sorted(set(self.kind_mix) - set(QUERY_KINDS))
        if unknown:
            raise ValueError(f"kind_mix has unknown kinds {unknown}; known: {list(QUERY_KINDS)}")
        if any(v < 0 for v in self.kind_mix.values()) or sum(self.kind_mix.values()) <= 0:
            raise ValueError(f"kind_mix shares must be >= 0 with a positive sum, got {self.kind_mix}")


@dataclass
class Product:
    item_id: str
    category: str
    brand: str
    series: str
    series_key: str
    model: str
    attrs: dict[str, str]
    title: str = ""
    description: str = ""
    bullets: str = ""


@dataclass
class Query:
    text: str
    kind: str
    base_kind: str
    category: str
    brand: str | None = None
    model: str | None = None
    series_key: str | None = None
    attrs: dict[str, str] = field(default_factory=dict)
    frequency: int = 1
    base_text: str | None = None  # a misspelled query: the text it was misspelled from


def model_key(model: str) -> str:
    """A model number compared without case, hyphens or spaces ("VX-2041" -> "vx2041")."""
    return re.sub(r"[^0-9a-z]", "", model.lower())


def judge(query: Query, product: Product) -> dict[str, str]:
    """The true verdict of each dimension for a (query, product) pair (module docstring rules)."""
    qc, pc = query.category, product.category
    category = "match" if pc == qc else "partial" if pc in CLOSE[qc] else "mismatch"
    usage = "match" if category != "mismatch" else "partial" if pc in COMPLEMENTS[qc] else "mismatch"
    brand = "absent" if query.brand is None else "match" if product.brand == query.brand else "mismatch"
    model = (
        "absent"
        if query.model is None
        else "match"
        if model_key(product.model) == query.model
        else "partial"
        if product.series_key == query.series_key
        else "mismatch"
    )
    hits = sum(product.attrs.get(k) == v for k, v in query.attrs.items())
    attributes = (
        "absent" if not query.attrs else "match" if hits == len(query.attrs) else "partial" if hits else "mismatch"
    )
    return {"category": category, "brand": brand, "model": model, "attributes": attributes, "usage": usage}


def rule_level(dims: dict[str, str]) -> int:
    """The documented labelling rule: dimension verdicts -> level 0..3 (irrelevant..exact).

    A missing dimension counts as ``absent``. First rule that applies:
      1. category mismatch: substitute (2) if usage is match, complement (1) if usage is partial,
         else irrelevant (0);
      2. category partial (a close category doing the same job): substitute (2);
      3. category match or absent, and brand, model or attributes is mismatch or partial:
         substitute (2);
      4. otherwise (every stated dimension matches): exact (3).
    """
    v = {d: dims.get(d, "absent") for d in DIMENSIONS}
    bad = {d: x for d, x in v.items() if x not in VERDICTS}
    if bad:
        raise ValueError(f"unknown verdicts {bad}; expected one of {VERDICTS}")
    if v["category"] == "mismatch":
        return {"match": 2, "partial": 1}.get(v["usage"], 0)
    if v["category"] == "partial":
        return 2
    if any(v[d] in ("mismatch", "partial") for d in ("brand", "model", "attributes")):
        return 2
    return 3
