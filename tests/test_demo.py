"""`ellm-mkd demo --scale tiny` end to end, as a user runs it, with the bundled MiniLM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.integration
def test_tiny_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "ellm_mkd", "demo", "--scale", "tiny", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test metrics (overall and per query bucket)" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())["cross_encoder"]
    test = metrics["test"]
    # the student learned: well above chance on the held-out queries, including unseen ones
    assert test["auc"] > 0.65 and test["ndcg10"] > 0.65, test
    assert "unseen/auc" in test and test["count"] > 100
    assert (out / "data" / "train.parquet").exists() and (out / "data_check.json").exists()
    assert metrics["checkpoint"].endswith(".ckpt")
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    assert {"train/loss/hard", "train/loss/grade", "train/loss/dim", "val/auc", "val/dim_acc/brand"} <= set(tags["scalars"])
    assert {"test/confusion_matrix", "test/reliability_diagram", "test/pr_curve"} <= set(tags["images"])
