"""``ellm-mkd annotate``: rules and LLM self-consistency, resumable output, a real loopback server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ellm_mkd.annotation import LLMAnnotator
from ellm_mkd.annotation_store import StoreError, read_annotations
from ellm_mkd.commands.annotate import annotate_main
from ellm_mkd.cot import parse

REPO = Path(__file__).resolve().parent.parent
LEVELS = ("irrelevant", "complement", "substitute", "exact")


def chain_for(query: str, item: str, level: str) -> str:
    first = item.split()[0]
    return "\n".join(
        [
            f"category: query {json.dumps(query)} | item {json.dumps(first)} => match",
            "brand: query - | item - => absent",
            "model: query - | item - => absent",
            "attributes: query - | item - => absent",
            "usage: query - | item - => absent",
            f"level: {level}",
        ]
    )


class ChainServer:
    """An OpenAI-compatible chat-completions server on loopback. Choice i of every request is a valid
    chain at level ``exact`` for i < 2, ``irrelevant`` for i == 2, and unparseable text after that."""

    def __init__(self, delay_s: float = 0.0):
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                time.sleep(delay_s)
                user = body["messages"][-1]["content"]
                query = json.loads(re.search(r"^Query: (.*)$", user, re.M).group(1))
                item = json.loads(re.search(r"^Product: (.*)$", user, re.M).group(1))
                texts = [
                    chain_for(query, item, "exact" if i < 2 else "irrelevant") if i < 3 else "I think it fits."
                    for i in range(body.get("n", 1))
                ]
                payload = json.dumps(
                    {
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                            for i, t in enumerate(texts)
                        ],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chain_server():
    s = ChainServer()
    yield s
    s.close()


def _rules(synth_dir: Path, out: Path, *extra: str) -> int:
    return annotate_main(
        [
            "--data.source.path",
            str(synth_dir),
            "--data.item_fields",
            "[title,brand,color,attributes]",
            "--out",
            str(out),
            "--progress",
            "false",
            *extra,
        ]
    )


def test_rules_annotation_is_complete_valid_and_resumes(synth_dir, tmp_path):
    from datamodules.datamodule import RelevanceDataModule

    out = tmp_path / "ann"
    assert _rules(synth_dir, out, "--limit", "300", "--rows_per_shard", "128") == 0
    assert read_annotations(out).num_rows == 300
    assert _rules(synth_dir, out, "--rows_per_shard", "128") == 0  # resumes: the rest only
    t = read_annotations(out).to_pydict()
    dm = RelevanceDataModule({"path": str(synth_dir)}, item_fields=["title", "brand", "color", "attributes"])
    dm.setup("fit")
    rows = {r["example_id"]: r for s in ("train", "val") for r in dm.datasets[s].rows}
    assert sorted(t["example_id"]) == sorted(rows)  # every example exactly once
    for eid, text, level in zip(t["example_id"], t["rationale"], t["level"]):
        r = rows[eid]
        chain = parse(text, r["query"], r["item_text"], dm.level_names)
        assert chain.level == level == dm.level_names[r["label"]]
        # on the synthetic catalog the chain renders the true verdicts
        assert [j.verdict for j in chain.judgements] == [v for v in r["dims"]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == len(rows) and summary["status"] == {"ok": len(rows)}
    assert summary["written_this_run"] == len(rows) - 300
    # the same store with other item fields would mix chains quoting different texts
    with pytest.raises(StoreError, match="item_fields"):
        annotate_main(
            [
                "--data.source.path",
                str(synth_dir),
                "--data.item_fields",
                "[title]",
                "--out",
                str(out),
                "--progress",
                "false",
            ]
        )


def test_teacher_data_module_joins_the_chains(synth_dir, tmp_path):
    from datamodules.datamodule import RelevanceDataModule

    out = tmp_path / "ann"
    assert _rules(synth_dir, out, "--splits", "[train]", "--limit", "200") == 0
    kw = dict(item_fields=["title", "brand", "color", "attributes"], annotations=str(out))
    with pytest.raises(ValueError, match="have no kept chain"):
        RelevanceDataModule({"path": str(synth_dir)}, **kw).setup("fit")
    dm = RelevanceDataModule({"path": str(synth_dir)}, missing_annotations="skip", batch_size=4, **kw)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 200
    batch = next(iter(dm.train_dataloader()))
    stored = dict(zip(*read_annotations(out).select(["example_id", "rationale"]).to_pydict().values()))
    assert batch["rationale"] == [stored[e] for e in batch["example_id"]]
    with pytest.raises(ValueError, match="item_fields"):
        RelevanceDataModule({"path": str(synth_dir)}, item_fields=["title"], annotations=str(out)).setup("fit")


class _Fixed:
    """A backend returning given texts (for the vote logic alone)."""

    name = "fixed"

    def __init__(self, texts):
        self.texts = texts

    def generate(self, conversations, n, temperature, max_new_tokens, seed=None):
        return [list(self.texts[:n]) for _ in conversations]

    def describe(self):
        return {"backend": "fixed"}


def test_vote_ties_go_to_the_human_label_and_disagreement_is_not_kept():
    row = {"example_id": "e", "query": "red drill", "item_text": "Drill", "label": 1}
    c = [chain_for("red drill", "Drill", lv) for lv in ("exact", "complement", "exact", "complement")] + ["junk"]
    res = LLMAnnotator(_Fixed(c), samples=5).annotate_batch([row], LEVELS)[0]
    assert res["votes"] == [0, 2, 0, 2] and res["parsed"] == 4 and res["level"] == "complement"
    assert res["status"] == "ok" and res["agrees"] is True and res["vote_share"] == 0.4
    assert parse(res["rationale"], "red drill", "Drill", LEVELS).level == "complement"
    res = LLMAnnotator(_Fixed(c[:3]), samples=3).annotate_batch([row], LEVELS)[0]
    assert res["level"] == "exact" and res["status"] == "disagrees" and res["rationale"] is None
    res = LLMAnnotator(_Fixed(c[:3]), samples=3, require_label_agreement=False).annotate_batch([row], LEVELS)[0]
    assert res["status"] == "ok" and res["agrees"] is False and "level: exact" in res["rationale"]
    res = LLMAnnotator(_Fixed(["junk"] * 3), samples=3).annotate_batch([row], LEVELS)[0]
    assert res["status"] == "no_parse" and res["parsed"] == 0
    with pytest.raises(ValueError, match="sampling_temperature"):
        LLMAnnotator(_Fixed(c), samples=3, sampling_temperature=0.0)


def _llm_args(synth_dir: Path, out: Path, url: str) -> list[str]:
    return [
        "--data.source.path",
        str(synth_dir),
        "--data.item_fields",
        "[title,brand]",
        "--out",
        str(out),
        "--annotator",
        "llm",
        "--llm.backend",
        "ellm_mkd.backends.OpenAIChatBackend",
        "--llm.backend.init_args.base_url",
        url,
        "--llm.backend.init_args.model",
        "teacher",
        "--llm.backend.init_args.concurrency",
        "4",
        "--llm.samples",
        "4",
        "--progress",
        "false",
    ]


def test_llm_self_consistency_against_a_loopback_server(synth_dir, tmp_path, chain_server):
    out = tmp_path / "llm"
    assert annotate_main(_llm_args(synth_dir, out, chain_server.url) + ["--limit", "60"]) == 0
    t = read_annotations(out).to_pydict()
    assert len(t["example_id"]) == 60 and chain_server.requests == 60  # n=4 in one request per pair
    exact = LEVELS.index("exact")
    for label, status, votes, share, agrees in zip(t["label"], t["status"], t["votes"], t["vote_share"], t["agrees"]):
        assert votes == [1, 0, 0, 2] and share == 0.5
        assert agrees is (label == exact) and status == ("ok" if label == exact else "disagrees")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parse_failure_rate"] == 0.25 and summary["sampled_chains"] == 240
    assert summary["agreement_rate"] == pytest.approx(sum(lb == exact for lb in t["label"]) / 60)


def test_unreachable_server_is_a_clear_error(synth_dir, tmp_path):
    import socket

    from ellm_mkd.backends import BackendError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    args = _llm_args(synth_dir, tmp_path / "x", url) + [
        "--limit",
        "2",
        "--llm.backend.init_args.max_retries",
        "1",
        "--llm.backend.init_args.backoff_s",
        "0.01",
    ]
    with pytest.raises(BackendError, match=re.escape(url)):
        annotate_main(args)


@pytest.mark.slow
def test_killed_annotation_resumes_without_duplicates_or_losses(synth_dir, tmp_path):
    server = ChainServer(delay_s=0.01)
    try:
        out = tmp_path / "killed"
        args = _llm_args(synth_dir, out, server.url) + [
            "--limit",
            "400",
            "--rows_per_shard",
            "20",
            "--batch_size",
            "20",
        ]
        cmd = [sys.executable, "-m", "ellm_mkd", "annotate", *args]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and len(list(out.glob("part-*"))) < 3:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = read_annotations(out).num_rows
        assert 0 < partial < 400 and partial % 20 == 0  # whole shards only
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        ids = read_annotations(out).column("example_id").to_pylist()
        assert len(ids) == 400 and len(set(ids)) == 400
    finally:
        server.close()
