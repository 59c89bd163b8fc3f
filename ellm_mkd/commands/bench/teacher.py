"""``ellm-mkd bench teacher``: the teacher on the embedded catalog, zero-shot versus LoRA, and its readout speed.

One run, one machine:

1. the catalog (``ellm-mkd data synth``) and rule annotations of its training split;
2. quality on a seeded sample of test pairs: level accuracy, AUC, macro-F1, RMSE and the parse-failure
   rate of the chains, for the model zero-shot and after ``steps`` LoRA steps, each in ``direct`` and
   ``cot`` readout (the same metrics as the students, :mod:`lightning_modules.evaluation`);
3. readout throughput of the fine-tuned teacher on the same pairs: ``direct`` (one batched forward),
   ``cot`` (one batched ``generate`` per batch with a static cache, the level and verdict
   distributions recorded while generating) and a naive loop that calls ``generate()`` for one pair
   at a time and parses the text (timed twice: with generate's default cache, which is the
   baseline of the issue's target cot batched >= 5x naive, and with a static cache).

``--stage throughput`` repeats step 3 alone with the adapter a full run trained, and writes the
figures into that run's result.

Writes ``docs/results/<name>.json`` and the ``<name>`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import logging
import random
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .common import (
    fmt,
    machine_description,
    optimizer_description,
    options,
    options_parser,
    publish,
    result_head,
    section_head,
    sync,
)

log = logging.getLogger(__name__)
QUALITY_KEYS = ("accuracy", "auc", "macro_f1", "rmse", "parse_failure_rate")


@dataclass
class TeacherBenchOptions:
    """Options of ``ellm-mkd bench teacher`` (each a ``--name`` flag; ``--config FILE`` reads them from YAML).

    Args:
        model: teacher base model
        work_dir: catalog, annotations, logs
        num_queries: catalog size (queries; 10 items each)
        item_fields: item fields, in order
        steps: LoRA optimizer steps
        batch_size: training examples per step (each: a cot and a direct response)
        lr: teacher peak learning rate
        eval_pairs: seeded sample of test pairs for quality and speed
        eval_batch_size: pairs per batched readout (--stage throughput: the batch it times)
        naive_pairs: pairs timed in the naive per-pair loops (evenly spaced over the length-sorted sample)
        max_new_tokens: generation budget of one chain
        precision: bf16-mixed, or 32-true on CPUs without native bf16 (AVX2-only: bf16 autocast is emulated, slower)
        accelerator: cpu, or gpu: training, quality and readout speed on one CUDA device (autocast on it)
        seed: seed of the catalog and of training
        stage: all: catalog, zero-shot and LoRA quality, throughput; throughput: only the readout speed of the
                    adapter a full run trained, written into that run's result
        adapter: --stage throughput: the LoRA adapter (default <work_dir>/teacher/adapter)
        name: benchmark name (the JSON file and the markdown section)
        out_json: default docs/results/<name>.json
        out_md: markdown file whose <name> section is replaced
    """

    model: str = "smollm2-135m-instruct"
    work_dir: str = "runs/benchmarks/teacher"
    num_queries: int = 600
    item_fields: list[str] = field(default_factory=lambda: ["title", "brand", "color", "attributes"])
    steps: int = 60
    batch_size: int = 8
    lr: float = 5e-4
    eval_pairs: int = 96
    eval_batch_size: int = 32
    naive_pairs: int = 16
    max_new_tokens: int = 128
    precision: str = "bf16-mixed"
    accelerator: Literal["cpu", "gpu"] = "cpu"
    seed: int = 0
    stage: Literal["all", "throughput"] = "all"
    adapter: str | None = None
    name: str = "teacher"
    out_json: str | None = None
    out_md: str = "docs/benchmarks.md"


def _parser():
    return options_parser(TeacherBenchOptions, "ellm-mkd bench teacher", __doc__.split("\n\n")[0])


def _evaluate(model, dm, mode: str, precision: str, accelerator: str = "cpu") -> dict[str, float]:
    import lightning as L

    model.use_readout(mode)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t = time.perf_counter()
    trainer.test(model, datamodule=dm, verbose=False)
    res = dict(model.last_results["test"])
    res["seconds"] = time.perf_counter() - t
    return {k: float(v) for k, v in res.items()}


def _naive_loop(model, ro, q: list[str], d: list[str], **generate_kwargs) -> tuple[float, int]:
    """What one writes first: ``generate()`` for one pair, decode, parse. Returns (pairs/s, parse failures)."""
    from ellm_mkd.cot import CoTParseError, parse

    tok = model.tokenizer
    failures = 0
    t = time.perf_counter()
    for qi, di in zip(q, d):
        enc = tok(ro.prompts([qi], [di], "cot")[0], return_tensors="pt", add_special_tokens=False)
        enc = enc.to(next(model.model.parameters()).device)
        out = model.model.generate(
            **enc,
            max_new_tokens=ro.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=ro.stop_ids,
            pad_token_id=tok.pad_token_id,
            **generate_kwargs,
        )
        text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        try:
            parse(text, qi, di, ro.level_names)
        except CoTParseError:
            failures += 1
    return len(q) / (time.perf_counter() - t), failures


def _throughput(
    model, rows: list[dict[str, Any]], batch: int, naive_pairs: int, bf16: bool, accelerator: str = "cpu"
) -> dict[str, float]:
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    model.to(device)  # Lightning hands the model back on the CPU after fit and test
    ro = model.readout
    q = [r["query"] for r in rows]
    d = [r["item_text"] for r in rows]
    out: dict[str, float] = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        t = time.perf_counter()
        for s in range(0, len(rows), batch):
            ro.direct(q[s : s + batch], d[s : s + batch])
        sync(device)
        out["direct_pairs_per_s"] = len(rows) / (time.perf_counter() - t)
        # cot batched twice: every chain written to its end, then (the readout's default) chains that
        # break the schema stopped at their first broken line; the distributions must not change
        levels = {}
        for stop, key in ((False, "cot_batched_whole_chains"), (True, "cot_batched")):
            ro.stop_unparseable = stop
            t = time.perf_counter()
            tokens, failures, probs = 0, 0, []
            for s in range(0, len(rows), batch):
                r = ro.cot(q[s : s + batch], d[s : s + batch])
                tokens += sum(len(model.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in r.rationales)
                failures += r.parse_failures
                probs.append(r.level_probs)
            sync(device)
            dt = time.perf_counter() - t
            out[f"{key}_pairs_per_s"] = len(rows) / dt
            out[f"{key}_generated_tokens_per_s"] = tokens / dt
            out[f"{key}_generated_tokens"] = tokens
            out[f"{key}_parse_failures"] = failures
            levels[stop] = torch.cat(probs).float().cpu()
        out["cot_stop_max_level_prob_difference"] = float((levels[True] - levels[False]).abs().max())
        # the naive loops time an evenly spaced subset: the rows are sorted by length, so the first few
        # would be the shortest prompts and chains
        n = min(naive_pairs, len(rows))
        pick = sorted({round(i * (len(rows) - 1) / max(n - 1, 1)) for i in range(n)})
        nq, nd = [q[i] for i in pick], [d[i] for i in pick]
        out["naive_pairs_per_s"], out["naive_parse_failures"] = _naive_loop(model, ro, nq, nd)
        out["naive_static_cache_pairs_per_s"], _ = _naive_loop(model, ro, nq, nd, cache_implementation="static")
    out["cot_batched_over_naive"] = out["cot_batched_pairs_per_s"] / out["naive_pairs_per_s"]
    out["cot_batched_over_naive_static_cache"] = out["cot_batched_pairs_per_s"] / out["naive_static_cache_pairs_per_s"]
    return out


def _target(speed: dict[str, float]) -> dict[str, Any]:
    return {
        "cot_batched_ge_5x_naive": {
            "rule": "cot batched pairs/s >= 5 x naive per-pair generate()",
            "value": speed["cot_batched_over_naive"],
            "met": speed["cot_batched_over_naive"] >= 5.0,
        }
    }


def _eval_rows(dm, opts) -> list[dict[str, Any]]:
    """The seeded sample of test pairs (sorted by length, so batches pad little)."""
    rows = random.Random(opts.seed).sample(dm.datasets["test"].rows, min(opts.eval_pairs, len(dm.datasets["test"])))
    rows.sort(key=lambda r: len(r["query"]) + len(r["item_text"]))
    return rows


def bench_throughput(opts, command: str) -> dict[str, Any]:
    """``--stage throughput``: the readout speed of an already fine-tuned adapter on the same pairs as the
    quality run, written into that run's result (which keeps its quality figures and records both runs)."""
    import json

    from datamodules.datamodule import RelevanceDataModule
    from lightning_modules import TeacherLM

    out_json = Path(opts.out_json or f"docs/results/{opts.name}.json")
    if not out_json.exists():
        raise FileNotFoundError(
            f"{out_json}: --stage throughput updates the result of a full run; run the full benchmark first"
        )
    result = json.loads(out_json.read_text(encoding="utf-8"))
    setup = result["setup"]
    work = Path(opts.work_dir)
    adapter = Path(opts.adapter or work / "teacher" / "adapter")
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter}: no LoRA adapter (adapter_config.json) here; pass --adapter")
    dm = RelevanceDataModule({"path": str(work / "data")}, item_fields=setup["item_fields"])
    dm.setup("fit")
    rows = _eval_rows(dm, opts)
    if len(rows) != setup["eval_pairs"]:
        raise ValueError(
            f"{out_json}: the quality run read {setup['eval_pairs']} pairs, this run would read {len(rows)}"
        )
    model = TeacherLM(
        model=setup["model"],
        adapter=str(adapter),
        num_levels=dm.num_levels,
        max_new_tokens=setup["max_new_tokens"],
        log_figures=False,
    ).eval()
    bf16 = opts.precision.startswith("bf16")
    speed = _throughput(model, rows, opts.eval_batch_size, opts.naive_pairs, bf16, opts.accelerator)
    result["throughput"] = speed
    result["targets"] = _target(speed)
    result["throughput_run"] = {
        "command": command,
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "adapter": str(adapter),
        "precision": opts.precision,
        "accelerator": opts.accelerator,
        "naive_pairs": opts.naive_pairs,
        "eval_batch_size": opts.eval_batch_size,
    }
    return result


