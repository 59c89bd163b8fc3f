"""``ellm-mkd bench cache``: what the teacher cache costs to write, to store and to read while training.

One run, one machine, on the embedded catalog:

1. **Write throughput and size**: the real writer path (``ellm-mkd predict`` with
   ``configs/teacher/cache_smollm2_{direct,cot}.yaml``) over the catalog: pairs/s of the predict loop
   (readout + shard writes) and bytes per example on disk (shards + manifest), for ``direct``
   (every pair of every split) and ``cot`` (the first ``cot_pairs`` pairs: generation is slow).
   The teacher is the LoRA adapter ``bench teacher`` leaves behind when it exists (``--adapter``),
   else the zero-shot base model: cot chains from a model that never learned the schema run to the
   token budget, which is the slow case.
2. **Join overhead**: epoch time of the cross-encoder student (bundled MiniLM) on the training split
   with the ``direct`` cache joined (teacher distributions, evidence masks from offsets, rationale
   tokens in every batch) versus without, alternating ``repeats`` times; target overhead <= 10%.

Writes ``docs/results/<name>.json`` and the ``<name>`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import logging
import shlex
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from callbacks.timer import ThroughputTimer
from ellm_mkd.commands.pipeline import REPO

from .common import options, options_parser, publish, result_head, section_head

log = logging.getLogger(__name__)


@dataclass
class CacheBenchOptions:
    """Options of ``ellm-mkd bench cache`` (each a ``--name`` flag; ``--config FILE`` reads them from YAML).

    Args:
        model: teacher base model
        adapter: LoRA adapter of the teacher (used when the directory exists)
        work_dir: scratch directory of the runs
        num_queries: catalog size (queries; 10 items each)
        direct_batch_size: pairs per direct readout batch
        cot_pairs: pairs written in cot readout
        cot_batch_size: pairs per cot readout batch
        student_config: student LightningCLI config timed with and without the cache
        repeats: epochs timed with and without the cache, alternating
        precision: trainer precision of the teacher and the student (32-true on CPUs without native bf16)
        accelerator: trainer accelerator of the teacher and the student: cpu or gpu (one CUDA device)
        seed: seed of the catalog and of training
        name: benchmark name (the JSON file and the markdown section)
        out_json: default docs/results/<name>.json
        out_md: markdown file whose <name> section is replaced
    """

    model: str = "smollm2-135m-instruct"
    adapter: str | None = "runs/benchmarks/teacher/teacher/adapter"
    work_dir: str = "runs/benchmarks/cache"
    num_queries: int = 150
    direct_batch_size: int = 32
    cot_pairs: int = 64
    cot_batch_size: int = 16
    student_config: str = "configs/students/cross_encoder.yaml"
    repeats: int = 2
    precision: str = "bf16-mixed"
    accelerator: Literal["cpu", "gpu"] = "cpu"
    seed: int = 0
    name: str = "cache"
    out_json: str | None = None
    out_md: str = "docs/benchmarks.md"


def _parser():
    return options_parser(CacheBenchOptions, "ellm-mkd bench cache", __doc__.split("\n\n")[0])


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def write_cache(mode: str, opts, data_dir: Path, out: Path, adapter: str | None) -> dict[str, Any]:
    """Run the real predict + TeacherCacheWriter path; time the predict loop."""
    from ellm_mkd.commands.lightning_cli import cli_main
    from ellm_mkd.teacher_cache import TeacherCache

    cfg = REPO / "configs" / "teacher" / f"cache_smollm2_{mode}.yaml"
    bs = opts.direct_batch_size if mode == "direct" else opts.cot_batch_size
    args = [
        "--config",
        str(cfg),
        "--model.init_args.model",
        opts.model,
        "--data.source.path",
        str(data_dir),
        "--trainer.callbacks.init_args.cache_dir",
        str(out),
        "--trainer.callbacks.init_args.overwrite",
        "true",
        "--trainer.accelerator",
        opts.accelerator,
        "--trainer.enable_progress_bar",
        "false",
        "--data.eval_batch_size",
        str(bs),
        "--trainer.default_root_dir",
        str(out.parent / f"predict_{mode}"),
        "--trainer.precision",
        opts.precision,
    ]
    if adapter:
        args += ["--model.init_args.adapter", adapter]
    if mode == "cot":
        args += ["--trainer.limit_predict_batches", str(max(1, opts.cot_pairs // bs))]
    cli = cli_main(args, run=False)
    timer = ThroughputTimer()
    cli.trainer.callbacks.append(timer)
    t = time.perf_counter()
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    wall = time.perf_counter() - t
    rows = len(TeacherCache(out))
    size = _dir_bytes(out)
    return {
        "mode": mode,
        "rows": rows,
        "batch_size": bs,
        "predict_loop_seconds": round(timer.predict_s, 2),
        "pairs_per_s": rows / timer.predict_s,
        "wall_seconds_with_setup": round(wall, 2),
        "bytes": size,
        "bytes_per_example": size / rows,
        "parse_failures": sum(e is not None for e in TeacherCache(out).table.column("parse_error").to_pylist()),
    }


def student_epoch_seconds(opts, data_dir: Path, cache: Path | None, work: Path) -> dict[str, float]:
    from ellm_mkd.commands.lightning_cli import cli_main

    args = [
        "--config",
        str(REPO / opts.student_config),
        "--data.source.path",
        str(data_dir),
        "--data.item_fields",
        json.dumps(["title", "brand", "color", "attributes"]),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.logger",
        "false",
        "--trainer.callbacks",
        "[]",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(work),
        "--seed_everything",
        str(opts.seed),
        "--trainer.precision",
        opts.precision,
        "--trainer.accelerator",
        opts.accelerator,
    ]
    if cache is not None:
        args += [
            "--data.teacher",
            json.dumps(
                {"class_path": "datamodules.teacher_signal.CachedTeacher", "init_args": {"cache_dir": str(cache)}}
            ),
        ]
    cli = cli_main(args, run=False)
    timer = ThroughputTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {
        "epoch_seconds": timer.train_s,
        "pairs": timer.train_pairs,
        "pairs_per_s": timer.train_pairs / timer.train_s,
    }


def bench_cache(opts, command: str) -> dict[str, Any]:
    from datamodules.synth import SynthConfig, write

    work = Path(opts.work_dir)
    data_dir = work / "data"
    write(data_dir, SynthConfig(seed=opts.seed, num_queries=opts.num_queries), overwrite=True)
    adapter = opts.adapter if opts.adapter and Path(opts.adapter).is_dir() else None
    log.info("teacher: %s%s", opts.model, f" + adapter {adapter}" if adapter else " (zero-shot: no adapter found)")
    writes = [write_cache(mode, opts, data_dir, work / f"cache_{mode}", adapter) for mode in ("direct", "cot")]
    for w in writes:
        log.info("cache %s: %s", w["mode"], w)
    runs: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
    for _ in range(opts.repeats):  # alternate, so drifts of the machine hit both sides alike
        runs["without"].append(student_epoch_seconds(opts, data_dir, None, work / "student"))
        runs["with"].append(student_epoch_seconds(opts, data_dir, work / "cache_direct", work / "student"))
    med = {k: statistics.median(r["epoch_seconds"] for r in v) for k, v in runs.items()}
    overhead = med["with"] / med["without"] - 1.0
    return {
        **result_head(opts.name, command),
        "setup": {
            "model": opts.model,
            "adapter": adapter,
            "catalog_queries": opts.num_queries,
            "precision": opts.precision,
            "accelerator": opts.accelerator,
            "student_config": opts.student_config,
            "repeats": opts.repeats,
        },
        "writes": writes,
        "student_epoch": {"runs": runs, "median_seconds": med, "overhead": overhead},
        "targets": {
            "join_overhead_le_10pct": {
                "rule": "student epoch time with the cache joined <= 1.10 x without",
                "value": overhead,
                "met": overhead <= 0.10,
            }
        },
    }


def markdown_section(result: dict[str, Any]) -> str:
    name, s = result["benchmark"], result["setup"]
    teacher = f"`{s['model']}`" + (f" + LoRA adapter `{s['adapter']}`" if s["adapter"] else " zero-shot")
    lines = [
        *section_head(result),
        f"Teacher {teacher}; embedded catalog ({s['catalog_queries']} queries). Write throughput is the predict "
        "loop of `ellm-mkd predict` with `callbacks.TeacherCacheWriter` (readout + Parquet shard writes), "
        f"precision {s['precision']}.",
        "",
        "| readout | rows | batch | pairs/s | bytes/example | chains not parsed |",
        "|---|---|---|---|---|---|",
    ]
    for w in result["writes"]:
        pf = str(w["parse_failures"]) if w["mode"] == "cot" else ""
        lines.append(
            f"| {w['mode']} | {w['rows']} | {w['batch_size']} | {w['pairs_per_s']:.2f} | "
            f"{w['bytes_per_example']:.0f} | {pf} |"
        )
    se = result["student_epoch"]
    lines += [
        "",
        f"Cross-encoder student (`{s['student_config']}`, MiniLM-L6) one training epoch, median of "
        f"{s['repeats']} alternating runs:",
        "",
        "| | epoch seconds | pairs/s |",
        "|---|---|---|",
    ]
    for key, label in (("without", "labels only"), ("with", "direct cache joined")):
        pps = statistics.median(r["pairs_per_s"] for r in se["runs"][key])
        lines.append(f"| {label} | {se['median_seconds'][key]:.1f} | {pps:.1f} |")
    t = result["targets"]["join_overhead_le_10pct"]
    lines += [
        "",
        f"Overhead of the join: {100 * se['overhead']:+.1f}% (target <= 10%: {'met' if t['met'] else 'NOT met'}).",
        f"<!-- /bench:{name} -->",
    ]
    return "\n".join(lines)


def bench_cache_main(argv: list[str]) -> int:
    from ellm_mkd.commands.lightning_cli import resolve_precision

    opts = options(CacheBenchOptions, _parser().parse_args(argv))
    opts.precision = resolve_precision(opts.precision, opts.accelerator)  # record what runs, not what was asked
    command = "ellm-mkd bench cache " + shlex.join(argv)
    result = bench_cache(opts, command)
    publish(result, opts, markdown_section(result))
    return 0
