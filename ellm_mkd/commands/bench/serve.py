"""``ellm-mkd bench serve``: serving speed of the shipped students, all contenders in one run on the same test
pairs and CPU.

1. the students are exported (``ellm-mkd export``, int8 included) from their checkpoints into ``work_dir``;
2. on a seeded sample of the data config's test pairs, for the cross-encoder: PyTorch eager, ONNX fp32,
   ONNX int8, ``sentence_transformers.CrossEncoder.predict`` on the same weights (the export's
   ``sentence_transformers/`` folder) and the teacher's direct readout (on ``teacher_pairs`` of them):
   pairs/s at batch ``batch_size``, latency p50/p99 at batch 1, and the AUC each gives on the pairs it scored;
3. the two-tower student with a precomputed item index: query latency at batch 1 (query tower + scorer over
   the query's items), its AUC, and one query against ``index_items`` items versus the cross-encoder;
4. the service (``ellm-mkd serve``, int8) on loopback: ``load_clients`` concurrent clients send
   ``load_requests`` requests: throughput, latency p50/p99, errors and lost requests; then every bad request
   of a fixed set must get a 4xx JSON answer.

Writes ``docs/results/<name>.json`` and the ``<name>`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import logging
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .common import fmt, options, options_parser, publish, result_head

log = logging.getLogger(__name__)


@dataclass
class ServeBenchOptions:
    """Options of ``ellm-mkd bench serve`` (each a ``--name`` flag; ``--config FILE`` reads them from YAML).

    Args:
        cross_encoder: cross-encoder student checkpoint (``ellm-mkd bench students`` writes this one)
        two_tower: two-tower student checkpoint (empty: skip the two-tower rows)
        data_config: YAML whose ``data`` section (source, item_fields) the students were trained with
        pairs: seeded sample of test pairs every contender scores
        batch_size: pairs per call for pairs/s
        latency_pairs: single-pair calls timed for latency p50/p99
        teacher_model: teacher for the direct-readout row (empty: skip it)
        teacher_adapter: its LoRA adapter (optional; speed barely depends on it)
        teacher_pairs: pairs the teacher scores (it is slow)
        teacher_batch_size: pairs per teacher forward (the students' batch_size by default: the same work per call)
        index_items: items scored for one query (two-tower index vs cross-encoder)
        load_clients: concurrent clients of the service load test (0: skip the service)
        load_requests: requests of the load test
        items_per_request: items per load-test request
        threads: onnxruntime/torch threads (default: all cores)
        seed: seed of the pair sample
        work_dir: exports and logs
        name: benchmark name (the JSON file and the markdown section)
        out_json: JSON path (default docs/results/<name>.json)
        out_md: markdown file of the section
    """

    cross_encoder: str = "runs/benchmarks/homedepot_cross_encoder/tb/checkpoints/best.ckpt"
    two_tower: str = "runs/benchmarks/homedepot_two_tower/tb/checkpoints/best.ckpt"
    data_config: str = "configs/benchmarks/homedepot_cross_encoder.yaml"
    pairs: int = 2000
    batch_size: int = 32
    latency_pairs: int = 300
    teacher_model: str = "smollm2-135m-instruct"
    teacher_adapter: str | None = None
    teacher_pairs: int = 64
    teacher_batch_size: int = 32
    index_items: int = 1000
    load_clients: int = 8
    load_requests: int = 2000
    items_per_request: int = 1
    threads: int | None = None
    seed: int = 0
    work_dir: str = "runs/bench/serve"
    name: str = "serve"
    out_json: str | None = None
    out_md: str = "docs/benchmarks.md"


def _pairs(opts: ServeBenchOptions) -> tuple[list[dict[str, Any]], Any, list[str]]:
    """The sampled test rows (query, item_text, item_id, label), the data source and the item fields."""
    from datamodules.data_source import DataSource
    from datamodules.splits import select_split
    from datamodules.text import DEFAULT_ITEM_FIELDS, render_item
    from datamodules.validation import load_examples

    data = (yaml.safe_load(Path(opts.data_config).read_text(encoding="utf-8")) or {}).get("data") or {}
    source = DataSource(**data["source"])
    fields = list(data.get("item_fields") or DEFAULT_ITEM_FIELDS)
    table, _ = load_examples(source)
    rows = select_split(table, "test").to_pylist()
    rows = random.Random(opts.seed).sample(rows, min(opts.pairs, len(rows)))
    out = [
        {
            "query": r["query"],
            "item_text": render_item(r, fields)[0],
            "item": {f: r[f] for f in fields if r.get(f)},
            "item_id": r["item_id"],
            "label": r["label"],
        }
        for r in rows
    ]
    return out, source, fields


def _auc(probs: np.ndarray, labels: Sequence[int], relevant_level: int) -> float | None:
    import torch
    from torchmetrics.functional.classification import binary_auroc

    y = torch.tensor([int(lv is not None and lv >= relevant_level) for lv in labels])
    if y.min() == y.max():
        return None
    return float(binary_auroc(torch.as_tensor(probs[:, relevant_level:].sum(1)), y))


def _speed(fn: Callable[[list[str], list[str]], np.ndarray], q: list[str], d: list[str], batch: int, lat_n: int):
    """Level probs of all pairs, pairs/s at ``batch`` and latency (ms) p50/p99 of ``lat_n`` single pairs."""
    fn(q[:batch], d[:batch])  # warm-up: first-call allocations and lazy initialisation
    t = time.perf_counter()
    probs = np.concatenate([np.asarray(fn(q[s : s + batch], d[s : s + batch])) for s in range(0, len(q), batch)])
    pps = len(q) / (time.perf_counter() - t)
    lat = []
    for i in range(min(lat_n, len(q))):
        t = time.perf_counter()
        fn([q[i]], [d[i]])
        lat.append((time.perf_counter() - t) * 1000)
    return probs, {"pairs_per_s": pps, **_percentiles(lat)}


def _percentiles(ms: Sequence[float]) -> dict[str, float]:
    if not ms:
        return {}
    return {"latency_p50_ms": float(np.percentile(ms, 50)), "latency_p99_ms": float(np.percentile(ms, 99))}


def _export(ckpt: str, out: Path, train_config: str) -> Any:
    from lightning_modules.serving_graphs import load_student

    from ..export import export_student
    from ..export_provenance import training_context

    if not Path(ckpt).is_file():
        raise FileNotFoundError(
            2, "checkpoint not found (train the students first: ellm-mkd bench students, or pass the flag)", ckpt
        )
    student = load_student(ckpt)
    ctx = training_context(Path(ckpt), train_config, student.num_levels)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    card = export_student(student, out, item_fields=ctx["item_fields"], level_names=ctx["level_names"], quantize=True)
    return student, card, ctx


def bench_cross_encoder(opts: ServeBenchOptions, rows: list[dict[str, Any]], work: Path) -> dict[str, Any]:
    from sentence_transformers import CrossEncoder

    from ellm_mkd.serving import Scorer

    from ..export import torch_scorer

    student, card, ctx = _export(opts.cross_encoder, work / "cross_encoder", opts.data_config)
    q, d, labels = [r["query"] for r in rows], [r["item_text"] for r in rows], [r["label"] for r in rows]
    rl = card.relevant_level
    eager = torch_scorer(student, ctx["item_fields"], ctx["level_names"], opts.batch_size)
    fp32 = Scorer.from_export(work / "cross_encoder", "fp32", opts.batch_size, opts.threads)
    int8 = Scorer.from_export(work / "cross_encoder", "int8", opts.batch_size, opts.threads)
    contenders: dict[str, Callable] = {
        "pytorch_eager": lambda a, b: eager.score_pairs(a, b).level_probs,
        "onnx_fp32": lambda a, b: fp32.score_pairs(a, b).level_probs,
        "onnx_int8": lambda a, b: int8.score_pairs(a, b).level_probs,
    }
    st_dir = card.sentence_transformers.get("path")
    if st_dir:
        ce = CrossEncoder(str(work / "cross_encoder" / st_dir), max_length=card.max_seq_length, device="cpu")
        contenders["sentence_transformers"] = lambda a, b: ce.predict(
            list(zip(a, b)), batch_size=opts.batch_size, apply_softmax=True, show_progress_bar=False
        )
    out: dict[str, Any] = {}
    for name, fn in contenders.items():
        probs, speed = _speed(fn, q, d, opts.batch_size, opts.latency_pairs)
        out[name] = {**speed, "auc": _auc(probs, labels, rl), "pairs": len(q)}
        log.info("%s: %s", name, out[name])
    if opts.teacher_model:
        out["teacher_direct"] = bench_teacher(opts, q, d, labels, card)
    return {"rows": out, "card": card, "scorer": int8}


def bench_teacher(opts: ServeBenchOptions, q: list[str], d: list[str], labels: list, card: Any) -> dict[str, Any]:
    import torch

    from lightning_modules import TeacherLM

    n = min(opts.teacher_pairs, len(q))
    teacher = TeacherLM(
        model=opts.teacher_model, adapter=opts.teacher_adapter, num_levels=card.num_levels, log_figures=False
    ).eval()
    teacher.level_names = tuple(card.level_names)
    ro = teacher.readout
    with torch.no_grad():
        probs, speed = _speed(
            lambda a, b: ro.direct(a, b).level_probs.float().numpy(),
            q[:n],
            d[:n],
            opts.teacher_batch_size,
            min(opts.latency_pairs, 8),
        )
    return {
        **speed,
        "auc": _auc(probs, labels[:n], card.relevant_level),
        "pairs": n,
        "batch_size": opts.teacher_batch_size,
    }


def bench_two_tower(opts: ServeBenchOptions, rows: list[dict[str, Any]], work: Path, ce: Any) -> dict[str, Any]:
    from ellm_mkd.serving import Scorer

    _, card, _ = _export(opts.two_tower, work / "two_tower", opts.data_config)
    tt = Scorer.from_export(work / "two_tower", "int8", opts.batch_size, opts.threads)
    q, d = [r["query"] for r in rows], [r["item_text"] for r in rows]
    items = sorted(set(d))
    vecs = tt.embed("item", items)  # the index: every item once, ahead of serving
    row_of = {t: i for i, t in enumerate(items)}
    item_vecs = vecs[[row_of[t] for t in d]]
    probs = tt.score_vectors(tt.embed("query", q), item_vecs).level_probs
    by_query: dict[str, list[int]] = {}
    for i, qq in enumerate(q):
        by_query.setdefault(qq, []).append(i)
    lat = []
    for qq, idx in list(by_query.items())[: opts.latency_pairs]:
        t = time.perf_counter()
        qv = tt.embed("query", [qq])
        tt.score_vectors(np.repeat(qv, len(idx), 0), item_vecs[idx])
        lat.append((time.perf_counter() - t) * 1000)
    # one query against index_items items: precomputed item vectors vs the cross-encoder on every pair
    k = min(opts.index_items, len(items))
    one = [q[0]] * k
    t = time.perf_counter()
    qv = tt.embed("query", [q[0]])
    tt.score_vectors(np.repeat(qv, k, 0), vecs[:k])
    tt_s = time.perf_counter() - t
    t = time.perf_counter()
    ce.score_pairs(one, items[:k])
    ce_s = time.perf_counter() - t
    return {
        "auc": _auc(probs, [r["label"] for r in rows], card.relevant_level),
        "pairs": len(q),
        "index_items": len(items),
        "queries_timed": len(lat),
        "mean_items_per_query": statistics.fmean(len(v) for v in by_query.values()),
        **{f"query_{k2}": v for k2, v in _percentiles(lat).items()},
        "one_query_items": k,
        "one_query_two_tower_ms": tt_s * 1000,
        "one_query_cross_encoder_int8_ms": ce_s * 1000,
        "two_tower_speedup": ce_s / tt_s,
        "one_query_pairs_per_s": k / tt_s,
    }


def _targets(ce: dict[str, Any], tt: dict[str, Any] | None, svc: dict[str, Any] | None) -> dict[str, Any]:
    """Each issue target: what it asks (``rule``), the measured ``value`` and ``met`` (``stated``: a figure to
    report, no threshold)."""
    t: dict[str, Any] = {}
    st, i8, eager = ce.get("sentence_transformers"), ce["onnx_int8"], ce["pytorch_eager"]
    if st:
        ratio = i8["pairs_per_s"] / st["pairs_per_s"]
        t["int8_2x_sentence_transformers"] = {
            "rule": "ONNX int8 cross-encoder pairs/s >= 2x sentence-transformers CrossEncoder.predict (same weights)",
            "value": ratio,
            "met": ratio >= 2,
        }
    if i8["auc"] is not None and eager["auc"] is not None:
        gap = abs(i8["auc"] - eager["auc"])
        t["int8_auc_within_0.005"] = {"rule": "AUC gap, int8 vs PyTorch, <= 0.005", "value": gap, "met": gap <= 0.005}
    if "teacher_direct" in ce:
        teacher = ce["teacher_direct"]["pairs_per_s"]
        t["cross_encoder_300x_teacher_direct"] = {
            "rule": "int8 cross-encoder pairs/s >= 300x the teacher's direct readout (same batch, same CPU)",
            "value": i8["pairs_per_s"] / teacher,
            "met": i8["pairs_per_s"] / teacher >= 300,
        }
        if tt:
            t["two_tower_300x_teacher_direct"] = {
                "rule": "two-tower pairs/s, one query against precomputed item vectors, >= 300x the teacher's",
                "value": tt["one_query_pairs_per_s"] / teacher,
                "met": tt["one_query_pairs_per_s"] / teacher >= 300,
            }
    if tt:
        t["two_tower_one_query_speedup"] = {
            "rule": f"one query against {tt['one_query_items']} items: int8 cross-encoder time / two-tower time",
            "value": tt["two_tower_speedup"],
            "stated": True,
        }
        t["two_tower_query_p99_ms"] = {
            "rule": "two-tower query latency p99 at batch 1 (query tower + scorer over its items)",
            "value": tt.get("query_latency_p99_ms"),
            "stated": True,
        }
    if svc:
        ok = svc["errors"] == 0 and svc["lost"] == 0 and svc["bad_requests_4xx_json"] == svc["bad_requests"]
        t["service_no_errors"] = {
            "rule": "load test: 0 errors, 0 lost requests; every bad request answered with a 4xx JSON error",
            "value": svc["errors"] + svc["lost"],
            "met": ok,
        }
    return t


def bench_serve(opts: ServeBenchOptions, command: str) -> dict[str, Any]:
    from .serve_load import load_test

    if opts.threads:  # the PyTorch contenders get the same threads as onnxruntime
        import torch

        torch.set_num_threads(opts.threads)
    work = Path(opts.work_dir)
    rows, source, fields = _pairs(opts)
    ce = bench_cross_encoder(opts, rows, work)
    tt = bench_two_tower(opts, rows, work, ce["scorer"]) if opts.two_tower else None
    svc = load_test(opts, work / "cross_encoder", rows) if opts.load_clients > 0 else None
    return {
        **result_head(opts.name, command),
        "setup": {**asdict(opts), "data": source.path, "item_fields": fields, "pairs_scored": len(rows)},
        "cross_encoder": ce["rows"],
        "parity": ce["card"].parity,
        "two_tower": tt,
        "service": svc,
        "targets": _targets(ce["rows"], tt, svc),
    }


def markdown_section(r: dict[str, Any]) -> str:
    s = r["setup"]
    lines = [
        f"<!-- bench:{r['benchmark']} -->",
        f"## {r['benchmark']}",
        "",
        f"`{r['command']}` — {r['machine']}, {r['date']}. {s['pairs_scored']} test pairs of `{s['data']}` "
        f"(seed {s['seed']}); pairs/s at batch {s['batch_size']}, latency at batch 1.",
        "",
        "| cross-encoder | pairs/s | latency p50 ms | p99 ms | AUC | pairs |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in r["cross_encoder"].items():
        lines.append(
            f"| {name} | {fmt(v['pairs_per_s'], 1)} | {fmt(v.get('latency_p50_ms'), 2)} | "
            f"{fmt(v.get('latency_p99_ms'), 2)} | {fmt(v['auc'])} | {v['pairs']} |"
        )
    tt = r["two_tower"]
    if tt:
        lines += [
            "",
            f"Two-tower (int8, item index of {tt['index_items']} items): AUC {fmt(tt['auc'])}; one query with its "
            f"items (mean {tt['mean_items_per_query']:.1f}) p50 {fmt(tt.get('query_latency_p50_ms'), 2)} ms, p99 "
            f"{fmt(tt.get('query_latency_p99_ms'), 2)} ms; one query against {tt['one_query_items']} items "
            f"{fmt(tt['one_query_two_tower_ms'], 1)} ms vs the int8 cross-encoder "
            f"{fmt(tt['one_query_cross_encoder_int8_ms'], 1)} ms "
            f"({tt['two_tower_speedup']:.1f}x).",
        ]
    svc = r["service"]
    if svc:
        lines += [
            "",
            f"Service (`ellm-mkd serve`, int8, loopback): {svc['clients']} clients, {svc['requests']} requests of "
            f"{svc['items_per_request']} item(s): {fmt(svc['requests_per_s'], 1)} requests/s, p50 "
            f"{fmt(svc.get('latency_p50_ms'), 1)} ms, p99 {fmt(svc.get('latency_p99_ms'), 1)} ms, "
            f"{svc['errors']} errors, {svc['lost']} lost; bad requests answered 4xx JSON: "
            f"{svc['bad_requests_4xx_json']}/{svc['bad_requests']}.",
        ]
    lines += ["", "| target | rule | value | met |", "|---|---|---|---|"]
    for name, t in r["targets"].items():
        value = fmt(float(t["value"]), 4 if name.startswith("int8_auc") else 2) if t["value"] is not None else "–"
        met = "–" if "met" not in t else ("yes" if t["met"] else "**no**")
        lines.append(f"| {name} | {t.get('rule', '')} | {value} | {met} |")
    lines.append(f"<!-- /bench:{r['benchmark']} -->")
    return "\n".join(lines)


def bench_serve_main(argv: list[str]) -> int:
    parser = options_parser(ServeBenchOptions, "ellm-mkd bench serve", __doc__.split("\n\n")[0])
    opts = options(ServeBenchOptions, parser.parse_args(argv))
    command = "ellm-mkd bench serve " + shlex.join(argv)
    result = bench_serve(opts, command.strip())
    publish(result, opts, markdown_section(result))
    print(f"exports in {opts.work_dir}", file=sys.stderr)
    return 0
