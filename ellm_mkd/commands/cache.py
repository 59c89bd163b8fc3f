"""``ellm-mkd cache``: look at a teacher cache (:mod:`ellm_mkd.teacher_cache`), or write one from a served teacher.

``ellm-mkd cache inspect PATH`` prints a cache's manifest, level distribution and sample chains;
``ellm-mkd cache serve-teacher --config configs/teacher/cache_served.yaml`` asks a teacher behind an
OpenAI-compatible server about every pair of the data and writes its cache (:mod:`ellm_mkd.served_teacher`).
"""

from __future__ import annotations

import json
import logging
import sys

from ellm_mkd.annotation_store import StoreError
from ellm_mkd.teacher_cache import inspect


def serve_teacher_parser():
    """The parser of ``ellm-mkd cache serve-teacher`` (its config is ``configs/teacher/cache_served.yaml``)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from datamodules.datamodule import RelevanceDataModule
    from ellm_mkd.served_teacher import ServedTeacher

    p = ArgumentParser(
        prog="ellm-mkd cache serve-teacher",
        description="Write a teacher cache from a teacher served by an OpenAI-compatible server (vLLM, SGLang, "
        "llama.cpp server), read through the log-probabilities of the level words. Killed? Run the same command "
        "again: only the pairs not in the cache are asked for.",
    )
    p.add_argument("--config", action=ActionConfigFile)
    p.add_class_arguments(RelevanceDataModule, "data", instantiate=True)
    p.add_class_arguments(ServedTeacher, "teacher", instantiate=True)
    p.add_argument("--cache_dir", type=str, required=True, help="the cache directory (a rerun resumes here)")
    p.add_argument("--rows_per_shard", type=int, default=256, help="rows per Parquet shard")
    p.add_argument("--overwrite", type=bool, default=False, help="delete an existing teacher cache there first")
    p.add_argument(
        "--max_unreadable_share",
        type=float,
        default=0.05,
        help="exit with an error when more of the pairs than this got no readable level distribution "
        "(they are not stored: a rerun asks again)",
    )
    return p


def serve_teacher_main(argv: list[str]) -> int:
    from ellm_mkd.served_teacher import write_served_cache

    p = serve_teacher_parser()
    cfg = p.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    init = p.instantiate(cfg)
    dm, teacher = init.data, init.teacher
    try:
        dm.setup("predict")
        data = {
            "label_scheme": dm.scheme.describe(),
            "level_names": list(dm.level_names),
            "item_fields": list(dm.item_fields),
            "source_path": str(dm.source.path),
            "split": dm.predict_split,
        }
        summary = write_served_cache(
            teacher,
            dm.full_predict_dataset().rows,
            cfg.cache_dir,
            data,
            rows_per_shard=cfg.rows_per_shard,
            overwrite=cfg.overwrite,
            max_unreadable_share=cfg.max_unreadable_share,
        )
    finally:
        teacher.close()
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    print(
        f"teacher cache: {summary['in_cache']} of {summary['rows']} examples in {cfg.cache_dir} "
        f"({summary['written']} written this run; ellm-mkd cache inspect {cfg.cache_dir})",
        flush=True,
    )
    return 0


def cache_main(argv: list[str]) -> int:
    """``ellm-mkd cache inspect PATH [--examples N]`` or ``ellm-mkd cache serve-teacher --config FILE``."""
    from jsonargparse import ArgumentParser

    if argv[:1] == ["serve-teacher"]:
        return serve_teacher_main(argv[1:])
    p = ArgumentParser(prog="ellm-mkd cache", description="Look at a teacher cache, or write one from a served teacher")
    sub = p.add_subcommands()
    ins = ArgumentParser(
        description="print the manifest, row count, teacher level distribution, mean entropy "
        "and a few chains with their evidence marked as [words]{dimension}"
    )
    ins.add_argument("path", type=str, help="the cache directory")
    ins.add_argument("--examples", type=int, default=3, help="how many examples to show")
    sub.add_subcommand("inspect", ins, help="a teacher cache's manifest, level distribution and sample chains")
    serve = ArgumentParser(description="write a teacher cache from a served teacher (--config FILE; see --help there)")
    sub.add_subcommand(
        "serve-teacher", serve, help="write a teacher cache from a teacher behind an OpenAI-compatible server"
    )
    cfg = p.parse_args(argv)
    args = cfg.inspect
    try:
        print(inspect(args.path, args.examples))
    except (StoreError, ValueError) as e:
        print(f"ellm-mkd cache inspect: {e}", file=sys.stderr)
        return 2
    return 0
