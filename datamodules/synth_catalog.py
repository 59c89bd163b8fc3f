"""Generating the synthetic catalog: brands -> series -> model variants -> listings, with titles,
descriptions and bullets (see "Catalog" in :mod:`datamodules.synth`)."""

from __future__ import annotations

import random
import re

from .synth_spec import Product, SynthConfig
from .synth_vocab import _NOISE, _PITCH, _SERIES, CATEGORIES, COMPLEMENTS, Category


def _cap(text: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in text.split())


def _clean(text: str) -> str:
    text = re.sub(r"\(\s*\)", "", text)
    text = re.sub(r"\s+,", ",", re.sub(r"\s+", " ", text))
    return text.strip(" ,|-")


def _build_catalog(cfg: SynthConfig) -> list[Product]:
    """Brands -> series -> model variants -> listings, per category, in a fixed order."""
    rng = random.Random(f"synth-catalog:{cfg.seed}")
    products: list[Product] = []
    codes: set[str] = set()
    for cat in CATEGORIES.values():
        for brand in cat.brands:
            style = rng.randrange(2)
            for series in rng.sample(_SERIES, rng.randint(1, cfg.series_per_brand)):
                code = brand[0] + rng.choice("ABCDEFGHJKLMNPRSTVWXZ")
                while code in codes:
                    code = "".join(rng.choices("ABCDEFGHJKLMNPRSTVWXZ", k=2))
                codes.add(code)
                n_var = rng.randint(1, cfg.variants_per_series)
                if style == 0:
                    base = rng.randrange(10, 99)
                    models = [f"{code}-{base}{v:02d}" for v in sorted(rng.sample(range(10, 99), n_var))]
                else:
                    base = rng.randrange(100, 999)
                    models = [f"{code}{base}{s}" for s in ["", *rng.sample("CXBSL", 4)][:n_var]]
                attrs = {k: rng.choice(vals) for k, vals in cat.attributes}
                seen: list[dict[str, str]] = []
                for model in models:
                    for _ in range(20):
                        if attrs not in seen:
                            break
                        attrs = dict(attrs)
                        for k, vals in rng.sample(cat.attributes, rng.randint(1, 2)):
                            attrs[k] = rng.choice(vals)
                    if attrs in seen:
                        continue
                    seen.append(attrs)
                    for _ in range(1 + (rng.random() < 0.3)):
                        p = Product(
                            f"P{len(products) + 1:06d}", cat.name, brand, series, f"{brand}|{code}", model, dict(attrs)
                        )
                        _describe(rng, cat, p)
                        products.append(p)
    return products


def _describe(rng: random.Random, cat: Category, p: Product) -> None:
    """Fill title, description and bullets of ``p`` (marketing noise, varying order)."""
    noun = _cap(cat.name if rng.random() < 0.75 else cat.aliases[0])
    values = list(p.attrs.values())
    shown = [_cap(v) for v in rng.sample(values, min(len(values), rng.randint(1, 3)))]
    noise = rng.sample(_NOISE, rng.choice((0, 1, 1, 2)))
    model = p.model if rng.random() < 0.8 else ""
    a_sp, a_cm, n_sp = " ".join(shown), ", ".join(shown), " ".join(noise)
    templates = (
        f"{p.brand} {p.series} {a_sp} {noun} {model} - {', '.join(noise)}",
        f"{p.brand} {model} {noun}, {a_cm} | {n_sp}",
        f"{n_sp} {p.brand} {noun} ({model}) {a_sp}",
        f"{noun} by {p.brand} {p.series} {model} - {a_cm} {n_sp}",
    )
    p.title = _clean(rng.choice(templates))
    features = ", ".join(f"{k} {v}" for k, v in p.attrs.items())
    comps = COMPLEMENTS[cat.name]
    p.description = _clean(
        f"The {p.brand} {p.series} {cat.name} is made for {cat.use}. It features {features}."
        + (f" Pairs with: {', '.join(comps)}." if comps else "")
        + " "
        + rng.choice(_PITCH)
    )
    lines = [f"{_cap(k)}: {v}" for k, v in rng.sample(list(p.attrs.items()), len(p.attrs))]
    lines.insert(rng.randrange(len(lines) + 1), f"Ideal for {cat.use}")
    p.bullets = "\n".join(f"- {line}" for line in lines)


def _attr_text(p: Product) -> str:
    return "; ".join([f"model: {p.model}", *(f"{k}: {v}" for k, v in p.attrs.items())])
