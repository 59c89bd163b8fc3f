"""``ellm-mkd demo``: the whole loop on the embedded default, as far as the project has it.

Stages so far: generate the synthetic catalog, validate it, train the cross-encoder student with
the bundled MiniLM-L6 and evaluate it on the test split (overall and per query bucket). Each stage
writes under ``--out`` (default ``runs/demo``) and replaces only the files it owns there.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "demo"
SCALES = {
    # name: synthetic catalog size, student epochs
    "tiny": {"synth": {"num_queries": 120, "items_per_query": 8}, "epochs": 2},
    "default": {"synth": {"num_queries": 600, "items_per_query": 10}, "epochs": 2},
}


def train_student(config: Path, data_dir: Path, out: Path, name: str, epochs: int) -> dict:
    """Fit a student from a demo config, test the best checkpoint, return its test metrics."""
    from .lightning_cli import cli_main

    cli = cli_main([
        "--config", str(config),
        "--data.source.path", str(data_dir),
        "--trainer.default_root_dir", str(out / "students" / name),
        "--trainer.logger.init_args.save_dir", str(out / "tensorboard"),
        "--trainer.max_epochs", str(epochs),
    ], run=False)
    t0 = time.time()
    cli.trainer.fit(cli.model, cli.datamodule)
    fit_s = time.time() - t0
    cli.trainer.test(cli.model, cli.datamodule, ckpt_path="best", verbose=False)
    model = cli.trainer.lightning_module
    results = dict(model.last_results["test"])
    best = cli.trainer.checkpoint_callback.best_model_path
    print(f"      {name}: fit {fit_s:.0f} s, best checkpoint {best}", flush=True)
    return {"test": results, "checkpoint": best, "fit_seconds": fit_s}


def run_demo(out: str = "runs/demo", scale: Literal["tiny", "default"] = "default", seed: int = 0) -> int:
    """Run every stage the project has on the embedded catalog.

    Args:
        out: output directory (each stage replaces only its own files there).
        scale: ``tiny`` (a quick check, about a minute) or ``default``.
        seed: seed of the synthetic catalog.
    """
    from datamodules.synth import SynthConfig, write

    from .data_cmd import check
    from .metrics import format_table

    t0 = time.time()
    out_dir = Path(out)
    data_dir = out_dir / "data"
    plan = SCALES[scale]
    print(f"[1/3] synthetic catalog -> {data_dir}  (scale {scale}, seed {seed})", flush=True)
    summary = write(data_dir, SynthConfig(seed=seed, **plan["synth"]), overwrite=True)
    print("      " + ", ".join(f"{k} {v}" for k, v in summary["counts"].items()), flush=True)
    print(f"[2/3] data check {data_dir}", flush=True)
    rc = check([str(data_dir), "--json", str(out_dir / "data_check.json")])
    if rc:
        return rc
    print(f"\n[3/3] cross-encoder student (MiniLM-L6), {plan['epochs']} epoch(s)", flush=True)
    ce = train_student(CONFIG_DIR / "cross_encoder.yaml", data_dir, out_dir, "cross_encoder", plan["epochs"])
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps({"cross_encoder": ce}, indent=2))
    print("\ntest metrics (overall and per query bucket)")
    print(format_table({"cross_encoder": ce["test"]}))
    print(f"\ndemo finished in {time.time() - t0:.0f} s; outputs under {out_dir}/:")
    print("  data/ (catalog), data_check.json, metrics.json (test metrics and checkpoint paths),")
    print(f"  tensorboard/ (loss terms, metrics, figures, checkpoints: tensorboard --logdir {out_dir / 'tensorboard'})")
    return 0


def demo_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="ellm-mkd demo", description="Run the whole loop on the embedded synthetic catalog.")
    p.add_function_arguments(run_demo)
    cfg = p.parse_args(argv)
    return run_demo(**vars(cfg))


if __name__ == "__main__":
    sys.exit(demo_main(sys.argv[1:]))
