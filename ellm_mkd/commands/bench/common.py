"""What every ``ellm-mkd bench`` shares: timing, machine description, evaluation of score-only
models with the project's metrics, result rows, and writing ``docs/results/*.json`` and
``docs/benchmarks.md`` sections."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


METRIC_KEYS = ("rmse", "auc", "spearman", "ndcg10", "macro_f1", "ece")


def options_parser(cls: type, prog: str, description: str) -> Any:
    """A benchmark's parser, built from its options dataclass (help from its docstring), with ``--config``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    p.add_class_arguments(cls)
    return p


def options(cls: type, cfg: Any) -> Any:
    """The typed options object ``cls`` (a dataclass) of a benchmark from its parsed namespace: every
    benchmark function takes one, so a benchmark runs the same from Python as from the command line."""
    return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})


def now() -> float:
    return time.perf_counter()


def sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def machine_description() -> str:
    """``"<cores> cores (<cpu model>), <GPU or no GPU>, torch <version>, <threads> torch threads"``."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = ", ".join(f"{n}" for n in names)
    return (
        f"{os.cpu_count()} cores ({cpu}), {gpu}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}"
    )


def limit_training_rows(rows: list[dict[str, Any]], limit: int, seed: int) -> list[dict[str, Any]]:
    """Whole training queries in the order of a seeded hash of the normalised query, while the pairs kept
    stay within ``limit``. Rows keep their original order."""
    from datamodules.splits import limit_by_query

    return limit_by_query(rows, limit, seed, "train", "--train_limit")


def grade_range(scheme) -> tuple[float, float]:
    """``(low, high)`` of the raw grade: the scheme's for graded/ordinal data, the level range otherwise."""
    low, high = getattr(scheme, "low", None), getattr(scheme, "high", None)
    if low is None or high is None:
        return 0.0, float(scheme.num_levels - 1)
    return float(low), float(high)


def grade_cut_points(scheme) -> list[float]:
    """Grades at which a predicted grade moves up a level: the graded scheme's cut points, else the
    midpoints between consecutive integer grades."""
    cps = getattr(scheme, "cut_points", None)
    if cps:
        return [float(c) for c in cps]
    low, _ = grade_range(scheme)
    return [low + k - 0.5 for k in range(1, scheme.num_levels)]


class TestRows:
    """The test rows of a data module as tensors, in the data module's order."""

    def __init__(self, dm) -> None:
        from ellm_mkd.schema import BUCKETS

        rows = dm.datasets["test"].rows
        nan = float("nan")
        self.example_ids = [r["example_id"] for r in rows]
        self.queries = [r["query"] for r in rows]
        self.labels = torch.tensor([-100 if r["label"] is None else r["label"] for r in rows], dtype=torch.long)
        self.grades = torch.tensor([nan if r["grade"] is None else r["grade"] for r in rows], dtype=torch.float32)
        self.gains = torch.tensor([nan if r["gain"] is None else r["gain"] for r in rows], dtype=torch.float32)
        self.query_ids = torch.tensor([r["query_id"] for r in rows], dtype=torch.long)
        self.bucket_ids = torch.tensor([BUCKETS.index(r["bucket"]) for r in rows], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.example_ids)


def score_model_metrics(
    dm,
    test: TestRows,
    pred_grade: torch.Tensor,
    score: torch.Tensor | None,
    keys: Sequence[str] = ("rmse", "auc", "spearman", "ndcg10", "macro_f1"),
) -> dict[str, float]:
    """``RelevanceMetrics`` keys (overall bare, per bucket ``<bucket>/<key>``) of a model that gives a grade
    and, optionally, a relevance score in [0, 1] (see the module docstring for how each key is made)."""
    from ellm_mkd.metrics import RelevanceMetrics

    k, rl = dm.num_levels, dm.relevant_level
    n = len(test)
    pred_grade = pred_grade.reshape(-1).float()
    out: dict[str, float] = {}
    # 1) grade-based keys and AUC: relevant mass = the score (or 0.5 when there is none)
    s = (score.reshape(-1).float() if score is not None else torch.full((n,), 0.5)).clamp(0.0, 1.0)
    probs = torch.zeros(n, k)
    probs[:, rl:] = (s / (k - rl)).unsqueeze(1)
    probs[:, :rl] = ((1.0 - s) / rl).unsqueeze(1)
    m = RelevanceMetrics(k, dm.level_names, rl)
    m.update(probs, pred_grade, test.labels, test.grades, test.gains, test.query_ids, test.bucket_ids)
    reg = m.compute()
    wanted = {"count", *(x for x in keys if x != "macro_f1")}
    if score is None:
        wanted.discard("auc")
    out.update({key: v for key, v in reg.items() if key.rsplit("/", 1)[-1] in wanted})
    # 2) classification keys: the predicted grade cut into levels
    if "macro_f1" in keys:
        cuts = torch.tensor(grade_cut_points(dm.scheme))
        levels = (pred_grade.unsqueeze(1) >= cuts.unsqueeze(0)).sum(1).clamp(0, k - 1)
        m2 = RelevanceMetrics(k, dm.level_names, rl)
        m2.update(
            torch.nn.functional.one_hot(levels, k).float(),
            pred_grade,
            test.labels,
            test.grades,
            test.gains,
            test.query_ids,
            test.bucket_ids,
        )
        cls = m2.compute()
        out.update({key: v for key, v in cls.items() if key.rsplit("/", 1)[-1] == "macro_f1"})
    return out


