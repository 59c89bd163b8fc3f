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

from datamodules.schema import BUCKETS, DIMENSIONS, VERDICTS

TABLE_METRICS = (("auc", "AUC"), ("ndcg10", "nDCG@10"), ("macro_f1", "macro-F1"), ("rmse", "RMSE"),
                 ("spearman", "Spearman"), ("ece", "ECE"), ("count", "pairs"))


def _fmt(v: Any, metric: str) -> str:
    if v is None:
        return "-"
    return f"{int(v)}" if metric == "count" else f"{float(v):.3f}"


def metrics_table(results: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| model | bucket | " + " | ".join(n for _, n in TABLE_METRICS) + " |",
             "|---|---|" + "---|" * len(TABLE_METRICS)]
    for name, m in results.items():
        for bucket in ("all", *BUCKETS):
            p = "" if bucket == "all" else f"{bucket}/"
            if p and m.get(p + "count") in (None, 0):
                continue
            lines.append(f"| {name} | {bucket} | " + " | ".join(_fmt(m.get(p + k), k) for k, _ in TABLE_METRICS) + " |")
    return lines


def delta_table(results: dict[str, dict[str, float]], students: list[str]) -> list[str]:
    cols = [(b, k) for k in ("auc", "ndcg10") for b in ("all", "tail", "unseen")]
    lines = ["| student | " + " | ".join(f"{'AUC' if k == 'auc' else 'nDCG@10'} {b}" for b, k in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for s in students:
        base, mkd = results.get(f"{s}_baseline", {}), results.get(f"{s}_mkd", {})
        cells = []
        for b, k in cols:
            key = k if b == "all" else f"{b}/{k}"
            if base.get(key) is None or mkd.get(key) is None:
                cells.append("-")
            else:
                cells.append(f"{mkd[key]:.3f} vs {base[key]:.3f} ({mkd[key] - base[key]:+.3f})")
        lines.append(f"| {s.replace('_', '-')} | " + " | ".join(cells) + " |")
    return lines


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchmetrics.functional.classification import binary_precision_recall_curve

    d = out / "plots"
    d.mkdir(parents=True, exist_ok=True)
    files = []
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, run in runs.items():
        score, y = _relevance(run["predictions"], truth, rel)
        if y.min() == y.max():
            continue
        p, r, _ = binary_precision_recall_curve(score, y)
        ax.plot(r.numpy(), p.numpy(), label=f"{name} (AUC {run['test'].get('auc', float('nan')):.3f})")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall, relevant vs not (test)")
    files.append(_save(fig, ax, d / "pr_curves.png"))

    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    edges = torch.linspace(0, 1, 11)
    for name, run in runs.items():
        score, y = _relevance(run["predictions"], truth, rel)
        idx = torch.bucketize(score, edges[1:-1])
        xs, ys = [], []
        for b in range(10):
            m = idx == b
            if m.any():
                xs.append(float(score[m].mean()))
                ys.append(float(y[m].float().mean()))
        ax.plot(xs, ys, "o-", ms=3, label=f"{name} (ECE {run['test'].get('ece', float('nan')):.3f})")
    ax.set(xlabel="predicted P(relevant)", ylabel="observed share relevant", title="Calibration (test, 10 bins)")
    files.append(_save(fig, ax, d / "calibration.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    names = list(runs)
    width = 0.8 / max(len(names), 1)
    for ax, metric, label in ((axes[0], "auc", "AUC"), (axes[1], "ndcg10", "nDCG@10")):
        for j, name in enumerate(names):
            vals = [runs[name]["test"].get(metric if b == "all" else f"{b}/{metric}") for b in ("all", *BUCKETS)]
            xs = [i + j * width for i in range(len(vals))]
            ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(BUCKETS) + 1)], ["all", *BUCKETS])
        ax.set(title=f"{label} per query bucket (test)", ylim=(0, 1))
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


def examples(teacher: Any, truth: dict[str, dict[str, Any]], student: dict[str, Any], n: int,
             level_names: list[str]) -> list[str]:
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
        lines += [f"### Example {k + 1}: “{r['query']}”", "", f"Item: `{r['item_text']}`  ",
                  f"Human label: **{level_names[r['label']]}**; teacher (after its chain): "
                  f"**{level_names[max(range(len(tp)), key=tp.__getitem__)]}** "
                  f"({', '.join(f'{name} {p:.2f}' for name, p in zip(level_names, tp))}); distilled cross-encoder: "
                  f"**{level_names[max(range(len(sp)), key=sp.__getitem__)]}** "
                  f"({', '.join(f'{name} {p:.2f}' for name, p in zip(level_names, sp))}).", "",
                  "Teacher's chain of thought (written by the fine-tuned teacher for this report"
                  + ("" if ro.errors[k] is None else f"; it does not parse: {ro.errors[k]}") + "):", "", "```",
                  ro.rationales[k] or "(empty)", "```", "",
                  "| dimension | true verdict | teacher verdict | student verdict (prob) |", "|---|---|---|---|"]
        tv = ro.verdict_probs[k]
        sv = _verdicts(student["dim_probs"][i])
        for j, dim in enumerate(DIMENSIONS):
            t_cell = VERDICTS[int(tv[j].argmax())] if ro.chains[k] is not None else "-"
            lines.append(f"| {dim} | {r['dims'][j] or '-'} | {t_cell} | {sv[j]} |")
        lines.append("")
    return lines


def write_report(out: Path, teacher: dict[str, Any], results: dict[str, dict[str, Any]], cache: dict[str, Any],
                 plan: dict[str, Any], scale: str, n_examples: int = 3) -> Path:
    truth, rel = _truth(out / "data", ["title", "brand", "color", "attributes"])
    model = teacher.get("model")
    level_names = list(model.level_names) if model is not None else [f"level{i}" for i in range(4)]
    runs = {"teacher (direct)": teacher, **{k.replace("_", "-"): v for k, v in results.items()}}
    files = plots(out, runs, truth, rel)
    students = sorted({k.rsplit("_", 1)[0] for k in results})
    lines = ["# ellm-mkd demo report", "",
             f"Scale `{scale}`: {plan['synth']['num_queries']} queries x {plan['synth']['items_per_query']} items of the "
             f"embedded catalog; teacher SmolLM2-135M-Instruct + LoRA, {plan['teacher_steps']} steps x "
             f"{plan['teacher_batch']} examples; teacher cache {cache['rows']} training pairs (forced readout); students "
             f"MiniLM-L6, {plan['epochs']} epoch(s). Relevant = level >= {level_names[rel]}.", "",
             "## Test metrics", "",
             "Teacher: direct readout (its own judgement, no chain given)"
             + (f", on the first {plan['teacher_test_batches'] * plan['teacher_eval']} test pairs"
                if plan["teacher_test_batches"] else "")
             + ". Students: baseline = labels only; mkd = full MKD (soft levels, dimension verdicts, rationale "
             "alignment; configs/mkd/full.yaml).", "",
             *metrics_table({k: v["test"] for k, v in runs.items()}), "",
             "## MKD vs baseline", "", *delta_table({k: v["test"] for k, v in results.items()}, students), "",
             "## Plots", "", *[f"![{Path(f).stem}]({f})" for f in files], "",
             "## Examples", "",
             *examples_section(model, truth, results, n_examples, level_names)]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def examples_section(model: Any, truth: dict[str, dict[str, Any]], results: dict[str, dict[str, Any]], n: int,
                     level_names: list[str]) -> list[str]:
    student = results.get("cross_encoder_mkd") or next(iter(results.values()))
    return examples(model, truth, student["predictions"], n, level_names)
