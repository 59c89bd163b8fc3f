"""Real 2-process DDP on CPU (gloo) through the CLI: same validation metrics as 1 process; fit runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli_metrics

pytestmark = pytest.mark.multiprocess
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "students" / "cross_encoder.yaml"


def cli(cmd: str, tmp: Path, name: str, encoder: str, data: Path, *extra: str) -> dict[str, float]:
    return run_cli_metrics(
        cmd,
        CONFIG,
        tmp,
        name,
        "--model.init_args.encoder",
        encoder,
        "--data.source.path",
        str(data),
        "--data.batch_size",
        "8",
        *extra,
    )


@pytest.mark.slow
def test_two_processes_validate_like_one(tmp_path, tiny_encoder, synth_dir):
    def one_and_two(name: str, *extra: str) -> tuple[dict, dict]:
        """``validate`` in one process and in two (DDP), the same options."""
        one = cli("validate", tmp_path, f"one{name}", tiny_encoder, synth_dir, "--trainer.devices", "1", *extra)
        ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
        return one, cli("validate", tmp_path, f"two{name}", tiny_encoder, synth_dir, *ddp, *extra)

    t = ("--model.init_args.temperature_scaling", "true")
    one, two = one_and_two("", *t)
    # the temperature is fitted on every rank's pairs: within a grid step (~3%) of one process's
    assert two["val/temperature"] == pytest.approx(one["val/temperature"], rel=0.035)
    # DistributedSampler pads the last shard by repeating a few rows, so counts may differ by < world size
    assert abs(one["val/count"] - two["val/count"]) < 2
    for key in ("val/auc", "val/ndcg10", "val/rmse", "val/macro_f1", "val/spearman", "val/tail/auc"):
        assert two[key] == pytest.approx(one[key], abs=0.02), key
    # the ECE after calibration on other queries: over every rank's pairs (query ids gathered with the logits)
    assert two["val/ece_calibrated_cv"] == pytest.approx(one["val/ece_calibrated_cv"], abs=0.03)
    # temperature and level biases (calibration_bias): fitted on every rank's logits, gathered across processes
    b = (*t, "--model.init_args.calibration_bias", "true")
    one_b, two_b = one_and_two("_b", *b)
    biases = [k for k in one_b if k.startswith("val/level_bias/")]
    assert len(biases) == 4 and any(abs(one_b[k]) > 0.01 for k in biases)
    assert two_b["val/temperature"] == pytest.approx(one_b["val/temperature"], rel=0.05)
    for key in biases:
        assert two_b[key] == pytest.approx(one_b[key], abs=0.05), key
    assert two_b["val/ece_calibrated_cv"] == pytest.approx(one_b["val/ece_calibrated_cv"], abs=0.03)


@pytest.mark.slow
def test_two_process_fit_trains_and_checkpoints(tmp_path, tiny_encoder, synth_dir):
    m = cli(
        "fit",
        tmp_path,
        "fit2",
        tiny_encoder,
        synth_dir,
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_steps",
        "6",
        "--trainer.limit_val_batches",
        "4",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.val_check_interval",
        "3",
    )
    assert "train/loss" in m and m["train/loss"] == m["train/loss"]  # logged and finite (not NaN)
    assert {"train/loss/hard", "train/loss/grade", "train/loss/dim", "val/auc"} <= set(m)
    assert list((tmp_path / "fit2").rglob("*.ckpt"))


# --- the shipped configs as they are: validation on, TensorBoard, figures, checkpoint selection ---------------

REPO = Path(__file__).resolve().parent.parent
DDP = ["--config", "configs/trainer/ddp.yaml", "--trainer.accelerator", "cpu"]  # the shipped overlay, 2 processes


def run_bounded(args: list[str], timeout: float = 420) -> subprocess.CompletedProcess:
    """``python -m ellm_mkd ARGS`` in its own process group; a run still going after ``timeout`` seconds is
    killed with all its ranks and fails the test (a collective that one rank never joins hangs for ever)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ellm_mkd", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(
            f"ellm-mkd {args[0]} did not finish in {timeout:.0f} s (a rank waits in a collective?):\n{out[-3000:]}"
        )
    assert proc.returncode == 0, out[-4000:]
    return subprocess.CompletedProcess(args, proc.returncode, out, None)


