"""Synthetic e-commerce catalog: the embedded default data of every stage and of the demo.

Nothing is downloaded. A hand-written taxonomy of 24 product categories in four departments
(tools, home improvement, electronics, home & kitchen) is expanded, deterministically from a seed,
into a catalog of products, a set of search queries, and judged (query, item) pairs whose
relevance level and per-dimension verdicts follow the documented rules below.

Catalog
    Each category has 4 invented brands, attribute keys with category-appropriate values
    (colour, sizes with units, material, voltage / wattage / capacity ...), *complement*
    categories (used together: drill -> drill bits and batteries, saw -> blades, coffee maker ->
    filters, laptop -> charger and sleeve, vacuum -> bags; the relation is symmetric) and, for
    three pairs, a *close* category that does the same job (cordless drill ~ impact driver,
    headphones ~ earbuds, LED bulb ~ smart bulb). A brand has 1..``series_per_brand`` series per
    category (a marketing name and a model code); a series has 1..``variants_per_series`` models
    that differ in at least one attribute ("VX-2041" / "VX-2057", "KS850" / "KS850C"); a model is
    sold as one or two listings (same specs, different title). Titles mix brand, series, model,
    key attributes and marketing noise ("Heavy Duty", "(2-Pack)", "New 2024 Model") in varying
    order. ``attributes`` always holds ``model: ...; key: value; ...``; the title usually shows
    the model. ``item_id`` is "P000001".. in catalog order; the catalog depends on the seed and the
    catalog fields of :class:`SynthConfig` only, not on ``num_queries``.

Queries (kind recorded in ``queries.parquet``, counts in ``synth.json``)
    category        "cordless drills", "best flower pot"
    brand_category  "voltara cordless drill"
    model           "vx-2041", "voltara vx2041", "ks850c circular saw"
    attribute       "red ceramic planter 12 in" (1-2 values of an existing product)
    long_tail       brand + 2-4 attribute values (+ sometimes the model) + filler words
    misspelled      any of the above with 1-2 character edits on words of 4+ letters
                    ("cordles drill", "voltra drill"); model numbers are never edited
    Queries are distinct after normalisation. Traffic (``frequency``) is heavy-tailed: a per-kind
    base (category 1000, brand_category 300, model 40, attribute 30, long_tail 4, misspelled 3)
    times a log-normal factor (sigma 0.6), so a few dozen category/brand queries carry most of the
    traffic and long-tail and misspelled queries sit in the tail. ``splits.assign_splits`` turns it into
    head/torso/tail buckets; misspellings and model numbers fill the ``unseen`` bucket.
    ``queries.parquet`` holds what each query asks (kind, base_kind, base_query, category, brand,
    model_key, attributes), its frequency, split and bucket.

Candidates
    Per query ``items_per_query`` items aimed at about 30% exact, 30% substitute, 20% complement and
    20% irrelevant: exact items from the asked category that satisfy every stated constraint;
    substitutes from the same category (preferring hard ones: same brand, same series, some of the
    asked attributes) and from a close category; complements from complement categories;
    irrelevant items from other categories (preferring the same department). Missing exact items
    (a model has one or two listings) are replaced by substitutes and missing substitutes (a
    category query has only close-category ones) by exact items; what is still missing becomes
    complements, then irrelevant items.

Labelling rules
    A query asks for a category (named, or implied by its model number: a model number names one
    product, so a pure model-number query asks for that product's category), optionally a brand, a
    model and attribute values. A misspelled query keeps the truth of the query it was misspelled
    from: verdicts judge what the user meant. Verdicts per (query, item):

    category    match: the item is of the asked category; partial: of a close category that does
                the same job (impact driver for "cordless drill"); mismatch: otherwise. Never
                absent here (see above).
    brand       absent: the query names no brand; match: same brand; mismatch: another brand.
    model       absent: the query has no model number; match: same model (case and hyphens
                ignored); partial: another model of the same series (same brand and model code,
                another variant); mismatch: otherwise.
    attributes  absent: the query asks for no attribute value; match: the item has every asked
                value under the same key; partial: some of them; mismatch: none (an item without
                the key does not have the value).
    usage       match: the item does the asked job (category match or partial); partial: it is
                used together with the asked product (a complement category: drill bits for a
                drill); mismatch: neither. Never absent here.

    Level (rule_level), first rule that applies:
      1. category mismatch: substitute (2) if usage is match, complement (1) if usage is partial,
         else irrelevant (0);
      2. category partial: substitute (2);
      3. category match or absent, and brand, model or attributes is mismatch or partial:
         substitute (2);
      4. otherwise (every stated dimension matches): exact (3).
    Before noise, label == rule_level(dims) for every pair (the label is computed from the dims).

    Label noise: with probability ``label_noise`` a pair's label moves to an adjacent level
    (0 -> 1, 3 -> 2, 1 and 2 up or down with equal chance); verdicts stay truthful, so
    label != rule_level(dims) marks exactly the noisy pairs. grade = float(label); gain is the
    ESCI gain of the label (0, 0.01, 0.1, 1).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
import textwrap
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .schema import DIMENSIONS, EXAMPLE_SCHEMA, SPLITS, VERDICTS, make_example_id, normalize_text
from .splits import assign_splits, select_split, split_summary

LEVEL_NAMES: tuple[str, ...] = ("irrelevant", "complement", "substitute", "exact")
#: ESCI gains per level, used for ``gain``.
GAINS: tuple[float, ...] = (0.0, 0.01, 0.1, 1.0)
QUERY_KINDS: tuple[str, ...] = ("category", "brand_category", "model", "attribute", "long_tail", "misspelled")
DEFAULT_KIND_MIX: dict[str, float] = {
    "category": 0.08, "brand_category": 0.17, "model": 0.18, "attribute": 0.25, "long_tail": 0.17, "misspelled": 0.15,
}
#: Files :func:`write` produces; ``synth.json`` last, so its presence marks a complete write.
OUTPUT_FILES: tuple[str, ...] = ("train.parquet", "val.parquet", "test.parquet", "products.parquet", "queries.parquet", "synth.json")
#: The labelling rules as text (stored in synth.json).
RULES: str = textwrap.dedent((__doc__ or "").partition("Labelling rules\n")[2]).strip()

_KIND_TRAFFIC = {"category": 1000.0, "brand_category": 300.0, "model": 40.0, "attribute": 30.0, "long_tail": 4.0, "misspelled": 3.0}
_TRAFFIC_SIGMA = 0.6

# name, department, aliases, brands, usage phrase, then "key=value|value; ..." attributes
_TAXONOMY: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("cordless drill", "tools", "drill driver|power drill", "Voltara Ridgeway Kestrel Torvik", "drilling holes and driving screws",
     "voltage=12V|18V|20V; chuck size=3/8 in|1/2 in; kit=tool only|1 battery kit|2 battery kit; color=yellow|red|black|blue|green"),
    ("impact driver", "tools", "impact drill|impact screwdriver", "Voltara Ridgeway Kestrel Torvik", "driving long screws and lag bolts",
     "voltage=12V|18V|20V; max torque=1500 in-lbs|1800 in-lbs|2000 in-lbs; kit=tool only|1 battery kit|2 battery kit; color=yellow|red|black|blue"),
    ("drill bits", "tools", "drill bit set|bit set", "Kestrel Ironbark Carbyte Ridgeway", "drilling wood, metal and masonry",
     "pieces=10-piece|21-piece|29-piece|100-piece; material=cobalt|titanium|black oxide|carbide; shank=hex|round"),
    ("drill battery", "tools", "power tool battery|lithium battery pack", "Voltara Ridgeway Kestrel Torvik", "powering cordless tools",
     "voltage=12V|18V|20V; capacity=2.0Ah|4.0Ah|5.0Ah|6.0Ah; pack=single|2-pack"),
    ("circular saw", "tools", "skill saw|cordless circular saw", "Voltara Ridgeway Ironbark Torvik", "cutting lumber and plywood",
     "blade size=6-1/2 in|7-1/4 in; power=15 amp corded|20V cordless; bevel=45 degree|56 degree; color=yellow|red|black|blue"),
    ("saw blade", "tools", "circular saw blade|framing blade", "Kestrel Carbyte Ironbark Dentra", "ripping and crosscutting wood",
     "diameter=6-1/2 in|7-1/4 in|10 in; teeth=24T|40T|60T; material=carbide|steel"),
    ("interior paint", "home improvement", "wall paint|latex paint", "Prismacoat Dunmore Vellum Brightwall", "painting interior walls and trim",
     "color=white|gray|navy blue|sage green|beige|black; finish=flat|eggshell|satin|semi-gloss; size=1 qt|1 gal|5 gal"),
    ("paint roller", "home improvement", "roller cover|paint roller kit", "Brightwall Rollcraft Dunmore Vellum", "rolling paint onto walls and ceilings",
     "nap=3/8 in|1/2 in|3/4 in; width=4 in|9 in|18 in; material=microfiber|woven|foam"),
    ("planter", "home improvement", "flower pot|plant pot", "Terrabloom Greenhaven Mossgate Potterly", "growing indoor and patio plants",
     "color=white|black|blue|sage green|red|gray; material=ceramic|terracotta|plastic|concrete; diameter=6 in|8 in|10 in|12 in|16 in"),
    ("potting soil", "home improvement", "potting mix|garden soil", "Terrabloom Greenhaven Mossgate Loamwell", "potting and repotting plants",
     "volume=8 qt|16 qt|1 cu ft|2 cu ft; type=all purpose|cactus mix|orchid mix|organic"),
    ("LED bulb", "home improvement", "LED light bulb|light bulbs", "Lumora Brightline Halvek Glowmere", "lighting rooms and fixtures",
     "brightness=40W equivalent|60W equivalent|100W equivalent; base=E26|E12|GU10; color temperature=2700K soft white|5000K daylight; pack=4-pack|8-pack|12-pack"),
    ("smart bulb", "home improvement", "wifi light bulb|smart light bulb", "Lumora Halvek Glowmere Brightline", "app and voice controlled lighting",
     "brightness=60W equivalent|75W equivalent; base=E26|BR30; connectivity=Wi-Fi|Bluetooth|Zigbee; color=tunable white|multicolor"),
    ("ceiling fan", "home improvement", "ceiling fan with light|indoor ceiling fan", "Aerwind Halvek Breezely Lumora", "cooling and lighting a room",
     "blade span=42 in|52 in|60 in; color=brushed nickel|matte black|white|bronze; control=remote|pull chain|wall control"),
    ("table lamp", "home & kitchen", "bedside lamp|desk lamp", "Lumora Glowmere Brightline Halvek", "bedside and living room lighting",
     "color=white|black|brass|gray; height=18 in|24 in|28 in; base material=ceramic|metal|wood"),
    ("laptop", "electronics", "notebook computer|laptop computer", "Novatek Zentrix Aurion Corvex", "work, school and browsing",
     "screen size=13.3 in|14 in|15.6 in|16 in; memory=8GB RAM|16GB RAM|32GB RAM; storage=256GB SSD|512GB SSD|1TB SSD; color=silver|space gray|black|blue"),
    ("laptop charger", "electronics", "laptop power adapter|usb c charger", "Novatek Zentrix Voltix Chargewell", "charging and powering laptops",
     "wattage=45W|65W|90W|100W; connector=USB-C|barrel 4.5mm; cable length=6 ft|10 ft"),
    ("laptop sleeve", "electronics", "laptop case|laptop bag", "Packwell Zentrix Corvex Stowaway", "carrying and protecting a laptop",
     "size=13 in|14 in|15.6 in|16 in; color=black|gray|navy|pink; material=neoprene|felt|leather"),
    ("headphones", "electronics", "over ear headphones|bluetooth headphones", "Sonique Auralis Echora Quillsound", "listening to music and taking calls",
     "style=over-ear|on-ear; connectivity=wireless|wired; noise control=active noise cancelling|passive isolation; color=black|white|silver|midnight blue; battery life=30 hr|40 hr|60 hr"),
    ("earbuds", "electronics", "wireless earbuds|in ear headphones", "Sonique Auralis Echora Pipbud", "listening on the go",
     "connectivity=wireless|wired; noise control=active noise cancelling|passive isolation; color=black|white|silver|rose gold; battery life=6 hr|8 hr|10 hr"),
    ("headphone case", "electronics", "headphone carrying case|earbuds case", "Packwell Stowaway Echora Caseloom", "storing and carrying headphones",
     "fits=over-ear headphones|on-ear headphones|earbuds; material=hard shell EVA|silicone|nylon; color=black|gray|blue"),
    ("coffee maker", "home & kitchen", "coffee machine|drip coffee maker", "Brewmont Caffio Morningside Kettleby", "brewing coffee at home",
     "capacity=4-cup|12-cup|14-cup; type=drip|single serve|pour over; color=black|stainless steel|white|red; controls=programmable|manual"),
    ("coffee filters", "home & kitchen", "paper coffee filters|coffee filter", "Brewmont Filtrio Morningside Kettleby", "filtering brewed coffee",
     "size=#2 cone|#4 cone|8-12 cup basket; material=white paper|unbleached paper|reusable mesh; count=100 count|200 count|1 reusable"),
    ("vacuum cleaner", "home & kitchen", "upright vacuum|vacuum", "Dustrek Cyclona Sweeply Airvane", "cleaning carpets and floors",
     "type=upright|canister|stick; power=12 amp corded|20V cordless; filter=HEPA|standard; color=red|gray|purple|blue"),
    ("vacuum bags", "home & kitchen", "vacuum cleaner bags|replacement vacuum bags", "Dustrek Cyclona Bagwell Airvane", "collecting dust in bagged vacuums",
     "bag type=type A|type C|type Q; count=3-pack|6-pack|10-pack; filter=HEPA|standard"),
)
_COMPLEMENT_PAIRS = (
    ("cordless drill", "drill bits"), ("cordless drill", "drill battery"), ("impact driver", "drill bits"),
    ("impact driver", "drill battery"), ("circular saw", "saw blade"), ("circular saw", "drill battery"),
    ("interior paint", "paint roller"), ("planter", "potting soil"), ("LED bulb", "ceiling fan"), ("LED bulb", "table lamp"),
    ("smart bulb", "ceiling fan"), ("smart bulb", "table lamp"), ("laptop", "laptop charger"), ("laptop", "laptop sleeve"),
    ("headphones", "headphone case"), ("earbuds", "headphone case"), ("coffee maker", "coffee filters"),
    ("vacuum cleaner", "vacuum bags"),
)
_CLOSE_PAIRS = (("cordless drill", "impact driver"), ("headphones", "earbuds"), ("LED bulb", "smart bulb"))
_SERIES = ("MaxForce", "ProLine", "Atlas", "Edge", "Vortex", "Nimbus", "Summit", "Pulse", "Aria", "Core", "Elite", "Flex", "Titan", "Zephyr", "Nova", "Orbit")
_NOISE = ("Pro", "Heavy Duty", "(2-Pack)", "New 2024 Model", "Free Shipping", "Best Seller", "Upgraded", "Premium",
          "Value Bundle", "Genuine", "Professional Grade", "Limited Edition")
_PITCH = ("Built to last.", "Backed by a 3-year warranty.", "A customer favourite.", "Easy to set up and use.", "")
_FILLERS = ("best", "new", "for home", "2024", "top rated")
_PRE_KEYS = {"color", "material", "style", "connectivity", "noise control", "type", "finish", "voltage", "wattage", "brightness"}
_KEYBOARD = dict(zip("qwertyuiopasdfghjklzxcvbnm", ("wa", "qes", "wrd", "etf", "ryg", "tuh", "yij", "uok", "ipl", "ol", "qsz", "awdx",
                                                 "sefc", "drgv", "fthb", "gyjn", "hukm", "jil", "kop", "zaxs", "xcsd", "vdf", "cbfg", "vnhg", "bmj", "nk")))


@dataclass(frozen=True)
class Category:
    name: str
    department: str
    aliases: tuple[str, ...]
    brands: tuple[str, ...]
    attributes: tuple[tuple[str, tuple[str, ...]], ...]
    use: str


CATEGORIES: dict[str, Category] = {
    name: Category(name, dept, tuple(aliases.split("|")), tuple(brands.split()),
                   tuple((k.strip(), tuple(v.split("|"))) for k, v in (kv.split("=") for kv in attrs.split(";"))), use)
    for name, dept, aliases, brands, use, attrs in _TAXONOMY
}
COMPLEMENTS: dict[str, tuple[str, ...]] = {
    c: tuple(sorted({b for a, b in _COMPLEMENT_PAIRS if a == c} | {a for a, b in _COMPLEMENT_PAIRS if b == c})) for c in CATEGORIES
}
CLOSE: dict[str, tuple[str, ...]] = {
    c: tuple(sorted({b for a, b in _CLOSE_PAIRS if a == c} | {a for a, b in _CLOSE_PAIRS if b == c})) for c in CATEGORIES
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

    def __post_init__(self) -> None:
        if self.num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {self.num_queries}")
        if self.items_per_query < 4:
            raise ValueError(f"items_per_query must be >= 4 (one item per level), got {self.items_per_query}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1], got {self.label_noise}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"need 0 <= val_fraction, test_fraction and their sum < 1; got {self.val_fraction}, {self.test_fraction}")
        if self.series_per_brand < 1 or self.variants_per_series < 1:
            raise ValueError(f"series_per_brand and variants_per_series must be >= 1, got {self.series_per_brand}, {self.variants_per_series}")
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


@dataclass
class SynthData:
    """Everything :func:`build` generates: examples (EXAMPLE_SCHEMA), the catalog and the queries."""

    examples: pa.Table
    products: pa.Table
    queries: pa.Table


def model_key(model: str) -> str:
    """A model number compared without case, hyphens or spaces ("VX-2041" -> "vx2041")."""
    return re.sub(r"[^0-9a-z]", "", model.lower())


def judge(query: Query, product: Product) -> dict[str, str]:
    """The true verdict of each dimension for a (query, product) pair (module docstring rules)."""
    qc, pc = query.category, product.category
    category = "match" if pc == qc else "partial" if pc in CLOSE[qc] else "mismatch"
    usage = "match" if category != "mismatch" else "partial" if pc in COMPLEMENTS[qc] else "mismatch"
    brand = "absent" if query.brand is None else "match" if product.brand == query.brand else "mismatch"
    model = ("absent" if query.model is None else "match" if model_key(product.model) == query.model
             else "partial" if product.series_key == query.series_key else "mismatch")
    hits = sum(product.attrs.get(k) == v for k, v in query.attrs.items())
    attributes = "absent" if not query.attrs else "match" if hits == len(query.attrs) else "partial" if hits else "mismatch"
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


# ---------------------------------------------------------------------------------------- catalog

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
                        p = Product(f"P{len(products) + 1:06d}", cat.name, brand, series, f"{brand}|{code}", model, dict(attrs))
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
        + (f" Pairs with: {', '.join(comps)}." if comps else "") + " " + rng.choice(_PITCH)
    )
    lines = [f"{_cap(k)}: {v}" for k, v in rng.sample(list(p.attrs.items()), len(p.attrs))]
    lines.insert(rng.randrange(len(lines) + 1), f"Ideal for {cat.use}")
    p.bullets = "\n".join(f"- {line}" for line in lines)


def _attr_text(p: Product) -> str:
    return "; ".join([f"model: {p.model}", *(f"{k}: {v}" for k, v in p.attrs.items())])


# ---------------------------------------------------------------------------------------- queries

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
            text = f"{rng.choice(_FILLERS[:2])} {phrase}" if r < 0.15 else f"{phrase} {_FILLERS[2]}" if r < 0.2 else phrase
            return Query(text, kind, kind, cat.name)
        brand = rng.choice(cat.brands)
        text = f"{brand.lower()} {phrase}" if rng.random() < 0.9 else f"{phrase} {brand.lower()}"
        return Query(text, kind, kind, cat.name, brand=brand)
    p = rng.choice(products)
    cat = CATEGORIES[p.category]
    if kind == "model":
        m = p.model.lower() if rng.random() < 0.6 else model_key(p.model)
        brand = p.brand if rng.random() < 0.5 else None
        text = " ".join(x for x in (brand and brand.lower(), m, _phrase(rng, cat, 0.0) if rng.random() < 0.5 else "") if x)
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
    parts = [rng.choice(_FILLERS) if rng.random() < 0.5 else "", brand.lower() if brand else "",
             _with_attrs(rng, _phrase(rng, cat, 0.2), attrs), p.model.lower() if with_model else ""]
    return Query(" ".join(x for x in parts if x), kind, kind, p.category, brand=brand,
                 model=model_key(p.model) if with_model else None, series_key=p.series_key if with_model else None, attrs=attrs)


def _misspell(rng: random.Random, text: str) -> str:
    """1-2 typing errors (drop, swap, double, neighbouring key) in words of 4+ letters."""
    tokens = text.split()
    eligible = [i for i, t in enumerate(tokens) if t.isalpha() and len(t) >= 4]
    for i in rng.sample(eligible, min(len(eligible), 1 if rng.random() < 0.7 else 2)):
        t = tokens[i]
        op, j = rng.randrange(4), rng.randrange(1, len(t) - 1)
        if op == 0:
            t = t[:j] + t[j + 1:]
        elif op == 1:
            t = t[:j] + t[j + 1] + t[j] + t[j + 2:]
        elif op == 2:
            t = t[:j] + t[j] + t[j:]
        else:
            t = t[:j] + rng.choice(_KEYBOARD.get(t[j], "e")) + t[j + 1:]
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


def _candidates(rng: random.Random, q: Query, by_cat: dict[str, list[Product]], n: int) -> list[tuple[Product, dict[str, str]]]:
    """``n`` distinct (item, verdicts) pairs for ``q`` in the level mix of the module docstring."""
    same = [(p, judge(q, p)) for p in by_cat[q.category]]
    levels = [rule_level(d) for _, d in same]
    exact = [x for x, level in zip(same, levels) if level == 3]
    subs = [x for x, level in zip(same, levels) if level == 2]
    close = [p for c in CLOSE[q.category] for p in by_cat[c]]
    comps = [p for c in COMPLEMENTS[q.category] for p in by_cat[c]]
    dept = CATEGORIES[q.category].department
    others = [c for c in CATEGORIES if c != q.category and c not in CLOSE[q.category] and c not in COMPLEMENTS[q.category]]

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
    weights = [1 + 2 * (d["brand"] == "match") + 3 * (d["model"] == "partial") + (d["attributes"] == "partial") for _, d in subs]
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


# ------------------------------------------------------------------------------------------ build

def _noisy(rng: random.Random, level: int) -> int:
    """An adjacent level: 0 -> 1, 3 -> 2, 1 and 2 up or down with equal chance."""
    return 1 if level == 0 else 2 if level == 3 else level + rng.choice((-1, 1))


def build(config: SynthConfig | None = None) -> SynthData:
    """Generate catalog, queries and examples (split and bucketed); see the module docstring."""
    cfg = config or SynthConfig()
    products = _build_catalog(cfg)
    by_cat: dict[str, list[Product]] = {c: [] for c in CATEGORIES}
    for p in products:
        by_cat[p.category].append(p)
    queries = _make_queries(cfg, products)
    rng_pairs = random.Random(f"synth-pairs:{cfg.seed}")
    rng_noise = random.Random(f"synth-noise:{cfg.seed}")
    cols: dict[str, list] = {name: [] for name in EXAMPLE_SCHEMA.names}
    for q in queries:
        for p, dims in _candidates(rng_pairs, q, by_cat, cfg.items_per_query):
            level = rule_level(dims)
            label = _noisy(rng_noise, level) if rng_noise.random() < cfg.label_noise else level
            row = {
                "example_id": make_example_id(q.text, p.item_id), "source_id": None, "source_line": len(cols["query"]) + 1,
                "query": q.text, "item_id": p.item_id, "title": p.title, "brand": p.brand, "color": p.attrs.get("color", ""),
                "description": p.description, "bullets": p.bullets, "attributes": _attr_text(p), "label": label,
                "grade": float(label), "gain": GAINS[label], "frequency": q.frequency, "query_bucket": None, "split": None,
                **{f"dim_{d}": dims[d] for d in DIMENSIONS},
            }
            for name, value in row.items():
                cols[name].append(value)
    examples = assign_splits(pa.Table.from_pydict(cols, schema=EXAMPLE_SCHEMA), seed=cfg.seed,
                             val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    examples = examples.select(EXAMPLE_SCHEMA.names).cast(EXAMPLE_SCHEMA)

    product_table = pa.Table.from_pydict({
        "item_id": [p.item_id for p in products], "title": [p.title for p in products], "brand": [p.brand for p in products],
        "color": [p.attrs.get("color", "") for p in products], "category": [p.category for p in products],
        "department": [CATEGORIES[p.category].department for p in products], "series": [p.series for p in products],
        "model": [p.model for p in products], "description": [p.description for p in products],
        "bullets": [p.bullets for p in products], "attributes": [_attr_text(p) for p in products],
    })
    first: dict[str, tuple[str, str]] = {}
    for q, s, b in zip(*(examples.column(c).to_pylist() for c in ("query", "split", "query_bucket"))):
        first.setdefault(q, (s, b))
    query_table = pa.Table.from_pydict({
        "query": [q.text for q in queries], "kind": [q.kind for q in queries], "base_kind": [q.base_kind for q in queries],
        "base_query": [q.base_text or q.text for q in queries],
        "category": [q.category for q in queries], "brand": [q.brand for q in queries], "model_key": [q.model for q in queries],
        "attributes": ["; ".join(f"{k}: {v}" for k, v in q.attrs.items()) for q in queries],
        "frequency": pa.array([q.frequency for q in queries], pa.int64()),
        "split": [first[q.text][0] for q in queries], "query_bucket": [first[q.text][1] for q in queries],
    })
    return SynthData(examples, product_table, query_table)


def generate(config: SynthConfig | None = None) -> tuple[pa.Table, pa.Table]:
    """Return ``(examples, products)``: examples conform to ``EXAMPLE_SCHEMA`` with split, frequency and
    query_bucket filled by ``splits.assign_splits``; products is the catalog (item_id, title, brand, color,
    category, department, series, model, description, bullets, attributes)."""
    data = build(config)
    return data.examples, data.products


def summarize(data: SynthData, config: SynthConfig) -> dict:
    """Counts, label distribution, query kinds and split buckets (the body of synth.json)."""
    labels = Counter(data.examples.column("label").to_pylist())
    n = data.examples.num_rows or 1
    return {
        "generator": "datamodules.synth",
        "config": asdict(config),
        "counts": {"examples": data.examples.num_rows, "queries": data.queries.num_rows, "products": data.products.num_rows,
                   "categories": len(CATEGORIES)},
        "label_distribution": {name: {"count": labels[i], "fraction": round(labels[i] / n, 4)} for i, name in enumerate(LEVEL_NAMES)},
        "query_kinds": {k: v for k, v in sorted(Counter(data.queries.column("kind").to_pylist()).items())},
        "splits": split_summary(data.examples),
        "levels": list(LEVEL_NAMES),
        "gains": list(GAINS),
        "rules": RULES,
    }


def write(out_dir: str | os.PathLike, config: SynthConfig | None = None, overwrite: bool = False) -> dict:
    """Generate and write ``train/val/test.parquet`` (EXAMPLE_SCHEMA), ``products.parquet``,
    ``queries.parquet`` and ``synth.json`` into ``out_dir``; return the synth.json summary plus
    ``out_dir`` and ``files``.

    Files are written into a temporary directory next to ``out_dir`` and moved in with
    ``os.replace`` (synth.json last). Raises ``FileExistsError`` when ``out_dir`` already holds
    any of these files, unless ``overwrite=True`` (which replaces only these files).
    """
    cfg = config or SynthConfig()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    existing = [f for f in OUTPUT_FILES if (out / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {existing}; pass overwrite=True to replace them")
    data = build(cfg)
    summary = summarize(data, cfg)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for split in SPLITS:
            pq.write_table(select_split(data.examples, split), tmp / f"{split}.parquet")
        pq.write_table(data.products, tmp / "products.parquet")
        pq.write_table(data.queries, tmp / "queries.parquet")
        (tmp / "synth.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for name in OUTPUT_FILES:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out_dir": str(out), "files": [str(out / f) for f in OUTPUT_FILES], **summary}
