"""``ellm-mkd bench mkd``: the MKD ablation on the embedded catalog, several seeds, both students.

One run, one machine:

1. synthesise the catalog (``--num_queries`` x ``--items_per_query``), annotate every split with the
   rules annotator, fine-tune the teacher (SmolLM2-135M + LoRA, ``--teacher_steps``) and test it
   (direct readout) on the test split (``--teacher_dir``: a teacher fine-tuned beforehand is tested instead);
2. write the teacher cache over the training split and the unlabelled pool (``--teacher_readout``: direct by
   default, the teacher's own judgement; ``forced`` reads it after each annotated chain, which only hands the
   annotations back); ``--pools`` draws, for each training query, catalog items nobody labelled, in multiples
   of the labelled pairs;
3. for each student, ablation row (``configs/mkd/<row>.yaml``), pool size and seed: fit, validate and test the
   best checkpoint; rows: ``baseline`` (labels), ``soft``, ``soft_dim``, ``full`` (+ rationale),
   ``full_augment`` (+ teacher-labelled pairs);
4. report the mean and standard deviation over seeds of every metric, overall and per query bucket,
   the teacher's own figures on the same test split, and the epoch-time overhead of each MKD row
   over the baseline (training loop only, the same training pairs: ``full_augment`` trains on more
   pairs, so its overhead is per pair; full MKD embeds the teacher's chains once before the first
   epoch, reported on its own as seconds per run), and the targets (:mod:`.mkd_report`): the teacher at least
   as good as the baselines; the compared MKD row (``--compare_row``) at its validation-chosen pool size above
   the baseline by more than its seed std (overall, tail, unseen), level metrics no worse, overhead <= 10%.
   With more than one pool size, a plot of student AUC against pool size beside the JSON.

``--source`` runs the same on a real dataset (``--preset``, ``--item_fields``, ``--relevant_level``, a
query-disjoint split; ``--limit_pairs`` subsamples whole queries per split so the teacher, its cache
and every row fit a time budget). ``--rerender`` rewrites the markdown from the result JSON.

Writes ``docs/results/<name>.json`` and the ``<name>`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ellm_mkd.commands.pipeline import REPO

from .common import atomic_write_text, machine_description, options, options_parser, publish, result_head
from .mkd_pools import augment_args, catalog_pool_files, file_pool_files, source_pool_files
from .mkd_pools import calibration as fit_calibration
from .mkd_report import markdown_section, pool_plot, seed_std, targets

log = logging.getLogger(__name__)
ROWS = ("baseline", "soft", "soft_dim", "full", "full_augment")
STUDENTS = ("cross_encoder", "two_tower")
READOUTS = ("direct", "cot", "forced")
SUMMARY_METRICS = ("auc", "ndcg10", "macro_f1", "rmse", "spearman", "ece")


@dataclass
class MkdBenchOptions:
    """Options of ``ellm-mkd bench mkd`` (each a ``--name`` flag; ``--config FILE`` reads them from YAML).

    Args:
        work_dir: default runs/benchmarks/<name>
        num_queries: catalog size (queries)
        items_per_query: catalog items per query
        source: a real dataset instead of the catalog (e.g. ../shared/data/homedepot/train.csv.zip)
        preset: its column preset (e.g. homedepot)
        item_fields: item fields (catalog default: title, brand, color, attributes)
        relevant_level: lowest level counted relevant by AUC
        split_seed: seed of the query-disjoint split of --source
        val_fraction: share of queries in validation (the catalog's or --source's)
        test_fraction: share of queries in test (the catalog's or --source's)
        limit_pairs: at most this many pairs per split, whole queries (e.g. {train: 3000, val: 500, test: 2000})
        resume: reuse the teacher, cache and finished student runs stored under <work_dir>/bench_state by an earlier
                    run with the same settings (a stopped benchmark goes on where it stopped)
        rerender: rewrite the markdown section (and targets) from the existing result JSON; runs nothing
        teacher_model: teacher base model
        teacher_dir: a teacher fine-tuned beforehand (``ellm-mkd fit`` of a teacher config): its LoRA ``adapter/``
                    directory (on teacher_model) or a whole model such as the ``merged/`` directory a full fine-tune
                    writes; the benchmark tests it and caches its judgement instead of fine-tuning one
        teacher_how: how teacher_dir was made (the exact command), printed in the report
        teacher_readout: what the cache holds: direct (the teacher's level distribution, one pass per pair), cot
                    (a chain the teacher writes, then its distributions) or forced (after the annotator's chain,
                    which hands the annotations back)
        teacher_calibration: fit a temperature for the teacher's level distributions on the validation split
                    (``CachedTeacher(temperature: fit)``; the cache then covers every split) and distil the
                    calibrated distributions; the fit is reported. ``bias``: a bias per level as well
                    (``level_bias: fit``), for a teacher that says a level too seldom on the labelled pairs;
                    ``auto``: the biases only where cross-validation over the validation queries keeps them
                    (``level_bias: auto``)
        student_calibration: every student (baseline and MKD rows alike) fits the temperature of its level logits
                    on the validation split (``--model.init_args.temperature_scaling true``); test figures are then
                    those of the calibrated probabilities. ``bias``: a bias per level as well
                    (``--model.init_args.calibration_bias true``), for pools whose level mix is not the labelled one
        pools: unlabelled pools the teacher labels, in multiples of the labelled training pairs: every MKD row
                    but full_augment runs once per pool size, the baseline once. Catalog: more catalog items per
                    training query; --source: more training queries (needs limit_pairs.train), their labels dropped
        pool_after: --source pools start after this many training pairs in the seeded query order limit_pairs
                    takes them in (default: right after the labelled ones); give the number of training pairs a
                    teacher_dir was fine-tuned on to keep the pools out of the teacher's training data
        pool_source: pools from this file (or example directory) of pairs of further queries, e.g. logged queries
                    with candidate items, instead of the catalog's items or --source's queries: whole queries in a
                    seeded order, less the benchmark's own queries (every split) and pool_exclude's, labels dropped
        pool_exclude: data whose queries stay out of a pool_source pool (e.g. what teacher_dir was fine-tuned on)
        compare_row: the MKD row held against the baseline in the targets, at its pool size with the best
                    validation AUC
        select_tolerance: pool sizes whose mean validation AUC is within this of the best are level with it: of
                    those, the one with the lowest mean validation ECE is held against the baseline (with
                    student_calibration: the ECE after a calibration fitted on other validation queries)
        encoder: student encoder
        teacher_steps: teacher LoRA steps
        teacher_batch: teacher examples per step
        teacher_eval: pairs per teacher readout batch
        students: student kinds (cross_encoder, two_tower)
        rows: ablation rows (configs/mkd/<row>.yaml)
        seeds: student training seeds
        epochs: student epochs
        train_batches: cap on student training batches per epoch
        keep_checkpoints: keep each student run's checkpoint (about 270 MB for MiniLM with its optimizer state; 30
                    runs by default); the benchmark needs only the test figures, stored under <work_dir>/bench_state
        seed: catalog and teacher seed
        name: benchmark name (the JSON file and the markdown section)
        out_json: default docs/results/<name>.json
        out_md: markdown file whose <name> section is replaced
    """

    work_dir: str | None = None
    num_queries: int = 120
    items_per_query: int = 8
    source: str | None = None
    preset: str | None = None
    item_fields: list[str] | None = None
    relevant_level: int | None = None
    split_seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    limit_pairs: dict[str, int] | None = None
    resume: bool = True
    rerender: bool = False
    teacher_model: str = "smollm2-135m-instruct"
    teacher_dir: str | None = None
    teacher_how: str | None = None
    teacher_readout: str = "direct"
    teacher_calibration: bool | Literal["bias", "auto"] = False
    student_calibration: bool | Literal["bias"] = False
    pools: list[int] = field(default_factory=lambda: [0])
    pool_after: int | None = None
    pool_source: str | None = None
    pool_exclude: list[str] = field(default_factory=list)
    compare_row: str = "full"
    select_tolerance: float = 0.0
    encoder: str = "minilm-l6"
    teacher_steps: int = 96
    teacher_batch: int = 8
    teacher_eval: int = 32
    students: list[str] = field(default_factory=lambda: list(STUDENTS))
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 2
    train_batches: int | None = None
    keep_checkpoints: bool = False
    seed: int = 0
    name: str = "mkd_catalog"
    out_json: str | None = None
    out_md: str = "docs/benchmarks.md"


def _parser():
    return options_parser(MkdBenchOptions, "ellm-mkd bench mkd", __doc__.split("\n\n")[0])


def _data_options(opts, out: Path) -> dict[str, Any]:
    """RelevanceDataModule options for the catalog under ``out`` or for ``--source``."""
    if opts.source is None:
        source: dict[str, Any] = {"path": str(out / "data")}
    else:
        source = {
            "path": opts.source,
            "split": {"seed": opts.split_seed, "val_fraction": opts.val_fraction, "test_fraction": opts.test_fraction},
        }
        if opts.preset:
            source["preset"] = opts.preset
    data: dict[str, Any] = {
        "source": source,
        "item_fields": list(opts.item_fields or ["title", "brand", "color", "attributes"]),
    }
    if opts.relevant_level is not None:
        data["relevant_level"] = opts.relevant_level
    if opts.limit_pairs:
        data["limit_pairs"] = dict(opts.limit_pairs)
    return data


def _cli_args(data: dict[str, Any]) -> list[str]:
    """The same options as ``ellm-mkd fit`` arguments."""
    args = ["--data.source.path", data["source"]["path"]]
    if "preset" in data["source"]:
        args += ["--data.source.preset", data["source"]["preset"]]
    for k, v in data["source"].get("split", {}).items():
        args += [f"--data.source.split.{k}", str(v)]
    args += ["--data.item_fields", "[" + ",".join(data["item_fields"]) + "]"]
    if "relevant_level" in data:
        args += ["--data.relevant_level", str(data["relevant_level"])]
    if "limit_pairs" in data:
        args += ["--data.limit_pairs", "{" + ", ".join(f"{k}: {v}" for k, v in data["limit_pairs"].items()) + "}"]
    return args


def _describe(data: dict[str, Any], opts) -> dict[str, Any]:
    return {
        "source": "embedded catalog" if opts.source is None else opts.source,
        "preset": opts.preset,
        "split": data["source"].get("split"),
        "item_fields": data["item_fields"],
        "relevant_level": data.get("relevant_level"),
        "limit_pairs": data.get("limit_pairs"),
    }


#: the validation figures a row keeps (the pool size is chosen on them)
VAL_KEYS = ("auc", "ndcg10", "ece", "macro_f1", "rmse", "ece_calibrated_cv")
TEACHER_KEYS = ("teacher_model", "teacher_steps", "teacher_batch", "teacher_eval", "teacher_dir", "teacher_readout")


def _fingerprint(opts, data: dict[str, Any], teacher: bool = True, student: bool = False, biased: bool = False) -> str:
    """What a stored teacher, cache (``student`` False) or student run depends on (rows, seeds and students are
    chosen per run; a baseline run does not depend on the teacher). ``--teacher_calibration auto`` counts as what it
    chose (``biased``: level biases kept), so its runs are those of ``true`` or ``bias`` on the same cache."""
    keys = ("num_queries", "items_per_query", "val_fraction", "test_fraction", "encoder", "epochs", "train_batches")
    keys += ("seed",) + (TEACHER_KEYS if teacher else ())
    extra = {"max_pool": max(opts.pools)} if teacher and max(opts.pools) > 0 else {}
    if teacher and opts.teacher_calibration:  # the cache is the same with or without biases; the runs are not
        chosen = ("bias" if biased else True) if opts.teacher_calibration == "auto" else opts.teacher_calibration
        extra["teacher_calibration"] = chosen if student else True
    if teacher and opts.pool_after is not None and max(opts.pools) > 0:
        extra["pool_after"] = opts.pool_after
    if teacher and opts.pool_source is not None and max(opts.pools) > 0:
        extra["pool_source"] = [opts.pool_source, *opts.pool_exclude]
    if student and opts.student_calibration:
        extra["student_calibration"] = opts.student_calibration
    return json.dumps({"data": data, **extra, **{k: getattr(opts, k) for k in keys}}, sort_keys=True, default=str)


def _load_state(path: Path, *fingerprints: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = json.loads(path.read_text(encoding="utf-8"))
    return state if state.get("fingerprint") in fingerprints else None


def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(state, indent=2, default=str) + "\n")


def _drop_checkpoints(run: dict[str, Any]) -> None:
    """Remove a finished student run's checkpoint directory (its test figures are already in ``run``)."""
    best = Path(run.pop("checkpoint") or "")
    if best.parent.name == "checkpoints":
        shutil.rmtree(best.parent, ignore_errors=True)


