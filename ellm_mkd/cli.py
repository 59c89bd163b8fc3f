"""``ellm-mkd``: one entry point for every stage.

``fit``, ``validate``, ``test`` and ``predict`` go to the LightningCLI (``--config``,
``--print_config``, dotted overrides); every other subcommand is an ordinary typed command.
"""

from __future__ import annotations

import logging
import sys

LIGHTNING_COMMANDS = {
    "fit": "train a model from a YAML config (LightningCLI)",
    "validate": "run validation of a model (LightningCLI)",
    "test": "evaluate a model on the test split (LightningCLI)",
    "predict": "run a model over a split, e.g. to write a teacher cache (LightningCLI)",
}
COMMANDS = {
    **LIGHTNING_COMMANDS,
    "demo": "the whole loop on the embedded synthetic catalog (make demo)",
    "bench": "bench students | bench teacher | bench cache | bench mkd: measure models (quality, throughput); writes docs/results and docs/benchmarks.md",
    "annotate": "chains of thought for every example (rules, or LLM self-consistency); sharded and resumable",
    "cache": "cache inspect PATH: a teacher cache's manifest, level distribution, entropy and sample chains",
    "data": "data check PATH: validate a dataset and print its counts; data synth --out DIR: generate the embedded catalog",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: ellm-mkd COMMAND [options]   (ellm-mkd COMMAND --help for a command's options)", "",
             "Explainable LLM-driven multi-dimensional distillation for query-item relevance.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in LIGHTNING_COMMANDS:
        from .lightning_cli import cli_main

        cli_main([cmd, *rest])
        return 0
    if cmd == "data":
        from .data_cmd import data_main

        return data_main(rest)
    if cmd == "annotate":
        from .annotate import annotate_main

        return annotate_main(rest)
    if cmd == "cache":
        from .teacher_cache import cache_main

        return cache_main(rest)
    if cmd == "bench":
        from .bench import bench_main

        return bench_main(rest)
    if cmd == "demo":
        from .demo import demo_main

        return demo_main(rest)
    print(f"ellm-mkd: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
