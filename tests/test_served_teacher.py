"""The served teacher (``ellm-mkd cache serve-teacher``) against a real OpenAI-compatible server on loopback.

:class:`LogprobServer` answers ``/v1/chat/completions`` and ``/v1/completions`` with per-token
log-probabilities derived from a hash of the pair, so every test knows the distribution the cache must
hold: the direct answer ``level: <name>`` and, for the chain prompt, a parseable chain (or, for some
pairs, text that does not parse). ``complement`` is written as two tokens (`` comp`` + ``lement``) and
one level is left out of the top tokens for some pairs, so multi-token names and the floor are covered.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ellm_mkd.annotation_store import read_annotations
from ellm_mkd.cot import parse
from ellm_mkd.prompts import PromptTemplate
from ellm_mkd.schema import DIMENSIONS, VERDICTS
from ellm_mkd.served_readout import read_words, token_trace
from ellm_mkd.teacher_cache import TeacherCache

LEVELS = ("irrelevant", "complement", "substitute", "exact")
ITEM_FIELDS = ["title", "brand", "color", "attributes"]
FLOOR = -9.0  # the least likely top token the server lists (" maybe")
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "teacher" / "cache_served.yaml"


def _h(*parts: str) -> bytes:
    return hashlib.sha256("|".join(parts).encode()).digest()


def level_top(query: str, item: str) -> dict[str, float]:
    """The top tokens after ``level:``: each level's first token (absent: one level left out for some pairs)."""
    h = _h(query, item)
    lp = {name: -0.1 - h[i] / 40 for i, name in enumerate(LEVELS)}
    top = {(" comp" if n == "complement" else f" {n}"): v for n, v in lp.items()}
    if h[5] % 3 == 0:  # the least likely level is not among the top tokens
        del top[min(top, key=top.get)]
    top[" maybe"] = FLOOR
    return top


def expected_levels(query: str, item: str) -> tuple[list[float], int]:
    """What the cache must hold: the level distribution renormalised, and 1 if a level was read at the floor."""
    top = level_top(query, item)
    missing = int(len(top) == len(LEVELS))  # three levels and " maybe": one level is not among the top tokens
    written = max(top, key=top.get)
    lps = []
    for name in LEVELS:
        first = " comp" if name == "complement" else f" {name}"
        lp = top.get(first, FLOOR)
        if name == "complement" and written == " comp":
            lp += -0.05  # the continuation "lement" the server wrote, read along the written tokens
        lps.append(lp)
    z = math.log(sum(math.exp(v) for v in lps))
    return [math.exp(v - z) for v in lps], missing


def verdict_top(query: str, item: str, dim: str, verdict: str) -> dict[str, float]:
    h = _h(query, item, dim)
    top = {f" {v}": -0.5 - h[i] / 50 for i, v in enumerate(VERDICTS)}
    top[f" {verdict}"] = -0.05  # the written verdict is the likeliest
    return top


def chain_for(query: str, item: str) -> tuple[str, list[str]]:
    first = item.split()[0]
    verdicts = ["match", "absent", "absent", "partial", "absent"]
    lines = [f"category: query {json.dumps(query)} | item {json.dumps(first)} => match"]
    lines += [f"{d}: query - | item - => {v}" for d, v in zip(DIMENSIONS[1:], verdicts[1:])]
    return "\n".join(lines), verdicts


def parses(query: str, item: str) -> bool:
    return _h(query, item, "cot")[0] % 4 != 0  # about a quarter of the chains do not parse


