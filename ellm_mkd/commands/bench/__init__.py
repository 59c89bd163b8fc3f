"""``ellm-mkd bench``: benchmarks that write ``docs/results/<name>.json`` and a section of
``docs/benchmarks.md`` naming the exact command, machine and date. One module per benchmark;
:mod:`.common` holds what they share."""

from __future__ import annotations

import importlib

#: benchmark name -> (module, entry); ``students`` parses its own subcommand name
BENCHMARKS = {
    "teacher": ("teacher", "bench_teacher_main"),
    "cache": ("cache", "bench_cache_main"),
    "mkd": ("mkd", "bench_mkd_main"),
    "serve": ("serve", "bench_serve_main"),
    "injection": ("injection", "bench_injection_main"),
    "packing": ("packing", "bench_packing_main"),
}


def bench_main(argv: list[str]) -> int:
    argv = list(argv)
    if argv[:1] and argv[0] in BENCHMARKS:
        module, func = BENCHMARKS[argv[0]]
        return getattr(importlib.import_module(f"{__name__}.{module}"), func)(argv[1:])
    from .students import bench_students_main

    return bench_students_main(argv)
