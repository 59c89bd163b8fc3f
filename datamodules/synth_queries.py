"""Generating the synthetic queries (kinds, misspellings, traffic) and each query's judged candidate
items (see "Queries" and "Candidates" in :mod:`datamodules.synth`)."""

from __future__ import annotations

import math
import random

from ellm_mkd.schema import normalize_text

from .synth_spec import QUERY_KINDS, Product, Query, SynthConfig, judge, model_key, rule_level
from .synth_vocab import _FILLERS, _KEYBOARD, _PRE_KEYS, CATEGORIES, CLOSE, COMPLEMENTS, Category

_KIND_TRAFFIC = {
    "category": 1000.0,
    "brand_category": 300.0,
    "model": 40.0,
    "attribute": 30.0,
    "long_tail": 4.0,
    "misspelled": 3.0,
}
_TRAFFIC_SIGMA = 0.6


def _phrase(rng: random.Random, cat: Category, plural: float = 0.3) -> str:
    phrase = rng.choice((cat.name, cat.name, *cat.aliases)).lower()
    last = phrase.split()[-1]
    if rng.random() < plural and not last.endswith("s") and last not in ("soil", "mix", "paint", "vacuum"):
        phrase = phrase[:-1] + "ies" if last.endswith("y") and last[-2:-1] not in "aeiou" else phrase + "s"
    return phrase


def _with_attrs(rng: random.Random, phrase: str, attrs: dict[str, str]) -> str:
    before, after = [], []
    for k, v in attrs.items():
        (before if k in _PRE_KEYS or rng.random() < 0.4 else after).append(v.lower())
    return " ".join([*before, phrase, *after])


def _base_query(rng: random.Random, kind: str, products: list[Product]) -> Query:
    if kind in ("category", "brand_category"):
        cat = rng.choice(list(CATEGORIES.values()))
        phrase = _phrase(rng, cat)
        if kind == "category":
            r = rng.random()
            text = (
                f"{rng.choice(_FILLERS[:2])} {phrase}" if r < 0.15 else f"{phrase} {_FILLERS[2]}" if r < 0.2 else phrase
            )
            return Query(text, kind, kind, cat.name)
        brand = rng.choice(cat.brands)
        text = f"{brand.lower()} {phrase}" if rng.random() < 0.9 else f"{phrase} {brand.lower()}"
        return Query(text, kind, kind, cat.name, brand=brand)
    p = rng.choice(products)
    cat = CATEGORIES[p.category]
    if kind == "model":
        m = p.model.lower() if rng.random() < 0.6 else model_key(p.model)
        brand = p.brand if rng.random() < 0.5 else None
        text = " ".join(
            x for x in (brand and brand.lower(), m, _phrase(rng, cat, 0.0) if rng.random() < 0.5 else "") if x
        )
        return Query(text, kind, kind, p.category, brand=brand, model=model_key(p.model), series_key=p.series_key)
    if kind == "attribute":
        keys = rng.sample([k for k, _ in cat.attributes], 1 if rng.random() < 0.6 else 2)
        attrs = {k: p.attrs[k] for k in keys}
        return Query(_with_attrs(rng, _phrase(rng, cat, 0.2), attrs), kind, kind, p.category, attrs=attrs)
    # long tail: brand + 2-4 attribute values (+ model) + filler
    keys = rng.sample([k for k, _ in cat.attributes], min(len(cat.attributes), rng.randint(2, 4)))
    attrs = {k: p.attrs[k] for k in keys}
    brand = p.brand if rng.random() < 0.85 else None
    with_model = rng.random() < 0.3
    parts = [
        rng.choice(_FILLERS) if rng.random() < 0.5 else "",
        brand.lower() if brand else "",
        _with_attrs(rng, _phrase(rng, cat, 0.2), attrs),
        p.model.lower() if with_model else "",
    ]
    return Query(
        " ".join(x for x in parts if x),
        kind,
        kind,
        p.category,
        brand=brand,
        model=model_key(p.model) if with_model else None,
        series_key=p.series_key if with_model else None,
        attrs=attrs,
    )


def _misspell(rng: random.Random, text: str) -> str:
    """1-2 typing errors (drop, swap, double, neighbouring key) in words of 4+ letters."""
    tokens = text.split()
    eligible = [i for i, t in enumerate(tokens) if t.isalpha() and len(t) >= 4]
    for i in rng.sample(eligible, min(len(eligible), 1 if rng.random() < 0.7 else 2)):
        t = tokens[i]
        op, j = rng.randrange(4), rng.randrange(1, len(t) - 1)
        if op == 0:
            t = t[:j] + t[j + 1 :]
        elif op == 1:
            t = t[:j] + t[j + 1] + t[j] + t[j + 2 :]
        elif op == 2:
            t = t[:j] + t[j] + t[j:]
        else:
            t = t[:j] + rng.choice(_KEYBOARD.get(t[j], "e")) + t[j + 1 :]
        tokens[i] = t
    return " ".join(tokens)


