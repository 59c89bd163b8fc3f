"""Streaming score files: Parquet, CSV or JSON lines, written chunk by chunk (constant memory) to a temporary
file that is renamed into place when complete, so a killed run never leaves a half file under the real name."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

FORMATS = ("parquet", "csv", "jsonl")
_EXT = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def output_format(path: str | Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"--out_format must be auto or one of {list(FORMATS)}, got {fmt!r}")
        return fmt
    ext = Path(path).suffix.lower()
    if ext not in _EXT:
        raise ValueError(
            f"{path}: cannot tell the output format from the name; use .parquet, .csv or .jsonl (or --out_format)"
        )
    return _EXT[ext]


class ScoreWriter:
    """``write(columns)`` appends rows given as ``{column: values}``; ``close()`` publishes the file."""

    def __init__(self, path: str | Path, fmt: str = "auto"):
        self.path = Path(path)
        self.format = output_format(self.path, fmt)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._file: Any = None
        self._writer: Any = None
        self.rows = 0

    def write(self, columns: dict[str, list[Any]]) -> None:
        n = len(next(iter(columns.values()), []))
        if not n:
            return
        if self.format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table(columns)
            if self._writer is None:
                self._writer = pq.ParquetWriter(self._tmp, table.schema)
            self._writer.write_table(table.cast(self._writer.schema))
        else:
            if self._file is None:
                self._file = open(self._tmp, "w", encoding="utf-8", newline="")
                if self.format == "csv":
                    self._writer = csv.writer(self._file)
                    self._writer.writerow(list(columns))
            keys = list(columns)
            for i in range(n):
                row = [columns[k][i] for k in keys]
                if self.format == "csv":
                    self._writer.writerow(row)
                else:
                    self._file.write(json.dumps(dict(zip(keys, row)), ensure_ascii=False) + "\n")
        self.rows += n

    def close(self) -> Path:
        if self.format == "parquet" and self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()
        if not self._tmp.exists():  # no rows: an empty file still says so
            self._tmp.write_text("")
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        for h in (self._writer if self.format == "parquet" else None, self._file):
            if h is not None:
                h.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ScoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
