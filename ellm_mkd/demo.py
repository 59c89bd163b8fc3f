"""``ellm-mkd demo``: the whole loop on the embedded default, as far as the project has it.

Stages so far: generate the synthetic catalog, then validate it and print its counts. Each stage
writes under ``--out`` (default ``runs/demo``) and replaces only the files it owns there.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser

SCALES = {
    # name: synthetic catalog size
    "tiny": {"num_queries": 120, "items_per_query": 8},
    "default": {"num_queries": 600, "items_per_query": 10},
}


def run_demo(out: str = "runs/demo", scale: Literal["tiny", "default"] = "default", seed: int = 0) -> int:
    from datamodules.synth import SynthConfig, write

    from .data_cmd import check

    t0 = time.time()
    data_dir = Path(out) / "data"
    print(f"[1/2] synthetic catalog -> {data_dir}  (scale {scale}, seed {seed})", flush=True)
    summary = write(data_dir, SynthConfig(seed=seed, **SCALES[scale]), overwrite=True)
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    print(f"      {counts}", flush=True)
    print(f"[2/2] data check {data_dir}", flush=True)
    rc = check([str(data_dir), "--json", str(Path(out) / "data_check.json")])
    print(f"\ndemo finished in {time.time() - t0:.1f} s; outputs under {out}/ (data/, data_check.json)")
    return rc


def demo_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="ellm-mkd demo", description="Run the whole loop on the embedded synthetic catalog.")
    p.add_function_arguments(run_demo)
    cfg = p.parse_args(argv)
    return run_demo(**vars(cfg))


if __name__ == "__main__":
    sys.exit(demo_main(sys.argv[1:]))