def result_row(
    name: str,
    kind: str,
    seed: int,
    flat: dict[str, float],
    throughput: dict[str, float] | None,
    config: dict[str, Any],
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    from ellm_mkd.schema import BUCKETS

    metrics = {k: finite_or_none(flat[k]) for k in METRIC_KEYS if k in flat}
    by_bucket = {}
    for b in BUCKETS:
        vals = {k: finite_or_none(flat[f"{b}/{k}"]) for k in ("count", *METRIC_KEYS) if f"{b}/{k}" in flat}
        if vals:
            if "count" in vals:
                vals["count"] = int(vals["count"])
            by_bucket[b] = vals
    row: dict[str, Any] = {"name": name, "kind": kind, "seed": seed, "metrics": metrics, "by_bucket": by_bucket}
    if throughput is not None:
        row["throughput"] = {k: round(v, 2) for k, v in throughput.items()}
    row["config"] = config
    if timings:
        row["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    row["_flat"] = flat
    return row


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the same model's rows over several seeds: means, ``seeds`` and ``std`` (sample)."""
    if len(rows) == 1:
        return rows[0]
    first = rows[0]

    def mean_of(dicts: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [k for k in dicts[0] if all(d.get(k) is not None for d in dicts)]
        return {k: statistics.fmean(d[k] for d in dicts) for k in keys}

    out = dict(first)
    out["seeds"] = [r["seed"] for r in rows]
    out["metrics"] = mean_of([r["metrics"] for r in rows])
    out["std"] = {k: statistics.stdev(r["metrics"][k] for r in rows) for k in out["metrics"]}
    out["by_bucket"] = {
        b: mean_of([r["by_bucket"][b] for r in rows])
        for b in first["by_bucket"]
        if all(b in r["by_bucket"] for r in rows)
    }
    for b in out["by_bucket"].values():
        if "count" in b:
            b["count"] = int(round(b["count"]))
    if "throughput" in first:
        out["throughput"] = {k: round(v, 2) for k, v in mean_of([r["throughput"] for r in rows]).items()}
        out["std"].update({k: statistics.stdev(r["throughput"][k] for r in rows) for k in out["throughput"]})
    if "timings_s" in first:
        out["timings_s"] = {k: round(v, 2) for k, v in mean_of([r["timings_s"] for r in rows]).items()}
    flat = mean_of([r["_flat"] for r in rows])
    out["_flat"] = flat
    return out


def optimizer_description(opt) -> str:
    """``AdamW (fused)``, ``AdamW (foreach)`` or ``AdamW (for-loop)``: torch's implementation in use."""
    d = getattr(opt, "defaults", {})
    if d.get("fused"):
        impl = "fused"
    elif d.get("foreach") is None:  # torch's default: foreach on accelerators, a for-loop on CPU tensors
        on_cpu = all(p.device.type == "cpu" for g in opt.param_groups for p in g["params"])
        impl = "for-loop" if on_cpu else "foreach"
    else:
        impl = "foreach" if d.get("foreach") else "for-loop"
    return f"{type(opt).__name__} ({impl})"


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


MD_HEADER = (
    "# Benchmarks\n\nEvery section below was written by the command it names, on the machine and date it "
    "names; the figures are what that run measured. The same figures, with more detail, are in "
    "`docs/results/<name>.json`.\n"
)


def result_head(name: str, command: str) -> dict[str, Any]:
    """The fields every benchmark result starts with: its name, the exact command, the machine and the date."""
    return {"benchmark": name, "command": command, "machine": machine_description(), "date": time.strftime("%Y-%m-%d")}


def section_head(result: dict[str, Any]) -> list[str]:
    """The first lines of a benchmark's markdown section: its marker, title, command, machine and date."""
    name = result["benchmark"]
    return [
        f"<!-- bench:{name} -->",
        f"## {name}",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; date {result['date']}.",
        "",
    ]


def publish(result: dict[str, Any], opts: Any, section: str) -> None:
    """Write a benchmark's JSON (``opts.out_json`` or ``docs/results/<name>.json``) and its markdown section."""
    out_json = opts.out_json or f"docs/results/{opts.name}.json"
    atomic_write_text(out_json, json.dumps(result, indent=2) + "\n")
    update_markdown(opts.out_md, opts.name, section)
    print(section)
    print(f"\nwrote {out_json} and the {opts.name} section of {opts.out_md}")


def update_markdown(path: str | os.PathLike, name: str, section: str) -> None:
    """Replace this benchmark's section of ``path`` (between its markers), or append it; other sections stay."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else MD_HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(path, text)
