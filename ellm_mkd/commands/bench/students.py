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
import os
import shlex
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from callbacks.timer import ThroughputTimer

from .baselines import BASELINE_NAME, run_references, run_st_baseline
from .common import (
    aggregate,
    atomic_write_text,
    limit_training_rows,
    machine_description,
    now,
    optimizer_description,
    options,
    result_head,
    result_row,
    update_markdown,
)
from .students_report import TARGET_TT_AUC_GAP as TARGET_TT_AUC_GAP
from .students_report import compute_targets, markdown_section

log = logging.getLogger(__name__)


DEFAULT_STUDENT_CONFIGS = [
    "configs/benchmarks/homedepot_cross_encoder.yaml",
    "configs/benchmarks/homedepot_two_tower.yaml",
]

_STUDENT_NAMES = {"CrossEncoderStudent": "cross_encoder", "TwoTowerStudent": "two_tower"}


def _student_name(model, config_path: str, taken: set[str]) -> str:
    name = _STUDENT_NAMES.get(type(model).__name__, Path(config_path).stem)
    if name in taken:
        name = Path(config_path).stem
    return name


def run_student(
    config: str,
    seed: int,
    epochs: int | None,
    train_limit: int | None,
    overrides: Sequence[str],
    taken: set[str],
    evaluate: bool = True,
) -> tuple[dict[str, Any], Any, Any]:
    """Fit and test one student config; returns its row, the data module and the model.
    ``evaluate=False`` fits only (no test or inference pass: the row has training figures alone)."""
    from ellm_mkd.commands.lightning_cli import cli_main

    if not Path(config).is_file():
        raise FileNotFoundError(
            f"{config}: no such config (paths are relative to the current directory; "
            "run ellm-mkd bench from the repository root)"
        )
    args = ["--config", config, f"--seed_everything={seed}"]
    if epochs is not None:
        args.append(f"--trainer.max_epochs={epochs}")
    args += [o if o.startswith("--") else f"--{o}" for o in overrides]
    t0 = now()
    with warnings.catch_warnings():  # LightningCLI warns when sys.argv (here: ``bench ...``) is not what it parses
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended.*")
        cli = cli_main(args, run=False)
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    dm.setup("fit")
    if train_limit is not None:
        dm.datasets["train"].rows = limit_training_rows(dm.datasets["train"].rows, train_limit, dm.source.split.seed)
    load_s = now() - t0
    timer = ThroughputTimer()
    trainer.callbacks.append(timer)
    name = _student_name(model, config, taken)
    log.info("bench: fitting %s (%s, seed %d, %d training pairs)", name, config, seed, len(dm.datasets["train"]))
    t0 = now()
    trainer.fit(model, datamodule=dm)
    fit_s = now() - t0
    test_total_s = predict_total_s = 0.0
    flat: dict[str, float] = {}
    if evaluate:
        t0 = now()
        trainer.test(
            model, datamodule=dm, verbose=False
        )  # the weights at the end of training (the baseline has no selection)
        test_total_s = now() - t0
        flat = dict(model.last_results["test"])
        # serving speed: the same test pairs through the predict loop (forward only, no metric bookkeeping)
        dm.predict_split = "test"
        t0 = now()
        trainer.predict(model, datamodule=dm, return_predictions=False)
        predict_total_s = now() - t0
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
        "optimizer": optimizer_description(trainer.optimizers[0]) if trainer.optimizers else None,
        "train_pairs": len(dm.datasets["train"]),
        "train_pairs_processed": timer.train_pairs,
        "optimizer_steps": trainer.global_step,
        "test_pairs": timer.test_pairs,
        "num_workers": dm.num_workers,
    }
    throughput = {"train_pairs_per_s": timer.train_pairs / max(timer.train_s, 1e-9)}
    if evaluate:
        throughput.update(
            infer_pairs_per_s=timer.predict_pairs / max(timer.predict_s, 1e-9),
            test_loop_pairs_per_s=timer.test_pairs / max(timer.test_s, 1e-9),
        )
    timings = {
        "load": load_s,
        "fit": fit_s,
        "train_batches": timer.train_s,
        "validation": timer.val_s,
        "test": test_total_s,
        "test_loop": timer.test_s,
        "predict": predict_total_s,
        "predict_loop": timer.predict_s,
    }
    row = result_row(name, "student", seed, flat, throughput, cfg, timings)
    return row, dm, model


@dataclass
class StudentsBenchOptions:
    """Options of ``ellm-mkd bench students`` (each a ``--name`` flag; ``--config FILE`` reads them from YAML).

    Args:
        configs: student LightningCLI configs (they must share data.source and its split)
        epochs: override trainer.max_epochs in every config (the baseline follows the cross-encoder's); default: the
                    configs'
        train_limit: cap the training pairs by keeping whole training queries in seeded hash order (quick runs);
                    default: all
        seed: training seed(s) (seed_everything; the split seed stays the config's); several seeds give mean rows
                    with 'seeds' and 'std'
        baseline: also train the sentence-transformers CrossEncoder
        baseline_text: what the baseline reads as the item: 'title' (the raw title, what a user would feed it) or
                    'rendered' (the students' item text, e.g. 'Title: ...')
        references: also compute the global-mean and TF-IDF rows
        override: extra LightningCLI arguments for every student config, e.g. [trainer.limit_test_batches=10]
        name: benchmark name (JSON file, markdown section)
        out_json: default: docs/results/<name>.json
        out_md: markdown file whose <name> section is replaced
        work_dir: scratch directory of the baseline trainer
        stage: full: train, test and report every model; throughput: re-time training alone (cross-encoder against
                    the baseline on the raw title and on the rendered text, --repeats rounds in rotated order) and
                    add the figures to the existing result
        throughput_pairs: training pairs of each timed run (--stage throughput)
        repeats: rounds of timed runs (--stage throughput)
    """

    configs: list[str] = field(default_factory=lambda: list(DEFAULT_STUDENT_CONFIGS))
    epochs: int | None = None
    train_limit: int | None = None
    seed: int | list[int] = 0
    baseline: bool = True
    baseline_text: Literal["title", "rendered"] = "title"
    references: bool = True
    override: list[str] = field(default_factory=lambda: [])
    name: str = "students_homedepot"
    out_json: str | None = None
    out_md: str = "docs/benchmarks.md"
    work_dir: str = "runs/benchmarks"
    stage: Literal["full", "throughput"] = "full"
    throughput_pairs: int = 3200
    repeats: int = 3


