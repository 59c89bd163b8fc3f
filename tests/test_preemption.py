"""A run stopped by SIGTERM (a scheduler's preemption) saves last.ckpt at that step; ``--ckpt_path last``
resumes it there and it ends where an uninterrupted run ends. Real processes, a real signal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def _fit(tmp: Path, synth_dir: Path, encoder: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ellm_mkd", "fit", "--config", str(REPO / "configs/students/cross_encoder.yaml")]
    cmd += ["--data.source.path", str(synth_dir), "--model.init_args.encoder", encoder, "--data.batch_size", "4"]
    cmd += ["--trainer.default_root_dir", str(tmp), "--trainer.logger.init_args.save_dir", str(tmp)]
    cmd += ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "8", "--trainer.limit_val_batches", "2"]
    cmd += ["--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false", "--data.num_workers", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def _step(path: Path) -> tuple[int, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["global_step"], ckpt["epoch"]


def test_sigterm_saves_last_and_resume_goes_on_from_that_step(tmp_path, synth_dir, tiny_encoder):
    run = tmp_path / "run"
    stop = ["--trainer.callbacks+=helpers.SigtermAt", "--trainer.callbacks.init_args.step", "5"]
    r = _fit(run, synth_dir, tiny_encoder, *stop)
    assert r.returncode == 143, r.stderr[-3000:]
    assert "stopped by SIGTERM (resume with --ckpt_path last)" in r.stderr
    last = run / "baseline" / "checkpoints" / "last.ckpt"
    assert _step(last) == (5, 0)  # mid-epoch: step 5 of 8 in the first epoch
    r = _fit(run, synth_dir, tiny_encoder, "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in r.stderr + r.stdout
    assert _step(last) == (16, 1)  # 2 epochs x 8 batches, as an uninterrupted run
