"""``ellm-mkd annotate``: chains of thought for every example (:mod:`ellm_mkd.annotation`)."""

from __future__ import annotations

import json
from typing import Literal

from ellm_mkd.annotation import LLMAnnotator, run_annotation


def _parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from datamodules.datamodule import RelevanceDataModule

    p = ArgumentParser(
        prog="ellm-mkd annotate",
        description="Chains of thought for every example (rules or LLM "
        "self-consistency), written to a sharded, resumable store.",
    )
    p.add_argument("--config", action=ActionConfigFile)
    p.add_class_arguments(RelevanceDataModule, "data", instantiate=True)
    p.add_argument("--out", type=str, required=True, help="store directory (reruns resume here)")
    p.add_argument("--annotator", type=Literal["rules", "llm"], default="rules")
    p.add_class_arguments(LLMAnnotator, "llm", instantiate=False, sub_configs=True)
    p.add_argument("--splits", type=list[Literal["train", "val", "test"]], default=["train", "val"])
    p.add_argument("--format", type=Literal["jsonl", "parquet"], default="jsonl")
    p.add_argument("--rows_per_shard", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16, help="pairs per backend call")
    p.add_argument("--limit", type=int | None, default=None, help="annotate at most this many examples")
    p.add_argument("--overwrite", type=bool, default=False, help="delete an existing store first")
    p.add_argument(
        "--progress", type=bool, default=True, help="a progress bar on a terminal, else a log line every 30 s"
    )
    p.add_argument(
        "--max_failed_share",
        type=float,
        default=0.5,
        help="exit with an error when more than this share of the pairs got no chain that parses "
        "(they are not stored: a rerun retries them)",
    )
    return p


def annotate_main(argv: list[str]) -> int:
    p = _parser()
    cfg = p.parse_args(argv)
    if cfg.annotator != "llm":
        cfg.llm.backend = None  # the llm section (its backend would load a model) is not needed
    init = p.instantiate_classes(cfg)
    llm = LLMAnnotator(**init.llm) if cfg.annotator == "llm" else None
    summary = run_annotation(
        init.data,
        cfg.out,
        cfg.annotator,
        llm,
        cfg.splits,
        cfg.format,
        cfg.rows_per_shard,
        cfg.batch_size,
        cfg.limit,
        cfg.overwrite,
        cfg.progress,
        cfg.max_failed_share,
    )
    print(json.dumps(summary, indent=2))
    print(f"annotations written to {cfg.out}/ (summary.json; run the same command again to resume)")
    return 0