def _parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(
        prog="ellm-mkd bench",
        description="Benchmarks that write docs/results/<name>.json and a section "
        "of docs/benchmarks.md naming the exact command, machine and date.",
    )
    sub = p.add_subcommands(required=True, dest="benchmark")
    s = ArgumentParser(
        description=(
            "Train and test student configs, beside a sentence-transformers CrossEncoder with the same weights and "
            "reference rows (global mean, char TF-IDF), on one query-disjoint split. Run from the repository root."
        )
    )
    s.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    s.add_class_arguments(StudentsBenchOptions)
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
            ids = (
                sorted(r["example_id"] for r in dm.datasets["train"].rows),
                sorted(r["example_id"] for r in dm.datasets["test"].rows),
            )
            if ids_ref is None:
                ids_ref = ids
                src = dm.source
                split_info = {
                    "source": src.path,
                    "preset": src.preset,
                    "seed": src.split.seed,
                    "val_fraction": src.split.val_fraction,
                    "test_fraction": src.split.test_fraction,
                    "train_pairs": len(ids[0]),
                    "val_pairs": len(dm.datasets["val"]),
                    "test_pairs": len(ids[1]),
                    "train_limit": opts.train_limit,
                    "relevant_level": dm.relevant_level,
                    "scheme": dm.scheme.describe(),
                }
                if opts.references:
                    references = run_references(dm, src.split.seed)
            elif ids != ids_ref:
                raise ValueError(
                    f"{config}: its train/test split differs from {opts.configs[0]}'s; the benchmark "
                    "compares models on one split (same data.source and split options)"
                )
            per_model.setdefault(row["name"], []).append(row)
            if ce_cfg is None and (row["config"]["model"] == "CrossEncoderStudent" or i == len(opts.configs) - 1):
                ce_cfg, ce_dm = row["config"], dm
            del model
        if opts.baseline:
            row = run_st_baseline(ce_dm, ce_cfg, seed, work_dir, opts.baseline_text)
            per_model.setdefault(row["name"], []).append(row)
    rows = [aggregate(rs) for rs in per_model.values()] + references
    result = {**result_head(opts.name, command), "split": split_info, "rows": rows, "targets": compute_targets(rows)}
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
        raise FileNotFoundError(
            f"{out_json}: --stage throughput adds to an existing result; run the full "
            "benchmark first (or point --out_json at its result)"
        )
    if opts.repeats < 1 or opts.throughput_pairs < 1:
        raise ValueError(
            f"--repeats and --throughput_pairs must be >= 1, got {opts.repeats} and {opts.throughput_pairs}"
        )
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
                row, dm, model = run_student(
                    opts.configs[0], seed, 1, opts.throughput_pairs, no_eval, set(), evaluate=False
                )
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
        "command": command,
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "config": opts.configs[0],
        "seed": seed,
        "train_pairs": len(ref_dm.datasets["train"]),
        "precision": ref_cfg["precision"],
        "batch_size": ref_cfg["batch_size"],
        "repeats": opts.repeats,
        "orders": orders,
        "train_pairs_per_s": {k: [round(x, 2) for x in v] for k, v in figures.items()},
        "median": {k: round(v, 2) for k, v in median.items()},
    }
    result["targets"]["ce_train_throughput_rerun"] = {
        "rule": f"median cross_encoder train_pairs_per_s >= median {BASELINE_NAME} (title) train_pairs_per_s "
        "(--stage throughput)",
        "measured": {"cross_encoder": round(ce, 2), BASELINE_NAME: round(st, 2)},
        "met": bool(ce >= st),
    }
    return result


def bench_students_main(argv: list[str]) -> int:
    """``ellm-mkd bench students ...`` (the parser takes the ``students`` subcommand itself)."""
    argv = list(argv)
    parser = _parser()
    cfg = parser.parse_args(argv)
    if cfg.benchmark != "students":  # pragma: no cover (jsonargparse rejects unknown subcommands)
        raise SystemExit(f"unknown benchmark {cfg.benchmark!r}")
    opts = options(StudentsBenchOptions, cfg.students)
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
            print(
                f"{r['name']}: train {tp['train_pairs_per_s']:.1f} pairs/s, "
                f"inference {tp['infer_pairs_per_s']:.1f} pairs/s"
            )
    for key, tg in result["targets"].items():
        print(f"target {key}: {tg['rule']}: {'met' if tg['met'] else ('n/a' if tg['met'] is None else 'NOT met')}")
    print(f"\nwrote {out_json}")
    print(f"wrote {opts.out_md} (section <!-- bench:{opts.name} -->)")
    return 0
