"""``ellm-mkd serve``: the real service started on 127.0.0.1, real HTTP requests (several at once, so the
dynamic batcher groups them), the same scores as ``ellm-mkd score``, and a 4xx JSON answer to every bad request."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from shipping import write_run

from ellm_mkd.commands.main import main

REPO = Path(__file__).resolve().parent.parent
MAX_ITEMS = 8
MAX_BYTES = 20_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_encoder, synth_dir):
    root = tmp_path_factory.mktemp("serve")
    ckpt = write_run(root / "runs", "cross_encoder", tiny_encoder, synth_dir)
    export = root / "export"
    assert main(["export", str(ckpt), "--out", str(export), "--sentence_transformers", "false"]) == 0
    port = _free_port()
    log = open(root / "serve.log", "w")
    cmd = [sys.executable, "-m", "ellm_mkd", "serve", "--model", str(export), "--port", str(port)]
    cmd += ["--max_items", str(MAX_ITEMS), "--max_request_bytes", str(MAX_BYTES), "--max_batch_size", "8"]
    cmd += ["--batch_timeout", "0.02", "--threads", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (root / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the service did not become healthy in 120 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url, export
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # the server and the workers it started, all in its own session
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def test_health_and_metadata(service):
    url, _ = service
    assert httpx.get(f"{url}/health").text == "ok"
    info = httpx.get(f"{url}/info").json()["model"]
    assert info["card"]["kind"] == "cross_encoder" and info["limits"]["max_items"] == MAX_ITEMS
    assert [lv["name"] for lv in info["card"]["levels"]] == ["irrelevant", "complement", "substitute", "exact"]


def test_scores_equal_the_score_command(service, synth_dir, tmp_path):
    url, export = service
    rows = pq.read_table(synth_dir / "test.parquet").to_pylist()[:40]
    src = tmp_path / "pairs.csv"
    with src.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "title", "brand", "color", "attributes", "item_id"])
        for r in rows:
            w.writerow([r["query"], r["title"], r["brand"], r["color"], r["attributes"], r["item_id"]])
    out = tmp_path / "scores.jsonl"
    mapping = [f"--mapping.{c}={c}" for c in ("brand", "color", "attributes", "item_id")]
    assert main(["score", str(src), "--model", str(export), "--out", str(out), *mapping, "--progress", "false"]) == 0
    want = {(s["query"], s["item_id"]): s for s in map(json.loads, out.read_text().splitlines())}

    by_query: dict[str, list[dict]] = {}
    for r in rows:
        item = {k: r[k] for k in ("item_id", "title", "brand", "color", "attributes") if r[k]}
        by_query.setdefault(r["query"], []).append(item)
    requests = [
        {"query": q, "items": items[i : i + 4]} for q, items in by_query.items() for i in range(0, len(items), 4)
    ]
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(8) as pool:  # concurrent: batched together
        answers = list(pool.map(lambda body: client.post(f"{url}/predict", json=body), requests))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:2]
    checked = 0
    for body, answer in zip(requests, answers):
        got = answer.json()
        assert got["query"] == body["query"] and len(got["results"]) == len(body["items"])
        for item, res in zip(body["items"], got["results"]):
            ref = want[(body["query"], item["item_id"])]
            assert res["item_id"] == item["item_id"] and res["level"] == ref["level"]
            assert abs(res["expected_grade"] - ref["expected_grade"]) < 1e-5
            assert all(abs(p - ref[f"p_{lv}"]) < 1e-5 for lv, p in res["level_probs"].items())
            assert all(res["dimensions"][d]["verdict"] == ref[d] for d in ("category", "brand", "usage"))
            checked += 1
    assert checked >= 40


BAD = {
    "missing items": (b'{"query": "drill"}', 422),
    "missing title": (b'{"query": "drill", "items": [{"brand": "X"}]}', 422),
    "query not a string": (b'{"query": 5, "items": [{"title": "x"}]}', 422),
    "items not a list": (b'{"query": "drill", "items": "x"}', 422),
    "no items": (b'{"query": "drill", "items": []}', 422),
    "blank query": (b'{"query": "   ", "items": [{"title": "x"}]}', 422),
    "unknown key": (b'{"query": "drill", "items": [{"title": "x", "price": 3}]}', 422),
    "too many items": (json.dumps({"query": "d", "items": [{"title": "x"}] * (MAX_ITEMS + 1)}).encode(), 422),
    "unpaired surrogate": (b'{"query": "dr\\ud800ill", "items": [{"title": "x"}]}', 422),
    "not JSON": (b"query=drill", 422),
    "bad UTF-8": (b'{"query": "\xff\xfe", "items": [{"title": "x"}]}', 400),
    "oversize": (json.dumps({"query": "d", "items": [{"title": "x" * MAX_BYTES}]}).encode(), 413),
}


def test_bad_requests_get_a_4xx_json_error(service):
    url, _ = service
    with httpx.Client(timeout=30) as client:
        for name, (body, status) in BAD.items():
            r = client.post(f"{url}/predict", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            assert r.json()["detail"], name
        ok = client.post(f"{url}/predict", json={"query": "drill", "items": [{"title": "Drill"}]})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 1  # still serving after all that


def test_bench_serve_writes_figures_for_every_contender(tmp_path, tiny_encoder, tiny_llama, synth_dir):
    """``ellm-mkd bench serve`` end to end on tiny models and the catalog (the figures mean nothing here;
    the command, its rows, targets and outputs are what is checked)."""
    ckpts = {
        kind: write_run(tmp_path / "runs", kind, tiny_encoder, synth_dir) for kind in ("cross_encoder", "two_tower")
    }
    data_config = tmp_path / "data.yaml"
    data_config.write_text(
        json.dumps({"data": {"source": {"path": str(synth_dir)}, "item_fields": ["title", "brand"]}})
    )
    out_json, out_md = tmp_path / "serve.json", tmp_path / "benchmarks.md"
    args = ["bench", "serve", "--cross_encoder", str(ckpts["cross_encoder"]), "--two_tower", str(ckpts["two_tower"])]
    args += ["--data_config", str(data_config), "--pairs", "40", "--latency_pairs", "4", "--teacher_model", tiny_llama]
    args += ["--teacher_pairs", "4", "--teacher_batch_size", "2", "--index_items", "20", "--load_clients", "2"]
    args += ["--load_requests", "12", "--items_per_request", "2", "--work_dir", str(tmp_path / "work")]
    args += ["--out_json", str(out_json), "--out_md", str(out_md), "--threads", "1"]
    assert main(args) == 0
    r = json.loads(out_json.read_text())
    assert set(r["cross_encoder"]) == {
        "pytorch_eager",
        "onnx_fp32",
        "onnx_int8",
        "sentence_transformers",
        "teacher_direct",
    }
    assert all(v["pairs_per_s"] > 0 and v["latency_p99_ms"] >= v["latency_p50_ms"] for v in r["cross_encoder"].values())
    # fp32 ONNX and sentence-transformers compute the eager student's function: the same AUC
    aucs = {k: v["auc"] for k, v in r["cross_encoder"].items()}
    assert (
        abs(aucs["onnx_fp32"] - aucs["pytorch_eager"]) < 1e-6
        and abs(aucs["sentence_transformers"] - aucs["onnx_fp32"]) < 1e-3
    )
    assert r["two_tower"]["two_tower_speedup"] > 0 and r["two_tower"]["one_query_items"] == 20
    svc = r["service"]
    assert svc["requests"] == 12 and svc["errors"] == 0 and svc["lost"] == 0
    assert svc["bad_requests_4xx_json"] == svc["bad_requests"]
    assert r["targets"]["service_no_errors"]["met"]
    targets = {"cross_encoder_300x_teacher_direct", "two_tower_300x_teacher_direct", "int8_auc_within_0.005"}
    assert targets <= set(r["targets"]) and r["targets"]["two_tower_query_p99_ms"]["stated"]
    gap = r["targets"]["int8_auc_within_0.005"]
    assert gap["value"] == abs(aucs["onnx_int8"] - aucs["pytorch_eager"]) and gap["met"] == (gap["value"] <= 0.005)
    md = out_md.read_text()
    assert "<!-- bench:serve -->" in md and "| onnx_int8 |" in md and r["command"].startswith("ellm-mkd bench serve")


def test_two_tower_service_takes_item_vectors_from_the_index(tmp_path, tiny_encoder, synth_dir):
    from ellm_mkd.commands.bench.serve_load import start_service, stop_service

    ckpt = write_run(tmp_path / "runs", "two_tower", tiny_encoder, synth_dir)
    export, index, scores = tmp_path / "export", tmp_path / "index", tmp_path / "scores.jsonl"
    assert main(["export", str(ckpt), "--out", str(export)]) == 0
    args = ["score", str(synth_dir), "--only_split", "val", "--model", str(export), "--item_index", str(index)]
    assert main([*args, "--out", str(scores), "--progress", "false"]) == 0
    want = [json.loads(line) for line in scores.read_text().splitlines()][:12]
    # an index built for another precision is refused before the service starts
    assert main(["serve", "--model", str(export), "--precision", "int8", "--item_index", str(index)]) == 1
    proc, url = start_service(export, tmp_path / "serve.log", ["--item_index", str(index), "--threads", "1"], 120)
    try:
        with httpx.Client(timeout=30) as client:
            for row in want:
                body = {"query": row["query"], "items": [{"item_id": row["item_id"]}]}  # by id alone
                got = client.post(f"{url}/predict", json=body).json()["results"][0]
                assert abs(got["expected_grade"] - row["expected_grade"]) < 1e-5 and got["level"] == row["level"]
            unknown = client.post(f"{url}/predict", json={"query": "q", "items": [{"item_id": "no-such-item"}]})
            assert unknown.status_code == 422 and "not in the server's item index" in unknown.text
            mixed = {"query": "drill", "items": [{"item_id": want[0]["item_id"]}, {"title": "Voltara drill"}]}
            assert len(client.post(f"{url}/predict", json=mixed).json()["results"]) == 2
    finally:
        stop_service(proc)
