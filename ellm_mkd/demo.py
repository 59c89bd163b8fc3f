"""``ellm-mkd demo``: the whole loop on the embedded default, end to end.

1. synthesise the catalog and check it;
2. annotate every split with the rules annotator (chains of thought with extractive evidence);
3. fine-tune the teacher (bundled SmolLM2-135M-Instruct + LoRA) on the training chains, then test
   it (direct readout: its own judgement, one pass per pair);
4. write the teacher cache over the training split (forced readout: the teacher's verdict and
   level distributions read after each annotated chain, one pass per pair);
5. train both students (cross-encoder, two-tower) twice: on labels alone (baseline) and with full
   MKD (soft levels + dimension verdicts + rationale alignment), and test each best checkpoint;
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

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs" / "demo"
MKD_OVERLAY = REPO / "configs" / "mkd" / "full.yaml"
ITEM_FIELDS = "[title,brand,color,attributes]"
SCALES: dict[str, dict[str, Any]] = {
    # synth: catalog size; teacher_steps x teacher_batch: LoRA examples; teacher_eval: pairs per teacher readout
    # batch; cache_batches: training batches the teacher scores (None: all; the rest train on labels alone);
    # teacher_test_batches: test batches the teacher is tested on (None: all); epochs / train_batches: student
    # passes and batches per pass (None: all); examples: chains the teacher writes for the report
    "tiny": {"synth": {"num_queries": 40, "items_per_query": 5}, "teacher_steps": 1, "teacher_batch": 2,
             "teacher_eval": 8, "cache_batches": 1, "teacher_test_batches": 1, "epochs": 1, "train_batches": 3,
             "examples": 1},
    # default: sized to finish in under 20 minutes on a 2-core CPU (docs/benchmarks.md, "demo")
    "default": {"synth": {"num_queries": 96, "items_per_query": 8}, "teacher_steps": 12, "teacher_batch": 8,
                "teacher_eval": 32, "cache_batches": None, "teacher_test_batches": None, "epochs": 2,
                "train_batches": None, "examples": 3},
}
STUDENTS = ("cross_encoder", "two_tower")


def _stage(n: int, total: int, text: str) -> None:
    print(f"\n[{n}/{total}] {text}", flush=True)


def _cli(args: list[str]):
    from .lightning_cli import cli_main

    return cli_main(args, run=False)


def data_args(out: Path, plan: dict[str, Any]) -> list[str]:
    """The data options every stage gets: the plan's own (``plan["data_args"]``: a real dataset, its
    split and item fields), else the synthetic catalog under ``out``."""
    return list(plan.get("data_args") or ["--data.source.path", str(out / "data"), "--data.item_fields", ITEM_FIELDS])


def fit_teacher(out: Path, plan: dict[str, Any], extra: list[str] = (), predictions: bool = True) -> dict[str, Any]:
    """LoRA fine-tune on the training chains; test with direct readout; returns metrics and paths (and the
    test split's predictions, for the report, unless ``predictions`` is false)."""
    cli = _cli(["--config", str(CONFIG_DIR / "teacher.yaml"), *data_args(out, plan),
                "--data.annotations", str(out / "annotations"), "--data.batch_size", str(plan["teacher_batch"]),
                "--data.eval_batch_size", str(plan["teacher_eval"]),
                "--trainer.max_steps", str(plan["teacher_steps"]), "--trainer.default_root_dir", str(out / "teacher"),
                "--trainer.logger.init_args.save_dir", str(out / "tensorboard"),
                "--model.init_args.export_dir", str(out / "teacher" / "export"), *extra])
    t0 = time.time()
    cli.trainer.fit(cli.model, cli.datamodule)
    fit_s = time.time() - t0
    if plan["teacher_test_batches"]:
        cli.trainer.limit_test_batches = plan["teacher_test_batches"]
    model = cli.trainer.lightning_module
    if predictions:  # the test pass keeps its readouts for the report: no second pass over the test split
        model.test_outputs = {"example_id": [], "probs": [], "dim_probs": []}
    cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    preds, model.test_outputs = model.test_outputs, None
    print(f"      teacher: {plan['teacher_steps']} LoRA steps in {fit_s:.0f} s; adapter {out / 'teacher' / 'export' / 'adapter'}",
          flush=True)
    return {"test": dict(model.last_results["test"]), "fit_seconds": fit_s, "predictions": preds,
            "adapter": str(out / "teacher" / "export" / "adapter"), "model": model}


def write_cache(out: Path, adapter: str, plan: dict[str, Any], extra: list[str] = ()) -> dict[str, Any]:
    """The teacher cache over the training split (forced readout), replacing any cache there."""
    cache = out / "teacher_cache"
    args = ["--config", str(REPO / "configs" / "teacher" / "cache_smollm2_forced.yaml"),
            "--model.init_args.adapter", adapter, *data_args(out, plan),
            "--data.annotations", str(out / "annotations"), "--data.predict_split", "train",
            "--data.eval_batch_size", str(plan["teacher_eval"]),
            "--trainer.callbacks.init_args.output_dir", str(cache), "--trainer.callbacks.init_args.overwrite", "true",
            "--trainer.default_root_dir", str(out / "teacher" / "cache_run"), *extra]
    cli = _cli(args)
    if plan["cache_batches"]:
        cli.trainer.limit_predict_batches = plan["cache_batches"]
    t0 = time.time()
    cli.trainer.predict(cli.model, cli.datamodule, return_predictions=False)
    from .teacher_cache import TeacherCache

    rows = len(TeacherCache(cache))
    sec = time.time() - t0
    print(f"      teacher cache: {rows} training pairs in {sec:.0f} s ({rows / sec:.2f} pairs/s) -> {cache}", flush=True)
    return {"path": str(cache), "rows": rows, "seconds": sec}


def train_student(out: Path, config: Path, name: str, plan: dict[str, Any], overlays: list[Path] = (),
                  extra: list[str] = (), predictions: bool = True) -> dict[str, Any]:
    """Fit a student from ``config`` (+ ``overlays``), test its best checkpoint, predict the test split.
    Returns test metrics, the checkpoint path, fit seconds and the training-loop seconds per epoch."""
    from .bench import _timer_callback_class

    args = ["--config", str(config)]
    for o in overlays:
        args += ["--config", str(o)]
    args += [*data_args(out, plan),
             "--trainer.default_root_dir", str(out / "students" / name),
             "--trainer.logger.init_args.save_dir", str(out / "tensorboard"),
             "--trainer.logger.init_args.name", name, "--trainer.max_epochs", str(plan["epochs"])]
    if plan["train_batches"]:  # a short run: log every step, so each loss term shows in TensorBoard
        args += ["--trainer.limit_train_batches", str(plan["train_batches"]), "--trainer.log_every_n_steps", "1"]
    cli = _cli([*args, *extra])
    timer = _timer_callback_class()()
    cli.trainer.callbacks.append(timer)
    t0 = time.time()
    cli.trainer.fit(cli.model, cli.datamodule)
    fit_s = time.time() - t0
    cli.trainer.test(cli.model, cli.datamodule, ckpt_path="best", verbose=False)
    model = cli.trainer.lightning_module
    results = dict(model.last_results["test"])
    preds = _predictions(cli.trainer, model, cli.datamodule) if predictions else None
    best = cli.trainer.checkpoint_callback.best_model_path
    print(f"      {name}: fit {fit_s:.0f} s, test AUC {results.get('auc', float('nan')):.3f}, "
          f"nDCG@10 {results.get('ndcg10', float('nan')):.3f}; best checkpoint {best}", flush=True)
    from callbacks.mkd import MKDistillation

    chains = [c.chain_embedding_seconds for c in cli.trainer.callbacks if isinstance(c, MKDistillation)]
    return {"test": results, "checkpoint": best, "fit_seconds": fit_s, "predictions": preds,
            "train_loop_seconds_per_epoch": timer.train_s / max(cli.trainer.current_epoch, 1),
            "train_pairs": timer.train_pairs, "chain_embedding_seconds": chains[0] if chains else None}


def _predictions(trainer: Any, model: Any, dm: Any) -> dict[str, Any]:
    """Test-split predictions as plain lists (example id, level probabilities, dimension probabilities)."""
    dm.predict_split = "test"
    dm.predict_dataset = None
    trainer.limit_predict_batches = 1.0
    out: dict[str, Any] = {"example_id": [], "probs": [], "dim_probs": []}
    for b in trainer.predict(model, dm, return_predictions=True):
        out["example_id"] += list(b["example_id"])
        out["probs"] += b["probs"].float().tolist()
        out["dim_probs"] += b["dim_probs"].float().tolist() if b.get("dim_probs") is not None else [None] * len(b["example_id"])
    return out


def run_demo(out: str = "runs/demo", scale: Literal["tiny", "default"] = "default", seed: int = 0) -> int:
    """Run the whole loop on the embedded catalog (see the module docstring).

    Args:
        out: output directory (each stage replaces only its own files there).
        scale: ``tiny`` (a quick check, a few minutes) or ``default``.
        seed: seed of the synthetic catalog.
    """
    from datamodules.datamodule import RelevanceDataModule
    from datamodules.synth import SynthConfig, write

    from .annotate import run_annotation
    from .data_cmd import check
    from .metrics import format_table
    from .report import write_report

    t0 = time.time()
    out_dir = Path(out)
    data_dir = out_dir / "data"
    plan = SCALES[scale]
    total = 7
    timings: dict[str, float] = {}

    _stage(1, total, f"synthetic catalog -> {data_dir}  (scale {scale}, seed {seed})")
    summary = write(data_dir, SynthConfig(seed=seed, **plan["synth"]), overwrite=True)
    print("      " + ", ".join(f"{k} {v}" for k, v in summary["counts"].items()), flush=True)
    rc = check([str(data_dir), "--json", str(out_dir / "data_check.json")])
    if rc:
        return rc

    _stage(2, total, f"rule annotations (chains of thought with evidence) -> {out_dir / 'annotations'}")
    shutil.rmtree(out_dir / "annotations", ignore_errors=True)
    t = time.time()
    dm = RelevanceDataModule({"path": str(data_dir)}, item_fields=["title", "brand", "color", "attributes"])
    run_annotation(dm, out_dir / "annotations", "rules", splits=["train", "val", "test"])
    timings["annotate"] = time.time() - t

    _stage(3, total, f"teacher: SmolLM2-135M-Instruct + LoRA, {plan['teacher_steps']} steps x {plan['teacher_batch']} examples")
    t = time.time()
    teacher = fit_teacher(out_dir, plan)
    timings["teacher"] = time.time() - t

    _stage(4, total, "teacher cache: verdict and level distributions after each training chain (forced readout)")
    t = time.time()
    cache = write_cache(out_dir, teacher["adapter"], plan)
    timings["cache"] = time.time() - t

    results: dict[str, dict[str, Any]] = {}
    for i, kind in enumerate(STUDENTS):
        _stage(5 + i, total, f"{kind.replace('_', '-')} student (MiniLM-L6), baseline and full MKD, {plan['epochs']} epoch(s)")
        t = time.time()
        results[f"{kind}_baseline"] = train_student(out_dir, CONFIG_DIR / f"{kind}.yaml", f"{kind}_baseline", plan)
        results[f"{kind}_mkd"] = train_student(
            out_dir, CONFIG_DIR / f"{kind}.yaml", f"{kind}_mkd", plan, [MKD_OVERLAY],
            ["--data.teacher.init_args.path", cache["path"], "--data.teacher.init_args.missing", "hard_label"])
        timings[kind] = time.time() - t

    _stage(7, total, f"report -> {out_dir / 'report.md'}")
    t = time.time()
    report = write_report(out_dir, teacher, results, cache, plan, scale, n_examples=plan["examples"])
    timings["report"] = time.time() - t
    timings["total"] = time.time() - t0

    metrics = {"teacher": {k: v for k, v in teacher.items() if k not in ("model", "predictions")},
               **{k: {kk: vv for kk, vv in v.items() if kk != "predictions"} for k, v in results.items()},
               "cache": cache, "timings_seconds": timings, "scale": scale}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print("\ntest metrics (overall and per query bucket)")
    print(format_table({"teacher": teacher["test"], **{k: v["test"] for k, v in results.items()}}))
    print(f"\ndemo finished in {timings['total']:.0f} s; outputs under {out_dir}/:")
    print(f"  report.md ({report}) with plots/, metrics.json, data/, annotations/, teacher/, teacher_cache/, students/,")
    print(f"  tensorboard/ (every loss term, metrics, figures: tensorboard --logdir {out_dir / 'tensorboard'})")
    return 0


def demo_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="ellm-mkd demo", description="Run the whole loop on the embedded synthetic catalog.")
    p.add_function_arguments(run_demo)
    cfg = p.parse_args(argv)
    return run_demo(**vars(cfg))


if __name__ == "__main__":
    sys.exit(demo_main(sys.argv[1:]))