def tensorboard_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        found = acc.Tags()
        tags |= set(found.get("scalars", [])) | set(found.get("images", []))
    return tags


@pytest.mark.slow
@pytest.mark.parametrize("student", ["cross_encoder", "two_tower"])
def test_shipped_student_config_fits_and_tests_on_two_processes(student, tmp_path, tiny_encoder, synth_dir):
    root = tmp_path / student
    common = [
        "--config",
        f"configs/students/{student}.yaml",
        "--model.init_args.encoder",
        tiny_encoder,
        "--data.source.path",
        str(synth_dir),
        "--data.batch_size",
        "8",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        *DDP,
    ]
    run_bounded(
        [
            "fit",
            *common,
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "6",
            "--trainer.limit_val_batches",
            "4",
        ]
    )
    best = root / "baseline" / "checkpoints" / "best.ckpt"  # beside the logger's version_N folders
    assert best.is_file() and (root / "baseline" / "checkpoints" / "last.ckpt").is_file()
    # rank 0 drew the figures, which gathered every rank's rows, and logged them beside the metrics
    tags = tensorboard_tags(root / "baseline")
    assert {"val/auc", "val/ndcg10", "val/confusion_matrix", "val/reliability_diagram", "val/pr_curve"} <= tags
    out = run_bounded(["test", *common, "--ckpt_path", str(best), "--trainer.limit_test_batches", "4"]).stdout
    assert "test/auc" in out and "test/ndcg10" in out
    assert "test/confusion_matrix" in tensorboard_tags(root / "baseline")
    if student != "cross_encoder":
        return
    # predict: each rank writes the pairs it scored to its own scores file; together they cover the batches once
    scores = tmp_path / "scores"
    out = run_bounded(
        [
            "predict",
            *common,
            "--ckpt_path",
            str(best),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(scores),
            "--trainer.limit_predict_batches",
            "3",
        ]
    ).stdout
    import pyarrow.parquet as pq

    ranks = [pq.read_table(scores / f"scores.rank{r}.parquet").to_pylist() for r in (0, 1)]
    assert f"scores: {scores / 'scores.rank0.parquet'}" in out
    assert not (scores / "scores.parquet").exists()
    ids = [[row["example_id"] for row in rows] for rows in ranks]
    assert len(ids[0]) == len(ids[1]) == 3 * 16  # 3 batches of 16 (eval batch: 2 x batch_size 8) on each rank
    assert len(set(ids[0]) | set(ids[1])) == 2 * 3 * 16  # no pair scored by both ranks
    assert all(0.0 <= row["expected_grade"] <= 3.0 for rows in ranks for row in rows)


@pytest.mark.slow
def test_shipped_teacher_config_fits_and_tests_on_two_processes(tmp_path, tiny_llama, synth_dir):
    from ellm_mkd.commands.annotate import annotate_main

    ann = tmp_path / "ann"
    args = ["--data.source.path", str(synth_dir), "--data.item_fields", "[title,brand]", "--out", str(ann)]
    assert annotate_main([*args, "--progress", "false"]) == 0
    root = tmp_path / "teacher"
    common = [
        "--config",
        "configs/teacher/smollm2_135m_lora.yaml",
        "--model.init_args.model",
        tiny_llama,
        "--model.init_args.export_dir",
        str(root / "export"),
        "--model.init_args.max_new_tokens",
        "8",
        "--data.source.path",
        str(synth_dir),
        "--data.annotations",
        str(ann),
        "--data.item_fields",
        "[title,brand]",
        "--data.batch_size",
        "2",
        "--data.eval_batch_size",
        "8",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        *DDP,
    ]
    # two steps make the epoch, so the epoch-end validation (direct AUC, figures) runs on both ranks
    run_bounded(["fit", *common, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"])
    last = root / "tb" / "checkpoints" / "last.ckpt"
    assert last.is_file() and (root / "export" / "adapter").is_dir()
    assert {"val/auc", "val/confusion_matrix"} <= tensorboard_tags(root / "tb")
    out = run_bounded(["test", *common, "--ckpt_path", str(last), "--trainer.limit_test_batches", "2"]).stdout
    assert "test/parse_failure_rate" in out
