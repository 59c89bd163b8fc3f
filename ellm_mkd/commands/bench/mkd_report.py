"""What ``ellm-mkd bench mkd`` reports: its targets (:func:`targets`), its section of ``docs/benchmarks.md``
(:func:`markdown_section`) and the plot of student AUC against pool size (:func:`pool_plot`)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .common import section_head

#: metrics whose mean must not get worse under MKD (True: higher is better)
LEVEL_METRICS = {"macro_f1": True, "rmse": False, "ece": False}


def row_label(r: dict[str, Any]) -> str:
    """``soft`` or ``soft + pool 2x``."""
    return r["row"] + (f" + pool {r['pool']}x" if r.get("pool") else "")


def _cell(m: dict[str, Any], key: str) -> str:
    v = m.get(key)
    return "–" if not v else f"{v['mean']:.3f} ± {v['std']:.3f}"


def _mean(m: dict[str, Any], key: str) -> float | None:
    v = m.get(key)
    return v["mean"] if v else None


def _selection_ece(rows: list[dict[str, Any]]) -> str:
    """The validation ECE that breaks ties between ``rows``: the cross-fitted one after calibration
    (``ece_calibrated_cv``) where every row has it, else the raw model's (``ece``)."""
    cv = all(_mean(r.get("val_metrics") or {}, "ece_calibrated_cv") is not None for r in rows)
    return "ece_calibrated_cv" if cv else "ece"