def bench_teacher(opts, command: str) -> dict[str, Any]:
    import lightning as L

    from datamodules.datamodule import RelevanceDataModule
    from datamodules.synth import SynthConfig, write
    from ellm_mkd.annotation import run_annotation
    from lightning_modules import TeacherLM

    work = Path(opts.work_dir)
    data_dir = work / "data"
    if not (data_dir / "synth.json").exists():
        write(data_dir, SynthConfig(seed=opts.seed, num_queries=opts.num_queries), overwrite=True)
    ann = work / "annotations"
    run_annotation(
        RelevanceDataModule({"path": str(data_dir)}, item_fields=opts.item_fields),
        ann,
        "rules",
        splits=["train"],
        progress=False,
    )

    dm = RelevanceDataModule(
        {"path": str(data_dir)},
        item_fields=opts.item_fields,
        annotations=str(ann),
        batch_size=opts.batch_size,
        eval_batch_size=opts.eval_batch_size,
    )
    dm.setup("fit")
    rows = _eval_rows(dm, opts)
    dm.datasets["test"].rows = rows

    L.seed_everything(opts.seed)
    model = TeacherLM(
        model=opts.model,
        num_levels=dm.num_levels,
        relevant_level=dm.relevant_level,
        lr=opts.lr,
        max_new_tokens=opts.max_new_tokens,
        log_figures=False,
        export_dir=str(work / "teacher"),
        save_merged=False,
    )
    quality: dict[str, dict[str, float]] = {}
    for mode in ("direct", "cot"):  # zero-shot: the LoRA update starts at zero, so this is the base model
        quality[f"zero_shot_{mode}"] = _evaluate(model, dm, mode, opts.precision, opts.accelerator)
        log.info("zero-shot %s: %s", mode, {k: round(v, 4) for k, v in quality[f"zero_shot_{mode}"].items()})
    trainer = L.Trainer(
        accelerator=opts.accelerator,
        devices=1,
        precision=opts.precision,
        max_steps=opts.steps,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    t = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_s = time.perf_counter() - t
    for mode in ("direct", "cot"):
        quality[f"lora_{mode}"] = _evaluate(model, dm, mode, opts.precision, opts.accelerator)
        log.info("LoRA %s: %s", mode, {k: round(v, 4) for k, v in quality[f"lora_{mode}"].items()})
    model.eval()
    bf16 = opts.precision.startswith("bf16")
    speed = _throughput(model, rows, opts.eval_batch_size, opts.naive_pairs, bf16, opts.accelerator)
    return {
        **result_head(opts.name, command),
        "setup": {
            "model": opts.model,
            "catalog_queries": opts.num_queries,
            "train_pairs": len(dm.datasets["train"]),
            "steps": opts.steps,
            "batch_size": opts.batch_size,
            "examples_seen": opts.steps * opts.batch_size,
            "lr": opts.lr,
            "precision": opts.precision,
            "accelerator": opts.accelerator,
            "optimizer": optimizer_description(trainer.optimizers[0]) if trainer.optimizers else None,
            "eval_pairs": len(rows),
            "eval_batch_size": opts.eval_batch_size,
            "max_new_tokens": opts.max_new_tokens,
            "item_fields": list(opts.item_fields),
            "train_seconds": round(train_s, 1),
            "train_seconds_per_step": round(train_s / max(opts.steps, 1), 2),
            "lora": {
                "r": model.hparams.lora_r,
                "alpha": model.hparams.lora_alpha,
                "targets": list(model.hparams.lora_target_modules),
            },
        },
        "rows": [
            {
                "name": name,
                "metrics": {k: v for k, v in m.items() if k in QUALITY_KEYS},
                "seconds": round(m["seconds"], 1),
            }
            for name, m in quality.items()
        ],
        "throughput": speed,
        "targets": _target(speed),
    }


def markdown_section(result: dict[str, Any]) -> str:
    name = result["benchmark"]
    s = result["setup"]
    lines = [
        *section_head(result),
        f"Teacher `{s['model']}` + LoRA (r {s['lora']['r']}, alpha {s['lora']['alpha']}, {len(s['lora']['targets'])} "
        f"projections) on the embedded catalog ({s['catalog_queries']} queries), rule annotations of the training "
        f"split; {s['steps']} steps x {s['batch_size']} examples ({s['examples_seen']} examples, each a cot and a "
        f"direct response; {s['train_seconds_per_step']} s/step, {s['train_seconds']} s). Quality on {s['eval_pairs']} "
        "seeded test pairs.",
        "",
        "| teacher | readout | accuracy | AUC | macro-F1 | RMSE | parse failures |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        who, mode = r["name"].rsplit("_", 1)
        m = r["metrics"]
        pf = fmt(m.get("parse_failure_rate")) if mode == "cot" else ""
        lines.append(
            f"| {who.replace('_', '-')} | {mode} | {fmt(m.get('accuracy'))} | {fmt(m.get('auc'))} | "
            f"{fmt(m.get('macro_f1'))} | {fmt(m.get('rmse'))} | {pf} |"
        )
    tp = result["throughput"]
    run = result.get("throughput_run")
    lines += [""]
    if run:
        lines += [
            f"Throughput measured by a later run: `{run['command']}` (adapter `{run['adapter']}` from the run "
            f"above; machine: {run['machine']}; date {run['date']}; precision {run['precision']}).",
            "",
        ]
    lines += [
        "Readout throughput of the fine-tuned teacher "
        f"(batch {(run or {}).get('eval_batch_size', s['eval_batch_size'])}, "
        f"max {s['max_new_tokens']} new tokens, the {s['eval_pairs']} pairs above):",
        "",
        "| readout | pairs/s |",
        "|---|---|",
        f"| direct (one batched forward) | {tp['direct_pairs_per_s']:.2f} |",
        f"| cot, batched generate (static cache), distributions recorded while generating | "
        f"{tp['cot_batched_pairs_per_s']:.2f} ({tp['cot_batched_generated_tokens_per_s']:.0f} generated tokens/s) |",
        *(
            [
                f"| ... every chain written to its end (`stop_unparseable: false`) | "
                f"{tp['cot_batched_whole_chains_pairs_per_s']:.2f} "
                f"({tp['cot_batched_whole_chains_generated_tokens_per_s']:.0f} generated tokens/s) |"
            ]
            if "cot_batched_whole_chains_pairs_per_s" in tp
            else []
        ),
        f"| cot, naive per-pair generate() then parse | {tp['naive_pairs_per_s']:.2f} |",
    ]
    naive_n = (run or {}).get("naive_pairs")
    if "naive_static_cache_pairs_per_s" in tp:
        lines.append(
            f'| cot, naive per-pair generate(cache_implementation="static") then parse | '
            f"{tp['naive_static_cache_pairs_per_s']:.2f} |"
        )
    if naive_n:
        lines += ["", f"The naive loops time {naive_n} pairs evenly spaced over the length-sorted sample."]
    lines += [
        "",
        f"cot batched / naive = {tp['cot_batched_over_naive']:.2f}x (target >= 5x: "
        f"{'met' if result['targets']['cot_batched_ge_5x_naive']['met'] else 'NOT met'})"
        + (
            f"; over the naive loop with a static cache: {tp['cot_batched_over_naive_static_cache']:.2f}x."
            if "cot_batched_over_naive_static_cache" in tp
            else "."
        ),
    ]
    if "cot_batched_whole_chains_pairs_per_s" in tp:
        lines += [
            "",
            f"Stopping a chain at its first line that breaks the schema: "
            f"{tp['cot_batched_parse_failures']} of {s['eval_pairs']} chains fail to parse with it, "
            f"{tp['cot_batched_whole_chains_parse_failures']} without; {tp['cot_batched_generated_tokens']} "
            f"generated tokens kept instead of {tp['cot_batched_whole_chains_generated_tokens']}; largest "
            f"level-probability difference {tp['cot_stop_max_level_prob_difference']:.1e}. With every chain "
            f"written to its end, cot batched / naive = "
            f"{tp['cot_batched_whole_chains_pairs_per_s'] / tp['naive_pairs_per_s']:.2f}x.",
        ]
    if result.get("notes"):
        lines += [""] + [f"Note: {n}" for n in result["notes"]]
    lines.append(f"<!-- /bench:{name} -->")
    return "\n".join(lines)


def bench_teacher_main(argv: list[str]) -> int:
    from ellm_mkd.commands.lightning_cli import resolve_precision

    opts = options(TeacherBenchOptions, _parser().parse_args(argv))
    opts.precision = resolve_precision(opts.precision, opts.accelerator)
    command = "ellm-mkd bench teacher " + shlex.join(argv)
    result = (bench_throughput if opts.stage == "throughput" else bench_teacher)(opts, command)
    publish(result, opts, markdown_section(result))
    return 0