def _kind_plan(cfg: SynthConfig, rng: random.Random) -> list[str]:
    """Exactly apportioned kinds (largest remainder), shuffled."""
    total = sum(cfg.kind_mix.values())
    shares = {k: cfg.kind_mix.get(k, 0.0) / total * cfg.num_queries for k in QUERY_KINDS}
    counts = {k: int(s) for k, s in shares.items()}
    for k in sorted(QUERY_KINDS, key=lambda k: counts[k] - shares[k])[: cfg.num_queries - sum(counts.values())]:
        counts[k] += 1
    plan = [k for k in QUERY_KINDS for _ in range(counts[k])]
    rng.shuffle(plan)
    return plan


def _make_queries(cfg: SynthConfig, products: list[Product]) -> list[Query]:
    """``num_queries`` distinct queries in the planned kind mix, each with its traffic."""
    rng = random.Random(f"synth-queries:{cfg.seed}")
    base_kinds = [k for k in QUERY_KINDS if k != "misspelled"]
    base_weights = [cfg.kind_mix.get(k, 0.0) + 1e-3 for k in base_kinds]
    seen: set[str] = set()
    queries: list[Query] = []
    for planned in _kind_plan(cfg, rng):
        kind = planned
        for attempt in range(200):
            if attempt == 30:
                kind = "long_tail"  # the finite spaces (category, brand) are exhausted: fall back
            if kind == "misspelled":
                q = _base_query(rng, rng.choices(base_kinds, base_weights)[0], products)
                text = _misspell(rng, q.text)
                if normalize_text(text) == normalize_text(q.text):
                    continue
                q.text, q.kind, q.base_text = text, "misspelled", q.text
            else:
                q = _base_query(rng, kind, products)
            key = normalize_text(q.text)
            if key not in seen:
                break
        else:
            raise ValueError(f"could not find {cfg.num_queries} distinct queries; lower num_queries")
        seen.add(key)
        q.frequency = max(1, round(_KIND_TRAFFIC[q.kind] * math.exp(rng.gauss(0.0, _TRAFFIC_SIGMA))))
        queries.append(q)
    return queries


# ------------------------------------------------------------------------------------- candidates


def _wsample(rng: random.Random, items: list, weights: list[float], k: int) -> list:
    """k items without replacement, with probability growing with weight (Efraimidis-Spirakis)."""
    keyed = sorted(((rng.random() ** (1.0 / w), i) for i, w in enumerate(weights)), reverse=True)
    return [items[i] for _, i in keyed[:k]]


def _candidates(
    rng: random.Random, q: Query, by_cat: dict[str, list[Product]], n: int
) -> list[tuple[Product, dict[str, str]]]:
    """``n`` distinct (item, verdicts) pairs for ``q`` in the level mix of the module docstring."""
    same = [(p, judge(q, p)) for p in by_cat[q.category]]
    levels = [rule_level(d) for _, d in same]
    exact = [x for x, level in zip(same, levels) if level == 3]
    subs = [x for x, level in zip(same, levels) if level == 2]
    close = [p for c in CLOSE[q.category] for p in by_cat[c]]
    comps = [p for c in COMPLEMENTS[q.category] for p in by_cat[c]]
    dept = CATEGORIES[q.category].department
    others = [
        c for c in CATEGORIES if c != q.category and c not in CLOSE[q.category] and c not in COMPLEMENTS[q.category]
    ]

    def jitter(share: float) -> int:
        return max(1, round(n * share) + rng.choice((-1, 0, 0, 1)))

    want = {"e": jitter(0.3), "c": jitter(0.2), "i": jitter(0.2)}
    while sum(want.values()) > n - 1:
        want[max(want, key=want.get)] -= 1
    want_s = n - sum(want.values())

    n_e = min(want["e"], len(exact))
    n_s = min(want_s + want["e"] - n_e, len(subs) + len(close))  # missing exact items become substitutes
    n_e = min(len(exact), n - want["c"] - want["i"] - n_s)  # missing substitutes become exact items
    n_close = min(len(close), max(1, n_s // 3) if close else 0)
    n_same = min(len(subs), n_s - n_close)
    n_close = n_s - n_same
    weights = [
        1 + 2 * (d["brand"] == "match") + 3 * (d["model"] == "partial") + (d["attributes"] == "partial")
        for _, d in subs
    ]
    picked_e = rng.sample(exact, n_e)
    picked_s = _wsample(rng, subs, weights, n_same) + [(p, judge(q, p)) for p in rng.sample(close, n_close)]
    n_comp = min(len(comps), n - n_e - n_s - want["i"])  # what is still missing becomes complements, then irrelevant
    picked_c = [(p, judge(q, p)) for p in rng.sample(comps, n_comp)]
    n_irr = n - len(picked_e) - len(picked_s) - len(picked_c)
    cat_weights = [3.0 if CATEGORIES[c].department == dept else 1.0 for c in others]
    chosen: dict[str, Product] = {}
    while len(chosen) < n_irr:
        p = rng.choice(by_cat[rng.choices(others, cat_weights)[0]])
        chosen[p.item_id] = p
    out = picked_e + picked_s + picked_c + [(p, judge(q, p)) for p in chosen.values()]
    rng.shuffle(out)
    return out
