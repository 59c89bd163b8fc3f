"""What ``ellm-mkd bench students`` reports: its targets (:func:`compute_targets`) and its section of
``docs/benchmarks.md`` (:func:`markdown_section`)."""

from __future__ import annotations

from typing import Any

from .baselines import BASELINE_NAME
from .common import fmt

TARGET_TT_AUC_GAP = 0.03


def compute_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["name"]: r for r in rows}
    ce, tt, st = by.get("cross_encoder"), by.get("two_tower"), by.get(BASELINE_NAME)

    def m(r, k):
        return None if r is None else r["metrics"].get(k)

    def t(r, k):
        return None if r is None else r.get("throughput", {}).get(k)

    def target(rule: str, measured: dict[str, Any], ok) -> dict[str, Any]:
        missing = [k for k, v in measured.items() if v is None]
        return {"rule": rule, "measured": measured, "met": None if missing else bool(ok())}

    out = {
        "ce_rmse_matches_baseline": target(
            "cross_encoder rmse <= st_cross_encoder rmse",
            {"cross_encoder": m(ce, "rmse"), BASELINE_NAME: m(st, "rmse")},
            lambda: m(ce, "rmse") <= m(st, "rmse"),
        ),
        "ce_auc_matches_baseline": target(
            "cross_encoder auc >= st_cross_encoder auc",
            {"cross_encoder": m(ce, "auc"), BASELINE_NAME: m(st, "auc")},
            lambda: m(ce, "auc") >= m(st, "auc"),
        ),
        "ce_train_throughput": target(
            "cross_encoder train_pairs_per_s >= st_cross_encoder train_pairs_per_s",
            {"cross_encoder": t(ce, "train_pairs_per_s"), BASELINE_NAME: t(st, "train_pairs_per_s")},
            lambda: t(ce, "train_pairs_per_s") >= t(st, "train_pairs_per_s"),
        ),
        "two_tower_auc_within_3_points": target(
            f"cross_encoder auc - two_tower auc <= {TARGET_TT_AUC_GAP}",
            {"cross_encoder": m(ce, "auc"), "two_tower": m(tt, "auc")},
            lambda: m(ce, "auc") - m(tt, "auc") <= TARGET_TT_AUC_GAP + 1e-12,
        ),
    }
    return out


