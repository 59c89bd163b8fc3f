"""The demo's report: metrics table, plots and examples, as Markdown beside PNG files.

:func:`write_report` takes the test metrics and test-split predictions of the teacher and of each
student run and writes ``<out>/report.md`` and ``<out>/plots/{pr_curves,calibration,buckets}.png``.
The examples put the fine-tuned teacher's own chain of thought (written now, cot readout) beside
the distilled cross-encoder's dimension verdicts and the catalog's true verdicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ellm_mkd.schema import BUCKETS, DIMENSIONS, VERDICTS

TABLE_METRICS = (
    ("auc", "AUC ↑"),
    ("ndcg10", "nDCG@10 ↑"),
    ("macro_f1", "macro-F1 ↑"),
    ("rmse", "RMSE ↓"),
    ("spearman", "Spearman ↑"),
    ("ece", "ECE ↓"),
    ("count", "pairs"),
)
#: metric -> +1 where higher is better, -1 where lower is better
DIRECTION = {"auc": 1, "ndcg10": 1, "macro_f1": 1, "rmse": -1, "spearman": 1, "ece": -1}
#: a run whose most frequent predicted level covers at least this share of the test pairs has collapsed
COLLAPSE_SHARE = 0.95
#: a teacher whose test AUC lies within this distance of 0.5 ranks pairs at chance
CHANCE_MARGIN = 0.05


def _fmt(v: Any, metric: str) -> str:
    if v is None:
        return "-"
    return f"{int(v)}" if metric == "count" else f"{float(v):.3f}"


def metrics_table(results: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "| model | bucket | " + " | ".join(n for _, n in TABLE_METRICS) + " |",
        "|---|---|" + "---|" * len(TABLE_METRICS),
    ]
    for name, m in results.items():
        for bucket in ("all", *BUCKETS):
            p = "" if bucket == "all" else f"{bucket}/"
            if p and m.get(p + "count") in (None, 0):
                continue
            lines.append(f"| {name} | {bucket} | " + " | ".join(_fmt(m.get(p + k), k) for k, _ in TABLE_METRICS) + " |")
    return lines


def delta_table(results: dict[str, dict[str, float]], students: list[str]) -> list[str]:
    """MKD against the baseline per student: ranking (AUC, nDCG@10 overall, tail, unseen) and the level
    predictions a user would ship (macro-F1, RMSE, ECE); each cell says whether MKD is better or worse."""
    names = dict(TABLE_METRICS)
    cols = [(b, k) for k in ("auc", "ndcg10") for b in ("all", "tail", "unseen")]
    cols += [("all", k) for k in ("macro_f1", "rmse", "ece")]
    lines = ["| student | " + " | ".join(f"{names[k]} {b}" for b, k in cols) + " |", "|---|" + "---|" * len(cols)]
    for s in students:
        base, mkd = results.get(f"{s}_baseline", {}), results.get(f"{s}_mkd", {})
        cells = []
        for b, k in cols:
            key = k if b == "all" else f"{b}/{k}"
            if base.get(key) is None or mkd.get(key) is None:
                cells.append("-")
                continue
            diff = mkd[key] - base[key]
            verdict = "same" if abs(diff) < 5e-4 else ("better" if diff * DIRECTION[k] > 0 else "worse")
            cells.append(f"{mkd[key]:.3f} vs {base[key]:.3f} ({diff:+.3f}, {verdict})")
        lines.append(f"| {s.replace('_', '-')} | " + " | ".join(cells) + " |")
    return lines


def level_shares(
    runs: dict[str, dict[str, Any]], truth: dict[str, dict[str, Any]], level_names: list[str]
) -> tuple[list[str], list[str]]:
    """Per run, the share of test pairs predicted at each level (argmax), beside the true shares; and a
    warning for every run whose predictions collapse onto one level that the labels do not."""
    true = torch.bincount(torch.tensor([r["label"] for r in truth.values()]), minlength=len(level_names)).float()
    true_share = true / true.sum().clamp_min(1)
    lines = [
        "| predictions of | " + " | ".join(level_names) + " | pairs |",
        "|---|" + "---|" * (len(level_names) + 1),
        "| (true labels) | " + " | ".join(f"{float(x):.2f}" for x in true_share) + f" | {int(true.sum())} |",
    ]
    warnings = []
    for name, run in runs.items():
        preds = run.get("predictions")
        if not preds or not preds["probs"]:
            continue
        counts = torch.bincount(torch.tensor(preds["probs"]).argmax(-1), minlength=len(level_names)).float()
        share = counts / counts.sum()
        lines.append(f"| {name} | " + " | ".join(f"{float(x):.2f}" for x in share) + f" | {int(counts.sum())} |")
        top = int(share.argmax())
        if share[top] >= COLLAPSE_SHARE and true_share[top] < COLLAPSE_SHARE:
            warnings.append(
                f"**{name} has collapsed onto one level**: it predicts `{level_names[top]}` for "
                f"{float(share[top]):.0%} of test pairs (true share {float(true_share[top]):.0%}). Its ranking "
                "metrics (AUC, nDCG) can still move, but its level predictions are not usable as they are."
            )
    return lines, warnings


def teacher_note(teacher: dict[str, float], results: dict[str, dict[str, float]]) -> list[str]:
    """Whether the premise of distillation holds: the teacher ranks better than chance and than the
    baseline students trained on the same labels."""
    auc = teacher.get("auc")
    if auc is None:
        return []
    notes = []
    if abs(auc - 0.5) < CHANCE_MARGIN:
        notes.append(
            f"**The teacher ranks at chance** (direct AUC {auc:.3f}, within {CHANCE_MARGIN} of 0.5): its soft "
            "labels carry little about relevance, so distillation has nothing to pass on beyond the labels."
        )
    elif auc < 0.5:
        notes.append(
            f"**The teacher ranks worse than chance** (direct AUC {auc:.3f}): it orders relevant pairs below "
            "irrelevant ones more often than not, and distilling it teaches the students that inversion."
        )
    better = {k: v["auc"] for k, v in results.items() if k.endswith("_baseline") and v.get("auc") is not None}
    below = {k: v for k, v in better.items() if v > auc}
    if better and not below and auc > 0.5 + CHANCE_MARGIN:
        notes.append(
            f"The teacher's direct AUC ({auc:.3f}) is above every baseline student trained on the same labels ("
            + ", ".join(f"{k.replace('_', '-')} {v:.3f}" for k, v in better.items())
            + "): it knows more than its students, the premise of distillation."
        )
    if below:
        notes.append(
            f"The teacher's direct AUC ({auc:.3f}) is below the baseline student(s) trained on the same labels ("
            + ", ".join(f"{k.replace('_', '-')} {v:.3f}" for k, v in below.items())
            + "): distillation assumes a teacher that knows more than its students."
        )
    return notes


def _truth(data_dir: Path, item_fields: list[str]) -> tuple[dict[str, dict[str, Any]], int]:
    from datamodules.datamodule import RelevanceDataModule

    dm = RelevanceDataModule({"path": str(data_dir)}, item_fields=item_fields)
    dm.setup("test")
    return {r["example_id"]: r for r in dm.datasets["test"].rows}, dm.relevant_level


def _relevance(preds: dict[str, Any], truth: dict[str, dict[str, Any]], rel: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.tensor(preds["probs"])
    score = probs[:, rel:].sum(-1)
    y = torch.tensor([truth[e]["label"] >= rel for e in preds["example_id"]], dtype=torch.long)
    return score, y


def plots(out: Path, runs: dict[str, dict[str, Any]], truth: dict[str, dict[str, Any]], rel: int) -> list[str]:
    """``pr_curves.png`` (relevant vs not, average precision in the legend, the positives' share as the
    chance line), ``calibration.png`` (binary P(relevant) in 10 equal-width bins, the binary ECE over
    the same bins in the legend) and ``buckets.png`` (AUC and nDCG@10 per query bucket, pairs per bar;
    a bucket without test pairs is marked so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchmetrics.functional.classification import (
        binary_average_precision,
        binary_calibration_error,
        binary_precision_recall_curve,
    )

    d = out / "plots"
    d.mkdir(parents=True, exist_ok=True)
    files = []
    fig, ax = plt.subplots(figsize=(6, 5))
    prevalence = None
    for name, run in runs.items():
        score, y = _relevance(run["predictions"], truth, rel)
        if y.min() == y.max():
            continue
        p, r, _ = binary_precision_recall_curve(score, y)
        ap = float(binary_average_precision(score, y))
        ax.plot(r.numpy(), p.numpy(), label=f"{name} (AP {ap:.3f})")
        prevalence = float(y.float().mean())
    if prevalence is not None:
        ax.axhline(prevalence, color="k", ls=":", lw=1, label=f"chance (positives {prevalence:.2f})")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall, relevant vs not (test)", ylim=(0, 1.05))
    files.append(_save(fig, ax, d / "pr_curves.png"))

    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    n_bins = 10
    edges = torch.linspace(0, 1, n_bins + 1)
    for name, run in runs.items():
        score, y = _relevance(run["predictions"], truth, rel)
        idx = torch.bucketize(score, edges[1:-1])
        xs, ys = [], []
        for b in range(n_bins):
            m = idx == b
            if m.any():
                xs.append(float(score[m].mean()))
                ys.append(float(y[m].float().mean()))
        ece = float(binary_calibration_error(score, y, n_bins=n_bins))
        ax.plot(xs, ys, "o-", ms=3, label=f"{name} (binary ECE {ece:.3f})")
    ax.set(
        xlabel="predicted P(relevant)",
        ylabel="observed share relevant",
        title=f"Calibration of P(relevant) (test, {n_bins} bins)",
    )
    files.append(_save(fig, ax, d / "calibration.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    names = list(runs)
    width = 0.8 / max(len(names), 1)
    groups = ("all", *BUCKETS)
    for ax, metric, label in ((axes[0], "auc", "AUC"), (axes[1], "ndcg10", "nDCG@10")):
        for j, name in enumerate(names):
            test = runs[name]["test"]
            vals = [test.get(metric if b == "all" else f"{b}/{metric}") for b in groups]
            counts = [test.get("count" if b == "all" else f"{b}/count") for b in groups]
            xs = [i + j * width for i in range(len(vals))]
            bars = ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=name)
            for bar, v, n in zip(bars, vals, counts):
                if v is not None and n:
                    ax.annotate(
                        f"{int(n)}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=5
                    )
        for i, b in enumerate(groups):
            if not any(runs[n]["test"].get("count" if b == "all" else f"{b}/count") for n in names):
                ax.text(i + 0.4 - width / 2, 0.5, "no test pairs", ha="center", va="center", rotation=90, fontsize=8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], list(groups))
        ax.set(title=f"{label} per query bucket (test; pairs above each bar)", ylim=(0, 1.08))
    files.append(_save(fig, axes[0], d / "buckets.png"))
    return files


def _save(fig: Any, legend_ax: Any, path: Path) -> str:
    """Legend, layout, PNG, close; returns the path relative to the report."""
    import matplotlib.pyplot as plt

    legend_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plots/{path.name}"


def _verdicts(dim_probs: list[list[float]] | None) -> list[str]:
    if dim_probs is None:
        return ["-"] * len(DIMENSIONS)
    t = torch.tensor(dim_probs)
    return [f"{VERDICTS[int(t[i].argmax())]} ({float(t[i].max()):.2f})" for i in range(len(DIMENSIONS))]


def examples(
    teacher: Any, truth: dict[str, dict[str, Any]], student: dict[str, Any], n: int, level_names: list[str]
) -> list[str]:
    """``n`` test pairs of different levels: the teacher writes its chain now; the student's verdicts beside."""
    if n <= 0 or teacher is None:
        return []
    by_id = {e: i for i, e in enumerate(student["example_id"])}
    picked, seen = [], set()
    for e, r in truth.items():
        if e in by_id and r["label"] not in seen:
            picked.append(r)
            seen.add(r["label"])
        if len(picked) == n:
            break
    teacher.eval()
    with torch.no_grad():
        ro = teacher.readout.cot([r["query"] for r in picked], [r["item_text"] for r in picked])
    lines = []
    for k, r in enumerate(picked):
        i = by_id[r["example_id"]]
        sp = student["probs"][i]
        tp = ro.level_probs[k].tolist()
        lines += [
            f"### Example {k + 1}: “{r['query']}”",
            "",
            f"Item: `{r['item_text']}`  ",
            f"Human label: **{level_names[r['label']]}**; teacher (after its chain): "
            f"**{level_names[max(range(len(tp)), key=tp.__getitem__)]}** "
            f"({', '.join(f'{name} {p:.2f}' for name, p in zip(level_names, tp))}); distilled cross-encoder: "
            f"**{level_names[max(range(len(sp)), key=sp.__getitem__)]}** "
            f"({', '.join(f'{name} {p:.2f}' for name, p in zip(level_names, sp))}).",
            "",
            "Teacher's chain of thought (written by the fine-tuned teacher for this report"
            + ("" if ro.errors[k] is None else f"; it does not parse: {ro.errors[k]}")
            + "):",
            "",
            "```",
            ro.rationales[k] or "(empty)",
            "```",
            "",
            "| dimension | true verdict | teacher verdict | student verdict (prob) |",
            "|---|---|---|---|",
        ]
        tv = ro.verdict_probs[k]
        sv = _verdicts(student["dim_probs"][i])
        for j, dim in enumerate(DIMENSIONS):
            t_cell = VERDICTS[int(tv[j].argmax())] if ro.chains[k] is not None else "-"
            lines.append(f"| {dim} | {r['dims'][j] or '-'} | {t_cell} | {sv[j]} |")
        lines.append("")
    return lines


def write_report(
    out: Path,
    teacher: dict[str, Any],
    results: dict[str, dict[str, Any]],
    cache: dict[str, Any],
    plan: dict[str, Any],
    scale: str,
    n_examples: int = 3,
) -> Path:
    truth, rel = _truth(out / "data", ["title", "brand", "color", "attributes"])
    model = teacher.get("model")
    level_names = list(model.level_names) if model is not None else [f"level{i}" for i in range(4)]
    runs = {"teacher (direct)": teacher, **{k.replace("_", "-"): v for k, v in results.items()}}
    files = plots(out, runs, truth, rel)
    shares, collapsed = level_shares(runs, truth, level_names)
    students = sorted({k.rsplit("_", 1)[0] for k in results})
    calib = cache.get("calibration")
    lines = [
        "# ellm-mkd demo report",
        "",
        f"Scale `{scale}`: {plan['synth']['num_queries']} queries x {plan['synth']['items_per_query']} labelled items "
        "of the embedded catalog, and an unlabelled pool of further items per training query, in multiples of the "
        "labelled ones ("
        + ", ".join(f"{k.replace('_', '-')} {f'{v}x' if v else 'none'}" for k, v in plan["pool"].items())
        + ", chosen on validation); "
        f"teacher {plan.get('teacher_name', 'LLM + LoRA')}, {teacher.get('steps', '?')} steps x "
        f"{plan['teacher_batch']} labelled pairs"
        + (f", best validation AUC {teacher['best_val_auc']:.3f} kept" if teacher.get("best_val_auc") else "")
        + f"; teacher cache {cache['rows']} pairs ({cache['readout']} readout: training pairs, pool, validation and "
        "test"
        + (f"; temperature {calib['temperature']:.2f} fitted on validation" if calib else "")
        + f"); students MiniLM-L6, {plan['epochs']} epoch(s). Relevant = level >= {level_names[rel]}.",
        "",
        "## Test metrics",
        "",
        "Teacher: direct readout (its own judgement, no chain given)"
        + (
            f", on the first {plan['teacher_test_batches'] * plan['teacher_eval']} test pairs"
            if plan["teacher_test_batches"]
            else ""
        )
        + ". Students: baseline = labels only; mkd = the teacher's level distributions on the labelled pairs and "
        "on its unlabelled pool, if any, beside the labels (configs/mkd/soft.yaml + the pool).",
        "",
        *metrics_table({k: v["test"] for k, v in runs.items()}),
        "",
        *[f"> {note}\n" for note in teacher_note(teacher["test"], {k: v["test"] for k, v in results.items()})],
        "## Predicted levels",
        "",
        "Share of test pairs predicted at each level (the most probable one), beside the true shares.",
        "",
        *shares,
        "",
        *[f"> {w}\n" for w in collapsed],
        "## MKD vs baseline",
        "",
        "↑: higher is better, ↓: lower is better; each cell is MKD vs baseline (difference, better or worse).",
        "",
        *delta_table({k: v["test"] for k, v in results.items()}, students),
        "",
        "## Plots",
        "",
        *[f"![{Path(f).stem}]({f})" for f in files],
        "",
        "## Examples",
        "",
        *examples_section(model, truth, results, n_examples, level_names),
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def examples_section(
    model: Any, truth: dict[str, dict[str, Any]], results: dict[str, dict[str, Any]], n: int, level_names: list[str]
) -> list[str]:
    student = results.get("cross_encoder_mkd") or next(iter(results.values()))
    return examples(model, truth, student["predictions"], n, level_names)
