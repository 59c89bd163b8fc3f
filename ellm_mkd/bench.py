"""``ellm-mkd bench``: benchmarks that write ``docs/results/<name>.json`` and a section of ``docs/benchmarks.md``.

``ellm-mkd bench students`` trains every student config it is given (default: the two Home Depot
configs under ``configs/benchmarks/``), tests each on its data module's test split, and puts beside
them, on the very same split and in the same process:

``st_cross_encoder``  a ``sentence_transformers.CrossEncoder`` built from the same MiniLM weights
                      (``num_labels=1``), trained with ``CrossEncoderTrainer`` on the same training
                      pairs ``(query, title)`` (``--baseline_text rendered``: the students' item
                      text) for the same epochs, with target ``(grade - low) / (high - low)``
                      (Home Depot: ``(grade - 1) / 2``) and the library's default loss
                      for one label (``BinaryCrossEntropyLoss``: BCE with logits). Same batch size,
                      learning rate, warm-up ratio, linear decay, weight decay, gradient clipping (the
                      student's ``gradient_clip_val``; none in the benchmark configs), max length, seed,
                      device and precision as the cross-encoder student; everything else is the
                      library's default (fused AdamW, one learning rate for encoder and head).
``global_mean``       the training mean grade for every pair (RMSE only).
``tfidf_char_3_5``    ``TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5))`` fit on the training
                      queries and titles; score = cosine(query, title); grade = a linear fit of grade
                      on cosine over the training pairs.

Evaluation: every row goes through the project's :class:`~ellm_mkd.metrics.RelevanceMetrics` on the
test rows of the data module (labels, grades, gains, query groups and buckets as the students see
them). Students: their level probabilities and expected grade, as ``trainer.test`` computes them.
Score-only models (baseline, TF-IDF): ``rmse``/``spearman``/``ndcg10`` from the predicted grade,
``auc`` from the raw score (fed as the probability mass on the relevant levels, so torchmetrics'
``BinaryAUROC`` sees exactly the score), ``macro_f1`` from the predicted grade cut into levels at the
scheme's cut points (Home Depot: 2.0 and 2.5); ``ece`` is not reported for them (they give no level
distribution). ``global_mean`` reports ``rmse`` only.

Throughput:

* training pairs/s = training pairs processed / wall time of the training batches. A batch's time
  runs from the end of the previous training batch (or the start of the epoch) to the end of this
  one, so it includes fetching and tokenizing the batch, forward, backward and the optimizer step,
  and excludes validation, checkpointing and epoch-end hooks (the interval after a validation
  restarts at the next batch start). The baseline is timed the same way with a
  ``transformers.TrainerCallback`` (``on_epoch_begin`` / ``on_step_end``); it tokenizes inside the
  step, so both include tokenization.
* inference pairs/s (``infer_pairs_per_s``) = test pairs / wall time of an inference pass over them
  at the configured eval batch size and precision. Students: ``trainer.predict`` over the test split,
  from the start of the predict epoch to the end of its last batch (data loading, tokenization,
  forward; nothing is kept). Baseline: ``CrossEncoder.predict`` over the same pairs with the same
  batch size under the same autocast (it sorts inputs by length; that is the library's own
  behaviour). Students also report ``test_loop_pairs_per_s``: the same pairs through
  ``trainer.test``, whose per-batch metric updates (tens of ms a batch on 2 CPU cores) make it an
  evaluation speed rather than a serving speed; metric computation and figures after the last batch
  are excluded from both.

``--train_limit N`` keeps whole training queries, in the order of a seeded hash of the normalised
query, while the kept pairs stay within ``N`` (every model, baseline and reference row then sees the
same reduced training set; validation and test are untouched).

``--stage throughput`` re-times training alone on this machine and adds the figures to an existing
result: the cross-encoder, the baseline on the raw title and the baseline on the students' rendered
text (the same tokens as the student) each train one epoch on the same ``--throughput_pairs`` pairs,
``--repeats`` rounds in rotated order; the target ``ce_train_throughput_rerun`` compares medians.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

DEFAULT_STUDENT_CONFIGS = ["configs/benchmarks/homedepot_cross_encoder.yaml", "configs/benchmarks/homedepot_two_tower.yaml"]
METRIC_KEYS = ("rmse", "auc", "spearman", "ndcg10", "macro_f1", "ece")
BASELINE_NAME = "st_cross_encoder"
REFERENCE_NAMES = ("global_mean", "tfidf_char_3_5")
_STUDENT_NAMES = {"CrossEncoderStudent": "cross_encoder", "TwoTowerStudent": "two_tower"}
TARGET_TT_AUC_GAP = 0.03


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------


def _now() -> float:
    return time.perf_counter()


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def machine_description() -> str:
    """``"<cores> cores (<cpu model>), <GPU or no GPU>, torch <version>, <threads> torch threads"``."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = ", ".join(f"{n}" for n in names)
    return (f"{os.cpu_count()} cores ({cpu}), {gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}")