def markdown_section(result: dict[str, Any]) -> str:
    from ellm_mkd.schema import BUCKETS

    name = result["benchmark"]
    rows = result["rows"]
    lines = [f"<!-- bench:{name} -->", f"## {name}", ""]
    lines += [f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ", f"Date: {result['date']}", ""]
    info = result.get("split", {})
    if info:
        lines += [
            f"Data: `{info.get('source')}`, query-disjoint split (seed {info.get('seed')}, "
            f"{info.get('test_fraction'):.0%} of queries held out for test, {info.get('val_fraction'):.0%} for "
            f"validation): "
            f"{info.get('train_pairs'):,} training pairs, {info.get('val_pairs'):,} validation pairs, "
            f"{info.get('test_pairs'):,} test pairs"
            + (f" (training capped with --train_limit {info['train_limit']})" if info.get("train_limit") else "")
            + ". Figures are on the test split; the weights at the end of training are tested.",
            "",
        ]
    cols = ["rmse", "auc", "spearman", "ndcg10", "macro_f1", "ece"]
    lines += [
        "### Overall",
        "",
        "| model | kind | " + " | ".join(cols) + " | train pairs/s | inference pairs/s |",
        "|---|---|" + "---:|" * (len(cols) + 2),
    ]
    for r in rows:
        tp = r.get("throughput", {})
        cells = [fmt(r["metrics"].get(c)) for c in cols]
        if "std" in r:
            cells = [c + (f" ± {r['std'][k]:.3f}" if k in r["std"] and c != "–" else "") for c, k in zip(cells, cols)]
        lines.append(
            f"| {r['name']} | {r['kind']} | "
            + " | ".join(cells)
            + f" | {fmt(tp.get('train_pairs_per_s'), 1)} | {fmt(tp.get('infer_pairs_per_s'), 1)} |"
        )
    lines += [
        "",
        "### Per query bucket",
        "",
        "| model | bucket | pairs | " + " | ".join(cols[:5]) + " |",
        "|---|---|" + "---:|" * 6,
    ]
    for r in rows:
        for b in BUCKETS:
            v = r["by_bucket"].get(b)
            if v:
                lines.append(
                    f"| {r['name']} | {b} | {v.get('count', '–')} | "
                    + " | ".join(fmt(v.get(c)) for c in cols[:5])
                    + " |"
                )
    lines += [
        "",
        "### Setup",
        "",
        "| model | precision | optimizer | epochs | batch | max length | lr | warm-up | grad clip | train pairs "
        "| steps |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["config"]
        if r["kind"] == "reference":
            continue
        lr = f"{c['lr']:g}" if c.get("head_lr") is None else f"{c['lr']:g} (heads {c['head_lr']:g})"
        clip = c.get("gradient_clip_val", c.get("max_grad_norm")) or "none"
        lines.append(
            f"| {r['name']} | {c.get('precision')} | {c.get('optimizer')} | {c.get('epochs')} | "
            f"{c.get('batch_size')} | "
            f"{c.get('max_seq_length')} | {lr} | {c.get('warmup_ratio')} | {fmt(clip, 1)} | {c.get('train_pairs')} | "
            f"{c.get('optimizer_steps')} |"
        )
    lines += ["", "### Targets", "", "| target | rule | measured | met |", "|---|---|---|---|"]
    for key, tg in result["targets"].items():
        meas = ", ".join(
            f"{k} {fmt(v, 4 if not isinstance(v, float) or v < 10 else 1)}" for k, v in tg["measured"].items()
        )
        met = {True: "yes", False: "**no**", None: "n/a"}[tg["met"]]
        lines.append(f"| {key} | {tg['rule']} | {meas} | {met} |")
    run = result.get("throughput_run")
    if run:
        lines += [
            "",
            "### Training throughput, re-timed",
            "",
            f"Command: `{run['command']}`  ",
            f"Machine: {run['machine']}; date {run['date']}.",
            "",
            f"Training alone, one epoch each over the same {run['train_pairs']:,} training pairs (whole queries), "
            f"batch {run['batch_size']}, precision {run['precision']}, no validation or test; {run['repeats']} "
            "rounds with the order rotated each round. The rows and the other targets above keep the figures of the "
            "full run, "
            "measured on the machine and at the precision named there.",
            "",
            "| model | training pairs/s per round | median |",
            "|---|---|---:|",
        ]
        for k, v in run["train_pairs_per_s"].items():
            lines.append(f"| {k} | {', '.join(f'{x:.1f}' for x in v)} | {run['median'][k]:.1f} |")
    base = next((r for r in rows if r["kind"] == "baseline"), None)
    if base is not None:
        lines += [
            "",
            f"The students read the item as the project renders it (`Title: <title>`); `{base['name']}` reads "
            f"{base['config'].get('item_text', 'the raw title')} (`--baseline_text`).",
        ]
    lines += [
        "",
        "How each row is evaluated (all through `ellm_mkd.metrics.RelevanceMetrics` on the same test rows): "
        "students from their level probabilities and expected grade; `st_cross_encoder` and `tfidf_char_3_5` "
        "give a score — AUC from the score, RMSE/Spearman/nDCG@10 from the predicted grade "
        "(`low + (high - low) * score` for the baseline, i.e. `1 + 2 * score` on Home Depot; a least-squares "
        "line on cosine for TF-IDF), macro-F1 from the "
        "predicted grade cut into levels at the scheme's cut points, no ECE; `global_mean` gives RMSE only. "
        "Training pairs/s: pairs over the wall time of the training batches (data loading and tokenization "
        "included, validation and checkpointing excluded); inference pairs/s: test pairs over the wall time "
        "of an inference pass over them (students: `trainer.predict`; baseline: `CrossEncoder.predict`), same "
        "eval batch size and precision. See `ellm_mkd/bench.py`.",
        "",
        f"<!-- /bench:{name} -->",
    ]
    return "\n".join(lines)
