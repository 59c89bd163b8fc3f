"""The item text every model sees, rendered the same way everywhere.

Students read ``query`` and :func:`render_item`'s text; later stages (evidence spans of the teacher's
chain of thought) give character offsets into exactly these two strings, so this module is the one
place that decides how item fields are laid out.

Layout: one ``Name: value`` segment per non-empty field, in the configured order, joined by
``" | "`` — e.g. ``Title: Voltara 20V Drill | Brand: Voltara | Color: red``. The field markers let
an encoder tell title words from brand or attribute words; with a single configured field there is
nothing to tell apart, so its value is the whole item text (no marker tokens to pay for).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ellm_mkd.schema import ITEM_FIELDS

FIELD_LABELS = {
    "title": "Title",
    "brand": "Brand",
    "color": "Color",
    "description": "Description",
    "bullets": "Bullets",
    "attributes": "Attributes",
}
SEPARATOR = " | "
#: control characters a text field should not carry: C0 controls other than tab, newline and carriage return
#: (NUL, ESC ...), DEL, the C1 controls, and the bidirectional embeddings, overrides and isolates that can make
#: text display in another order than it is read (U+202A..U+202E, U+2066..U+2069)
CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def strip_control_chars(text: str) -> str:
    """``text`` without its :data:`CONTROL_CHARS`."""
    return CONTROL_CHARS.sub("", text)


DEFAULT_ITEM_FIELDS: tuple[str, ...] = ("title", "brand", "color", "attributes", "bullets", "description")


def check_item_fields(fields: Sequence[str]) -> tuple[str, ...]:
    unknown = [f for f in fields if f not in ITEM_FIELDS]
    if unknown:
        raise ValueError(f"unknown item field(s) {unknown}; choose from {list(ITEM_FIELDS)}")
    if "title" not in fields:
        raise ValueError("item_fields must include 'title'")
    return tuple(fields)


def render_item(
    row: Mapping[str, Any], fields: Sequence[str] = DEFAULT_ITEM_FIELDS, max_chars_per_field: int = 1000
) -> tuple[str, dict[str, tuple[int, int]]]:
    """Item text and the ``[start, end)`` character span of each field's value inside it."""
    parts: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    pos = 0
    labelled = len(fields) > 1
    for f in fields:
        value = row.get(f)
        if not value:
            continue
        value = " ".join(str(value).split())[:max_chars_per_field]
        if parts:
            pos += len(SEPARATOR)
        prefix = f"{FIELD_LABELS[f]}: " if labelled else ""
        spans[f] = (pos + len(prefix), pos + len(prefix) + len(value))
        parts.append(prefix + value)
        pos += len(prefix) + len(value)
    return SEPARATOR.join(parts), spans
