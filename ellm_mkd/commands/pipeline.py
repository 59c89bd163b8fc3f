"""The pipeline steps that ``ellm-mkd demo`` and ``ellm-mkd bench mkd`` share: fit and test the teacher,
write its cache, fit and test a student. Each drives the LightningCLI exactly as a user's
``ellm-mkd fit|test|predict --config ...`` would, with the data options of a *plan* (a dict: the
demo's scales, or the benchmark's settings)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

#: the repository root (configs/ lives there)
REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs" / "demo"
ITEM_FIELDS = "[title,brand,color,attributes]"


#: the CLIs this process built: LightningCLI registers instantiators that hold the CLI on its parser, and the
#: parser outlives the stage, so each CLI (its model, data and trainer) stays alive until release_memory()
def _cli(args: list[str]):
    from ellm_mkd.commands.lightning_cli import cli_main

    return cli_main(args, run=False)


def data_args(out: Path, plan: dict[str, Any]) -> list[str]:
    """The data options every stage gets: the plan's own (``plan["data_args"]``: a real dataset, its
    split and item fields), else the synthetic catalog under ``out``."""
    return list(plan.get("data_args") or ["--data.source.path", str(out / "data"), "--data.item_fields", ITEM_FIELDS])


def teacher_config(plan: dict[str, Any]) -> str:
    """The teacher config of a plan: ``plan["teacher_config"]``, else the demo's (``configs/demo/teacher.yaml``)."""
    return str(plan.get("teacher_config") or CONFIG_DIR / "teacher.yaml")


def fit_teacher(out: Path, plan: dict[str, Any], extra: list[str] = (), predictions: bool = True) -> dict[str, Any]:
    """LoRA fine-tune the plan's teacher config for ``plan["teacher_epochs"]`` epochs (when given) and at most
    ``plan["teacher_steps"]`` steps (when given); test with direct readout; returns metrics and paths (and the
    test split's predictions, for the report, unless ``predictions`` is false)."""
    length = ["--trainer.max_steps", str(plan["teacher_steps"])] if plan.get("teacher_steps") else []
    if plan.get("teacher_epochs"):
        length += ["--trainer.max_epochs", str(plan["teacher_epochs"])]
    cli = _cli(
        [
            "--config",
            teacher_config(plan),
            *data_args(out, plan),
            "--data.annotations",
            str(out / "annotations"),
            "--data.batch_size",
            str(plan["teacher_batch"]),
            "--data.eval_batch_size",
            str(plan["teacher_eval"]),
            *length,
            "--trainer.default_root_dir",
            str(out / "teacher"),
            "--trainer.logger.init_args.save_dir",
            str(out / "tensorboard"),
            "--model.init_args.export_dir",
            str(out / "teacher" / "export"),
            *extra,
        ]
    )
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
    steps, best = cli.trainer.global_step, getattr(cli.trainer.checkpoint_callback, "best_model_score", None)
    kept = f" (best validation AUC {float(best):.3f} kept)" if best is not None else ""
    print(
        f"      teacher: {steps} LoRA steps in {fit_s:.0f} s{kept}; "
        f"test AUC {model.last_results['test'].get('auc', float('nan')):.3f}"
        f"; adapter {out / 'teacher' / 'export' / 'adapter'}",
        flush=True,
    )
    return {
        "test": dict(model.last_results["test"]),
        "fit_seconds": fit_s,
        "steps": steps,
        "best_val_auc": float(best) if best is not None else None,
        "base_model": model.hparams.model,  # what the adapter sits on
        "predictions": preds,
        "adapter": str(out / "teacher" / "export" / "adapter"),
    }


def load_teacher(out: Path, plan: dict[str, Any], adapter: str) -> Any:
    """The fine-tuned teacher of :func:`fit_teacher` again (its LoRA adapter on the base model, level names from
    the data), for the report's example chains: loaded after the students, so one LLM is in memory at a time."""
    cli = _cli(
        [
            "--config",
            teacher_config(plan),
            *data_args(out, plan),
            "--data.annotations",
            str(out / "annotations"),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(out / "teacher"),
            "--model.init_args.adapter",
            adapter,
            "--model.init_args.merge_adapter",
            "true",  # (it only writes chains)
            "--model.init_args.gradient_checkpointing",
            "false",  # (generation wants its KV cache)
        ]
    )
    cli.datamodule.setup("test")
    cli.model.connect_levels(cli.datamodule, "test")
    return cli.model


