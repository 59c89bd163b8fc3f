"""``ellm-mkd bench students`` end to end on the synthetic catalog and a tiny random encoder.

The student configs are the real benchmark configs with the data, encoder and output directories
pointed at test fixtures, so the benchmark's own YAML is exercised too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from ellm_mkd.commands.bench import bench_main
from ellm_mkd.commands.bench.common import limit_training_rows, update_markdown

REPO = Path(__file__).resolve().parent.parent
BENCH_CONFIGS = ("homedepot_cross_encoder", "homedepot_two_tower")


def _tiny_configs(tmp_path: Path, synth_dir: Path, encoder: str) -> list[str]:
    out = []
    for name in BENCH_CONFIGS:
        cfg = yaml.safe_load((REPO / "configs" / "benchmarks" / f"{name}.yaml").read_text())
        cfg["data"]["source"] = {"path": str(synth_dir)}
        cfg["data"]["batch_size"] = 16
        args = cfg["model"]["init_args"]
        args.update(encoder=encoder, log_figures=False)
        if "scorer_hidden" in args:
            args["scorer_hidden"] = 32
        root = str(tmp_path / "runs" / name)
        cfg["trainer"].update(default_root_dir=root, enable_progress_bar=False, enable_model_summary=False)
        cfg["trainer"]["logger"]["init_args"]["save_dir"] = root
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out.append(str(path))
    return out


def _finite_numbers(d) -> bool:
    return all(
        (v is None and k == "spearman") or (isinstance(v, (int, float)) and math.isfinite(v)) for k, v in d.items()
    )


@pytest.mark.slow
def test_bench_students_end_to_end(tmp_path, synth_dir, tiny_encoder, capsys):
    configs = _tiny_configs(tmp_path, synth_dir, tiny_encoder)
    out_json, out_md = tmp_path / "results" / "first.json", tmp_path / "benchmarks.md"
    common = [
        "--configs",
        json.dumps(configs),
        "--train_limit",
        "240",
        "--out_md",
        str(out_md),
        "--work_dir",
        str(tmp_path / "work"),
    ]
    assert bench_main(["students", *common, "--name", "first", "--out_json", str(out_json)]) == 0

    res = json.loads(out_json.read_text())
    assert {"benchmark", "command", "machine", "date", "rows", "targets"} <= set(res)
    assert res["benchmark"] == "first" and res["command"].startswith("ellm-mkd bench students --configs")
    assert "cores" in res["machine"] and "torch" in res["machine"] and len(res["date"]) == 10
    names = [r["name"] for r in res["rows"]]
    assert names == ["cross_encoder", "two_tower", "st_cross_encoder", "global_mean", "tfidf_char_3_5"]
    split = res["split"]
    assert 0 < split["train_pairs"] <= 240 and split["test_pairs"] > 0
    for r in res["rows"]:
        assert {"name", "seed", "metrics", "by_bucket", "config"} <= set(r), r["name"]
        assert r["seed"] == 0
        assert _finite_numbers(r["metrics"]) and r["metrics"]["rmse"] >= 0, r
        assert r["by_bucket"] and set(r["by_bucket"]) <= {"head", "torso", "tail", "unseen"}
        for b in r["by_bucket"].values():
            assert b["count"] > 0 and _finite_numbers(b)
        assert r["config"]["train_pairs"] == split["train_pairs"] and r["config"]["test_pairs"] == split["test_pairs"]
        if r["kind"] == "reference":
            assert "throughput" not in r
        else:
            tp = r["throughput"]
            assert tp["train_pairs_per_s"] > 0 and tp["infer_pairs_per_s"] > 0
            assert {"rmse", "auc", "spearman", "ndcg10", "macro_f1"} <= set(r["metrics"])
            assert r["config"]["epochs"] == 1 and r["config"]["max_seq_length"] == 64
    rows = {r["name"]: r for r in res["rows"]}
    assert "ece" in rows["cross_encoder"]["metrics"] and "ece" not in rows["st_cross_encoder"]["metrics"]
    assert set(rows["global_mean"]["metrics"]) == {"rmse"}
    assert rows["cross_encoder"]["config"]["train_pairs_processed"] == split["train_pairs"]
    assert rows["st_cross_encoder"]["config"]["optimizer_steps"] == math.ceil(split["train_pairs"] / 16)
    assert rows["cross_encoder"]["throughput"]["test_loop_pairs_per_s"] > 0
    assert rows["cross_encoder"]["config"]["optimizer"].startswith("AdamW")
    assert set(res["targets"]) == {
        "ce_rmse_matches_baseline",
        "ce_auc_matches_baseline",
        "ce_train_throughput",
        "two_tower_auc_within_3_points",
    }
    assert all(isinstance(t["met"], bool) for t in res["targets"].values())

    md = out_md.read_text()
    assert "<!-- bench:first -->" in md and "<!-- /bench:first -->" in md and res["command"] in md
    printed = capsys.readouterr().out
    assert "st_cross_encoder" in printed and str(out_json) in printed

    # a second benchmark keeps the first one's section; rerunning the first replaces it in place
    assert (
        bench_main(
            [
                "students",
                *common,
                "--name",
                "second",
                "--baseline",
                "false",
                "--references",
                "false",
                "--configs",
                json.dumps(configs[:1]),
                "--seed",
                "[0, 1]",
                "--out_json",
                str(tmp_path / "results" / "second.json"),
            ]
        )
        == 0
    )
    md2 = out_md.read_text()
    assert md2.count("<!-- bench:first -->") == 1 and md2.count("<!-- bench:second -->") == 1
    first_section = md[md.index("<!-- bench:first -->") : md.index("<!-- /bench:first -->")]
    assert first_section in md2
    second = json.loads((tmp_path / "results" / "second.json").read_text())
    assert [r["name"] for r in second["rows"]] == ["cross_encoder"]
    row = second["rows"][0]  # two seeds: mean figures, the seeds, and their standard deviation
    assert row["seeds"] == [0, 1] and set(row["metrics"]) <= set(row["std"]) and "train_pairs_per_s" in row["std"]
    assert row["metrics"]["rmse"] != rows["cross_encoder"]["metrics"]["rmse"]  # seed 1 trained differently
    assert second["targets"]["ce_auc_matches_baseline"]["met"] is None

    # --stage throughput re-times training alone and adds to the result; the measured rows stay
    assert (
        bench_main(
            [
                "students",
                *common,
                "--name",
                "first",
                "--out_json",
                str(out_json),
                "--stage",
                "throughput",
                "--throughput_pairs",
                "120",
                "--repeats",
                "2",
            ]
        )
        == 0
    )
    res_t = json.loads(out_json.read_text())
    assert res_t["rows"] == res["rows"]
    run = res_t["throughput_run"]
    assert run["orders"][0][0] == "cross_encoder" and run["orders"][0] != run["orders"][1]
    assert 0 < run["train_pairs"] <= 120 and run["train_pairs"] < split["train_pairs"]
    assert set(run["train_pairs_per_s"]) == {"cross_encoder", "st_cross_encoder (title)", "st_cross_encoder (rendered)"}
    for name, figures in run["train_pairs_per_s"].items():
        assert len(figures) == 2 and all(x > 0 for x in figures), name
        assert run["median"][name] == pytest.approx(sum(figures) / 2, abs=0.01)
    tg = res_t["targets"]["ce_train_throughput_rerun"]
    assert tg["met"] == (run["median"]["cross_encoder"] >= run["median"]["st_cross_encoder (title)"])
    md_t = out_md.read_text()
    assert "Training throughput, re-timed" in md_t and run["command"] in md_t
    assert "median" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="existing result"):
        bench_main(
            [
                "students",
                *common,
                "--name",
                "nothing",
                "--out_json",
                str(tmp_path / "none.json"),
                "--stage",
                "throughput",
            ]
        )


def test_pool_size_is_chosen_on_validation_auc_then_ece_within_the_tolerance():
    from ellm_mkd.commands.bench.mkd_report import chosen_rows

    def row(pool, auc, ece):
        return {
            "student": "two_tower",
            "row": "soft",
            "pool": pool,
            "val_metrics": {"auc": {"mean": auc}, "ece": {"mean": ece}},
        }

    rows = [row(0, 0.950, 0.05), row(2, 0.9564, 0.070), row(4, 0.9555, 0.059), {**row(0, 0.99, 0.0), "row": "baseline"}]
    pick = {
        tol: chosen_rows({"setup": {"compare_row": "soft", "select_tolerance": tol}, "rows": rows})
        for tol in (0, 0.002, 0.01)
    }
    assert pick[0]["two_tower"]["pool"] == 2  # the best validation AUC alone
    assert pick[0.002]["two_tower"]["pool"] == 4  # 4x is level on AUC and has the lower ECE
    assert pick[0.01]["two_tower"]["pool"] == 0  # a wide tolerance: the lowest ECE of all three
    assert chosen_rows({"setup": {"compare_row": "soft"}, "rows": rows})["two_tower"]["pool"] == 2  # default 0
    # students that calibrate: the ECE after calibration on other validation queries decides, where every row has it
    cv = [{**r, "val_metrics": {**r["val_metrics"], "ece_calibrated_cv": {"mean": c}}} for r, c in zip(rows, (0, 1, 2))]
    setup = {"compare_row": "soft", "select_tolerance": 0.002}
    cv[1]["val_metrics"]["ece_calibrated_cv"]["mean"] = 0.03
    cv[2]["val_metrics"]["ece_calibrated_cv"]["mean"] = 0.04
    assert chosen_rows({"setup": setup, "rows": cv})["two_tower"]["pool"] == 2  # raw ECE would pick 4x
    cv[1]["val_metrics"]["ece_calibrated_cv"] = None  # one row without it (an older run): the raw ECE for all
    assert chosen_rows({"setup": setup, "rows": cv})["two_tower"]["pool"] == 4


def test_update_markdown_replaces_only_its_section(tmp_path):
    md = tmp_path / "b.md"
    update_markdown(md, "a", "<!-- bench:a -->\nA1\n<!-- /bench:a -->")
    update_markdown(md, "b", "<!-- bench:b -->\nB1\n<!-- /bench:b -->")
    update_markdown(md, "a", "<!-- bench:a -->\nA2\n<!-- /bench:a -->")
    text = md.read_text()
    assert text.startswith("# Benchmarks") and "A2" in text and "A1" not in text and "B1" in text
    assert text.index("A2") < text.index("B1")


def test_train_limit_keeps_whole_queries_in_hash_order():
    rows = [{"query": f"q{i % 7}", "example_id": str(i)} for i in range(70)]  # 7 queries x 10 pairs
    kept = limit_training_rows(rows, 35, seed=0)
    assert len(kept) == 30 and len({r["query"] for r in kept}) == 3
    assert kept == limit_training_rows(rows, 35, seed=0)  # deterministic
    with pytest.raises(ValueError):
        limit_training_rows(rows, 5, seed=0)


@pytest.mark.slow
@pytest.mark.integration
def test_bench_cache_end_to_end(tmp_path, tiny_llama):
    out_json, out_md = tmp_path / "cache.json", tmp_path / "benchmarks.md"
    assert (
        bench_main(
            [
                "cache",
                "--model",
                tiny_llama,
                "--adapter",
                str(tmp_path / "none"),
                "--work_dir",
                str(tmp_path / "work"),
                "--num_queries",
                "16",
                "--cot_pairs",
                "8",
                "--cot_batch_size",
                "4",
                "--repeats",
                "1",
                "--precision",
                "32-true",
                "--out_json",
                str(out_json),
                "--out_md",
                str(out_md),
            ]
        )
        == 0
    )
    res = json.loads(out_json.read_text())
    direct, cot = res["writes"]
    assert direct["mode"] == "direct" and direct["rows"] > 100 and direct["pairs_per_s"] > 0
    assert cot["mode"] == "cot" and cot["rows"] == 8 and cot["bytes_per_example"] > direct["bytes_per_example"]
    se = res["student_epoch"]
    assert se["runs"]["with"][0]["pairs"] == se["runs"]["without"][0]["pairs"] > 0
    assert res["targets"]["join_overhead_le_10pct"]["value"] == se["overhead"]
    assert "<!-- bench:cache -->" in out_md.read_text() and res["command"] in out_md.read_text()


@pytest.mark.integration
def test_bench_teacher_end_to_end(tmp_path, tiny_llama):
    out_json, out_md = tmp_path / "teacher.json", tmp_path / "benchmarks.md"
    assert (
        bench_main(
            [
                "teacher",
                "--model",
                tiny_llama,
                "--work_dir",
                str(tmp_path / "work"),
                "--num_queries",
                "20",
                "--steps",
                "2",
                "--batch_size",
                "4",
                "--eval_pairs",
                "8",
                "--eval_batch_size",
                "4",
                "--naive_pairs",
                "2",
                "--max_new_tokens",
                "8",
                "--precision",
                "32-true",
                "--out_json",
                str(out_json),
                "--out_md",
                str(out_md),
            ]
        )
        == 0
    )
    res = json.loads(out_json.read_text())
    assert [r["name"] for r in res["rows"]] == ["zero_shot_direct", "zero_shot_cot", "lora_direct", "lora_cot"]
    assert res["setup"]["precision"] == "32-true" and res["setup"]["steps"] == 2
    tp = res["throughput"]
    assert tp["direct_pairs_per_s"] > 0 and tp["naive_pairs_per_s"] > 0
    assert res["targets"]["cot_batched_ge_5x_naive"]["value"] == tp["cot_batched_over_naive"]
    assert "<!-- bench:teacher -->" in out_md.read_text()
    # the readout speed again, from the adapter the run trained, into the same result
    assert (
        bench_main(
            [
                "teacher",
                "--stage",
                "throughput",
                "--work_dir",
                str(tmp_path / "work"),
                "--eval_pairs",
                "8",
                "--naive_pairs",
                "1",
                "--precision",
                "32-true",
                "--out_json",
                str(out_json),
                "--out_md",
                str(out_md),
            ]
        )
        == 0
    )
    again = json.loads(out_json.read_text())
    assert again["rows"] == res["rows"] and again["setup"] == res["setup"]
    assert again["throughput_run"]["adapter"] == str(tmp_path / "work" / "teacher" / "adapter")
    assert again["throughput_run"]["eval_batch_size"] == 32 and "(batch 32," in out_md.read_text()
    assert again["throughput"]["naive_static_cache_pairs_per_s"] > 0
    # cot batched with and without stopping broken chains: the same failures and distributions
    t2 = again["throughput"]
    assert t2["cot_batched_whole_chains_pairs_per_s"] > 0
    assert t2["cot_batched_parse_failures"] == t2["cot_batched_whole_chains_parse_failures"]
    assert t2["cot_batched_generated_tokens"] <= t2["cot_batched_whole_chains_generated_tokens"]
    assert t2["cot_stop_max_level_prob_difference"] < 1e-4 and "every chain written to its end" in out_md.read_text()
    assert again["targets"]["cot_batched_ge_5x_naive"]["value"] == again["throughput"]["cot_batched_over_naive"]
    assert "Throughput measured by a later run" in out_md.read_text()
    with pytest.raises(ValueError, match="8 pairs"):
        bench_main(
            [
                "teacher",
                "--stage",
                "throughput",
                "--work_dir",
                str(tmp_path / "work"),
                "--eval_pairs",
                "6",
                "--out_json",
                str(out_json),
                "--out_md",
                str(out_md),
            ]
        )


@pytest.mark.slow
@pytest.mark.integration
def test_bench_mkd_end_to_end(tmp_path, tiny_llama, tiny_encoder):
    """The ablation pipeline on tiny models: teacher, cache with augmented pairs, rows x seeds, aggregation."""
    out_json, out_md = tmp_path / "mkd.json", tmp_path / "benchmarks.md"
    common = ["mkd", "--teacher_model", tiny_llama, "--encoder", tiny_encoder, "--work_dir", str(tmp_path / "work")]
    common += ["--num_queries", "24", "--items_per_query", "5", "--teacher_steps", "1", "--teacher_batch", "2"]
    common += ["--teacher_eval", "16", "--teacher_readout", "forced", "--seeds", "[0,1]"]
    common += ["--students", "[cross_encoder]", "--epochs", "1", "--train_batches", "2"]
    out = ["--out_json", str(out_json), "--out_md", str(out_md)]
    assert bench_main([*common, "--rows", "[baseline,full,full_augment]", *out]) == 0
    res = json.loads(out_json.read_text())
    assert [(r["student"], r["row"]) for r in res["rows"]] == [
        ("cross_encoder", r) for r in ("baseline", "full", "full_augment")
    ]
    from datamodules.datamodule import RelevanceDataModule

    dm = RelevanceDataModule({"path": str(tmp_path / "work" / "data")})
    dm.setup("fit")
    assert res["setup"]["cache_rows"] > len(dm.datasets["train"])  # the sampled pairs were labelled by the teacher too
    for r in res["rows"]:
        auc = r["metrics"]["auc"]
        assert auc["n"] == 2 and 0 <= auc["mean"] <= 1 and auc["std"] >= 0
    assert res["rows"][0]["epoch_overhead_vs_baseline"] == 0.0
    # full MKD embeds the training chains once per run, reported apart from the epoch time; the baseline has none
    assert res["rows"][1]["chain_embedding_seconds"]["n"] == 2 and res["rows"][1]["chain_embedding_seconds"]["mean"] > 0
    assert res["rows"][0]["chain_embedding_seconds"] == {} and "chain embedding, once per run" in out_md.read_text()
    assert "<!-- bench:mkd_catalog -->" in out_md.read_text() and "± " in out_md.read_text()
    runs = tmp_path / "work" / "tensorboard"
    assert (runs / "cross_encoder_full_augment_s0").exists() and (runs / "cross_encoder_baseline_s1").exists()
    # each run's checkpoints go once its figures are stored (--keep_checkpoints false, the default)
    students = [d for d in runs.iterdir() if d.name.startswith("cross_encoder_")]
    assert len(students) == 6 and all(list(d.rglob("events.out.tfevents.*")) for d in students)
    assert not [c for d in students for c in d.rglob("*.ckpt")]
    # without --student_calibration no student fits a temperature, whatever its config says
    (config,) = (runs / "cross_encoder_full_s0").glob("version_*/config.yaml")
    assert yaml.safe_load(config.read_text())["model"]["init_args"]["temperature_scaling"] is False
    # a second invocation with the same settings reads the teacher, cache and finished runs back
    args = [*common, "--rows", "[baseline,full]", *out]
    assert bench_main(args) == 0
    again = json.loads(out_json.read_text())
    assert again["setup"]["resumed_runs"] == 4 and again["setup"]["setup_seconds"] == res["setup"]["setup_seconds"]
    assert again["rows"][:2] == res["rows"][:2] and "read back from its state" in out_md.read_text()
    # another teacher: the baseline runs (no teacher) are read back, the teacher and the MKD runs are redone
    assert bench_main([*args[:-4], "--teacher_steps", "2", "--out_json", str(out_json), "--out_md", str(out_md)]) == 0
    other = json.loads(out_json.read_text())
    assert other["setup"]["resumed_runs"] == 2 and other["setup"]["setup_seconds"] != res["setup"]["setup_seconds"]
    assert other["rows"][0] == res["rows"][0] and other["setup"]["teacher"]["steps"] == 2
    # calibrated students: the teacher and cache are read back, no student run (baseline or MKD) is
    calibrated = [*args[:-4], "--teacher_steps", "2", "--student_calibration", "true", *out]
    assert bench_main(calibrated) == 0
    cal = json.loads(out_json.read_text())["setup"]
    assert cal["resumed_runs"] == 0 and cal["setup_seconds"] == other["setup"]["setup_seconds"]
    # other student settings: nothing is reused
    assert (
        bench_main(
            [
                *args[:-4],
                "--seeds",
                "[0]",
                "--epochs",
                "2",
                "--rows",
                "[baseline]",
                "--keep_checkpoints",
                "true",
                "--out_json",
                str(out_json),
                "--out_md",
                str(out_md),
            ]
        )
        == 0
    )
    assert json.loads(out_json.read_text())["setup"]["resumed_runs"] == 0
    kept = runs / "cross_encoder_baseline_s0" / "checkpoints"
    assert [p.name for p in kept.glob("*.ckpt")] == ["best.ckpt"]  # kept this time


def test_bench_mkd_pools_of_unlabelled_pairs_with_a_prepared_teacher(tmp_path, tiny_llama, tiny_encoder):
    """The production setting: a teacher fine-tuned beforehand (a whole model directory) judges the labelled
    training pairs and a pool of unlabelled catalog pairs (direct readout); the MKD row runs once per pool size,
    the baseline once; the pool size is chosen on validation; a plot of AUC against pool size is written."""
    import pyarrow.parquet as pq

    out_json, out_md = tmp_path / "mkd_pools.json", tmp_path / "benchmarks.md"
    args = [
        "mkd",
        "--teacher_dir",
        tiny_llama,
        "--teacher_how",
        "a tiny random model",
        "--encoder",
        tiny_encoder,
        "--work_dir",
        str(tmp_path / "work"),
        "--num_queries",
        "24",
        "--items_per_query",
        "5",
        "--val_fraction",
        "0.25",
        "--test_fraction",
        "0.25",
        "--teacher_eval",
        "16",
        "--pools",
        "[0,2]",
        "--teacher_calibration",
        "bias",
        "--student_calibration",
        "bias",
        "--select_tolerance",
        "1.0",
        "--rows",
        "[baseline,soft]",
        "--compare_row",
        "soft",
        "--seeds",
        "[0,1]",
        "--students",
        "[cross_encoder]",
        "--epochs",
        "1",
        "--train_batches",
        "2",
        "--name",
        "mkd_pools",
        "--out_json",
        str(out_json),
        "--out_md",
        str(out_md),
    ]
    assert bench_main(args) == 0
    res = json.loads(out_json.read_text())
    train = res["setup"]["split_pairs"]["train"]
    pool = pq.read_table(tmp_path / "work" / "data" / "pool_2x.parquet")
    train_queries = set(pq.read_table(tmp_path / "work" / "data" / "train.parquet").column("query").to_pylist())
    assert pool.num_rows == 2 * train and set(pool.column("query").to_pylist()) == train_queries
    # the catalog's split follows --val_fraction / --test_fraction, as the synthesiser splits it (not its defaults)
    from datamodules.synth import SynthConfig, build

    def split_of(cfg):
        examples = build(cfg).examples
        return {(q, s) for q, s in zip(examples.column("query").to_pylist(), examples.column("split").to_pylist())}

    written = set()
    for split in ("train", "val", "test"):
        table = pq.read_table(tmp_path / "work" / "data" / f"{split}.parquet")
        written |= {(q, split) for q in table.column("query").to_pylist()}
    asked = SynthConfig(num_queries=24, items_per_query=5, val_fraction=0.25, test_fraction=0.25)
    assert written == split_of(asked) != split_of(SynthConfig(num_queries=24, items_per_query=5))
    assert "24 queries x 5 items, 0.25 / 0.25 of queries for validation / test" in out_md.read_text()
    # the cache holds the teacher's direct judgement of every labelled pair and every pool pair, and (to fit the
    # temperature the MKD runs distil at) of the validation and test pairs
    sizes = res["setup"]["split_pairs"]
    assert res["setup"]["cache_rows"] == 3 * train + sizes["val"] + sizes["test"]
    assert res["setup"]["teacher"]["readout_for_cache"] == "direct"
    calibration = res["setup"]["teacher"]["calibration"]
    assert calibration["pairs"] == sizes["val"] and calibration["nll_after"] <= calibration["nll_before"]
    assert len(calibration["bias"]) == 4 and abs(sum(calibration["bias"])) < 1e-5
    # the same calibration on the test pairs, reported beside the fit (nothing is chosen on it)
    held_out = calibration["test"]
    from ellm_mkd.teacher_cache import TeacherCache

    test_rows = pq.read_table(tmp_path / "work" / "data" / "test.parquet").to_pylist()
    said = TeacherCache(tmp_path / "work" / "teacher_cache").signals([r["example_id"] for r in test_rows])
    nll = -sum(math.log(said[r["example_id"]].level_probs[r["label"]]) for r in test_rows) / len(test_rows)
    assert held_out["pairs"] == sizes["test"] == len(test_rows) and held_out["nll_before"] == pytest.approx(nll)
    assert f"On the {sizes['test']} test pairs, which the fit did not see" in out_md.read_text()
    biases = ", ".join(f"{b:+.2f}" for b in calibration["bias"])
    fitted = f"temperature T = {calibration['temperature']:.2f} and level biases [{biases}], fitted on {sizes['val']}"
    assert fitted in out_md.read_text()
    for run in ("cross_encoder_soft_s0", "cross_encoder_soft_pool2x_s0"):  # every MKD run distils at that T and b
        (config,) = (tmp_path / "work" / "tensorboard" / run).glob("version_*/config.yaml")
        teacher_args = yaml.safe_load(config.read_text())["data"]["teacher"]["init_args"]
        assert teacher_args["temperature"] == calibration["temperature"]
        assert teacher_args["level_bias"] == pytest.approx(calibration["bias"])
    for run in ("cross_encoder_baseline_s0", "cross_encoder_soft_s1"):  # every student fits its own T and biases
        (config,) = (tmp_path / "work" / "tensorboard" / run).glob("version_*/config.yaml")
        init = yaml.safe_load(config.read_text())["model"]["init_args"]
        assert init["temperature_scaling"] is True and init["calibration_bias"] is True
    assert res["setup"]["student_calibration"] == "bias"
    assert "each with a temperature and level biases fitted on validation" in out_md.read_text()
    manifest = TeacherCache(tmp_path / "work" / "teacher_cache").manifest
    assert manifest["teacher"]["readout"] == "direct"
    assert [(r["row"], r["pool"]) for r in res["rows"]] == [("baseline", 0), ("soft", 0), ("soft", 2)]
    by = {(r["row"], r["pool"]): r for r in res["rows"]}
    # the augmented run trains on the labelled pairs and the pool (train_batches caps the batches, so the pair
    # counts are what the capped epoch saw; the pool run saw at least as many)
    assert by[("soft", 2)]["train_pairs"] >= by[("soft", 0)]["train_pairs"]
    assert all(r["val_metrics"]["auc"]["n"] == 2 for r in res["rows"])
    # every pool size is within the tolerance (1.0) of the best validation AUC: the lowest validation ECE after
    # calibration on other validation queries (the students calibrate) is chosen
    assert all(r["val_metrics"]["ece_calibrated_cv"]["n"] == 2 for r in res["rows"])
    chosen = min((by[("soft", p)] for p in (0, 2)), key=lambda r: r["val_metrics"]["ece_calibrated_cv"]["mean"])
    rule = "(within 1 of the best, the lowest validation ECE after calibration on other validation queries)"
    assert rule in out_md.read_text()
    measured = res["targets"]["cross_encoder_soft_beats_baseline_all"]["measured"]
    assert measured.startswith(f"soft{' + pool 2x' if chosen['pool'] else ''} {chosen['metrics']['auc']['mean']:.4f}")
    assert {"teacher_above_cross_encoder_baseline", "cross_encoder_soft_keeps_ece"} <= set(res["targets"])
    assert res["setup"]["teacher"]["dir"] == tiny_llama and res["setup"]["teacher"]["steps"] is None
    plot = tmp_path / "mkd_pools_pools.png"
    assert plot.stat().st_size > 0 and "](mkd_pools_pools.png)" in out_md.read_text()
    assert "soft + pool 2x" in out_md.read_text() and "a tiny random model" in out_md.read_text()


@pytest.mark.integration
def test_bench_mkd_on_home_depot_subsample(tmp_path, tiny_llama, tiny_encoder):
    """The ablation on a real dataset: preset, query-disjoint split, whole-query subsample per split; the
    teacher, its cache and the students all read that subsample; targets and rerender from the JSON."""
    from conftest import shared_file

    path = shared_file("homedepot", "train.csv.zip")
    out_json, out_md = tmp_path / "mkd_hd.json", tmp_path / "benchmarks.md"
    args = [
        "mkd",
        "--source",
        str(path),
        "--preset",
        "homedepot",
        "--item_fields",
        "[title]",
        "--relevant_level",
        "2",
        "--limit_pairs",
        "{train: 48, val: 16, test: 24}",
        "--teacher_model",
        tiny_llama,
        "--encoder",
        tiny_encoder,
        "--work_dir",
        str(tmp_path / "work"),
        "--teacher_steps",
        "1",
        "--teacher_batch",
        "2",
        "--teacher_eval",
        "8",
        "--rows",
        "[baseline,full]",
        "--pools",
        "[0,1]",
        "--pool_after",
        "96",
        "--seeds",
        "[0]",
        "--students",
        "[cross_encoder]",
        "--epochs",
        "1",
        "--name",
        "mkd_hd",
        "--out_json",
        str(out_json),
        "--out_md",
        str(out_md),
    ]
    assert bench_main(args) == 0
    res = json.loads(out_json.read_text())
    sizes = res["setup"]["split_pairs"]
    assert 0 < sizes["train"] <= 48 and 0 < sizes["val"] <= 16 and 0 < sizes["test"] <= 24
    assert res["setup"]["data"]["preset"] == "homedepot" and res["setup"]["catalog"] is None
    # the pool: training pairs of further queries, after the first 96 in the subsample's query order (a teacher
    # trained on those 96 never saw them), unlabelled; the teacher scored the labelled pairs and the pool
    import pyarrow.parquet as pq

    from datamodules.datamodule import RelevanceDataModule
    from ellm_mkd.schema import make_example_id, normalize_text

    pool = pq.read_table(tmp_path / "work" / "data" / "pool_1x.parquet").to_pylist()
    assert 0.9 * sizes["train"] <= len(pool) and "relevance" not in pool[0] and "label" not in pool[0]
    data = {"source": {"path": str(path), "preset": "homedepot"}, "item_fields": ["title"], "relevant_level": 2}
    wider = RelevanceDataModule(**data, limit_pairs={"train": 96, "val": 16, "test": 24})
    wider.setup("fit")
    first = {r["example_id"] for r in wider.datasets["train"].rows}
    held = {normalize_text(r["query"]) for split in ("val", "test") for r in wider.datasets[split].rows}
    assert not {make_example_id(r["query"], r["item_id"]) for r in pool} & first
    assert not {normalize_text(r["query"]) for r in pool} & held
    assert res["setup"]["cache_rows"] == sizes["train"] + len(pool) and res["setup"]["pool_after"] == 96
    assert [(r["row"], r["pool"]) for r in res["rows"]] == [("baseline", 0), ("full", 0), ("full", 1)]
    assert (
        sum(res["teacher"][f"{b}/count"] for b in ("head", "torso", "tail", "unseen") if f"{b}/count" in res["teacher"])
        == sizes["test"]
    )
    assert set(res["targets"]) >= {"cross_encoder_full_beats_baseline_all", "cross_encoder_full_epoch_overhead"}
    text = out_md.read_text()
    assert "subsampled by whole queries" in text and "no target on this dataset" in text
    # the markdown can be rewritten from the JSON alone
    out_md.write_text("")
    assert (
        bench_main(
            ["mkd", "--rerender", "true", "--name", "mkd_hd", "--out_json", str(out_json), "--out_md", str(out_md)]
        )
        == 0
    )
    assert out_md.read_text().strip().splitlines()[1] == "## mkd_hd"


def test_bench_options_are_a_typed_object_read_from_flags_or_yaml(tmp_path):
    """Each benchmark's options are one dataclass (a benchmark runs the same from Python); ``--config``
    reads them from YAML and flags override it."""
    from ellm_mkd.commands.bench.common import options
    from ellm_mkd.commands.bench.mkd import MkdBenchOptions, _parser

    cfg_file = tmp_path / "bench.yaml"
    cfg_file.write_text("num_queries: 40\nseeds: [3]\nepochs: 5\n")
    got = options(MkdBenchOptions, _parser().parse_args(["--config", str(cfg_file), "--epochs", "1"]))
    assert got == MkdBenchOptions(num_queries=40, seeds=[3], epochs=1)
    assert MkdBenchOptions().rows == ["baseline", "soft", "soft_dim", "full", "full_augment"]
    with pytest.raises(SystemExit):
        _parser().parse_args(["--num_queries", "many"])


def test_bench_injection_measures_flips_per_style(tmp_path, synth_dir, tiny_llama):
    """The injection benchmark: held-out pairs below the injected level, clean and with each style appended to
    the product text, on a whole-model teacher directory; flip rates per style and the 2% target."""
    out_json, out_md = tmp_path / "injection.json", tmp_path / "benchmarks.md"
    args = ["injection", "--data", str(synth_dir), "--teacher_dir", tiny_llama, "--compare_base", "false"]
    args += ["--max_pairs", "6", "--batch_size", "4", "--out_json", str(out_json), "--out_md", str(out_md)]
    assert bench_main(args) == 0
    res = json.loads(out_json.read_text())
    t = res["teachers"]["fine_tuned"]
    assert set(res["teachers"]) == {"fine_tuned"} and t["pairs"] == 6
    assert set(t["styles"]) == {"plain", "chat_markers", "fake_chain", "fake_level", "quote_escape"}
    for m in t["styles"].values():
        assert 0 <= m["to_injected_level"] <= m["flip_rate"] <= 1 and -1 <= m["mean_delta_p_injected"] <= 1
    assert t["max_flip_rate"] == max(m["flip_rate"] for m in t["styles"].values())
    assert 0 <= t["control"]["flip_rate"] <= 1 and res["setup"]["control"].startswith(" Free delivery")  # no target
    assert res["targets"]["flip_rate"]["met"] == (t["max_flip_rate"] <= 0.02)
    assert "<|im_start|>system" in res["setup"]["injections"]["chat_markers"]
    assert "| fine_tuned | 6 | chat_markers |" in out_md.read_text()
    assert "| fine_tuned | 6 | control (neutral text) |" in out_md.read_text()
    with pytest.raises(ValueError, match="unknown injection styles"):
        bench_main([*args, "--styles", "[shouting]"])


def test_teacher_level_biases_keep_the_cache_and_change_only_the_mkd_runs():
    """--teacher_calibration bias after true (or back) on one work_dir: the stored teacher and cache serve both
    (the setup's fingerprint is the same), the MKD runs are trained again (theirs differ), the baselines are not."""
    from types import SimpleNamespace

    from ellm_mkd.commands.bench.mkd import TEACHER_KEYS, _fingerprint

    def opts(calibration):
        keys = ("num_queries", "items_per_query", "encoder", "epochs", "train_batches", "seed", *TEACHER_KEYS)
        keys += ("val_fraction", "test_fraction")
        return SimpleNamespace(
            **dict.fromkeys(keys, 1),
            pools=[0, 2],
            pool_after=None,
            pool_source=None,
            pool_exclude=[],
            teacher_calibration=calibration,
            student_calibration="bias",
        )

    data = {"source": {"path": "work/data"}}
    t_only, biased = opts(True), opts("bias")
    assert _fingerprint(t_only, data) == _fingerprint(biased, data)
    assert _fingerprint(t_only, data, student=True) != _fingerprint(biased, data, student=True)
    assert _fingerprint(t_only, data, teacher=False, student=True) == _fingerprint(
        biased, data, teacher=False, student=True
    )
    # auto is what it chose: the runs of true (no biases kept) or of bias (kept)
    auto = opts("auto")
    assert _fingerprint(auto, data, student=True) == _fingerprint(t_only, data, student=True)
    assert _fingerprint(auto, data, student=True, biased=True) == _fingerprint(biased, data, student=True)
    assert _fingerprint(auto, data) == _fingerprint(t_only, data)
    # the catalog's split is part of every fingerprint (its queries differ)
    wider_val = opts(True)
    wider_val.val_fraction = 0.2
    assert _fingerprint(t_only, data, teacher=False, student=True) != _fingerprint(
        wider_val, data, teacher=False, student=True
    )