def limit_training_rows(rows: list[dict[str, Any]], limit: int, seed: int) -> list[dict[str, Any]]:
    """Whole training queries in the order of a seeded hash of the normalised query, while the pairs kept
    stay within ``limit``. Rows keep their original order."""
    from datamodules.splits import limit_by_query

    return limit_by_query(rows, limit, seed, "train", "--train_limit")


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def _timer_callback_class():
    from lightning.pytorch.callbacks import Callback

    class ThroughputTimer(Callback):
        """Wall time of training batches, validation and the test loop (see the module docstring)."""

        def __init__(self) -> None:
            self.train_s = 0.0
            self.train_pairs = 0
            self.train_batches = 0
            self.val_s = 0.0
            self.test_s = 0.0
            self.test_pairs = 0
            self.predict_s = 0.0
            self.predict_pairs = 0
            self._mark: float | None = None
            self._val_t0: float | None = None
            self._test_t0: float | None = None
            self._test_last: float | None = None

        @staticmethod
        def _now(pl_module) -> float:
            _sync(pl_module.device)
            return _now()

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._mark = self._now(pl_module)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self._mark is None:  # a validation ran since the last batch: restart here
                self._mark = self._now(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = self._now(pl_module)
            self.train_s += now - self._mark
            self.train_pairs += len(batch["example_id"])
            self.train_batches += 1
            self._mark = now

        def on_validation_start(self, trainer, pl_module) -> None:
            self._val_t0 = self._now(pl_module)

        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self.val_s += self._now(pl_module) - self._val_t0
            self._mark = None

        def on_test_epoch_start(self, trainer, pl_module) -> None:
            self._test_t0 = self._test_last = self._now(pl_module)
            self.test_pairs = 0

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self._test_last = self._now(pl_module)
            self.test_pairs += len(batch["example_id"])

        def on_test_epoch_end(self, trainer, pl_module) -> None:
            self.test_s = self._test_last - self._test_t0

        def on_predict_epoch_start(self, trainer, pl_module) -> None:
            self._test_t0 = self._test_last = self._now(pl_module)
            self.predict_pairs = 0

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self._test_last = self._now(pl_module)
            self.predict_pairs += len(batch["example_id"])

        def on_predict_epoch_end(self, trainer, pl_module) -> None:
            self.predict_s = self._test_last - self._test_t0

    return ThroughputTimer


# ------------------------------------------------------------------------------------------------
# Evaluation of score-only models with the project's metrics
# ------------------------------------------------------------------------------------------------


def grade_range(scheme) -> tuple[float, float]:
    """``(low, high)`` of the raw grade: the scheme's for graded/ordinal data, the level range otherwise."""
    low, high = getattr(scheme, "low", None), getattr(scheme, "high", None)
    if low is None or high is None:
        return 0.0, float(scheme.num_levels - 1)
    return float(low), float(high)


def grade_cut_points(scheme) -> list[float]:
    """Grades at which a predicted grade moves up a level: the graded scheme's cut points, else the
    midpoints between consecutive integer grades."""
    cps = getattr(scheme, "cut_points", None)
    if cps:
        return [float(c) for c in cps]
    low, _ = grade_range(scheme)
    return [low + k - 0.5 for k in range(1, scheme.num_levels)]


class TestRows:
    """The test rows of a data module as tensors, in the data module's order."""

    def __init__(self, dm) -> None:
        from datamodules.schema import BUCKETS

        rows = dm.datasets["test"].rows
        nan = float("nan")
        self.example_ids = [r["example_id"] for r in rows]
        self.queries = [r["query"] for r in rows]
        self.labels = torch.tensor([-100 if r["label"] is None else r["label"] for r in rows], dtype=torch.long)
        self.grades = torch.tensor([nan if r["grade"] is None else r["grade"] for r in rows], dtype=torch.float32)
        self.gains = torch.tensor([nan if r["gain"] is None else r["gain"] for r in rows], dtype=torch.float32)
        self.query_ids = torch.tensor([r["query_id"] for r in rows], dtype=torch.long)
        self.bucket_ids = torch.tensor([BUCKETS.index(r["bucket"]) for r in rows], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.example_ids)


def score_model_metrics(dm, test: TestRows, pred_grade: torch.Tensor, score: torch.Tensor | None,
                        keys: Sequence[str] = ("rmse", "auc", "spearman", "ndcg10", "macro_f1")) -> dict[str, float]:
    """``RelevanceMetrics`` keys (overall bare, per bucket ``<bucket>/<key>``) of a model that gives a grade
    and, optionally, a relevance score in [0, 1] (see the module docstring for how each key is made)."""
    from ellm_mkd.metrics import RelevanceMetrics

    k, rl = dm.num_levels, dm.relevant_level
    n = len(test)
    pred_grade = pred_grade.reshape(-1).float()
    out: dict[str, float] = {}
    # 1) grade-based keys and AUC: relevant mass = the score (or 0.5 when there is none)
    s = (score.reshape(-1).float() if score is not None else torch.full((n,), 0.5)).clamp(0.0, 1.0)
    probs = torch.zeros(n, k)
    probs[:, rl:] = (s / (k - rl)).unsqueeze(1)
    probs[:, :rl] = ((1.0 - s) / rl).unsqueeze(1)
    m = RelevanceMetrics(k, dm.level_names, rl)
    m.update(probs, pred_grade, test.labels, test.grades, test.gains, test.query_ids, test.bucket_ids)
    reg = m.compute()
    wanted = {"count", *(x for x in keys if x != "macro_f1")}
    if score is None:
        wanted.discard("auc")
    out.update({key: v for key, v in reg.items() if key.rsplit("/", 1)[-1] in wanted})
    # 2) classification keys: the predicted grade cut into levels
    if "macro_f1" in keys:
        cuts = torch.tensor(grade_cut_points(dm.scheme))
        levels = (pred_grade.unsqueeze(1) >= cuts.unsqueeze(0)).sum(1).clamp(0, k - 1)
        m2 = RelevanceMetrics(k, dm.level_names, rl)
        m2.update(torch.nn.functional.one_hot(levels, k).float(), pred_grade, test.labels, test.grades, test.gains,
                  test.query_ids, test.bucket_ids)
        cls = m2.compute()
        out.update({key: v for key, v in cls.items() if key.rsplit("/", 1)[-1] == "macro_f1"})
    return out


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------


def _row(name: str, kind: str, seed: int, flat: dict[str, float], throughput: dict[str, float] | None,
         config: dict[str, Any], timings: dict[str, float] | None = None) -> dict[str, Any]:
    from datamodules.schema import BUCKETS

    metrics = {k: _finite_or_none(flat[k]) for k in METRIC_KEYS if k in flat}
    by_bucket = {}
    for b in BUCKETS:
        vals = {k: _finite_or_none(flat[f"{b}/{k}"]) for k in ("count", *METRIC_KEYS) if f"{b}/{k}" in flat}
        if vals:
            if "count" in vals:
                vals["count"] = int(vals["count"])
            by_bucket[b] = vals
    row: dict[str, Any] = {"name": name, "kind": kind, "seed": seed, "metrics": metrics, "by_bucket": by_bucket}
    if throughput is not None:
        row["throughput"] = {k: round(v, 2) for k, v in throughput.items()}
    row["config"] = config
    if timings:
        row["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    row["_flat"] = flat
    return row


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the same model's rows over several seeds: means, ``seeds`` and ``std`` (sample)."""
    if len(rows) == 1:
        return rows[0]
    first = rows[0]

    def mean_of(dicts: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [k for k in dicts[0] if all(d.get(k) is not None for d in dicts)]
        return {k: statistics.fmean(d[k] for d in dicts) for k in keys}

    out = dict(first)
    out["seeds"] = [r["seed"] for r in rows]
    out["metrics"] = mean_of([r["metrics"] for r in rows])
    out["std"] = {k: statistics.stdev(r["metrics"][k] for r in rows) for k in out["metrics"]}
    out["by_bucket"] = {b: mean_of([r["by_bucket"][b] for r in rows]) for b in first["by_bucket"]
                        if all(b in r["by_bucket"] for r in rows)}
    for b in out["by_bucket"].values():
        if "count" in b:
            b["count"] = int(round(b["count"]))
    if "throughput" in first:
        out["throughput"] = {k: round(v, 2) for k, v in mean_of([r["throughput"] for r in rows]).items()}
        out["std"].update({k: statistics.stdev(r["throughput"][k] for r in rows) for k in out["throughput"]})
    if "timings_s" in first:
        out["timings_s"] = {k: round(v, 2) for k, v in mean_of([r["timings_s"] for r in rows]).items()}
    flat = mean_of([r["_flat"] for r in rows])
    out["_flat"] = flat
    return out


def _student_name(model, config_path: str, taken: set[str]) -> str:
    name = _STUDENT_NAMES.get(type(model).__name__, Path(config_path).stem)
    if name in taken:
        name = Path(config_path).stem
    return name


def run_student(config: str, seed: int, epochs: int | None, train_limit: int | None, overrides: Sequence[str],
                taken: set[str], evaluate: bool = True) -> tuple[dict[str, Any], Any, Any]:
    """Fit and test one student config; returns its row, the data module and the model.
    ``evaluate=False`` fits only (no test or inference pass: the row has training figures alone)."""
    from ellm_mkd.lightning_cli import cli_main

    if not Path(config).is_file():
        raise FileNotFoundError(f"{config}: no such config (paths are relative to the current directory; "
                                "run ellm-mkd bench from the repository root)")
    args = ["--config", config, f"--seed_everything={seed}"]
    if epochs is not None:
        args.append(f"--trainer.max_epochs={epochs}")
    args += [o if o.startswith("--") else f"--{o}" for o in overrides]
    t0 = _now()
    with warnings.catch_warnings():  # LightningCLI warns when sys.argv (here: ``bench ...``) is not what it parses
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended.*")
        cli = cli_main(args, run=False)
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    dm.setup("fit")
    if train_limit is not None:
        dm.datasets["train"].rows = limit_training_rows(dm.datasets["train"].rows, train_limit, dm.source.split.seed)
    load_s = _now() - t0
    timer = _timer_callback_class()()
    trainer.callbacks.append(timer)
    name = _student_name(model, config, taken)
    log.info("bench: fitting %s (%s, seed %d, %d training pairs)", name, config, seed, len(dm.datasets["train"]))
    t0 = _now()
    trainer.fit(model, datamodule=dm)
    fit_s = _now() - t0
    test_total_s = predict_total_s = 0.0
    flat: dict[str, float] = {}
    if evaluate:
        t0 = _now()
        trainer.test(model, datamodule=dm, verbose=False)  # the weights at the end of training (the baseline has no selection)
        test_total_s = _now() - t0
        flat = dict(model.last_results["test"])
        # serving speed: the same test pairs through the predict loop (forward only, no metric bookkeeping)
        dm.predict_split = "test"
        t0 = _now()
        trainer.predict(model, datamodule=dm, return_predictions=False)
        predict_total_s = _now() - t0
    hp = model.hparams
    cfg = {
        "config": config,
        "model": type(model).__name__,
        "encoder": hp.encoder,
        "precision": str(trainer.precision),
        "accelerator": type(trainer.accelerator).__name__,
        "epochs": trainer.max_epochs,
        "batch_size": dm.batch_size,
        "eval_batch_size": dm.eval_batch_size or 2 * dm.batch_size,
        "max_seq_length": hp.max_seq_length,
        "lr": hp.lr,
        "head_lr": hp.head_lr,
        "warmup_ratio": hp.warmup_ratio,
        "scheduler": hp.scheduler,
        "weight_decay": hp.weight_decay,
        "gradient_clip_val": trainer.gradient_clip_val,
        "optimizer": _optimizer_description(trainer.optimizers[0]) if trainer.optimizers else None,
        "train_pairs": len(dm.datasets["train"]),
        "train_pairs_processed": timer.train_pairs,
        "optimizer_steps": trainer.global_step,
        "test_pairs": timer.test_pairs,
        "num_workers": dm.num_workers,
    }
    throughput = {"train_pairs_per_s": timer.train_pairs / max(timer.train_s, 1e-9)}
    if evaluate:
        throughput.update(infer_pairs_per_s=timer.predict_pairs / max(timer.predict_s, 1e-9),
                          test_loop_pairs_per_s=timer.test_pairs / max(timer.test_s, 1e-9))
    timings = {"load": load_s, "fit": fit_s, "train_batches": timer.train_s, "validation": timer.val_s,
               "test": test_total_s, "test_loop": timer.test_s, "predict": predict_total_s,
               "predict_loop": timer.predict_s}
    row = _row(name, "student", seed, flat, throughput, cfg, timings)
    return row, dm, model


def _optimizer_description(opt) -> str:
    """``AdamW (fused)``, ``AdamW (foreach)`` or ``AdamW (for-loop)``: torch's implementation in use."""
    d = getattr(opt, "defaults", {})
    if d.get("fused"):
        impl = "fused"
    elif d.get("foreach") is None:  # torch's default: foreach on accelerators, a for-loop on CPU tensors
        on_cpu = all(p.device.type == "cpu" for g in opt.param_groups for p in g["params"])
        impl = "for-loop" if on_cpu else "foreach"
    else:
        impl = "foreach" if d.get("foreach") else "for-loop"
    return f"{type(opt).__name__} ({impl})"


def _titles_by_id(dm) -> dict[str, str]:
    t = dm.table
    return dict(zip(t.column("example_id").to_pylist(), t.column("title").to_pylist()))


def run_st_baseline(dm, ref_cfg: dict[str, Any], seed: int, work_dir: Path, text: str = "title",
                    evaluate: bool = True) -> dict[str, Any]:
    """Train and test the sentence-transformers CrossEncoder on the data module's split (module docstring).
    ``evaluate=False`` trains only (the row has training figures alone)."""
    try:
        import datasets  # noqa: F401  (CrossEncoderTrainer needs it)
        from sentence_transformers import CrossEncoder
        from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
        from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
        from transformers import TrainerCallback
    except ImportError as e:
        raise ImportError(f"the sentence-transformers baseline needs sentence-transformers and datasets "
                          f"(pip install 'ellm-mkd[bench]'), or run with --baseline false: {e}") from e
    from datasets import Dataset

    from ellm_mkd.models import resolve_model

    low, high = grade_range(dm.scheme)
    if text not in ("title", "rendered"):
        raise ValueError(f"--baseline_text must be title or rendered, got {text!r}")
    titles = _titles_by_id(dm)

    def item(r: dict[str, Any]) -> str:
        return titles[r["example_id"]] if text == "title" else r["item_text"]

    train_rows = dm.datasets["train"].rows
    train = Dataset.from_dict({
        "query": [r["query"] for r in train_rows],
        "title": [item(r) for r in train_rows],
        "label": [(float(r["grade"]) - low) / (high - low) for r in train_rows],
    })
    test = TestRows(dm)
    test_pairs = [(r["query"], item(r)) for r in dm.datasets["test"].rows]

    precision = ref_cfg["precision"]
    bf16 = precision.startswith("bf16")
    fp16 = precision.startswith("16")
    use_cpu = ref_cfg["accelerator"] == "CPUAccelerator" or not torch.cuda.is_available()
    device = "cpu" if use_cpu else "cuda"
    torch.manual_seed(seed)
    t0 = _now()
    model = CrossEncoder(resolve_model(ref_cfg["encoder"]), num_labels=1, max_length=ref_cfg["max_seq_length"], device=device)
    load_s = _now() - t0

    class _Timer(TrainerCallback):
        def __init__(self) -> None:
            self.train_s, self.steps, self._mark = 0.0, 0, 0.0

        def _t(self) -> float:
            if not use_cpu:
                torch.cuda.synchronize()
            return _now()

        def on_epoch_begin(self, args, state, control, **kw):
            self._mark = self._t()

        def on_step_end(self, args, state, control, **kw):
            now = self._t()
            self.train_s += now - self._mark
            self.steps += 1
            self._mark = now

    out_dir = work_dir / BASELINE_NAME / f"seed{seed}"
    args = CrossEncoderTrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=ref_cfg["epochs"],
        per_device_train_batch_size=ref_cfg["batch_size"],
        per_device_eval_batch_size=ref_cfg["eval_batch_size"],
        learning_rate=ref_cfg["lr"],
        warmup_steps=ref_cfg["warmup_ratio"],  # a float < 1 is a ratio of the total steps
        lr_scheduler_type={"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[ref_cfg["scheduler"]],
        weight_decay=ref_cfg["weight_decay"],
        max_grad_norm=ref_cfg["gradient_clip_val"] or 0.0,
        bf16=bf16,
        fp16=fp16,
        use_cpu=use_cpu,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=ref_cfg["num_workers"],
        dataloader_pin_memory=not use_cpu,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=50,
        report_to="none",
    )
    timer = _Timer()
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=train, loss=BinaryCrossEntropyLoss(model),
                                  callbacks=[timer])
    log.info("bench: fitting %s (seed %d, %d training pairs, %s)", BASELINE_NAME, seed, len(train), precision)
    t0 = _now()
    trainer.train()
    fit_s = _now() - t0
    infer_s, flat = 0.0, {}
    if evaluate:
        amp = torch.autocast(device, dtype=torch.bfloat16 if bf16 else torch.float16, enabled=bf16 or fp16)
        t0 = _now()
        with amp:
            scores = model.predict(test_pairs, batch_size=ref_cfg["eval_batch_size"], show_progress_bar=False,
                                   convert_to_tensor=True)
        if not use_cpu:
            torch.cuda.synchronize()
        infer_s = _now() - t0
        scores = scores.float().cpu().reshape(-1)
        pred_grade = low + (high - low) * scores
        flat = score_model_metrics(dm, test, pred_grade, scores)
    cfg = {
        "model": "sentence_transformers.CrossEncoder(num_labels=1) + CrossEncoderTrainer, BinaryCrossEntropyLoss",
        "encoder": ref_cfg["encoder"],
        "precision": "bf16 autocast (TrainingArguments bf16=True" + (", use_cpu=True)" if use_cpu else ")") if bf16
        else ("fp16 autocast" if fp16 else "fp32"),
        "epochs": ref_cfg["epochs"],
        "batch_size": ref_cfg["batch_size"],
        "eval_batch_size": ref_cfg["eval_batch_size"],
        "max_seq_length": ref_cfg["max_seq_length"],
        "lr": ref_cfg["lr"],
        "warmup_ratio": ref_cfg["warmup_ratio"],
        "scheduler": ref_cfg["scheduler"],
        "weight_decay": ref_cfg["weight_decay"],
        "max_grad_norm": args.max_grad_norm,
        "optimizer": f"{getattr(args.optim, 'value', args.optim)} (transformers Trainer default)",
        "target": f"(grade - {low:g}) / {high - low:g}",
        "item_text": "the raw title" if text == "title" else "the students' rendered item text",
        "train_pairs": len(train),
        "train_pairs_processed": len(train) * int(ref_cfg["epochs"]),
        "optimizer_steps": timer.steps,
        "test_pairs": len(test_pairs),
        "num_workers": ref_cfg["num_workers"],
    }
    throughput = {"train_pairs_per_s": len(train) * int(ref_cfg["epochs"]) / max(timer.train_s, 1e-9)}
    if evaluate:
        throughput["infer_pairs_per_s"] = len(test_pairs) / max(infer_s, 1e-9)
    timings = {"load": load_s, "fit": fit_s, "train_batches": timer.train_s, "test_loop": infer_s}
    return _row(BASELINE_NAME, "baseline", seed, flat, throughput, cfg, timings)


def run_references(dm, split_seed: int) -> list[dict[str, Any]]:
    """``global_mean`` and ``tfidf_char_3_5`` on the data module's split (module docstring)."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    titles = _titles_by_id(dm)
    train_rows = dm.datasets["train"].rows
    test_rows = dm.datasets["test"].rows
    test = TestRows(dm)
    g_train = np.array([r["grade"] for r in train_rows], dtype=np.float64)
    base_cfg = {"train_pairs": len(train_rows), "test_pairs": len(test_rows)}
    rows = []

    t0 = _now()
    mean = float(g_train.mean())
    flat = score_model_metrics(dm, test, torch.full((len(test),), mean), None, keys=("rmse",))
    rows.append(_row("global_mean", "reference", split_seed, flat, None,
                     {**base_cfg, "predicted_grade": round(mean, 4)}, {"total": _now() - t0}))

    t0 = _now()
    q_train = [r["query"] for r in train_rows]
    t_train = [titles[r["example_id"]] for r in train_rows]
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5))
    vec.fit(q_train + t_train)

    def cosine(qs: list[str], ts: list[str]) -> np.ndarray:
        a, b = vec.transform(qs), vec.transform(ts)  # rows are L2-normalised: the dot product is the cosine
        return np.asarray(a.multiply(b).sum(axis=1)).reshape(-1)

    c_train = cosine(q_train, t_train)
    slope, intercept = np.polyfit(c_train, g_train, 1)
    c_test = cosine([r["query"] for r in test_rows], [titles[r["example_id"]] for r in test_rows])
    pred = torch.tensor(intercept + slope * c_test, dtype=torch.float32)
    flat = score_model_metrics(dm, test, pred, torch.tensor(c_test, dtype=torch.float32))
    rows.append(_row("tfidf_char_3_5", "reference", split_seed, flat, None,
                     {**base_cfg, "vectorizer": "TfidfVectorizer(analyzer='char_wb', ngram_range=(3, 5)) on train queries + titles",
                      "grade": f"{intercept:.4f} + {slope:.4f} * cosine (least squares on train)"},
                     {"total": _now() - t0}))
    return rows


# ------------------------------------------------------------------------------------------------
# Targets, JSON, markdown
# ------------------------------------------------------------------------------------------------


def compute_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["name"]: r for r in rows}
    ce, tt, st = by.get("cross_encoder"), by.get("two_tower"), by.get(BASELINE_NAME)

    def m(r, k):
        return None if r is None else r["metrics"].get(k)

    def t(r, k):
        return None if r is None else r.get("throughput", {}).get(k)

    def target(rule: str, measured: dict[str, Any], ok) -> dict[str, Any]:
        missing = [k for k, v in measured.items() if v is None]
        return {"rule": rule, "measured": measured, "met": None if missing else bool(ok())}

    out = {
        "ce_rmse_matches_baseline": target(
            "cross_encoder rmse <= st_cross_encoder rmse",
            {"cross_encoder": m(ce, "rmse"), BASELINE_NAME: m(st, "rmse")},
            lambda: m(ce, "rmse") <= m(st, "rmse")),
        "ce_auc_matches_baseline": target(
            "cross_encoder auc >= st_cross_encoder auc",
            {"cross_encoder": m(ce, "auc"), BASELINE_NAME: m(st, "auc")},
            lambda: m(ce, "auc") >= m(st, "auc")),
        "ce_train_throughput": target(
            "cross_encoder train_pairs_per_s >= st_cross_encoder train_pairs_per_s",
            {"cross_encoder": t(ce, "train_pairs_per_s"), BASELINE_NAME: t(st, "train_pairs_per_s")},
            lambda: t(ce, "train_pairs_per_s") >= t(st, "train_pairs_per_s")),
        "two_tower_auc_within_3_points": target(
            f"cross_encoder auc - two_tower auc <= {TARGET_TT_AUC_GAP}",
            {"cross_encoder": m(ce, "auc"), "two_tower": m(tt, "auc")},
            lambda: m(ce, "auc") - m(tt, "auc") <= TARGET_TT_AUC_GAP + 1e-12),
    }
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_section(result: dict[str, Any]) -> str:
    from datamodules.schema import BUCKETS

    name = result["benchmark"]
    rows = result["rows"]
    lines = [f"<!-- bench:{name} -->", f"## {name}", ""]
    lines += [f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ", f"Date: {result['date']}", ""]
    info = result.get("split", {})
    if info:
        lines += [f"Data: `{info.get('source')}`, query-disjoint split (seed {info.get('seed')}, "
                  f"{info.get('test_fraction'):.0%} of queries held out for test, {info.get('val_fraction'):.0%} for "
                  f"validation): "
                  f"{info.get('train_pairs'):,} training pairs, {info.get('val_pairs'):,} validation pairs, "
                  f"{info.get('test_pairs'):,} test pairs"
                  + (f" (training capped with --train_limit {info['train_limit']})" if info.get("train_limit") else "")
                  + ". Figures are on the test split; the weights at the end of training are tested.", ""]
    cols = ["rmse", "auc", "spearman", "ndcg10", "macro_f1", "ece"]
    lines += ["### Overall", "",
              "| model | kind | " + " | ".join(cols) + " | train pairs/s | inference pairs/s |",
              "|---|---|" + "---:|" * (len(cols) + 2)]
    for r in rows:
        tp = r.get("throughput", {})
        cells = [_fmt(r["metrics"].get(c)) for c in cols]
        if "std" in r:
            cells = [c + (f" ± {r['std'][k]:.3f}" if k in r["std"] and c != "–" else "") for c, k in zip(cells, cols)]
        lines.append(f"| {r['name']} | {r['kind']} | " + " | ".join(cells)
                     + f" | {_fmt(tp.get('train_pairs_per_s'), 1)} | {_fmt(tp.get('infer_pairs_per_s'), 1)} |")
    lines += ["", "### Per query bucket", "",
              "| model | bucket | pairs | " + " | ".join(cols[:5]) + " |", "|---|---|" + "---:|" * 6]
    for r in rows:
        for b in BUCKETS:
            v = r["by_bucket"].get(b)
            if v:
                lines.append(f"| {r['name']} | {b} | {v.get('count', '–')} | " + " | ".join(_fmt(v.get(c)) for c in cols[:5]) + " |")
    lines += ["", "### Setup", "",
              "| model | precision | optimizer | epochs | batch | max length | lr | warm-up | grad clip | train pairs | steps |",
              "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        c = r["config"]
        if r["kind"] == "reference":
            continue
        lr = f"{c['lr']:g}" if c.get("head_lr") is None else f"{c['lr']:g} (heads {c['head_lr']:g})"
        clip = c.get("gradient_clip_val", c.get("max_grad_norm")) or "none"
        lines.append(f"| {r['name']} | {c.get('precision')} | {c.get('optimizer')} | {c.get('epochs')} | {c.get('batch_size')} | "
                     f"{c.get('max_seq_length')} | {lr} | {c.get('warmup_ratio')} | {_fmt(clip, 1)} | {c.get('train_pairs')} | "
                     f"{c.get('optimizer_steps')} |")
    lines += ["", "### Targets", "", "| target | rule | measured | met |", "|---|---|---|---|"]
    for key, tg in result["targets"].items():
        meas = ", ".join(f"{k} {_fmt(v, 4 if not isinstance(v, float) or v < 10 else 1)}" for k, v in tg["measured"].items())
        met = {True: "yes", False: "**no**", None: "n/a"}[tg["met"]]
        lines.append(f"| {key} | {tg['rule']} | {meas} | {met} |")
    run = result.get("throughput_run")
    if run:
        lines += ["", "### Training throughput, re-timed", "",
                  f"Command: `{run['command']}`  ", f"Machine: {run['machine']}; date {run['date']}.", "",
                  f"Training alone, one epoch each over the same {run['train_pairs']:,} training pairs (whole queries), "
                  f"batch {run['batch_size']}, precision {run['precision']}, no validation or test; {run['repeats']} "
                  "rounds with the order rotated each round. The rows and the other targets above keep the figures of the full run, "
                  "measured on the machine and at the precision named there.", "",
                  "| model | training pairs/s per round | median |", "|---|---|---:|"]
        for k, v in run["train_pairs_per_s"].items():
            lines.append(f"| {k} | {', '.join(f'{x:.1f}' for x in v)} | {run['median'][k]:.1f} |")
    base = next((r for r in rows if r["kind"] == "baseline"), None)
    if base is not None:
        lines += ["", f"The students read the item as the project renders it (`Title: <title>`); `{base['name']}` reads "
                  f"{base['config'].get('item_text', 'the raw title')} (`--baseline_text`)."]
    lines += ["", "How each row is evaluated (all through `ellm_mkd.metrics.RelevanceMetrics` on the same test rows): "
              "students from their level probabilities and expected grade; `st_cross_encoder` and `tfidf_char_3_5` "
              "give a score — AUC from the score, RMSE/Spearman/nDCG@10 from the predicted grade "
              "(`low + (high - low) * score` for the baseline, i.e. `1 + 2 * score` on Home Depot; a least-squares "
              "line on cosine for TF-IDF), macro-F1 from the "
              "predicted grade cut into levels at the scheme's cut points, no ECE; `global_mean` gives RMSE only. "
              "Training pairs/s: pairs over the wall time of the training batches (data loading and tokenization "
              "included, validation and checkpointing excluded); inference pairs/s: test pairs over the wall time "
              "of an inference pass over them (students: `trainer.predict`; baseline: `CrossEncoder.predict`), same "
              "eval batch size and precision. See `ellm_mkd/bench.py`.", "", f"<!-- /bench:{name} -->"]
    return "\n".join(lines)


_MD_HEADER = ("# Benchmarks\n\nEvery section below was written by the command it names, on the machine and date it "
              "names; the figures are what that run measured. The same figures, with more detail, are in "
              "`docs/results/<name>.json`.\n")


def publish(result: dict[str, Any], opts: Any, section: str) -> None:
    """Write a benchmark's JSON (``opts.out_json`` or ``docs/results/<name>.json``) and its markdown section."""
    out_json = opts.out_json or f"docs/results/{opts.name}.json"
    atomic_write_text(out_json, json.dumps(result, indent=2) + "\n")
    update_markdown(opts.out_md, opts.name, section)
    print(section)
    print(f"\nwrote {out_json} and the {opts.name} section of {opts.out_md}")


def update_markdown(path: str | os.PathLike, name: str, section: str) -> None:
    """Replace this benchmark's section of ``path`` (between its markers), or append it; other sections stay."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else _MD_HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(path, text)


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def _parser():
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="ellm-mkd bench", description="Benchmarks that write docs/results/<name>.json and a section "
                       "of docs/benchmarks.md naming the exact command, machine and date.")
    sub = p.add_subcommands(required=True, dest="benchmark")
    s = ArgumentParser(description=(
        "Train and test student configs, beside a sentence-transformers CrossEncoder with the same weights and "
        "reference rows (global mean, char TF-IDF), on one query-disjoint split. Run from the repository root."))
    s.add_argument("--configs", type=list[str], default=DEFAULT_STUDENT_CONFIGS,
                   help="student LightningCLI configs (they must share data.source and its split)")
    s.add_argument("--epochs", type=int | None, default=None, help="override trainer.max_epochs in every config "
                   "(the baseline follows the cross-encoder's); default: the configs'")
    s.add_argument("--train_limit", type=int | None, default=None, help="cap the training pairs by keeping whole "
                   "training queries in seeded hash order (quick runs); default: all")
    s.add_argument("--seed", type=int | list[int], default=0, help="training seed(s) (seed_everything; the split "
                   "seed stays the config's); several seeds give mean rows with 'seeds' and 'std'")
    s.add_argument("--baseline", type=bool, default=True, help="also train the sentence-transformers CrossEncoder")
    s.add_argument("--baseline_text", type=Literal["title", "rendered"], default="title", help="what the baseline reads as the item: "
                   "'title' (the raw title, what a user would feed it) or 'rendered' (the students' item text, "
                   "e.g. 'Title: ...')")
    s.add_argument("--references", type=bool, default=True, help="also compute the global-mean and TF-IDF rows")
    s.add_argument("--override", type=list[str], default=[], help="extra LightningCLI arguments for every student "
                   "config, e.g. [trainer.limit_test_batches=10]")
    s.add_argument("--name", type=str, default="students_homedepot", help="benchmark name (JSON file, markdown section)")
    s.add_argument("--out_json", type=str | None, default=None, help="default: docs/results/<name>.json")
    s.add_argument("--out_md", type=str, default="docs/benchmarks.md", help="markdown file whose <name> section is replaced")
    s.add_argument("--work_dir", type=str, default="runs/benchmarks", help="scratch directory of the baseline trainer")
    s.add_argument("--stage", type=Literal["full", "throughput"], default="full", help="full: train, test and "
                   "report every model; throughput: re-time training alone (cross-encoder against the baseline "
                   "on the raw title and on the rendered text, --repeats rounds in rotated order) and add the "
                   "figures to the existing result")
    s.add_argument("--throughput_pairs", type=int, default=3200, help="training pairs of each timed run (--stage throughput)")
    s.add_argument("--repeats", type=int, default=3, help="rounds of timed runs (--stage throughput)")
    sub.add_subcommand("students", s)
    return p


def bench_students(opts, command: str) -> dict[str, Any]:
    seeds = [opts.seed] if isinstance(opts.seed, int) else list(opts.seed)
    if not seeds:
        raise ValueError("--seed needs at least one seed")
    if not opts.configs:
        raise ValueError("--configs needs at least one student config")
    work_dir = Path(opts.work_dir) / opts.name
    per_model: dict[str, list[dict[str, Any]]] = {}
    references: list[dict[str, Any]] = []
    split_info: dict[str, Any] = {}
    ids_ref: tuple[list[str], list[str]] | None = None
    for seed in seeds:
        ce_cfg: dict[str, Any] | None = None
        ce_dm = None
        taken: set[str] = set()
        for i, config in enumerate(opts.configs):
            row, dm, model = run_student(config, seed, opts.epochs, opts.train_limit, opts.override, taken)
            taken.add(row["name"])
            ids = (sorted(r["example_id"] for r in dm.datasets["train"].rows),
                   sorted(r["example_id"] for r in dm.datasets["test"].rows))
            if ids_ref is None:
                ids_ref = ids
                src = dm.source
                split_info = {"source": src.path, "preset": src.preset, "seed": src.split.seed,
                              "val_fraction": src.split.val_fraction, "test_fraction": src.split.test_fraction,
                              "train_pairs": len(ids[0]), "val_pairs": len(dm.datasets["val"]), "test_pairs": len(ids[1]),
                              "train_limit": opts.train_limit, "relevant_level": dm.relevant_level,
                              "scheme": dm.scheme.describe()}
                if opts.references:
                    references = run_references(dm, src.split.seed)
            elif ids != ids_ref:
                raise ValueError(f"{config}: its train/test split differs from {opts.configs[0]}'s; the benchmark "
                                 "compares models on one split (same data.source and split options)")
            per_model.setdefault(row["name"], []).append(row)
            if ce_cfg is None and (row["config"]["model"] == "CrossEncoderStudent" or i == len(opts.configs) - 1):
                ce_cfg, ce_dm = row["config"], dm
            del model
        if opts.baseline:
            row = run_st_baseline(ce_dm, ce_cfg, seed, work_dir, opts.baseline_text)
            per_model.setdefault(row["name"], []).append(row)
    rows = [_aggregate(rs) for rs in per_model.values()] + references
    result = {
        "benchmark": opts.name,
        "command": command,
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "split": split_info,
        "rows": rows,
        "targets": compute_targets(rows),
    }
    return result


THROUGHPUT_CONTENDERS = ("cross_encoder", f"{BASELINE_NAME} (title)", f"{BASELINE_NAME} (rendered)")


def bench_students_throughput(opts, command: str) -> dict[str, Any]:
    """``--stage throughput``: re-time training alone, in one process, for the cross-encoder (the first of
    ``--configs``) and the sentence-transformers baseline reading the raw title and the students' rendered
    item text; each trains one epoch on the same ``--throughput_pairs`` training pairs (whole queries, as
    ``--train_limit``), no validation, no test; ``--repeats`` rounds, the order rotated each round so that
    no contender always runs first or last. The figures and a target on the medians are added to the
    existing result (``--out_json``), whose rows and figures stay as they were measured."""
    out_json = Path(opts.out_json or f"docs/results/{opts.name}.json")
    if not out_json.is_file():
        raise FileNotFoundError(f"{out_json}: --stage throughput adds to an existing result; run the full "
                                "benchmark first (or point --out_json at its result)")
    if opts.repeats < 1 or opts.throughput_pairs < 1:
        raise ValueError(f"--repeats and --throughput_pairs must be >= 1, got {opts.repeats} and {opts.throughput_pairs}")
    result = json.loads(out_json.read_text())
    seed = opts.seed if isinstance(opts.seed, int) else list(opts.seed)[0]
    work_dir = Path(opts.work_dir) / opts.name / "throughput"
    no_eval = [*opts.override, "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0"]
    figures: dict[str, list[float]] = {c: [] for c in THROUGHPUT_CONTENDERS}
    orders: list[list[str]] = []
    ref_cfg = ref_dm = None
    for r in range(opts.repeats):
        k = r % len(THROUGHPUT_CONTENDERS)
        order = list(THROUGHPUT_CONTENDERS[k:] + THROUGHPUT_CONTENDERS[:k])
        if ref_cfg is None:  # the baseline copies the cross-encoder's settings: it runs first once
            order.remove("cross_encoder")
            order.insert(0, "cross_encoder")
        orders.append(order)
        for name in order:
            if name == "cross_encoder":
                row, dm, model = run_student(opts.configs[0], seed, 1, opts.throughput_pairs, no_eval, set(),
                                             evaluate=False)
                del model
                ref_cfg, ref_dm = row["config"], dm
            else:
                text = "title" if name.endswith("(title)") else "rendered"
                row = run_st_baseline(ref_dm, ref_cfg, seed, work_dir, text, evaluate=False)
            pps = row["throughput"]["train_pairs_per_s"]
            figures[name].append(pps)
            log.info("bench throughput: round %d, %s: %.1f training pairs/s", r + 1, name, pps)
    median = {k: statistics.median(v) for k, v in figures.items()}
    ce, st = median["cross_encoder"], median[f"{BASELINE_NAME} (title)"]
    result["throughput_run"] = {
        "command": command, "machine": machine_description(), "date": time.strftime("%Y-%m-%d"),
        "config": opts.configs[0], "seed": seed, "train_pairs": len(ref_dm.datasets["train"]),
        "precision": ref_cfg["precision"], "batch_size": ref_cfg["batch_size"], "repeats": opts.repeats,
        "orders": orders, "train_pairs_per_s": {k: [round(x, 2) for x in v] for k, v in figures.items()},
        "median": {k: round(v, 2) for k, v in median.items()},
    }
    result["targets"]["ce_train_throughput_rerun"] = {
        "rule": f"median cross_encoder train_pairs_per_s >= median {BASELINE_NAME} (title) train_pairs_per_s "
                "(--stage throughput)",
        "measured": {"cross_encoder": round(ce, 2), BASELINE_NAME: round(st, 2)}, "met": bool(ce >= st)}
    return result


def bench_main(argv: list[str]) -> int:
    argv = list(argv)
    if argv[:1] == ["teacher"]:
        from .bench_teacher import bench_teacher_main

        return bench_teacher_main(argv[1:])
    if argv[:1] == ["cache"]:
        from .bench_cache import bench_cache_main

        return bench_cache_main(argv[1:])
    if argv[:1] == ["mkd"]:
        from .bench_mkd import bench_mkd_main

        return bench_mkd_main(argv[1:])
    parser = _parser()
    cfg = parser.parse_args(argv)
    if cfg.benchmark != "students":  # pragma: no cover (jsonargparse rejects unknown subcommands)
        raise SystemExit(f"unknown benchmark {cfg.benchmark!r}")
    opts = cfg.students
    command = "ellm-mkd bench " + shlex.join(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out_json = opts.out_json or f"docs/results/{opts.name}.json"
    retime = opts.stage == "throughput"
    result = bench_students_throughput(opts, command) if retime else bench_students(opts, command)
    flat = {r["name"]: r.pop("_flat") for r in result["rows"] if "_flat" in r}  # a re-timing reads rows from JSON
    atomic_write_text(out_json, json.dumps(result, indent=2, allow_nan=False) + "\n")
    update_markdown(opts.out_md, opts.name, markdown_section(result))
    if retime:
        run = result["throughput_run"]
        for k, v in run["train_pairs_per_s"].items():
            print(f"{k}: training pairs/s {', '.join(f'{x:.1f}' for x in v)} (median {run['median'][k]:.1f})")
        tg = result["targets"]["ce_train_throughput_rerun"]
        print(f"target ce_train_throughput_rerun: {tg['rule']}: {'met' if tg['met'] else 'NOT met'}")
        print(f"\nwrote {out_json} and the {opts.name} section of {opts.out_md}")
        return 0

    from ellm_mkd.metrics import format_table

    print()
    print(format_table(flat))
    print()
    for r in result["rows"]:
        tp = r.get("throughput")
        if tp:
            print(f"{r['name']}: train {tp['train_pairs_per_s']:.1f} pairs/s, inference {tp['infer_pairs_per_s']:.1f} pairs/s")
    for key, tg in result["targets"].items():
        print(f"target {key}: {tg['rule']}: {'met' if tg['met'] else ('n/a' if tg['met'] is None else 'NOT met')}")
    print(f"\nwrote {out_json}")
    print(f"wrote {opts.out_md} (section <!-- bench:{opts.name} -->)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(bench_main(sys.argv[1:]))
