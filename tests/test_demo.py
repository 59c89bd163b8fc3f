"""`ellm-mkd demo --scale tiny` end to end, as a user runs it, with the bundled SmolLM2 teacher and MiniLM students."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

RUNS = ("cross_encoder_baseline", "cross_encoder_mkd", "two_tower_baseline", "two_tower_mkd")


@pytest.mark.integration
def test_tiny_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "ellm_mkd", "demo", "--scale", "tiny", "--out", str(out)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test metrics (overall and per query bucket)" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(RUNS) | {"teacher", "cache"} <= set(metrics)
    assert metrics["cache"]["rows"] == 8  # tiny: one readout batch of training pairs
    from datamodules.datamodule import RelevanceDataModule

    dm = RelevanceDataModule({"path": str(out / "data")})
    dm.setup("test")
    n_test = len(dm.datasets["test"])
    for name in RUNS:  # every student is tested on the whole test split
        test = metrics[name]["test"]
        assert test["count"] == n_test > 0 and 0.0 <= test["auc"] <= 1.0 and metrics[name]["checkpoint"].endswith(".ckpt")
    assert 0.0 <= metrics["teacher"]["test"]["auc"] <= 1.0

    report = (out / "report.md").read_text()
    for needle in ("## Test metrics", "## MKD vs baseline", "| teacher (direct) | all |", "| cross-encoder-mkd | all |",
                   "| two-tower-baseline | all |", "### Example 1", "| dimension | true verdict | teacher verdict"):
        assert needle in report, needle
    for png in ("pr_curves", "calibration", "buckets"):
        data = (out / "plots" / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"(plots/{png}.png)" in report

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def tags(run: str) -> dict[str, list[str]]:
        ea = EventAccumulator(str(next((out / "tensorboard" / run).rglob("events.out.tfevents.*")).parent),
                              size_guidance={"images": 0, "scalars": 0})
        ea.Reload()
        return ea.Tags()

    mkd = tags("cross_encoder_mkd")
    assert {f"train/loss/{t}" for t in ("hard", "soft", "dim_kd", "rationale", "rationale_embedding")} <= set(mkd["scalars"])
    assert {"test/confusion_matrix", "test/reliability_diagram", "test/pr_curve"} <= set(mkd["images"])
    assert "train/loss/soft" not in tags("two_tower_baseline")["scalars"]
    assert "train/loss" in tags("teacher")["scalars"]
