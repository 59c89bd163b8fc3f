"""Describing a data source: the column mapping, the known presets (mapping and label scheme each),
the split options, and :class:`DataSource`, which :func:`datamodules.validation.load_examples` reads."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from .labels import ESCI_GAINS, LabelScheme, make_scheme


@dataclass
class ColumnMapping:
    """Which source column holds each example field (None: the preset's choice, or absent)."""

    query: str | None = None
    """search query text (required)"""
    title: str | None = None
    """item title (required)"""
    item_id: str | None = None
    """item id; when absent the item's text identifies it"""
    brand: str | None = None
    color: str | None = None
    description: str | None = None
    bullets: str | None = None
    attributes: str | None = None
    label: str | None = None
    """raw relevance label, read by the label scheme"""
    source_id: str | None = None
    """the row's own id in the source; must be unique"""
    frequency: str | None = None
    """query traffic count, for head/torso/tail buckets"""
    split: str | None = None
    """a split the file already assigns (train/val/test); else splits are made by hash"""

    def merged_over(self, base: ColumnMapping) -> ColumnMapping:
        return replace(
            base, **{f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        )

    def used(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


_EXAMPLES_MAPPING = ColumnMapping(
    query="query",
    title="title",
    item_id="item_id",
    brand="brand",
    color="color",
    description="description",
    bullets="bullets",
    attributes="attributes",
    label="label",
    source_id="source_id",
    frequency="frequency",
    split="split",
)
#: Known layouts: a column mapping and a label scheme each.
PRESETS: dict[str, dict[str, Any]] = {
    "homedepot": {
        "mapping": ColumnMapping(
            query="search_term", title="product_title", item_id="product_uid", label="relevance", source_id="id"
        ),
        "scheme": {"name": "graded", "low": 1.0, "high": 3.0, "cut_points": [2.0, 2.5]},
    },
    "esci": {
        "mapping": ColumnMapping(
            query="query",
            title="product_title",
            item_id="product_id",
            brand="product_brand",
            color="product_color",
            description="product_description",
            bullets="product_bullet_point",
            label="esci_label",
            source_id="example_id",
        ),
        "scheme": "esci",
    },
    "crowdflower": {
        "mapping": ColumnMapping(
            query="query",
            title="product_title",
            description="product_description",
            label="median_relevance",
            source_id="id",
        ),
        "scheme": {"name": "ordinal", "low": 1, "high": 4},
    },
    "examples": {
        "mapping": _EXAMPLES_MAPPING,
        "scheme": {
            "name": "levels",
            "num_levels": 4,
            "level_names": ["irrelevant", "complement", "substitute", "exact"],
            "level_gains": list(ESCI_GAINS),
        },
    },
}
_DEFAULT_MAPPING = ColumnMapping(query="query", title="title", label="label")
#: a text line may hold this many bytes per ``max_field_chars`` (16 columns of 4-byte UTF-8 characters)
#: before reading stops: no line that long can hold only fields within the limit
LINE_BYTES_PER_FIELD_CHAR = 64


@dataclass
class SplitOptions:
    """How examples are split and bucketed (see ``datamodules.splits``)."""

    seed: int = 0
    """seed of the query hash; the same seed gives the same split"""
    val_fraction: float = 0.1
    """expected share of queries in validation"""
    test_fraction: float = 0.2
    """expected share of queries held out for test"""
    head_share: float = 1 / 3
    """share of query traffic carried by head queries"""
    torso_share: float = 1 / 3
    """share of query traffic carried by torso queries"""
    mark_unseen: bool = True
    """mark held-out queries with a term absent from training as 'unseen'"""


@dataclass
class DataSource:
    """One dataset: where it is, how to read it, how to map and label it, what to do with bad rows."""

    path: str
    """a CSV/TSV/JSONL/Parquet file (plain, .gz or .zip), or a directory of train/val/test.parquet example files"""
    preset: str | None = None
    """homedepot | esci | crowdflower | examples: a column mapping and label scheme to start from"""
    format: str = "auto"
    """auto (from the file name) | csv | tsv | jsonl | parquet"""
    products: str | None = None
    """ESCI two-file layout: the products Parquet, joined on product_locale, product_id"""
    member: str | None = None
    """the file to read inside a zip holding several"""
    encoding: str = "auto"
    """auto (UTF-8, falling back to cp1252 with a warning) or a codec name"""
    delimiter: str | None = None
    """field delimiter of delimited text; default comma for .csv, tab for .tsv"""
    mapping: ColumnMapping = field(default_factory=ColumnMapping)
    """source column per example field, over the preset's"""
    scheme: str | dict[str, Any] | None = None
    """label scheme: a name or {name: ..., options}; default the preset's"""
    require_label: bool = True
    """a row without a label is a problem (False: unlabelled pairs, e.g. for teacher augmentation)"""
    on_error: Literal["error", "quarantine"] = "error"
    """error: refuse the file listing every problem; quarantine: set bad rows aside in a side file"""
    quarantine_path: str | None = None
    """where quarantined rows go (JSON lines); default runs/rejected/<file name>.rejected.jsonl"""
    on_conflict: Literal["auto", "mean", "problem"] = "auto"
    """a pair judged twice with different labels: mean (average the grades: right for graded means,
    whose label already averages raters), problem (a conflicting_duplicate under on_error), or
    auto (mean for the graded scheme, problem otherwise)"""
    max_field_chars: int = 20000
    """a text field longer than this is a problem (too_long); a text-format line over
    ``LINE_BYTES_PER_FIELD_CHAR * max_field_chars`` bytes stops the read at once (too_long)"""
    max_input_bytes: int = 4 << 30
    """the most bytes read from one file, after decompression (.gz, .zip): past it the read stops (too_large)"""
    control_chars: Literal["strip", "keep", "reject"] = "strip"
    """control characters in text fields (C0 but tab/newline/CR, DEL, C1, bidi overrides and isolates):
    strip them (counted per column in the load report), keep them (counted), or reject the row (control_chars)"""
    max_problems_shown: int = 20
    """how many problems an error message lists"""
    split: SplitOptions = field(default_factory=SplitOptions)

    @property
    def max_line_bytes(self) -> int:
        return LINE_BYTES_PER_FIELD_CHAR * self.max_field_chars

    def resolved_mapping(self) -> ColumnMapping:
        base = PRESETS[self.preset]["mapping"] if self.preset else _DEFAULT_MAPPING
        return self.mapping.merged_over(base)

    def resolved_scheme(self) -> LabelScheme:
        if self.scheme is not None:
            return make_scheme(self.scheme)
        if self.preset:
            return make_scheme(PRESETS[self.preset]["scheme"])
        return make_scheme(PRESETS["examples"]["scheme"])

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.on_conflict not in ("auto", "mean", "problem"):
            raise ValueError(f"on_conflict must be auto, mean or problem, got {self.on_conflict!r}")
        if self.control_chars not in ("strip", "keep", "reject"):
            raise ValueError(f"control_chars must be strip, keep or reject, got {self.control_chars!r}")
        if self.max_field_chars < 1 or self.max_input_bytes < 1:
            raise ValueError("max_field_chars and max_input_bytes must be >= 1")
        if self.on_error not in ("error", "quarantine"):
            raise ValueError(f"on_error must be 'error' or 'quarantine', got {self.on_error!r}")
        if isinstance(self.mapping, dict):
            self.mapping = ColumnMapping(**self.mapping)
        if isinstance(self.split, dict):
            self.split = SplitOptions(**self.split)
