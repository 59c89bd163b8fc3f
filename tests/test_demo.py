"""`ellm-mkd demo --scale tiny` end to end, as a user runs it, with the bundled Gemma 3 270M teacher and MiniLM
students; then every command README shows, run as written from where a user stands after `make demo`."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNS = ("cross_encoder_baseline", "cross_encoder_mkd", "two_tower_baseline", "two_tower_mkd")


@pytest.fixture(scope="module")
def after_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A user's working directory after the tiny demo: the repository's configs, and runs/demo/."""
    cwd = tmp_path_factory.mktemp("user")
    (cwd / "configs").symlink_to(REPO / "configs")
    r = subprocess.run(
        [sys.executable, "-m", "ellm_mkd", "demo", "--scale", "tiny"],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=cwd,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd, r


@pytest.mark.slow
@pytest.mark.integration
def test_tiny_demo_end_to_end(after_demo):
    cwd, r = after_demo
    out = cwd / "runs" / "demo"
    assert "test metrics (overall and per query bucket)" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(RUNS) | {"teacher", "cache"} <= set(metrics)
    # tiny: one readout batch of the teacher's own judgement (direct readout), over the splits and the unlabelled pool
    assert metrics["cache"]["rows"] == 8 and metrics["cache"]["readout"] == "direct"
    assert metrics["teacher"]["steps"] == 1
    pool = out / "data" / "pool_1x.parquet"  # the unlabelled pool the teacher labels for the MKD students
    import pyarrow.parquet as pq

    assert pq.read_metadata(pool).num_rows > 0
    import yaml

    def augment(run: str):  # the training data options a student run was fitted with
        return yaml.safe_load((out / "tensorboard" / run / "version_0" / "config.yaml").read_text())["data"]["augment"]

    # tiny: the cross-encoder distils with a 1x pool, the two-tower on its labelled pairs alone (pool 0x)
    assert augment("cross_encoder_mkd")["source"]["path"] == "runs/demo/data/pool_1x.parquet"
    assert not augment("two_tower_mkd") and not augment("two_tower_baseline")
    from datamodules.datamodule import RelevanceDataModule

    dm = RelevanceDataModule({"path": str(out / "data")})
    dm.setup("test")
    n_test = len(dm.datasets["test"])
    for name in RUNS:  # every student is tested on the whole test split
        test = metrics[name]["test"]
        assert (
            test["count"] == n_test > 0 and 0.0 <= test["auc"] <= 1.0 and metrics[name]["checkpoint"].endswith(".ckpt")
        )
    assert 0.0 <= metrics["teacher"]["test"]["auc"] <= 1.0

    report = (out / "report.md").read_text()
    for needle in (
        "## Test metrics",
        "## MKD vs baseline",
        "## Predicted levels",
        "| (true labels) |",
        "AUC ↑",
        "| teacher (direct) | all |",
        "| cross-encoder-mkd | all |",
        "| two-tower-baseline | all |",
        "### Example 1",
        "| dimension | true verdict | teacher verdict",
    ):
        assert needle in report, needle
    for png in ("pr_curves", "calibration", "buckets"):
        data = (out / "plots" / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"(plots/{png}.png)" in report

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def tags(run: str) -> dict[str, list[str]]:
        ea = EventAccumulator(
            str(next((out / "tensorboard" / run).rglob("events.out.tfevents.*")).parent),
            size_guidance={"images": 0, "scalars": 0},
        )
        ea.Reload()
        return ea.Tags()

    mkd = tags("cross_encoder_mkd")
    assert {"train/loss/hard", "train/loss/soft"} <= set(mkd["scalars"])  # configs/mkd/soft.yaml
    assert {"test/confusion_matrix", "test/reliability_diagram", "test/pr_curve"} <= set(mkd["images"])
    assert "train/loss/soft" not in tags("two_tower_baseline")["scalars"]
    assert "train/loss" in tags("teacher")["scalars"]


# -- every command README shows, as a user runs it after `make demo` -----------------------------------------


def readme_commands() -> list[str]:
    """The ``ellm-mkd`` commands of README: the lines of its bash blocks (continuations joined, comments
    dropped) and the commands in backticks of its tables, without placeholders (DIR, PATH, ...)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("ellm-mkd "):
                found.append(" ".join(line.split()))
    for span in re.findall(r"`(ellm-mkd [^`]*)`", text):
        if not re.search(r"\b(DIR|PATH|COMMAND)\b|\.\.\.", span) and span not in found:
            found.append(span)
    return found


#: what the tiny demo cannot hold, or what is too long for a test: (pattern, arguments appended, why)
SIZED = (
    (
        "fit --config configs/teacher/",
        ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--data.eval_batch_size", "4"],
        "one LoRA step",
    ),
    (
        "predict --config configs/teacher/cache_",
        [
            "--trainer.limit_predict_batches",
            "1",
            "--data.eval_batch_size",
            "4",
            "--model.init_args.max_new_tokens",
            "16",
        ],
        "one readout batch",
    ),
    (
        "--config configs/mkd/",
        ["--data.teacher.init_args.missing", "hard_label"],
        "the tiny demo caches one batch of training pairs, the default demo all of them",
    ),
    (
        "fit --config configs/students/",
        ["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2"],
        "three batches",
    ),
)


def test_readme_lists_the_commands_a_user_meets():
    cmds = readme_commands()
    assert len(cmds) >= 8, cmds
    for needle in (
        "ellm-mkd fit --config configs/students/cross_encoder.yaml",
        "--config configs/mkd/soft.yaml",
        "ellm-mkd test --config configs/students/cross_encoder.yaml",
        "ellm-mkd cache inspect",
    ):
        assert any(needle in c for c in cmds), needle


def _serve_once(args: list[str], cwd: Path) -> None:
    import time
    import urllib.request

    port = args[args.index("--port") + 1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ellm_mkd", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"serve exited: {proc.stderr.read()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "serve did not become healthy in 180 s"
            time.sleep(0.5)
        body = json.dumps({"query": "cordless drill", "items": [{"item_id": "A1", "title": "20V Drill"}]}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/predict", data=body, method="POST", headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.loads(r.read())
        assert out["results"][0]["item_id"] == "A1" and "expected_grade" in out["results"][0]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
@pytest.mark.integration
def test_every_readme_command_runs_as_written_after_the_demo(after_demo):
    cwd, _ = after_demo
    ran = []
    for cmd in readme_commands():
        args = shlex.split(cmd)[1:]
        if args[0] == "bench":  # reads ../shared/data for an hour; tests/test_bench.py runs each one small
            continue
        if args[0] == "demo":  # the fixture ran it (at the tiny scale; make demo runs the default one)
            ran.append("demo")
            continue
        for pattern, extra, _why in SIZED:
            if pattern in cmd:
                args += extra
        if args[0] == "serve":  # a service: start it, score one request over HTTP, stop it
            _serve_once(args, cwd)
            ran.append("serve")
            continue
        r = subprocess.run(
            [sys.executable, "-m", "ellm_mkd", *args], capture_output=True, text=True, cwd=cwd, timeout=900
        )
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        ran.append(args[0])
    assert {"fit", "test", "predict", "annotate", "cache", "data", "demo"} <= set(ran), ran
    # what README says a fit leaves: checkpoints under the run's root, TensorBoard logs under runs/students
    assert (cwd / "runs/students/cross_encoder/baseline/checkpoints/best.ckpt").is_file()
    assert (cwd / "runs/students/cross_encoder/baseline/checkpoints/last.ckpt").is_file()
    assert list((cwd / "runs/students").rglob("events.out.tfevents.*"))
