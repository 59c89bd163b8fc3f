"""``ellm-mkd``: one entry point for every stage.

``fit``, ``validate``, ``test`` and ``predict`` go to the LightningCLI (``--config``,
``--print_config``, dotted overrides); every other subcommand is an ordinary typed command.
"""

from __future__ import annotations

import importlib
import logging
import os
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
    "bench": "bench students | teacher | cache | mkd | serve | injection: measure models (quality, throughput); "
    "writes docs/results and docs/benchmarks.md",
    "annotate": "chains of thought for every example (rules, or LLM self-consistency); sharded and resumable",
    "cache": "cache inspect PATH: a teacher cache's manifest, level distribution, entropy and sample chains; "
    "cache serve-teacher --config FILE: a teacher cache from a teacher behind an OpenAI-compatible server",
    "data": "data check PATH: validate a dataset and print its counts; "
    "data synth --out DIR: generate the embedded catalog",
    "export": "export CKPT --out DIR: a student as ONNX (+ int8), tokenizer, model.json, sentence-transformers folder",
    "score": "score DATA --model DIR|CKPT --out FILE: pairs -> Parquet/CSV/JSONL of grades, levels, verdicts",
    "serve": "serve --model DIR|CKPT: a JSON HTTP scoring service (LitServe) with dynamic batching",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: ellm-mkd COMMAND [options]   (ellm-mkd COMMAND --help for a command's options)",
        "",
        "Explainable LLM-driven multi-dimensional distillation for query-item relevance.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


#: command name -> (module under ellm_mkd.commands, its entry function); loaded only when run
ENTRY_POINTS = {
    "data": ("data", "data_main"),
    "annotate": ("annotate", "annotate_main"),
    "cache": ("cache", "cache_main"),
    "bench": ("bench", "bench_main"),
    "demo": ("demo", "demo_main"),
    "export": ("export", "export_main"),
    "score": ("score", "score_main"),
    "serve": ("serve", "serve_main"),
}


#: set to 1 (or pass --debug) to see the traceback of an error instead of its one-line message
DEBUG_ENV = "ELLM_MKD_DEBUG"


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in LIGHTNING_COMMANDS:
        from .lightning_cli import cli_main

        try:
            cli_main([cmd, *rest])
        finally:
            close_process_group()
        return 0
    if cmd in ENTRY_POINTS:
        module, func = ENTRY_POINTS[cmd]
        return getattr(importlib.import_module(f"{__package__}.{module}"), func)(rest)
    print(f"ellm-mkd: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
    return 2


def close_process_group() -> None:
    """Destroy the process group a DDP run opened (Lightning leaves it open): a process that exits with
    gloo's threads still running is aborted (``terminate called without an active exception``, exit
    status -6), so a finished run would look like a failed one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def error_message(e: BaseException) -> str:
    """The message a user reads: the exception's own text (and its cause's, when it has none)."""
    text = str(e).strip()
    while not text and e.__cause__ is not None:
        e = e.__cause__
        text = str(e).strip()
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError) and e.filename:
        text = f"{e.filename}: {e.strerror or text}"
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command. An error reaches the user as one line on stderr naming the command, and exit
    status 1; ``--debug`` (anywhere) or ``ELLM_MKD_DEBUG=1`` shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        print("ellm-mkd: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        if type(e).__name__ != "SIGTERMException":  # Lightning's, raised at a batch boundary after SIGTERM
            raise
        print(f"ellm-mkd {' '.join(argv[:1])}: stopped by SIGTERM (resume with --ckpt_path last)", file=sys.stderr)
        return 143
    except Exception as e:
        if debug:
            raise
        where = " ".join(argv[:2] if argv[:1] in (["data"], ["cache"], ["bench"]) else argv[:1])
        print(f"ellm-mkd {where}: error: {error_message(e)}", file=sys.stderr)
        print(f"(add --debug or set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