def chosen_rows(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per student, the compared MKD row at the pool size with the best mean validation AUC (never test); pool sizes
    within ``select_tolerance`` of that AUC (the setup's, default 0) count as level with it, and the one with the
    lowest mean validation ECE among them is chosen: the cross-fitted ECE after calibration (``ece_calibrated_cv``,
    what a calibrated student is tested on) where every such row has it, else the raw model's."""
    compare = result["setup"].get("compare_row", "full")
    tolerance = result["setup"].get("select_tolerance") or 0.0
    by_student: dict[str, list[dict[str, Any]]] = {}
    for r in result["rows"]:
        if r["row"] == compare:
            by_student.setdefault(r["student"], []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for student, rows in by_student.items():
        aucs = [_mean(r.get("val_metrics") or {}, "auc") for r in rows]
        if all(a is None for a in aucs):
            out[student] = rows[0]
            continue
        best = max(a for a in aucs if a is not None)
        level = [r for r, a in zip(rows, aucs) if a is not None and a >= best - tolerance]

        key = _selection_ece(level)

        def rank(r: dict[str, Any], key: str = key) -> tuple[float, float]:  # lowest validation ECE, best AUC
            ece = _mean(r["val_metrics"], key) if tolerance > 0 else None
            return (ece if ece is not None else 0.0, -_mean(r["val_metrics"], "auc"))

        out[student] = min(level, key=rank)
    return out


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The teacher against the cross-encoder baseline (the premise of distillation); per student, the compared MKD
    row at its validation-chosen pool size against the baseline: mean AUC overall, on tail and on unseen queries
    above the baseline by more than the baseline's seed std, level metrics (macro-F1, RMSE, ECE) no worse, and the
    training-loop time per pair at most 10% above the baseline's."""
    by = {(r["student"], r["row"], r.get("pool", 0)): r for r in result["rows"]}
    out: dict[str, dict[str, Any]] = {}
    teacher_auc = (result.get("teacher") or {}).get("auc")
    for student in dict.fromkeys(r["student"] for r in result["rows"]):
        base = by.get((student, "baseline", 0))
        if base and teacher_auc is not None and _mean(base["metrics"], "auc") is not None:
            b = _mean(base["metrics"], "auc")
            out[f"teacher_above_{student}_baseline"] = {
                "rule": f"teacher direct AUC (test) >= {student} baseline mean AUC",
                "measured": f"teacher {teacher_auc:.4f}, baseline {b:.4f}",
                "met": teacher_auc >= b,
            }
    for student, full in chosen_rows(result).items():
        base = by.get((student, "baseline", 0))
        if not base:
            continue
        name = f"{student}_{full['row']}"
        for bucket in ("all", "tail", "unseen"):
            key = "auc" if bucket == "all" else f"{bucket}/auc"
            f, b = full["metrics"].get(key), base["metrics"].get(key)
            if not f or not b:
                continue
            out[f"{name}_beats_baseline_{bucket}"] = {
                "rule": f"mean AUC ({bucket}) {row_label(full)} > baseline + baseline std",
                "measured": f"{row_label(full)} {f['mean']:.4f}, baseline {b['mean']:.4f} ± {b['std']:.4f}",
                "met": f["mean"] > b["mean"] + b["std"],
            }
        for key, higher in LEVEL_METRICS.items():
            f, b = _mean(full["metrics"], key), _mean(base["metrics"], key)
            if f is None or b is None:
                continue
            out[f"{name}_keeps_{key}"] = {
                "rule": f"mean {key} {row_label(full)} {'>=' if higher else '<='} baseline",
                "measured": f"{row_label(full)} {f:.4f}, baseline {b:.4f}",
                "met": f >= b if higher else f <= b,
            }
        ov = full.get("epoch_overhead_vs_baseline")
        if ov is not None:
            out[f"{name}_epoch_overhead"] = {
                "rule": "training-loop time per pair, MKD over baseline <= +10%",
                "measured": f"{100 * ov:+.1f}%",
                "met": ov <= 0.10,
            }
    return out


def pool_plot(result: dict[str, Any], path: Path) -> Path | None:
    """Student test AUC (mean ± std over seeds) against pool size: the baseline as a flat line (it cannot use
    unlabelled pairs), each MKD row as a curve. Returns the PNG path, or None with fewer than two pool sizes."""
    pools = sorted({r.get("pool", 0) for r in result["rows"]})
    if len(pools) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = list(dict.fromkeys(r["student"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(students), figsize=(5 * len(students), 3.6), squeeze=False)
    for ax, student in zip(axes[0], students):
        rows = [r for r in result["rows"] if r["student"] == student]
        for name in dict.fromkeys(r["row"] for r in rows):
            pts = sorted((r.get("pool", 0), r["metrics"].get("auc")) for r in rows if r["row"] == name)
            pts = [(p, m) for p, m in pts if m]
            if name == "baseline" and pts:
                pts = [(p, pts[0][1]) for p in pools]
            if not pts:
                continue
            xs, ms = [p for p, _ in pts], [m["mean"] for _, m in pts]
            sd = [m["std"] for _, m in pts]
            ax.errorbar(
                xs, ms, yerr=sd, marker="o", capsize=3, label=name, linestyle="--" if name == "baseline" else "-"
            )
        teacher = (result.get("teacher") or {}).get("auc")
        if teacher is not None:
            ax.axhline(teacher, color="grey", linewidth=1, label="teacher (direct)")
        ax.set_title(student)
        ax.set_xlabel("unlabelled pool (x labelled training pairs)")
        ax.set_ylabel("test AUC")
        ax.set_xticks(pools)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _calibration_text(c: dict[str, Any] | None) -> str:
    if not c:
        return ""
    biases = "" if c.get("bias") is None else " and level biases [" + ", ".join(f"{b:+.2f}" for b in c["bias"]) + "]"
    return (
        f" The students distil its level distributions at temperature T = {c['temperature']:.2f}{biases}, fitted on "
        f"{c['pairs']} validation pairs (validation NLL {c['nll_before']:.3f} -> {c['nll_after']:.3f}, "
        f"ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f})." + _cv_text(c.get("cv")) + _held_out_text(c.get("test"))
    )


def _cv_text(cv: dict[str, Any] | None) -> str:
    if not cv:
        return ""
    return (
        f" Level biases {'kept' if cv['bias'] else 'left out'} by {cv['folds']}-fold cross-validation over the "
        f"{cv['groups']} validation queries (held-out NLL {cv['nll_temperature']:.3f} with the temperature alone, "
        f"{cv['nll_temperature_bias']:.3f} with biases)."
    )


def _held_out_text(t: dict[str, Any] | None) -> str:
    if not t:
        return ""
    return (
        f" On the {t['pairs']} test pairs, which the fit did not see, the same calibration took the teacher's NLL "
        f"from {t['nll_before']:.3f} to {t['nll_after']:.3f} and ECE from {t['ece_before']:.3f} to "
        f"{t['ece_after']:.3f}."
    )


def markdown_section(result: dict[str, Any], plot: str | None = None) -> str:
    from ellm_mkd.schema import BUCKETS

    name, s = result["benchmark"], result["setup"]
    d = s.get("data") or {"source": "embedded catalog"}
    if s.get("catalog"):
        c = s["catalog"]
        what = f"Embedded catalog, {c['num_queries']} queries x {c['items_per_query']} items"
        if "val_fraction" in c:  # (results written before the catalog's split was an option hold the defaults)
            what += f", {c['val_fraction']} / {c['test_fraction']} of queries for validation / test"
    else:
        sp = d.get("split") or {}
        what = (
            f"`{d['source']}` (preset {d.get('preset')}, item fields {', '.join(d['item_fields'])}), query-disjoint "
            f"split (seed {sp.get('seed')}, {sp.get('val_fraction')} / {sp.get('test_fraction')} of queries for "
            f"validation / test)"
        )
        if d.get("limit_pairs"):
            what += (
                ", subsampled by whole queries to at most "
                + ", ".join(f"{v} {k}" for k, v in d["limit_pairs"].items())
                + " pairs"
            )
    if s.get("split_pairs"):
        what += " (" + ", ".join(f"{v} {k}" for k, v in s["split_pairs"].items()) + " pairs)"
    t = s["teacher"]
    if t.get("dir"):
        teacher = f"`{t['model']}` fine-tuned beforehand (`{t['dir']}`{'; ' + t['how'] if t.get('how') else ''})"
    else:
        teacher = f"`{t['model']}` + LoRA ({t['steps']} steps x {t['batch']})"
    pools = sorted({r.get("pool", 0) for r in result["rows"]})
    pool_text = (
        f"; unlabelled pools of {', '.join(f'{p}x' for p in pools)} the labelled training pairs, judged by the teacher"
        + (
            f" (further training queries, after the first {s['pool_after']} training pairs)"
            if s.get("pool_after")
            else f" (pairs of further queries from `{s['pool_source']}`)"
            if s.get("pool_source")
            else ""
        )
        if len(pools) > 1
        else ""
    )
    calibrated = {
        True: ", each with a temperature fitted on validation (baseline and MKD alike)",
        "bias": ", each with a temperature and level biases fitted on validation (baseline and MKD alike)",
    }.get(s.get("student_calibration"), "")
    lines = [
        *section_head(result),
        f"{what}; teacher {teacher}, cache of {s['cache_rows']} training pairs "
        f"({t.get('readout_for_cache', 'forced')} readout){pool_text}; students {s['student_epochs']} epoch(s)"
        f"{calibrated}; mean ± std over seeds {result['rows'][0]['seeds'] if result['rows'] else []}. "
        "Teacher (direct readout) on the same test split: "
        f"AUC {result['teacher'].get('auc', float('nan')):.3f}, "
        f"nDCG@10 {result['teacher'].get('ndcg10', float('nan')):.3f}, "
        f"accuracy {result['teacher'].get('accuracy', float('nan')):.3f}, "
        f"macro-F1 {result['teacher'].get('macro_f1', float('nan')):.3f}, "
        f"ECE {result['teacher'].get('ece', float('nan')):.3f}." + _calibration_text(t.get("calibration")),
        "",
        "| student | row | bucket | AUC | nDCG@10 | macro-F1 | RMSE | ECE | val AUC | epoch overhead vs baseline | "
        "chain embedding, once per run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        m = r["metrics"]
        for bucket in ("all", *BUCKETS):
            p = "" if bucket == "all" else f"{bucket}/"
            if p and not m.get(p + "count"):
                continue
            ov, ce = r["epoch_overhead_vs_baseline"], r.get("chain_embedding_seconds")
            first = bucket == "all"
            lines.append(
                f"| {r['student']} | {row_label(r)} | {bucket} | {_cell(m, p + 'auc')} | {_cell(m, p + 'ndcg10')} | "
                f"{_cell(m, p + 'macro_f1')} | {_cell(m, p + 'rmse')} | {_cell(m, p + 'ece') if first else ''} | "
                f"{_cell(r.get('val_metrics') or {}, 'auc') if first else ''} | "
                f"{'' if not first or ov is None else f'{100 * ov:+.1f}%'} | "
                f"{'' if not first or not ce else format(ce['mean'], '.1f') + ' s'} |"
            )
    if plot:
        lines += ["", f"![student AUC against pool size]({plot})"]
    if len(s.get("machines") or []) > 1:
        lines += [
            "",
            "Runs of this benchmark were resumed on more than one machine ("
            + "; ".join(s["machines"])
            + "): epoch times compare only within one machine.",
        ]
    if s.get("resumed_runs"):
        lines += [
            "",
            f"{s['resumed_runs']} student run(s) were finished by an earlier invocation with the same settings "
            "(`--resume`, the default) and read back from its state.",
        ]
    checks = result.get("targets") or targets(result)
    if checks:
        chosen = chosen_rows(result)
        title = "Targets" if s.get("catalog") else "Against the baseline (no target on this dataset)"
        lines += ["", f"{title}:", ""]
        if chosen:
            tol = s.get("select_tolerance") or 0.0
            cv = _selection_ece(list(chosen.values())) == "ece_calibrated_cv"
            ece = "validation ECE after calibration on other validation queries" if cv else "validation ECE"
            rule = f" (within {tol:g} of the best, the lowest {ece})" if tol > 0 else ""
            lines += [
                f"MKD row held against the baseline, its pool size chosen on validation AUC{rule}: "
                + ", ".join(f"{k}: {row_label(v)}" for k, v in chosen.items())
                + ".",
                "",
            ]
        lines += ["| check | rule | measured | met |", "|---|---|---|---|"]
        for key, c in checks.items():
            lines.append(f"| {key} | {c['rule']} | {c['measured']} | {'yes' if c['met'] else '**no**'} |")
    lines.append(f"<!-- /bench:{name} -->")
    return "\n".join(lines)


def seed_std(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation and count of the finite values (empty when none)."""
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return {}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
