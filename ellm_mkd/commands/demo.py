"""``ellm-mkd demo``: the whole loop on the embedded default, end to end.

1. synthesise the catalog (labelled pairs, and an unlabelled pool of further catalog items for each
   training query) and check it;
2. annotate every split with the rules annotator (chains of thought with extractive evidence);
3. fine-tune the teacher (bundled Gemma 3 270M + LoRA) on the level judgement of the labelled
   training pairs, validating every epoch and keeping the best, then test it (direct readout: its own
   judgement, one pass per pair);
4. write the teacher cache (direct readout) over the training pairs, the unlabelled pool and the
   validation and test splits, and fit the temperature of its level distributions on validation;
5. train both students (cross-encoder, two-tower) twice: on labels alone (baseline) and with MKD
   (configs/mkd/soft.yaml: the calibrated teacher's level distributions on the labelled pairs and on
   the pool, the paper's production setting), and test each best checkpoint;
6. write ``report.md`` with the metrics table (teacher, students baseline vs MKD, per query
   bucket), PNG plots (PR curves, calibration, per-bucket bars) and examples where the teacher
   writes its chain of thought beside the distilled student's dimension verdicts.

Everything lands under ``--out`` (default ``runs/demo``), TensorBoard logs under
``<out>/tensorboard``. Each stage replaces only what it owns there.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ArgumentParser

from .pipeline import (
    CONFIG_DIR,
    REPO,
    fit_teacher,
    load_teacher,
    release_memory,
    teacher_model_args,
    train_student,
    write_cache,
)

MKD_ROW = REPO / "configs" / "mkd" / "soft.yaml"
TEACHER = "Gemma 3 270M + LoRA"
SCALES: dict[str, dict[str, Any]] = {
    # synth: catalog size; pool: per student, unlabelled catalog items per training query the teacher labels for
    # its MKD run, in multiples of items_per_query (0: none; default: chosen on validation, docs/benchmarks.md#demo);
    # teacher_epochs (validated, best kept) / teacher_steps (a cap, None: none) x teacher_batch: LoRA pairs;
    # teacher_eval: pairs per teacher readout batch; cache_batches: readout batches the cache holds (None: all;
    # pairs without a cache row train on labels alone); calibrate: fit the temperature of the cached level
    # distributions on validation; teacher_test_batches: test batches the teacher is tested on (None: all);
    # epochs / train_batches: student passes and batches per pass (None: all); examples: chains for the report
    "tiny": {
        "synth": {"num_queries": 40, "items_per_query": 5},
        "pool": {"cross_encoder": 1, "two_tower": 0},
        "teacher_epochs": 1,
        "teacher_steps": 1,
        "teacher_batch": 2,
        "teacher_eval": 8,
        "cache_batches": 1,
        "calibrate": False,
        "teacher_test_batches": 1,
        "epochs": 1,
        "train_batches": 3,
        "examples": 1,
    },
    # default: sized to finish in under 20 minutes on a 2-core CPU (docs/benchmarks.md, "demo")
    "default": {
        "synth": {"num_queries": 96, "items_per_query": 8},
        "pool": {"cross_encoder": 4, "two_tower": 0},
        "teacher_epochs": 4,
        "teacher_steps": None,
        "teacher_batch": 8,
        "teacher_eval": 32,
        "cache_batches": None,
        "calibrate": True,
        "teacher_test_batches": None,
        "epochs": 2,
        "train_batches": None,
        "examples": 3,
    },
}
STUDENTS = ("cross_encoder", "two_tower")
FIELDS = ["title", "brand", "color", "attributes"]


def _stage(n: int, total: int, text: str) -> None:
    print(f"\n[{n}/{total}] {text}", flush=True)


def run_demo(out: str = "runs/demo", scale: Literal["tiny", "default"] = "default", seed: int = 0) -> int:
    """Run the whole loop on the embedded catalog (see the module docstring).

    Args:
        out: output directory (each stage replaces only its own files there).
        scale: ``tiny`` (a quick check, a few minutes) or ``default``.
        seed: seed of the synthetic catalog.
    """
    from datamodules.datamodule import RelevanceDataModule
    from datamodules.synth import SynthConfig, write
    from ellm_mkd.annotation import run_annotation
    from ellm_mkd.metrics import format_table

    from .bench.mkd_pools import augment_args, calibration, catalog_pool_files
    from .data import check
    from .report import write_report

    t0 = time.time()
    out_dir = Path(out)
    data_dir = out_dir / "data"
    plan = {**SCALES[scale], "teacher_name": TEACHER}
    total = 7
    timings: dict[str, float] = {}
    peak_rss: dict[str, float] = {}  # the process's peak resident memory so far, after each stage (GiB)

    def peak(stage: str) -> None:
        import resource

        peak_rss[stage] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)

    _stage(1, total, f"synthetic catalog -> {data_dir}  (scale {scale}, seed {seed})")
    pool_items = max(plan["pool"].values()) * plan["synth"]["items_per_query"]
    summary = write(data_dir, SynthConfig(seed=seed, **plan["synth"], pool_items_per_query=pool_items), overwrite=True)
    print("      " + ", ".join(f"{k} {v}" for k, v in summary["counts"].items()), flush=True)
    rc = check([str(data_dir), "--json", str(out_dir / "data_check.json")])
    if rc:
        return rc

    _stage(2, total, f"rule annotations (chains of thought with evidence) -> {out_dir / 'annotations'}")
    shutil.rmtree(out_dir / "annotations", ignore_errors=True)
    t = time.time()
    dm = RelevanceDataModule({"path": str(data_dir)}, item_fields=FIELDS)
    run_annotation(dm, out_dir / "annotations", "rules", splits=["train", "val", "test"])
    timings["annotate"] = time.time() - t
    peak("annotate")

    cap = f", at most {plan['teacher_steps']} steps" if plan["teacher_steps"] else ""
    _stage(
        3,
        total,
        f"teacher: {TEACHER}, level judgement of the labelled pairs, {plan['teacher_epochs']} epoch(s){cap} x "
        f"{plan['teacher_batch']} pairs, the best validated epoch kept",
    )
    t = time.time()
    teacher = fit_teacher(out_dir, plan)
    release_memory()  # the report loads the teacher again after the students: one LLM in memory at a time
    timings["teacher"] = time.time() - t
    peak("teacher")

    _stage(
        4,
        total,
        f"teacher cache: its level distributions (direct readout) over the training pairs, an unlabelled pool of "
        f"{max(plan['pool'].values())}x, validation and test",
    )
    t = time.time()
    pools = catalog_pool_files(out_dir, sorted(set(plan["pool"].values())), plan["synth"]["items_per_query"])
    largest = augment_args(pools[max(pools)])  # the cache covers the largest pool: a superset serves every size
    model_args = teacher_model_args(teacher["base_model"], teacher["adapter"])
    dtype = ["--model.init_args.weights_dtype", "auto"]  # the base weights as configs/demo/teacher.yaml trained them
    cache = write_cache(out_dir, plan, model_args, "direct", [*largest, "--data.predict_split", "all", *dtype])
    mkd_args = ["--data.teacher.init_args.cache_dir", cache["path"], "--data.teacher.init_args.missing", "hard_label"]
    if plan["calibrate"]:  # the temperature of the teacher's level distributions, fitted on validation
        cache["calibration"] = calibration({"source": {"path": str(data_dir)}, "item_fields": FIELDS}, cache["path"])
        mkd_args += ["--data.teacher.init_args.temperature", repr(cache["calibration"]["temperature"])]
    release_memory()
    timings["cache"] = time.time() - t
    peak("cache")

    results: dict[str, dict[str, Any]] = {}
    for i, kind in enumerate(STUDENTS):
        size = plan["pool"][kind]  # 0: MKD on the labelled pairs alone
        mkd = f"soft + {size}x pool" if size else "soft, no pool"
        _stage(
            5 + i,
            total,
            f"{kind.replace('_', '-')} student (MiniLM-L6), baseline and MKD ({mkd}), {plan['epochs']} epoch(s)",
        )
        t = time.time()
        results[f"{kind}_baseline"] = train_student(out_dir, CONFIG_DIR / f"{kind}.yaml", f"{kind}_baseline", plan)
        pool = augment_args(pools[size]) if size else []
        results[f"{kind}_mkd"] = train_student(
            out_dir, CONFIG_DIR / f"{kind}.yaml", f"{kind}_mkd", plan, [MKD_ROW], [*mkd_args, *pool]
        )
        release_memory()
        timings[kind] = time.time() - t
        peak(kind)

    _stage(7, total, f"report -> {out_dir / 'report.md'}")
    t = time.time()
    teacher["model"] = load_teacher(out_dir, plan, teacher["adapter"])  # writes the report's example chains
    report = write_report(out_dir, teacher, results, cache, plan, scale, n_examples=plan["examples"])
    timings["report"] = time.time() - t
    timings["total"] = time.time() - t0
    peak("report")

    metrics = {
        "teacher": {k: v for k, v in teacher.items() if k not in ("model", "predictions")},
        **{k: {kk: vv for kk, vv in v.items() if kk != "predictions"} for k, v in results.items()},
        "cache": cache,
        "timings_seconds": timings,
        "peak_rss_gib_after_stage": peak_rss,
        "scale": scale,
        "pool": plan["pool"],
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print("\ntest metrics (overall and per query bucket)")
    print(format_table({"teacher": teacher["test"], **{k: v["test"] for k, v in results.items()}}))
    print(f"\ndemo finished in {timings['total']:.0f} s; outputs under {out_dir}/:")
    print(f"  report.md ({report}) with plots/, metrics.json, data/, annotations/, teacher/, teacher_cache/,")
    print("  tensorboard/<run>/checkpoints/best.ckpt for each student run (" + ", ".join(results) + "),")
    print(f"  tensorboard/ (every loss term, metrics, figures: tensorboard --logdir {out_dir / 'tensorboard'})")
    return 0


def demo_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="ellm-mkd demo", description="Run the whole loop on the embedded synthetic catalog.")
    p.add_function_arguments(run_demo)
    cfg = p.parse_args(argv)
    return run_demo(**vars(cfg))


if __name__ == "__main__":
    sys.exit(demo_main(sys.argv[1:]))
