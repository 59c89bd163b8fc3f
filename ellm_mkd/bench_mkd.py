"""``ellm-mkd bench mkd``: the MKD ablation on the embedded catalog, several seeds, both students.

One run, one machine:

1. synthesise the catalog (``--num_queries`` x ``--items_per_query``), annotate every split with the
   rules annotator, fine-tune the teacher (SmolLM2-135M + LoRA, ``--teacher_steps``) and test it
   (direct readout) on the test split;
2. write the teacher cache over the training split, augmented pairs included (forced readout: the
   teacher's distributions after each annotated chain; augmented pairs get a chain the teacher writes);
3. for each student, ablation row (``configs/mkd/<row>.yaml``) and seed: fit, test the best
   checkpoint; rows: ``baseline`` (labels), ``soft``, ``soft_dim``, ``full`` (+ rationale),
   ``full_augment`` (+ teacher-labelled pairs);
4. report the mean and standard deviation over seeds of every metric, overall and per query bucket,
   the teacher's own figures on the same test split, and the epoch-time overhead of each MKD row
   over the baseline (training loop only, the same training pairs: ``full_augment`` trains on more
   pairs, so its overhead is per pair).

Writes ``docs/results/<name>.json`` and the ``<name>`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import logging
import shlex
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from .bench import machine_description, publish

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
ROWS = ("baseline", "soft", "soft_dim", "full", "full_augment")
STUDENTS = ("cross_encoder", "two_tower")
SUMMARY_METRICS = ("auc", "ndcg10", "macro_f1", "rmse", "spearman", "ece")


def _parser():
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="ellm-mkd bench mkd", description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", type=str, default="runs/benchmarks/mkd_catalog")
    p.add_argument("--num_queries", type=int, default=120, help="catalog size (queries)")
    p.add_argument("--items_per_query", type=int, default=8)
    p.add_argument("--teacher_model", type=str, default="smollm2-135m-instruct", help="teacher base model")
    p.add_argument("--encoder", type=str, default="minilm-l6", help="student encoder")
    p.add_argument("--teacher_steps", type=int, default=16, help="teacher LoRA steps")
    p.add_argument("--teacher_batch", type=int, default=8, help="teacher examples per step")
    p.add_argument("--teacher_eval", type=int, default=32, help="pairs per teacher readout batch")
    p.add_argument("--students", type=list[str], default=list(STUDENTS))
    p.add_argument("--rows", type=list[str], default=list(ROWS), help="ablation rows (configs/mkd/<row>.yaml)")
    p.add_argument("--seeds", type=list[int], default=[0, 1, 2], help="student training seeds")
    p.add_argument("--epochs", type=int, default=2, help="student epochs")
    p.add_argument("--train_batches", type=int | None, default=None, help="cap on student training batches per epoch")
    p.add_argument("--seed", type=int, default=0, help="catalog and teacher seed")
    p.add_argument("--name", type=str, default="mkd_catalog")
    p.add_argument("--out_json", type=str | None, default=None)
    p.add_argument("--out_md", type=str, default="docs/benchmarks.md")
    return p


def _mean_std(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return {}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def bench_mkd(opts, command: str) -> dict[str, Any]:
    from datamodules.datamodule import RelevanceDataModule
    from datamodules.synth import SynthConfig, write

    from .annotate import run_annotation
    from .demo import CONFIG_DIR, fit_teacher, train_student, write_cache

    unknown = (set(opts.rows) - set(ROWS)) | (set(opts.students) - set(STUDENTS))
    if unknown:
        raise ValueError(f"unknown rows or students {sorted(unknown)}; rows: {list(ROWS)}, students: {list(STUDENTS)}")
    out = Path(opts.work_dir)
    plan = {"synth": {"num_queries": opts.num_queries, "items_per_query": opts.items_per_query},
            "teacher_steps": opts.teacher_steps, "teacher_batch": opts.teacher_batch, "teacher_eval": opts.teacher_eval,
            "cache_batches": None, "teacher_test_batches": None, "epochs": opts.epochs,
            "train_batches": opts.train_batches}
    t0 = time.time()
    write(out / "data", SynthConfig(seed=opts.seed, **plan["synth"]), overwrite=True)
    dm = RelevanceDataModule({"path": str(out / "data")}, item_fields=["title", "brand", "color", "attributes"])
    run_annotation(dm, out / "annotations", "rules", splits=["train", "val", "test"], overwrite=True, progress=False)
    tm = ["--model.init_args.model", opts.teacher_model]
    teacher = fit_teacher(out, plan, ["--seed_everything", str(opts.seed), *tm])
    teacher.pop("model")
    augment = []
    if "full_augment" in opts.rows:  # the cache covers the augmented pairs too (a superset serves every row)
        aug = yaml.safe_load((REPO / "configs" / "mkd" / "full_augment.yaml").read_text())["data"]["augment"]
        augment = [f"--data.augment.{k}={v}" for k, v in aug.items()]
    cache = write_cache(out, teacher["adapter"], plan, [*augment, *tm])
    setup_s = time.time() - t0

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for kind in opts.students:
        for row in opts.rows:
            for seed in opts.seeds:
                extra = ["--seed_everything", str(seed), "--model.init_args.encoder", opts.encoder]
                if row != "baseline":
                    extra += ["--data.teacher.init_args.path", cache["path"]]
                r = train_student(out, CONFIG_DIR / f"{kind}.yaml", f"{kind}_{row}_s{seed}", plan,
                                  [REPO / "configs" / "mkd" / f"{row}.yaml"], extra, predictions=False)
                runs.setdefault(kind, {}).setdefault(row, []).append(r)

    rows_out = []
    for kind, by_row in runs.items():
        base = by_row.get("baseline")
        base_epoch = statistics.fmean(r["train_loop_seconds_per_epoch"] / max(r["train_pairs"], 1) for r in base) \
            if base else None
        for row, rs in by_row.items():
            keys = sorted({k for r in rs for k in r["test"]})
            per_pair = statistics.fmean(r["train_loop_seconds_per_epoch"] / max(r["train_pairs"], 1) for r in rs)
            rows_out.append({
                "student": kind, "row": row, "seeds": list(opts.seeds),
                "metrics": {k: _mean_std([r["test"].get(k) for r in rs]) for k in keys},
                "train_loop_seconds_per_epoch": _mean_std([r["train_loop_seconds_per_epoch"] for r in rs]),
                "epoch_overhead_vs_baseline": None if base_epoch is None else per_pair / base_epoch - 1.0,
            })
    return {
        "benchmark": opts.name, "command": command, "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "setup": {"catalog": plan["synth"], "teacher": {"model": opts.teacher_model, "steps": opts.teacher_steps,
                                                        "batch": opts.teacher_batch, "readout_for_cache": "forced"},
                  "cache_rows": cache["rows"], "student_epochs": opts.epochs, "train_batches": opts.train_batches,
                  "setup_seconds": round(setup_s, 1), "total_seconds": round(time.time() - t0, 1)},
        "teacher": {k: v for k, v in teacher["test"].items()},
        "rows": rows_out,
    }


def _cell(m: dict[str, Any], key: str) -> str:
    v = m.get(key)
    return "–" if not v else f"{v['mean']:.3f} ± {v['std']:.3f}"


def markdown_section(result: dict[str, Any]) -> str:
    from datamodules.schema import BUCKETS

    name, s = result["benchmark"], result["setup"]
    lines = [f"<!-- bench:{name} -->", f"## {name}", "", f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}; date {result['date']}.", "",
             f"Embedded catalog, {s['catalog']['num_queries']} queries x {s['catalog']['items_per_query']} items; teacher "
             f"`{s['teacher']['model']}` + LoRA ({s['teacher']['steps']} steps x {s['teacher']['batch']}), cache of "
             f"{s['cache_rows']} training pairs (forced readout); students {s['student_epochs']} epoch(s); mean ± std over "
             f"seeds {result['rows'][0]['seeds'] if result['rows'] else []}. Teacher (direct readout) on the same test split: "
             f"AUC {result['teacher'].get('auc', float('nan')):.3f}, nDCG@10 {result['teacher'].get('ndcg10', float('nan')):.3f}, "
             f"accuracy {result['teacher'].get('accuracy', float('nan')):.3f}.", "",
             "| student | row | bucket | AUC | nDCG@10 | macro-F1 | RMSE | epoch overhead vs baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        m = r["metrics"]
        for bucket in ("all", *BUCKETS):
            p = "" if bucket == "all" else f"{bucket}/"
            if p and not m.get(p + "count"):
                continue
            ov = r["epoch_overhead_vs_baseline"]
            lines.append(f"| {r['student']} | {r['row']} | {bucket} | {_cell(m, p + 'auc')} | {_cell(m, p + 'ndcg10')} | "
                         f"{_cell(m, p + 'macro_f1')} | {_cell(m, p + 'rmse')} | "
                         f"{'' if bucket != 'all' or ov is None else f'{100 * ov:+.1f}%'} |")
    lines.append(f"<!-- /bench:{name} -->")
    return "\n".join(lines)


def bench_mkd_main(argv: list[str]) -> int:
    opts = _parser().parse_args(argv)
    result = bench_mkd(opts, "ellm-mkd bench mkd " + shlex.join(argv))
    publish(result, opts, markdown_section(result))
    return 0
