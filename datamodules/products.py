"""ESCI's two-Parquet layout: each example row with the columns of its product.

:class:`ProductJoin` reads and checks the products file (the catalog: it is held in memory whole, as a
table) and joins any table of example rows to it: the whole examples table (:func:`join_products`, what
``load_examples`` does) or one batch of it at a time (the streaming reader). Rows and order stay the
examples'; ``__has_product`` says whether the product was found, looked up by
``(product_locale, product_id)``. A key that the products file holds twice is a :class:`DataError`
naming the products file, the key and its rows.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from .file_bytes import open_source
from .readers import DataError, Problem, Source

JOIN_KEYS = ("product_locale", "product_id")


def _check_key_type(name: str, key: str, t: pa.DataType, what: str, warnings: list[str]) -> None:
    """A join column must be text or integers (matched as their decimal text, with a warning)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        warnings.append(f"{name}: join column {key!r} is {t}; its values are matched as decimal text")
    elif not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        why = "is all null (an empty column)" if pa.types.is_null(t) else f"is {t}, not text or integers"
        msg = f"join column {key!r} {why}; the {what} file needs text {list(JOIN_KEYS)}"
        raise DataError(f"{name}: {msg}", [Problem(name, None, key, "bad_value", msg, unit="row")])


def _join_key(table: pa.Table) -> pa.ChunkedArray | pa.Array:
    """``product_locale`` and ``product_id`` of each row as one text key."""
    return pc.binary_join_element_wise(*(pc.cast(table.column(k), pa.string()) for k in JOIN_KEYS), "\x1f")


def _check_columns(name: str, names: list[str], what: str) -> None:
    missing = [k for k in JOIN_KEYS if k not in names]
    if missing:
        raise DataError(
            f"{name}: the {what} file lacks join column(s) {missing}",
            [Problem(name, None, m, "missing_column", f"join column {m!r} not found", unit="row") for m in missing],
        )


class ProductJoin:
    """The products file of an examples file with schema ``examples``, checked and ready to join."""

    def __init__(self, examples_name: str, examples: pa.Schema, products_path: str, max_bytes: int | None = None):
        prod = open_source(products_path, "parquet", max_bytes=max_bytes)
        self.name = prod.name
        _check_columns(examples_name, examples.names, "examples")
        _check_columns(prod.name, prod.table.column_names, "products")
        self.warnings = list(prod.warnings)
        _check_key_type(examples_name, JOIN_KEYS[0], examples.field(JOIN_KEYS[0]).type, "examples", self.warnings)
        _check_key_type(examples_name, JOIN_KEYS[1], examples.field(JOIN_KEYS[1]).type, "examples", self.warnings)
        for k in JOIN_KEYS:
            _check_key_type(prod.name, k, prod.table.schema.field(k).type, "products", self.warnings)
        self.key = _join_key(prod.table)
        self._refuse_duplicate_keys()
        self.products = prod.table.drop_columns([c for c in prod.table.column_names if c in examples.names])

    def _refuse_duplicate_keys(self) -> None:
        counts = pa.table({"key": self.key}).group_by("key").aggregate([("key", "count")])
        dups = counts.filter((pc.field("key_count") > 1) & pc.is_valid(pc.field("key")))["key"]
        if not len(dups):
            return
        rows: dict[str, list[int]] = {}
        for i in pc.indices_nonzero(pc.is_in(self.key, value_set=dups)).to_pylist():
            rows.setdefault(self.key[i].as_py(), []).append(i + 1)
        problems = []
        for key, at in sorted(rows.items(), key=lambda kv: kv[1][0]):
            msg = f"product {tuple(key.split(chr(31), 1))} appears {len(at)} times, at rows {at[:10]}"
            problems.append(Problem(self.name, at[0], "product_id", "duplicate_id", msg, unit="row"))
        shown = "; ".join(x.message for x in problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise DataError(
            f"{self.name}: {len(problems)} (product_locale, product_id) key(s) appear more than once, so an "
            f"example could not tell which product it means: {shown}. Keep one row per key",
            problems,
        )

    def columns(self, examples: list[str]) -> list[str]:
        """The joined table's columns."""
        return [*examples, *self.products.column_names, "__has_product"]

    def apply(self, examples: pa.Table) -> pa.Table:
        """``examples`` (the whole file or a batch of it) with its products' columns and ``__has_product``."""
        index = pc.index_in(_join_key(examples), value_set=self.key)
        joined = examples
        for name, col in zip(self.products.column_names, self.products.take(index).columns):
            joined = joined.append_column(name, col)
        return joined.append_column("__has_product", pc.is_valid(index))


def join_products(src: Source, products_path: str, max_bytes: int | None = None) -> Source:
    """The whole examples table of ``src`` (Parquet) joined to the products file (see :class:`ProductJoin`)."""
    join = ProductJoin(src.name, src.table.schema, products_path, max_bytes)
    table = join.apply(src.table)
    return Source(f"{src.name} + {join.name}", "parquet", table=table, warnings=src.warnings + join.warnings)
