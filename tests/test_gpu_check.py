"""scripts/gpu_check.sh, the GPU check: valid bash; stops with a message when there is no GPU; and, with
GPU_CHECK_ALLOW_CPU=1 and every size turned down (random tiny models for the benchmarks), the real script end to
end on the CPU, its merged JSON holding every stage's command, wall seconds and positive figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"

#: the sizes of tests/test_bench.py's teacher and cache runs
TINY = {
    "GPU_CHECK_STUDENTS_QUERIES": "20",
    "GPU_CHECK_STUDENTS_ARGS": "--baseline false",
    "GPU_CHECK_TEACHER_QUERIES": "20",
    "GPU_CHECK_TEACHER_STEPS": "2",
    "GPU_CHECK_TEACHER_BATCH": "4",
    "GPU_CHECK_TEACHER_EVAL_PAIRS": "8",
    "GPU_CHECK_TEACHER_EVAL_BATCH": "4",
    "GPU_CHECK_TEACHER_NAIVE_PAIRS": "2",
    "GPU_CHECK_TEACHER_MAX_NEW_TOKENS": "8",
    "GPU_CHECK_CACHE_QUERIES": "16",
    "GPU_CHECK_CACHE_DIRECT_BATCH": "32",
    "GPU_CHECK_CACHE_COT_PAIRS": "8",
    "GPU_CHECK_CACHE_COT_BATCH": "4",
    "GPU_CHECK_CACHE_REPEATS": "1",
    "GPU_CHECK_BUDGET_S": "0",
}


def run_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    base.update(
        GPU_CHECK_PYTHON=sys.executable, GPU_CHECK_WORK=str(tmp_path / "work"), GPU_CHECK_OUT=str(tmp_path / "gpu.json")
    )
    base.update(env)
    return subprocess.run(["bash", str(SCRIPT)], env=base, capture_output=True, text=True, timeout=900)


def test_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_stops_with_a_message(tmp_path):
    r = run_check(tmp_path)
    assert r.returncode != 0
    assert "torch.cuda.is_available() is False" in r.stderr and "GPU_CHECK_ALLOW_CPU=1" in r.stderr
    assert not (tmp_path / "gpu.json").exists()


def test_an_unknown_stage_is_refused(tmp_path):
    r = run_check(tmp_path, GPU_CHECK_STAGES="students tpu")
    assert r.returncode == 2 and "unknown stage 'tpu'" in r.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_every_benchmark_stage_end_to_end_on_cpu(tmp_path, tiny_llama, tiny_encoder):
    r = run_check(
        tmp_path,
        GPU_CHECK_ALLOW_CPU="1",
        GPU_CHECK_STAGES="students teacher cache",
        GPU_CHECK_TEACHER_MODEL=tiny_llama,
        GPU_CHECK_ENCODER=tiny_encoder,
        **TINY,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["ok"] and not res["gpu"] and "not GPU figures" in res["note"]
    assert res["versions"]["torch"] == torch.__version__ and res["device"]["name"].startswith("cpu")
    assert list(res["stages"]) == ["students", "teacher", "cache"] == list(res["commands"])
    for name, stage in res["stages"].items():
        assert stage["ok"] and stage["rc"] == 0 and stage["wall_seconds"] > 0, name
        assert stage["command"] == res["commands"][name] and f"bench {name}" in stage["command"]
        assert res["wall_seconds"][name] == stage["wall_seconds"]
        assert stage["result"]["benchmark"] == f"gpu_{name}"
    assert res["wall_seconds"]["total"] >= sum(s["wall_seconds"] for s in res["stages"].values())
    students = res["stages"]["students"]["figures"]
    assert set(students) == {"cross_encoder", "two_tower"}
    for row in students.values():
        assert row["train_pairs_per_s"] > 0 and row["infer_pairs_per_s"] > 0 and row["accelerator"] == "CPUAccelerator"
        assert row["optimizer"] == "AdamW (fused)"
    teacher = res["stages"]["teacher"]["figures"]
    for key in ("direct_pairs_per_s", "cot_batched_pairs_per_s", "naive_pairs_per_s", "train_seconds_per_step"):
        assert teacher[key] > 0, key
    assert teacher["accelerator"] == "cpu" and teacher["optimizer"] == "AdamW (fused)"
    cache = res["stages"]["cache"]["figures"]
    assert cache["writes"]["direct"]["pairs_per_s"] > 0 and cache["writes"]["cot"]["pairs_per_s"] > 0
    assert all(v > 0 for v in cache["student_train_pairs_per_s"].values())
    # the adapter the teacher stage trained is the cache's teacher; no docs/ file was touched
    assert res["stages"]["cache"]["result"]["setup"]["adapter"].endswith("teacher/teacher/adapter")
    assert all((tmp_path / "work" / name / "benchmarks.md").is_file() for name in res["stages"])  # not docs/
    assert res["settings"]["GPU_CHECK_TEACHER_STEPS"] == "2"


def test_a_failing_stage_is_recorded_and_the_exit_status_says_so(tmp_path):
    """A stage whose command fails (here: a size that is not a number) is recorded with its exit status and the
    end of its log; a folder as GPU_CHECK_OUT gets gpu.json and the stage logs."""
    out, model = tmp_path / "out", tmp_path / "model"
    out.mkdir()
    model.mkdir()
    (model / "config.json").write_text("{}")  # a local model folder: never loaded, the stage stops before
    r = run_check(
        tmp_path,
        GPU_CHECK_ALLOW_CPU="1",
        GPU_CHECK_STAGES="teacher",
        GPU_CHECK_TEACHER_MODEL=str(model),
        GPU_CHECK_TEACHER_ARGS="--steps many",
        GPU_CHECK_OUT=str(out),
    )
    assert r.returncode == 1 and "[teacher] FAILED" in r.stderr
    res = json.loads((out / "gpu.json").read_text())
    stage = res["stages"]["teacher"]
    assert not res["ok"] and not stage["ok"] and stage["rc"] != 0 and stage["figures"] == {}
    assert "--steps many" in stage["command"] and any("steps" in line for line in stage["log_tail"])
    assert (out / "gpu_check_logs" / "teacher.log").is_file()