def bench_mkd(opts, command: str) -> dict[str, Any]:
    from datamodules.datamodule import RelevanceDataModule
    from datamodules.synth import SynthConfig, write
    from ellm_mkd.annotation import run_annotation
    from ellm_mkd.commands.pipeline import (
        CONFIG_DIR,
        fit_teacher,
        release_memory,
        teacher_model_args,
        test_teacher,
        train_student,
        write_cache,
    )

    unknown = (set(opts.rows) - set(ROWS)) | (set(opts.students) - set(STUDENTS))
    if unknown:
        raise ValueError(f"unknown rows or students {sorted(unknown)}; rows: {list(ROWS)}, students: {list(STUDENTS)}")
    if opts.teacher_readout not in READOUTS:
        raise ValueError(f"teacher_readout must be one of {list(READOUTS)}, got {opts.teacher_readout!r}")
    pools = sorted(set(opts.pools))
    if pools[0] < 0:
        raise ValueError(f"pools are multiples of the labelled training pairs (>= 0), got {opts.pools}")
    out = Path(opts.work_dir or f"runs/benchmarks/{opts.name}")
    plan = {
        "synth": {
            "num_queries": opts.num_queries,
            "items_per_query": opts.items_per_query,
            "val_fraction": opts.val_fraction,
            "test_fraction": opts.test_fraction,
        },
        "teacher_config": REPO / "configs" / "benchmarks" / "mkd_teacher.yaml",  # SmolLM2 + LoRA, teacher_steps
        "teacher_steps": opts.teacher_steps,
        "teacher_batch": opts.teacher_batch,
        "teacher_eval": opts.teacher_eval,
        "cache_batches": None,
        "teacher_test_batches": None,
        "epochs": opts.epochs,
        "train_batches": opts.train_batches,
    }
    t0 = time.time()
    data = _data_options(opts, out)
    if opts.source is not None:
        plan["data_args"] = _cli_args(data)
    state = out / "bench_state"
    fingerprint = _fingerprint(opts, data)
    setup = _load_state(state / "setup.json", fingerprint) if opts.resume else None
    if setup is None:  # runs stored under other settings are not read (their fingerprints differ)
        (state / "setup.json").unlink(missing_ok=True)
        if opts.source is None:
            pool_items = pools[-1] * opts.items_per_query if opts.pool_source is None else 0
            write(out / "data", SynthConfig(seed=opts.seed, **plan["synth"], pool_items_per_query=pool_items), True)
        dm = RelevanceDataModule(**data)
        run_annotation(
            dm, out / "annotations", "rules", splits=["train", "val", "test"], overwrite=True, progress=False
        )
        dm.setup("fit")
        sizes = {split: len(dm.datasets[split]) for split in ("train", "val", "test")}
        if opts.teacher_dir is None:
            tm = ["--model.init_args.model", opts.teacher_model]
            teacher = fit_teacher(out, plan, ["--seed_everything", str(opts.seed), *tm], predictions=False)
            model_args = teacher_model_args(opts.teacher_model, teacher["adapter"])
        else:  # fine-tuned beforehand: test it on this split
            model_args = teacher_model_args(opts.teacher_model, opts.teacher_dir)
            teacher = {"test": test_teacher(out, plan, model_args), "adapter": None, "fit_seconds": None}
        augment = []
        if pools[-1] > 0:  # the cache covers the largest pool (a superset serves every pool size)
            if opts.pool_source is not None:
                source = (opts.pool_source, opts.pool_exclude, opts.seed)
                files = file_pool_files(out, data, dm.table, pools, len(dm.datasets["train"]), *source)
            elif opts.source is None:
                files = catalog_pool_files(out, pools, opts.items_per_query)
            else:
                labelled = {r["example_id"] for r in dm.datasets["train"].rows}
                files = source_pool_files(out, data, pools, labelled, opts.pool_after)
            augment = augment_args(files[pools[-1]])
        elif "full_augment" in opts.rows:  # the cache covers the sampled pairs too (a superset serves every row)
            aug = yaml.safe_load((REPO / "configs" / "mkd" / "full_augment.yaml").read_text())["data"]["augment"]
            augment = [f"--data.augment.{k}={v}" for k, v in aug.items()]
        every_split = ["--data.predict_split", "all"] if opts.teacher_calibration else []
        cache = write_cache(out, plan, model_args, opts.teacher_readout, [*augment, *every_split])
        setup = {
            "fingerprint": fingerprint,
            "sizes": sizes,
            "cache": cache,
            "machine": machine_description(),
            "teacher": {"test": teacher["test"], "adapter": teacher["adapter"], "fit_seconds": teacher["fit_seconds"]},
            "with_augment": bool(augment),
            "seconds": round(time.time() - t0, 1),
        }
        _save_state(state / "setup.json", setup)
    elif "full_augment" in opts.rows and not setup["with_augment"]:
        raise ValueError(
            f"{state}: its teacher cache has no augmented pairs, which the full_augment row needs; "
            "run with --resume false"
        )
    else:
        log.info("resuming: teacher and cache from %s", state)
    if opts.teacher_calibration:  # fitted on every run (seconds): a resumed cache may be calibrated another way now
        level_bias = {"bias": "fit", "auto": "auto"}.get(opts.teacher_calibration)
        calibration = fit_calibration(data, setup["cache"]["path"], level_bias)
        if calibration != setup.get("calibration"):
            setup["calibration"] = calibration
            _save_state(state / "setup.json", setup)
    sizes, cache, teacher = setup["sizes"], setup["cache"], setup["teacher"]
    pool_files = {p: str(out / "data" / f"pool_{p}x.parquet") for p in pools if p > 0}

    runs: dict[str, dict[tuple[str, int], list[dict[str, Any]]]] = {}
    machines = {setup["machine"]}
    biased = (setup.get("calibration") or {}).get("bias") is not None  # what --teacher_calibration auto chose
    resumed = 0
    for kind in opts.students:
        for row in opts.rows:
            for pool in pools if row not in ("baseline", "full_augment") else [0]:
                for seed in opts.seeds:
                    name = f"{kind}_{row}" + (f"_pool{pool}x" if pool else "") + f"_s{seed}"
                    own = _fingerprint(opts, data, teacher=row != "baseline", student=True, biased=biased)
                    # a run stored under the setup's fingerprint is one of the same settings, unless the students
                    # now calibrate (that is not in the setup's fingerprint)
                    also = () if opts.student_calibration else (fingerprint,)
                    r = _load_state(state / "runs" / f"{name}.json", own, *also) if opts.resume else None
                    if r is None:
                        extra = ["--seed_everything", str(seed), "--model.init_args.encoder", opts.encoder]
                        # explicit either way: what a student config says does not change the row
                        extra += ["--model.init_args.temperature_scaling", str(bool(opts.student_calibration)).lower()]
                        extra += ["--model.init_args.calibration_bias", str(opts.student_calibration == "bias").lower()]
                        if row != "baseline":
                            extra += ["--data.teacher.init_args.cache_dir", cache["path"]]
                            if opts.teacher_calibration:  # T (and b) fitted once, on the validation split
                                t_fit = repr(setup["calibration"]["temperature"])
                                extra += ["--data.teacher.init_args.temperature", t_fit]
                                if setup["calibration"].get("bias") is not None:
                                    b_fit = json.dumps(setup["calibration"]["bias"])
                                    extra += ["--data.teacher.init_args.level_bias", b_fit]
                        if pool:
                            extra += augment_args(pool_files[pool])
                        r = train_student(
                            out,
                            CONFIG_DIR / f"{kind}.yaml",
                            name,
                            plan,
                            [REPO / "configs" / "mkd" / f"{row}.yaml"],
                            extra,
                            predictions=False,
                        )
                        r = {
                            **{k: v for k, v in r.items() if k != "predictions"},
                            "fingerprint": own,
                            "machine": machine_description(),
                        }
                        release_memory()  # this run's CLI, model and trainer: not kept into the next run
                        if not opts.keep_checkpoints:
                            _drop_checkpoints(r)
                        _save_state(state / "runs" / f"{name}.json", r)
                    else:
                        resumed += 1
                    machines.add(r["machine"])
                    runs.setdefault(kind, {}).setdefault((row, pool), []).append(r)

    rows_out = []
    for kind, by_row in runs.items():
        base = by_row.get(("baseline", 0))
        base_epoch = (
            statistics.fmean(r["train_loop_seconds_per_epoch"] / max(r["train_pairs"], 1) for r in base)
            if base
            else None
        )
        for (row, pool), rs in by_row.items():
            keys = sorted({k for r in rs for k in r["test"]})
            per_pair = statistics.fmean(r["train_loop_seconds_per_epoch"] / max(r["train_pairs"], 1) for r in rs)
            rows_out.append(
                {
                    "student": kind,
                    "row": row,
                    "pool": pool,
                    "seeds": list(opts.seeds),
                    "train_pairs": statistics.fmean(r["train_pairs"] / max(opts.epochs, 1) for r in rs),
                    "metrics": {k: seed_std([r["test"].get(k) for r in rs]) for k in keys},
                    # validation reads the raw logits (a student's fitted temperature and biases apply after it)
                    "val_metrics": {k: seed_std([(r.get("val") or {}).get(k) for r in rs]) for k in VAL_KEYS},
                    "train_loop_seconds_per_epoch": seed_std([r["train_loop_seconds_per_epoch"] for r in rs]),
                    "epoch_overhead_vs_baseline": None if base_epoch is None else per_pair / base_epoch - 1.0,
                    # once per run, before the first epoch (full MKD's chains through the frozen encoder)
                    "chain_embedding_seconds": seed_std([r.get("chain_embedding_seconds") for r in rs]),
                }
            )
    return {
        **result_head(opts.name, command),
        "setup": {
            "data": _describe(data, opts),
            "split_pairs": sizes,
            "catalog": plan["synth"] if opts.source is None else None,
            "teacher": {
                "model": opts.teacher_model,
                "dir": opts.teacher_dir,
                "how": opts.teacher_how,
                "steps": None if opts.teacher_dir else opts.teacher_steps,
                "batch": opts.teacher_batch,
                "fit_seconds": teacher["fit_seconds"],
                "readout_for_cache": cache.get("readout", "forced"),
                "calibration": setup.get("calibration"),
            },
            "cache_rows": cache["rows"],
            "cache_seconds": cache["seconds"],
            "pools": pools,
            "pool_after": opts.pool_after if opts.source is not None and pools[-1] > 0 else None,
            "pool_source": opts.pool_source if pools[-1] > 0 else None,
            "compare_row": opts.compare_row,
            "select_tolerance": opts.select_tolerance,
            "student_epochs": opts.epochs,
            "student_calibration": opts.student_calibration,
            "train_batches": opts.train_batches,
            "setup_seconds": setup["seconds"],
            "this_run_seconds": round(time.time() - t0, 1),
            "resumed_runs": resumed,
            "machines": sorted(machines),
        },
        "teacher": {k: v for k, v in teacher["test"].items()},
        "rows": rows_out,
    }


def bench_mkd_main(argv: list[str]) -> int:
    import json

    opts = options(MkdBenchOptions, _parser().parse_args(argv))
    if opts.rerender:
        path = Path(opts.out_json or f"docs/results/{opts.name}.json")
        result = json.loads(path.read_text(encoding="utf-8"))
    else:
        result = bench_mkd(opts, "ellm-mkd bench mkd " + shlex.join(argv))
    result["targets"] = targets(result)
    out_json = Path(opts.out_json or f"docs/results/{opts.name}.json")
    png = pool_plot(result, out_json.with_name(f"{out_json.stem}_pools.png"))
    rel = None if png is None else os.path.relpath(png, Path(opts.out_md).parent)
    publish(result, opts, markdown_section(result, rel))
    return 0
