"""``ellm-mkd cache inspect PATH``: look at a teacher cache (:mod:`ellm_mkd.teacher_cache`)."""

from __future__ import annotations

import sys

from ellm_mkd.annotation_store import StoreError
from ellm_mkd.teacher_cache import inspect


def cache_main(argv: list[str]) -> int:
    """``ellm-mkd cache inspect PATH [--examples N]``."""
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="ellm-mkd cache", description="Look at a teacher cache.")
    sub = p.add_subcommands()
    ins = ArgumentParser(
        description="print the manifest, row count, teacher level distribution, mean entropy "
        "and a few chains with their evidence marked as [words]{dimension}"
    )
    ins.add_argument("path", type=str, help="the cache directory")
    ins.add_argument("--examples", type=int, default=3, help="how many examples to show")
    sub.add_subcommand("inspect", ins)
    cfg = p.parse_args(argv)
    args = cfg.inspect
    try:
        print(inspect(args.path, args.examples))
    except (StoreError, ValueError) as e:
        print(f"ellm-mkd cache inspect: {e}", file=sys.stderr)
        return 2
    return 0
