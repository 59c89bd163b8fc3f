"""The server annotator against hostile or broken servers on loopback: a slow-drip answer, an absurd
``Retry-After``, answers with ``content: null`` or prose instead of a chain (issue 21, item 4)."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_annotate import _llm_args, chain_for

from ellm_mkd import annotation
from ellm_mkd.annotation import AnnotationFailed
from ellm_mkd.annotation_store import read_annotations
from ellm_mkd.backends import BackendError, OpenAIChatBackend
from ellm_mkd.commands.annotate import annotate_main
from ellm_mkd.commands.main import main

CONV = [[{"role": "user", "content": "hello"}]]


class Server:
    """Loopback chat-completions server; ``answer(query, item, i)`` gives choice ``i``'s content
    (None: ``content: null``). ``drip_bps`` sends the body that many bytes per second; ``script``
    holds (status, headers) answered first."""

    def __init__(self, answer=None, drip_bps: float = 0.0):
        self.answer = answer or (lambda q, it, i: chain_for(q, it, "exact"))
        self.drip_bps = drip_bps
        self.script: list[tuple[int, dict[str, str]]] = []
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                if outer.script:
                    status, headers = outer.script.pop(0)
                    payload = b'{"error": {"message": "slow down"}}'
                    self.send_response(status)
                    for k, v in {**headers, "Content-Length": str(len(payload))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                user = body["messages"][-1]["content"]
                q = re.search(r"^Query: (.*)$", user, re.M)
                it = re.search(r"^Product: (.*)$", user, re.M)
                q, it = (json.loads(q.group(1)), json.loads(it.group(1))) if q and it else ("x", "x")
                choices = [
                    {"index": i, "message": {"role": "assistant", "content": outer.answer(q, it, i)}}
                    for i in range(body.get("n", 1))
                ]
                payload = json.dumps({"choices": choices}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    if outer.drip_bps:
                        for k in range(0, len(payload), 4):  # 4 bytes at a time
                            self.wfile.write(payload[k : k + 4])
                            self.wfile.flush()
                            time.sleep(4 / outer.drip_bps)
                    else:
                        self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def make_server():
    made = []

    def make(**kw) -> Server:
        made.append(Server(**kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_a_slow_drip_answer_is_cut_off_by_the_deadline(make_server):
    """40 bytes/s never trips a per-read timeout; the deadline of timeout_s ends the attempt."""
    server = make_server(drip_bps=40)
    t0 = time.monotonic()
    with (
        OpenAIChatBackend(server.url, "m", api_key_env=None, timeout_s=0.6, max_retries=1, backoff_s=0.01) as b,
        pytest.raises(BackendError, match=r"timed out: no complete answer within timeout_s=0\.6s") as e,
    ):
        b.generate(CONV, n=1, temperature=0.0, max_new_tokens=8)
    assert time.monotonic() - t0 < 3.5  # two attempts of 0.6 s (+ one read gap each), not the ~5 s of the body
    assert server.url in str(e.value) and server.requests == 2


def test_retry_after_is_capped(make_server, caplog):
    server = make_server()
    server.script = [
        (429, {"Retry-After": "3600"}),
        (503, {"Retry-After": formatdate(time.time() + 7200, usegmt=True)}),
    ]
    t0 = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="ellm_mkd.backends"),
        OpenAIChatBackend(server.url, "m", api_key_env=None, max_retry_after_s=0.05) as b,
    ):
        out = b.generate(CONV, n=1, temperature=0.0, max_new_tokens=8)
    assert time.monotonic() - t0 < 2 and len(out[0]) == 1 and server.requests == 3
    capped = [r.getMessage() for r in caplog.records if "capped at max_retry_after_s=0.05" in r.getMessage()]
    assert len(capped) == 2 and "Retry-After 3600s" in capped[0]
    with pytest.raises(ValueError, match="max_retry_after_s"):
        OpenAIChatBackend(server.url, "m", max_retry_after_s=-1)


def _args(synth_dir: Path, url: str, out: Path, *extra: str) -> list[str]:
    return _llm_args(synth_dir, out, url) + ["--llm.backend.init_args.backoff_s", "0.01", *extra]


def test_null_answers_are_not_stored_and_the_run_fails_then_a_rerun_retries_them(synth_dir, tmp_path, make_server):
    out = tmp_path / "ann"
    null = make_server(answer=lambda q, it, i: None)
    with pytest.raises(AnnotationFailed, match=r"10 of 10 pair\(s\) got no chain that parses") as e:
        annotate_main(_args(synth_dir, null.url, out, "--limit", "10"))
    msg = str(e.value)
    assert "10 with only empty answers (content null or blank)" in msg and "failed.jsonl" in msg
    assert null.requests == 20  # each pair sampled once more (retries: 1) before it is left for a rerun
    assert read_annotations(out).num_rows == 0  # nothing stored as done
    failed = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()]
    assert len(failed) == 10 and {f["reason"] for f in failed} == {"empty"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_this_run"] == 10 and summary["failures_this_run"] == {"empty": 10}
    null.answer = lambda q, it, i: chain_for(q, it, "exact")  # the server is fixed; the same command again
    assert annotate_main(_args(synth_dir, null.url, out, "--limit", "10")) == 0
    assert read_annotations(out).num_rows == 10 and null.requests == 30  # the 10 failed pairs, now annotated
    assert not (out / "failed.jsonl").exists()


def test_prose_answers_below_the_share_are_counted_and_left_for_a_rerun(synth_dir, tmp_path, make_server):
    """Pairs whose query starts with a letter in a-h get prose; the others a chain."""

    def answer(q, it, i):
        return "This product looks relevant to me." if q[0] <= "h" else chain_for(q, it, "exact")

    server = make_server(answer=answer)
    out = tmp_path / "ann"
    dm, llm = _module(synth_dir, server.url)
    summary = annotation.run_annotation(dm, out, "llm", llm, limit=40, max_failed_share=0.9)
    n_bad = summary["failed_this_run"]
    assert 0 < n_bad < 40 and summary["failures_this_run"] == {"no_parse": n_bad}
    assert summary["written_this_run"] == 40 - n_bad == read_annotations(out).num_rows
    failed = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()]
    assert failed[0]["answer"] == "This product looks relevant to me." and failed[0]["error"]
    with pytest.raises(AnnotationFailed, match=r"more than max_failed_share=0\.1"):
        annotation.run_annotation(dm, tmp_path / "strict", "llm", llm, limit=40, max_failed_share=0.1)


def _module(synth_dir: Path, url: str):
    from datamodules.datamodule import RelevanceDataModule

    dm = RelevanceDataModule({"path": str(synth_dir)}, item_fields=["title", "brand"])
    backend = OpenAIChatBackend(url, "teacher", api_key_env=None, concurrency=4)
    llm = annotation.LLMAnnotator(backend, samples=2, retries=0)
    return dm, llm


def test_a_run_whose_first_pairs_all_fail_stops_early_with_exit_1(synth_dir, tmp_path, make_server, capsys):
    server = make_server(answer=lambda q, it, i: "I cannot judge this.")
    code = main(["annotate", *_args(synth_dir, server.url, tmp_path / "ann", "--limit", "300", "--batch_size", "16")])
    err = capsys.readouterr().err
    assert code == 1 and "ellm-mkd annotate: error:" in err and "the first 64 pairs all failed" in err
    assert "Traceback" not in err and server.requests <= 2 * 64  # stopped after 4 batches, not 300 pairs


def test_progress_lines_when_stderr_is_not_a_terminal(synth_dir, tmp_path, monkeypatch, caplog):
    from datamodules.datamodule import RelevanceDataModule

    monkeypatch.setattr(annotation, "PROGRESS_EVERY_S", 0.0)
    dm = RelevanceDataModule({"path": str(synth_dir)}, item_fields=["title", "brand"])
    with caplog.at_level(logging.INFO, logger="ellm_mkd.annotation"):
        annotation.run_annotation(dm, tmp_path / "ann", "rules", limit=50, batch_size=20)
    lines = [r.getMessage() for r in caplog.records if "pairs/s" in r.getMessage()]
    assert lines[0].startswith("annotate (rules): 20/50 pairs (40%)") and "50/50 pairs (100%)" in lines[-1]