def _entry(token: str, lp: float, top: dict[str, float]) -> dict:
    alts = [
        {"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in sorted(top.items(), key=lambda kv: -kv[1])
    ]
    return {"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": alts}


def level_tokens(query: str, item: str) -> list[tuple[str, float, dict[str, float]]]:
    top = level_top(query, item)
    written = max(top, key=top.get)
    out = [(written, top[written], top)]
    if written == " comp":
        out.append(("lement", -0.05, {"lement": -0.05, "act": -4.0}))
    return out


def answer_tokens(query: str, item: str, direct: bool, prefixed: bool) -> list[tuple[str, float, dict[str, float]]]:
    """The tokens the fake teacher writes: (token, logprob, top) each."""
    if direct:
        head = [] if prefixed else [("level", -0.01, {"level": -0.01, "Level": -5.0}), (":", -0.01, {":": -0.01})]
        return head + level_tokens(query, item)
    if not parses(query, item):
        return [(t, -0.3, {t: -0.3, " x": -5.0}) for t in re.findall(r" ?\w+| ?[^\w\s]|\s", "I think it fits.")]
    text, verdicts = chain_for(query, item)
    out: list[tuple[str, float, dict[str, float]]] = []
    line = 0
    for tok in re.findall(r" ?\w+| ?=>| ?[^\w\s]|\s", text):
        if out and out[-1][0] == " =>":
            top = verdict_top(query, item, DIMENSIONS[line], verdicts[line])
            out.append((tok, top[tok], top))
            line += 1
        else:
            out.append((tok, -0.01, {tok: -0.01, " x": -7.0}))
    out += [("\n", -0.01, {"\n": -0.01}), ("level", -0.01, {"level": -0.01}), (":", -0.01, {":": -0.01})]
    return out + level_tokens(query, item)


class LogprobServer:
    """An OpenAI-compatible server that returns token log-probabilities (see the module docstring).

    ``mode``: ``normal``, ``nologprobs`` (answers without them), ``notop`` (no top_logprobs), ``rude`` (the
    direct answer names no level); ``script``: HTTP statuses answered first; ``fail_after``: answer 500 to every
    request after this many good answers; ``sleep_s``: seconds per answer; ``peak``: most requests in flight.
    """

    def __init__(self) -> None:
        self.mode, self.script, self.fail_after, self.sleep_s = "normal", [], None, 0.0
        self.bodies: list[dict] = []
        self.good = self.inflight = self.peak = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append(body)
                    server.inflight += 1
                    server.peak = max(server.peak, server.inflight)
                    status = server.script.pop(0) if server.script else None
                    if status is None and server.fail_after is not None and server.good >= server.fail_after:
                        status = 500
                    elif status is None:
                        server.good += 1
                try:
                    time.sleep(server.sleep_s)
                    if status is not None:
                        return self._send(status, {"error": {"message": f"scripted {status}"}})
                    self._send(200, server.answer(self.path, body))
                finally:
                    with server.lock:
                        server.inflight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def answer(self, path: str, body: dict) -> dict:
        chat = path.endswith("/chat/completions")
        text = body["messages"][-1]["content"] if chat else body["prompt"]
        query = json.loads(re.search(r'^Query: ("(?:[^"\\]|\\.)*")', text, re.M).group(1))
        item = json.loads(re.search(r'^Product: ("(?:[^"\\]|\\.)*")', text, re.M).group(1))
        prefixed = not chat and text.endswith("level:")
        direct = prefixed or "Answer with level:" in text
        toks = answer_tokens(query, item, direct, prefixed)
        if self.mode == "rude" and direct:
            toks = [("The", -0.1, {"The": -0.1, "It": -2.0}), (" product", -0.1, {" product": -0.1})]
        toks = toks[: body["max_tokens"]]
        content = "".join(t for t, _, _ in toks)
        if chat:
            logprobs = {"content": [_entry(t, lp, top if self.mode != "notop" else {}) for t, lp, top in toks]}
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        else:
            logprobs = {
                "tokens": [t for t, _, _ in toks],
                "token_logprobs": [lp for _, lp, _ in toks],
                "top_logprobs": [top for _, _, top in toks],
                "text_offset": [len(text) + sum(len(t) for t, _, _ in toks[:k]) for k in range(len(toks))],
            }
            choice = {"index": 0, "text": content, "finish_reason": "stop"}
        if self.mode != "nologprobs":
            choice["logprobs"] = logprobs
        return {"id": "x", "object": "chat.completion" if chat else "text_completion", "choices": [choice]}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = LogprobServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from datamodules.synth import SynthConfig, write

    out = tmp_path_factory.mktemp("served") / "data"
    write(out, SynthConfig(seed=0, num_queries=24, items_per_query=4))
    return out


def run(server: LogprobServer, data: Path, out: Path, *extra: str) -> int:
    """``ellm-mkd cache serve-teacher`` as a user runs it (the shipped config, overridden)."""
    from ellm_mkd.commands.main import main

    args = [
        "--data.source.path",
        str(data),
        "--data.item_fields",
        json.dumps(ITEM_FIELDS),
        "--data.predict_split",
        "all",
    ]
    args += ["--teacher.base_url", server.base_url, "--teacher.model", "teacher-7b", "--teacher.api_key_env", "null"]
    args += ["--teacher.backoff_s", "0.01", "--teacher.concurrency", "4", "--cache_dir", str(out)]
    return main(["cache", "serve-teacher", "--config", str(CONFIG), *args, *extra])


def predict_rows(data: Path) -> list[dict]:
    from datamodules.datamodule import RelevanceDataModule

    dm = RelevanceDataModule({"path": str(data)}, item_fields=ITEM_FIELDS, predict_split="all")
    dm.setup("predict")
    return dm.full_predict_dataset().rows


# -- reading words from top_logprobs --------------------------------------------------------------------


def test_read_words_multi_token_first_token_floor_and_bytes():
    def trace(tokens):
        return token_trace({"logprobs": {"content": [_entry(t, lp, top) for t, lp, top in tokens]}})

    # written: "level: level2" as " level" + "2"; the top tokens after " level" give the other names
    t = trace([("level", -0.1, {}), (":", -0.1, {}), (" level", -0.2, {" level": -0.2, " other": -1.0}),
               ("2", -0.3, {"2": -0.3, "0": -1.5, "1": -2.5, "x": -4.0})])  # fmt: skip
    r = read_words(t, len("level:"), ["level0", "level1", "level2", "level3"])
    assert r.logprobs[:3] == pytest.approx([-0.2 - 1.5, -0.2 - 2.5, -0.2 - 0.3])
    assert r.logprobs[3] == pytest.approx(-0.2 - 4.0) and r.missing == 1  # not among the top: the floor
    assert sum(r.probs()) == pytest.approx(1.0)

    # first-token probability where the written tokens leave the word; case ignored; a shared first token split
    t = trace([(" Exact", -0.3, {" Exact": -0.3, " sub": -1.0, " compl": -2.0, " irr": -3.0})])
    r = read_words(t, 0, ["exact", "substitute", "subpar", "complement", "irrelevant"])
    want = [-0.3, -1.0 - math.log(2), -1.0 - math.log(2), -2.0, -3.0]
    assert r.logprobs == pytest.approx(want) and r.missing == 0

    # no level word among the top tokens: unreadable; a character split over two tokens' bytes comes out whole
    assert read_words(trace([(" The", -0.1, {" The": -0.1, " It": -1.0})]), 0, ["exact", "substitute"]) is None
    e = token_trace({"logprobs": {"content": [
        {"token": "caf", "logprob": -0.1, "bytes": [99, 97, 102], "top_logprobs": []},
        {"token": "bytes:\\xc3", "logprob": -0.2, "bytes": [0xC3], "top_logprobs": []},
        {"token": "bytes:\\xa9", "logprob": -0.3, "bytes": [0xA9], "top_logprobs": []},
        {"token": " ok", "logprob": -0.4, "bytes": [32, 111, 107], "top_logprobs": []},
    ]}})  # fmt: skip
    assert e.text == "café ok" and e.starts[-1] == len("café")


# -- the cache -------------------------------------------------------------------------------------------


def test_direct_chat_cache_holds_the_renormalised_logprobs(server, data, tmp_path, capsys):
    out = tmp_path / "cache"
    assert run(server, data, out, "--rows_per_shard", "16") == 0
    text = capsys.readouterr().out
    summary = json.loads(text[text.index("{") : text.rindex("}") + 1])
    rows = predict_rows(data)
    cache = TeacherCache(out)
    sigs = cache.signals()
    assert sorted(sigs) == sorted(r["example_id"] for r in rows)  # every pair, once
    missing = 0
    for r in rows:
        s = sigs[r["example_id"]]
        want, miss = expected_levels(r["query"], r["item_text"])
        missing += miss
        assert s.level_probs == pytest.approx(want, abs=1e-6)
        assert (s.query, s.item_text, s.rationale, s.verdict_probs, s.parse_error) == (
            r["query"], r["item_text"], "", None, None,
        )  # fmt: skip
    assert 0 < missing < len(rows) and summary["missing_words"] == missing
    assert summary["requests"] == len(rows) == len(server.bodies)
    m = cache.manifest
    assert m["teacher"]["model"] == "teacher-7b" and m["teacher"]["readout"] == "direct"
    assert m["teacher"]["template_fingerprint"] == PromptTemplate().fingerprint()
    assert m["server"] == server.base_url and m["complete"] and m["row_count"] == len(rows)
    assert m["level_names"] == list(LEVELS) and m["item_fields"] == ITEM_FIELDS
    body = server.bodies[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["temperature"] == 0.0
    assert body["messages"][-1]["content"].startswith("Answer with level:")


def test_cot_chains_parsed_verdicts_read_and_students_get_teacher_probs(server, data, tmp_path, minilm_tokenizer):
    from datamodules.datamodule import RelevanceDataModule
    from datamodules.teacher_signal import CachedTeacher
    from lightning_modules.cross_encoder import PairInputs

    out = tmp_path / "cache"
    assert run(server, data, out, "--teacher.readout", "cot") == 0
    rows = predict_rows(data)
    sigs = TeacherCache(out).signals()
    unparsed = 0
    for r in rows:
        q, d, s = r["query"], r["item_text"], sigs[r["example_id"]]
        want, _ = expected_levels(q, d)
        assert s.level_probs == pytest.approx(want, abs=1e-6)
        if not parses(q, d):  # stored without a chain, with its error; the level from the direct question
            unparsed += 1
            assert s.rationale == "" and s.verdict_probs is None and s.parse_error and not s.evidence
            continue
        text, verdicts = chain_for(q, d)
        top = level_top(q, d)
        written = max(top, key=top.get).strip().replace("comp", "complement")
        assert s.rationale == text + "\nlevel: " + written
        parse(s.rationale, q, d, LEVELS)
        for dim, v, got in zip(DIMENSIONS, verdicts, s.verdict_probs):
            top = verdict_top(q, d, dim, v)
            z = math.log(sum(math.exp(x) for x in top.values()))
            assert got == pytest.approx([math.exp(top[f" {w}"] - z) for w in VERDICTS], abs=1e-6)
        (cat,) = [e for e in s.evidence if e[0] == "category" and e[1] == "item"]
        assert d[cat[2] : cat[3]] == d.split()[0]
    assert 0 < unparsed < len(rows)
    assert len(server.bodies) == len(rows) + unparsed  # one more (direct) request per chain that did not parse

    # students read the served cache unchanged
    dm = RelevanceDataModule(
        {"path": str(data)},
        item_fields=ITEM_FIELDS,
        teacher=CachedTeacher(str(out), missing="error", expect={"teacher": {"readout": "cot"}}),
    )
    dm.connect(layout=PairInputs(minilm_tokenizer, 64))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["teacher_present"].all()
    for eid, p in zip(batch["example_id"], batch["teacher_probs"].tolist()):
        assert p == pytest.approx(sigs[eid].level_probs, abs=1e-6)
    assert batch["rationale_mask"].sum() > 0


def test_completions_api_renders_the_local_prompt(server, data, tmp_path, smollm2_tokenizer):
    out = tmp_path / "cache"
    assert run(server, data, out, "--teacher.api", "completions", "--teacher.tokenizer", "smollm2-135m-instruct") == 0
    rows = {r["example_id"]: r for r in predict_rows(data)}
    sigs = TeacherCache(out).signals()
    for eid, r in rows.items():
        assert sigs[eid].level_probs == pytest.approx(expected_levels(r["query"], r["item_text"])[0], abs=1e-6)
    r = next(iter(rows.values()))
    want = PromptTemplate().prompt(smollm2_tokenizer, r["query"], r["item_text"], LEVELS, "direct") + "level:"
    assert want in [b["prompt"] for b in server.bodies] and server.bodies[0]["logprobs"] == 20
    assert TeacherCache(out).manifest["teacher"]["served"]["tokenizer"] == "smollm2-135m-instruct"


def test_killed_run_resumes_without_duplicates_or_gaps(server, data, tmp_path, capsys):
    out = tmp_path / "cache"
    n = len(predict_rows(data))
    server.fail_after = 30  # then the server answers 500 to everything: the job stops after its retries
    assert run(server, data, out, "--rows_per_shard", "8", "--teacher.max_retries", "1") == 1
    err = capsys.readouterr().err
    assert "HTTP 500" in err and "run the same command again" in err
    first = read_annotations(out, "teacher cache").column("example_id").to_pylist()
    assert 0 < len(first) <= 30 and len(first) == len(set(first))
    assert not TeacherCache(out).manifest.get("complete")
    server.fail_after, asked_before = None, len(server.bodies)
    assert run(server, data, out, "--rows_per_shard", "8") == 0
    assert len(server.bodies) - asked_before == n - len(first)  # only the missing rows were asked for
    ids = read_annotations(out, "teacher cache").column("example_id").to_pylist()
    assert len(ids) == len(set(ids)) == n and sorted(ids) == sorted(r["example_id"] for r in predict_rows(data))
    assert TeacherCache(out).manifest["complete"]
    asked_before = len(server.bodies)
    assert run(server, data, out) == 0 and len(server.bodies) == asked_before  # complete: nothing asked


def test_concurrency_bound_and_retries_on_5xx(server, data, tmp_path, caplog):
    server.sleep_s, server.script = 0.02, [503, 502, 500]
    out = tmp_path / "cache"
    assert run(server, data, out, "--teacher.concurrency", "3", "--data.limit_pairs", "{train: 12}") == 0
    n = len(TeacherCache(out))
    assert server.peak == 3  # never more than concurrency requests in flight, and that many used
    assert len(server.bodies) == n + 3  # the three failures were retried
    assert sum("retry" in r.getMessage() for r in caplog.records) == 3


@pytest.mark.parametrize("mode", ["nologprobs", "notop"])
def test_a_server_without_logprobs_is_a_clear_error(server, data, tmp_path, capsys, mode):
    server.mode = mode
    assert run(server, data, tmp_path / "cache") == 1
    err = capsys.readouterr().err
    assert err.startswith("ellm-mkd cache serve-teacher: error: ")
    assert ("no 'logprobs'" if mode == "nologprobs" else "no top_logprobs") in err
    assert "log-probabilities of the level words" in err and len(server.bodies) <= 8  # stopped at once


def test_unreadable_answers_are_counted_and_left_for_a_rerun(server, data, tmp_path, capsys):
    server.mode = "rude"
    assert run(server, data, tmp_path / "cache", "--max_unreadable_share", "0.5") == 1
    err = capsys.readouterr().err
    assert "got no readable level distribution" in err and "The product" in err
    assert len(TeacherCache(tmp_path / "cache")) == 0


def test_shipped_config_and_bad_settings(data, tmp_path, server, capsys):
    from ellm_mkd.commands.cache import serve_teacher_parser
    from ellm_mkd.served_teacher import ServedTeacher

    parser = serve_teacher_parser()
    cfg = parser.parse_args(["--config", str(CONFIG)])
    init = parser.instantiate(cfg)
    assert isinstance(init.teacher, ServedTeacher) and init.teacher.readout == "direct"
    assert init.data.predict_split == "all" and cfg.cache_dir
    init.teacher.close()
    # a setting that cannot work is one line naming it, before any request
    assert run(server, data, tmp_path / "c", "--teacher.api", "completions") == 1
    assert "set tokenizer" in capsys.readouterr().err and not server.bodies
    # a cache made by another teacher is refused, not mixed
    assert run(server, data, tmp_path / "c2", "--data.limit_pairs", "{train: 4}") == 0
    assert run(server, data, tmp_path / "c2", "--teacher.model", "other-model") == 1
    assert "'teacher'" in capsys.readouterr().err
