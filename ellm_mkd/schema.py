"""The example contract every stage reads and writes.

An *example* is one judged (query, item) pair. In memory and on disk it is a row of a
``pyarrow.Table`` with :data:`EXAMPLE_SCHEMA`; the synthetic catalog, every reader and the
``RelevanceDataModule`` speak this schema and nothing else.

Fields
------
example_id    stable id: :func:`make_example_id` of the query and the item id (or item text)
source_id     the row's id in the source file, if it had one (e.g. ESCI ``example_id``)
source_line   1-based line (text formats) or row (Parquet) in the source file, for messages
query         the search query
item_id       the item's id in the source (or a hash of its text when it has none)
title         item title (required, non-empty)
brand, color, description, bullets, attributes   optional item fields ("" when absent);
              ``attributes`` is readable ``key: value; key: value`` text
label         relevance level ``0..K-1`` (null for unlabelled pairs)
grade         the raw grade the label came from (Home Depot mean 1..3; the level otherwise)
gain          the gain used by nDCG
frequency     how often the query occurs (a traffic count when the data has one, else the
              number of judged pairs of the query)
query_bucket  ``head`` / ``torso`` / ``tail`` by frequency, or ``unseen`` (see ``splits``)
split         ``train`` / ``val`` / ``test``
dim_category .. dim_usage   ground-truth verdicts per chain-of-thought dimension, where the
              data knows them (the synthetic catalog); null otherwise
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import pyarrow as pa

#: Chain-of-thought dimensions, in the order they are judged.
DIMENSIONS: tuple[str, ...] = ("category", "brand", "model", "attributes", "usage")
#: The closed set of verdicts a dimension can take.
VERDICTS: tuple[str, ...] = ("match", "partial", "mismatch", "absent")
#: Item text fields besides the title, in the order students see them.
ITEM_FIELDS: tuple[str, ...] = ("title", "brand", "color", "description", "bullets", "attributes")
SPLITS: tuple[str, ...] = ("train", "val", "test")
BUCKETS: tuple[str, ...] = ("head", "torso", "tail", "unseen")

EXAMPLE_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.string(), nullable=False),
        pa.field("source_id", pa.string()),
        pa.field("source_line", pa.int64()),
        pa.field("query", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("brand", pa.string()),
        pa.field("color", pa.string()),
        pa.field("description", pa.string()),
        pa.field("bullets", pa.string()),
        pa.field("attributes", pa.string()),
        pa.field("label", pa.int32()),
        pa.field("grade", pa.float32()),
        pa.field("gain", pa.float32()),
        pa.field("frequency", pa.int64()),
        pa.field("query_bucket", pa.string()),
        pa.field("split", pa.string()),
        *[pa.field(f"dim_{d}", pa.string()) for d in DIMENSIONS],
    ]
)
COLUMNS: tuple[str, ...] = tuple(EXAMPLE_SCHEMA.names)

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Unicode NFC, case-folded, whitespace collapsed: the form ids and query groups use."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip().casefold()


def make_example_id(query: str, item_key: str) -> str:
    """Stable 16-hex-digit id of a (query, item) pair.

    ``item_key`` is the item id when the data has one, else the item's text. The id depends on
    nothing but these two strings (normalised), so it survives re-reads, re-splits and reorders.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(normalize_text(query).encode("utf-8"))
    h.update(b"\x1f")
    h.update(item_key.strip().encode("utf-8"))
    return h.hexdigest()


def empty_table() -> pa.Table:
    return EXAMPLE_SCHEMA.empty_table()


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Build an example table from dicts; missing optional fields become null."""
    cols = {name: [r.get(name) for r in rows] for name in COLUMNS}
    return pa.Table.from_pydict(cols, schema=EXAMPLE_SCHEMA)


def conform(table: pa.Table) -> pa.Table:
    """Add any missing optional column as nulls and cast to :data:`EXAMPLE_SCHEMA`.

    Raises ``ValueError`` naming the missing required columns.
    """
    required = [f.name for f in EXAMPLE_SCHEMA if not f.nullable]
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"example table lacks required columns {missing}")
    cols = []
    for f in EXAMPLE_SCHEMA:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=EXAMPLE_SCHEMA)