def release_memory() -> None:
    """Free what the last stage left (Lightning's trainer and module refer to each other: a collection frees
    them) and hand the freed heap back to the system, so the next stage's peak does not stack on this one's."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps its own policy
        pass


def teacher_model_args(model: str, teacher_dir: str | None = None) -> list[str]:
    """The TeacherLM options that load a teacher to read it (test, cache): ``model`` as is, or a fine-tuned
    ``teacher_dir`` (a LoRA ``adapter/`` directory on top of ``model``, folded into its weights as it loads, or a
    whole model such as the ``merged/`` directory a full fine-tune writes)."""
    if teacher_dir is None:
        return ["--model.init_args.model", model]
    from ellm_mkd.models import is_lora_adapter

    if is_lora_adapter(teacher_dir):
        return [
            "--model.init_args.model",
            model,
            "--model.init_args.adapter",
            str(teacher_dir),
            "--model.init_args.merge_adapter",
            "true",
        ]
    return ["--model.init_args.model", str(teacher_dir), "--model.init_args.use_lora", "false"]


def test_teacher(out: Path, plan: dict[str, Any], model_args: list[str]) -> dict[str, Any]:
    """Test an already fine-tuned teacher (direct readout) on the test split; returns its metrics."""
    cli = _cli(
        [
            "--config",
            teacher_config(plan),
            *data_args(out, plan),
            "--data.annotations",
            str(out / "annotations"),
            "--data.eval_batch_size",
            str(plan["teacher_eval"]),
            "--trainer.default_root_dir",
            str(out / "teacher"),
            "--trainer.logger",
            "false",
            *model_args,
        ]
    )
    if plan["teacher_test_batches"]:
        cli.trainer.limit_test_batches = plan["teacher_test_batches"]
    cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    return dict(cli.trainer.lightning_module.last_results["test"])


def write_cache(
    out: Path, plan: dict[str, Any], model_args: list[str], readout: str = "forced", extra: list[str] = ()
) -> dict[str, Any]:
    """The teacher cache over the training split with ``readout`` (``configs/teacher/cache_smollm2_<readout>.yaml``:
    direct, cot or forced), replacing any cache there."""
    cache = out / "teacher_cache"
    args = [
        "--config",
        str(REPO / "configs" / "teacher" / f"cache_smollm2_{readout}.yaml"),
        *model_args,
        *data_args(out, plan),
        *(["--data.annotations", str(out / "annotations")] if readout == "forced" else []),
        "--data.predict_split",
        "train",
        "--data.eval_batch_size",
        str(plan["teacher_eval"]),
        "--trainer.callbacks.init_args.cache_dir",
        str(cache),
        "--trainer.callbacks.init_args.overwrite",
        "true",
        "--trainer.default_root_dir",
        str(out / "teacher" / "cache_run"),
        *extra,
    ]
    cli = _cli(args)
    if plan["cache_batches"]:
        cli.trainer.limit_predict_batches = plan["cache_batches"]
    t0 = time.time()
    cli.trainer.predict(cli.model, cli.datamodule, return_predictions=False)
    from ellm_mkd.teacher_cache import TeacherCache

    rows = len(TeacherCache(cache))
    sec = time.time() - t0
    print(
        f"      teacher cache ({readout}): {rows} pairs in {sec:.0f} s ({rows / sec:.2f} pairs/s) -> {cache}",
        flush=True,
    )
    return {"path": str(cache), "rows": rows, "seconds": sec, "readout": readout}


def train_student(
    out: Path,
    config: Path,
    name: str,
    plan: dict[str, Any],
    overlays: list[Path] = (),
    extra: list[str] = (),
    predictions: bool = True,
) -> dict[str, Any]:
    """Fit a student from ``config`` (+ ``overlays``), test its best checkpoint, predict the test split.
    Returns test and validation metrics of the best checkpoint, its path, fit seconds and the training-loop
    seconds per epoch."""
    from callbacks.timer import ThroughputTimer

    args = ["--config", str(config)]
    for o in overlays:
        args += ["--config", str(o)]
    args += [
        *data_args(out, plan),
        "--trainer.default_root_dir",
        str(out / "students" / name),
        "--trainer.logger.init_args.save_dir",
        str(out / "tensorboard"),
        "--trainer.logger.init_args.name",
        name,
        "--trainer.max_epochs",
        str(plan["epochs"]),
    ]
    if plan["train_batches"]:  # a short run: log every step, so each loss term shows in TensorBoard
        args += ["--trainer.limit_train_batches", str(plan["train_batches"]), "--trainer.log_every_n_steps", "1"]
    cli = _cli([*args, *extra])
    timer = ThroughputTimer()
    cli.trainer.callbacks.append(timer)
    t0 = time.time()
    cli.trainer.fit(cli.model, cli.datamodule)
    fit_s = time.time() - t0
    model = cli.trainer.lightning_module
    cli.trainer.validate(cli.model, cli.datamodule, ckpt_path="best", verbose=False)
    val = dict(model.last_results["val"])  # what selects among settings (never the test split)
    cli.trainer.test(cli.model, cli.datamodule, ckpt_path="best", verbose=False)
    results = dict(model.last_results["test"])
    preds = _predictions(cli.trainer, model, cli.datamodule) if predictions else None
    best = cli.trainer.checkpoint_callback.best_model_path
    print(
        f"      {name}: fit {fit_s:.0f} s, test AUC {results.get('auc', float('nan')):.3f}, "
        f"nDCG@10 {results.get('ndcg10', float('nan')):.3f}; best checkpoint {best}",
        flush=True,
    )
    from callbacks.mkd import MKDistillation

    chains = [c.chain_embedding_seconds for c in cli.trainer.callbacks if isinstance(c, MKDistillation)]
    return {
        "test": results,
        "val": val,
        "checkpoint": best,
        "fit_seconds": fit_s,
        "predictions": preds,
        "train_loop_seconds_per_epoch": timer.train_s / max(cli.trainer.current_epoch, 1),
        "train_pairs": timer.train_pairs,
        "chain_embedding_seconds": chains[0] if chains else None,
    }


def _predictions(trainer: Any, model: Any, dm: Any) -> dict[str, Any]:
    """Test-split predictions as plain lists (example id, level probabilities, dimension probabilities)."""
    dm.predict_split = "test"
    dm.predict_dataset = None
    trainer.limit_predict_batches = 1.0
    out: dict[str, Any] = {"example_id": [], "probs": [], "dim_probs": []}
    for b in trainer.predict(model, dm, return_predictions=True):
        out["example_id"] += list(b["example_id"])
        out["probs"] += b["probs"].float().tolist()
        out["dim_probs"] += (
            b["dim_probs"].float().tolist() if b.get("dim_probs") is not None else [None] * len(b["example_id"])
        )
    return out
