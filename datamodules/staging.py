"""Write a set of files into a directory all at once: staged beside it, moved in when every one is written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_files(out: Path, names: Sequence[str]) -> Iterator[Path]:
    """Yield a temporary directory beside ``out`` to write ``names`` into; when the block ends without an error,
    move them into ``out`` with ``os.replace`` in the order given (a summary file last marks a complete set).
    The temporary directory is removed either way, so an error leaves ``out`` as it was."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
