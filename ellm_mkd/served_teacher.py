"""A served teacher: the teacher's judgement taken from an OpenAI-compatible server, written as a teacher cache.

Where the teacher is served (vLLM, SGLang, llama.cpp server, a fine-tuned teacher's ``merged/`` directory
behind any of them), ``ellm-mkd cache serve-teacher --config configs/teacher/cache_served.yaml`` asks it
about every pair of the data and writes the same cache as ``ellm-mkd predict`` with a local teacher
(:mod:`ellm_mkd.teacher_cache`: Parquet shards + ``manifest.json``), which students read unchanged
(``datamodules.teacher_signal.CachedTeacher``).

Prompts are :class:`~ellm_mkd.prompts.PromptTemplate`'s (same fingerprint as a local teacher with the same
template). Two ways to send them (``api``):

``chat``         ``/v1/chat/completions`` with the template's messages; the server applies the model's chat
                 template. The assistant's answer cannot be prefilled, so ``direct`` asks for
                 ``level: <name>`` and reads the word written after ``level:`` (or, when the answer has no
                 ``level:``, its first word).
``completions``  ``/v1/completions`` with the prompt rendered here by ``tokenizer``'s chat template (the
                 served model's tokenizer: a bundled name, local directory or hub id), exactly as a local
                 teacher renders it; ``direct`` sends ``prompt + "level:"`` and reads the next word, which
                 is the local ``direct`` readout.

Readouts (``readout``): ``direct`` reads the level distribution at one point; ``cot`` lets the teacher
write its chain (``max_new_tokens``, ``temperature``), parses it strictly (:func:`ellm_mkd.cot.parse`) and
reads each verdict distribution after ``=>`` and the level distribution after the final ``level:``, from
the log-probabilities of the same answer. A chain that does not parse is stored with rationale ``""``, its
parse error and no verdicts; its level distribution is read from one more request, the direct question
(``chat``), or the chain's prompt + ``level:`` (``completions``, as the local readout does). How words are
read from ``top_logprobs`` (multi-token names, words outside the top K): :mod:`ellm_mkd.served_readout`.

HTTP (:class:`~ellm_mkd.backends.OpenAIChatBackend`): one shared client, ``concurrency`` requests in
flight at most, a deadline per attempt (``timeout_s``, from sending to the answer's last byte), retries with
exponential backoff on connection errors, timeouts, 429 and 5xx (``Retry-After`` honoured up to
``max_retry_after_s``), other 4xx at once. A request that still fails stops the job: the rows already
answered are written, and running the same command again asks only for the rows not in the cache.

The manifest pins what the rows mean: ``teacher`` = ``{model, weights_hash: null, template_fingerprint,
readout, max_new_tokens, served: {api, tokenizer, top_logprobs, temperature}}``, the label scheme, level
names and item fields; ``server`` (the URL of the last run that wrote to it) may change between runs.
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout

from .annotation_store import ID, MANIFEST, AnnotationStore, StoreError, read_annotations, read_manifest
from .backends import BackendError, OpenAIChatBackend
from .cot import CoTParseError, evidence_spans, parse
from .prompts import PromptTemplate, neutralize_special_tokens
from .schema import DIMENSIONS, VERDICTS
from .served_readout import NoLogprobsError, TokenTrace, WordReading, read_words, token_trace
from .teacher_cache import KIND, SCHEMA_VERSION, VOLATILE_KEYS, TeacherSignal, cache_schema

log = logging.getLogger(__name__)
Api = Literal["chat", "completions"]


class ServedTeacherError(RuntimeError):
    """A served teacher that cannot be read as configured (no log-probabilities, a refused option ...)."""


class _Client(OpenAIChatBackend):
    """The chat backend's HTTP machinery (deadline, retries, backoff, Retry-After cap) aimed at one endpoint."""

    def __init__(self, endpoint: str, **kw: Any):
        super().__init__(**kw)
        self.url, self.server_kind = f"{self.base_url}/{endpoint}", endpoint.replace("/", "-")

    def post(self, body: dict[str, Any]) -> Any:
        return self._post(body)


@dataclass
class Reading:
    """One pair as the served teacher read it: its signal, or why it has none, and what reading it took."""

    example_id: str
    signal: TeacherSignal | None
    unreadable: str | None = None
    missing_words: int = 0
    requests: int = 0
    fallback: bool = False
    answers: list[str] = field(default_factory=list)


class ServedTeacher:
    """The teacher behind an OpenAI-compatible server; see the module docstring.

    Args:
        base_url: the server's API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the server serves (its ``/v1/models`` lists them).
        readout: ``direct`` (level distribution only) or ``cot`` (chain, verdicts, level).
        api: ``chat`` or ``completions`` (the prompt rendered here by ``tokenizer``).
        tokenizer: the served model's tokenizer (bundled name, local directory or hub id); needed by
            ``api: completions``, unused by ``chat``.
        template: the prompt template (default: the project's; use the one the teacher was trained with).
        top_logprobs: alternatives asked for at every written token (vLLM allows up to its ``--max-logprobs``,
            20 by default; OpenAI's chat API up to 20).
        max_new_tokens: generation budget of a chain (``cot``).
        direct_max_tokens: generation budget of a direct answer (``level: <name>`` and a little slack).
        temperature: sampling temperature of the chain (0: greedy). Direct answers are always greedy.
        seed: sampling seed sent with every request (None: none).
        api_key_env, concurrency, timeout_s, max_retries, backoff_s, max_retry_after_s, extra_body:
            as :class:`~ellm_mkd.backends.OpenAIChatBackend` (``concurrency`` bounds the requests in flight).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        readout: Literal["direct", "cot"] = "direct",
        api: Api = "chat",
        tokenizer: str | None = None,
        template: PromptTemplate | None = None,
        top_logprobs: int = 20,
        max_new_tokens: int = 256,
        direct_max_tokens: int = 8,
        temperature: float = 0.0,
        seed: int | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_retry_after_s: float = 60.0,
        extra_body: dict | None = None,
    ):
        if readout not in ("direct", "cot") or api not in ("chat", "completions"):
            raise ValueError(
                f"readout must be 'direct' or 'cot' and api 'chat' or 'completions', got {readout!r}, {api!r}"
            )
        if top_logprobs < 1:
            raise ValueError(f"top_logprobs must be >= 1 (the level words are read from them), got {top_logprobs}")
        if max_new_tokens < 1 or direct_max_tokens < 1:
            raise ValueError(
                f"max_new_tokens and direct_max_tokens must be >= 1, got {max_new_tokens}, {direct_max_tokens}"
            )
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        extra = dict(extra_body or {})
        clash = sorted(set(extra) & {"logprobs", "top_logprobs", "prompt", "echo", "stream"})
        if clash:
            raise ValueError(f"extra_body may not set {clash}: the served teacher sets them itself")
        if isinstance(template, dict):
            template = PromptTemplate(**template)
        self.template = template or PromptTemplate()
        self.model, self.readout, self.api = model, readout, api
        self.tokenizer_name = tokenizer
        self.top_logprobs, self.max_new_tokens, self.direct_max_tokens = top_logprobs, max_new_tokens, direct_max_tokens
        self.temperature, self.seed = float(temperature), seed
        self.tokenizer = None
        if api == "completions":
            if not tokenizer:
                raise ValueError(
                    "api: completions renders the prompt here with the served model's chat template: set tokenizer "
                    "(a bundled name, a local model directory or a hub id), or use api: chat"
                )
            from .models import load_tokenizer

            self.tokenizer = load_tokenizer(tokenizer)
        self.client = _Client(
            "chat/completions" if api == "chat" else "completions",
            base_url=base_url,
            model=model,
            api_key_env=api_key_env,
            concurrency=concurrency,
            timeout_s=timeout_s,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_retry_after_s=max_retry_after_s,
            extra_body=extra,
        )
        self.level_names: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        """What pins this teacher's outputs in a cache manifest (the server URL is not part of it)."""
        return {
            "model": self.model,
            "weights_hash": None,
            "template_fingerprint": self.template.fingerprint(),
            "readout": self.readout,
            "max_new_tokens": self.max_new_tokens if self.readout == "cot" else None,
            "served": {
                "api": self.api,
                "tokenizer": self.tokenizer_name if self.api == "completions" else None,
                "top_logprobs": self.top_logprobs,
                "temperature": self.temperature if self.readout == "cot" else 0.0,
            },
        }

    def close(self) -> None:
        self.client.close()

    # -- requests -----------------------------------------------------------------------------------

    def _ask(self, query: str, item: str, mode: Literal["cot", "direct"], level_prefix: bool) -> TokenTrace:
        """One request; the answer as a :class:`TokenTrace`. ``level_prefix``: the prompt ends with ``level:``
        (``completions`` only)."""
        greedy = mode == "direct" or level_prefix
        body: dict[str, Any] = {
            "model": self.model,
            "n": 1,
            "temperature": 0.0 if greedy else self.temperature,
            "max_tokens": self.direct_max_tokens if greedy else self.max_new_tokens,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        messages = self.template.messages(query, item, self.level_names, mode)
        if self.api == "chat":
            # the server renders its own chat template: break the common control markers in the text first
            body["messages"] = [{**m, "content": neutralize_special_tokens(m["content"])} for m in messages]
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        else:
            from .prompts import chat_prompt

            prompt = chat_prompt(self.tokenizer, messages)
            body.update(
                prompt=prompt + (self.template.answer_prefix if level_prefix else ""), logprobs=self.top_logprobs
            )
        body.update(self.client.extra_body)
        try:
            payload = self.client.post(body)
        except BackendError as e:
            if "logprob" in str(e).lower():
                raise ServedTeacherError(
                    f"{e}. The served teacher asks for top_logprobs={self.top_logprobs}: lower top_logprobs, or "
                    "let the server return more (vLLM: --max-logprobs)"
                ) from e
            raise
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise BackendError(f"malformed answer from {self.client.url}: no 'choices' list")
        try:
            trace = token_trace(choices[0], f"the answer of {self.client.url}")
            if trace.tokens and not trace.has_top:
                raise NoLogprobsError(
                    f"the answer of {self.client.url} has the written tokens' log-probabilities but no top_logprobs"
                )
        except NoLogprobsError as e:
            raise ServedTeacherError(
                f"{e}. The served teacher reads the teacher's judgement from the log-probabilities of the level "
                f"words, so the server must return them for a request with "
                + ("logprobs: true, top_logprobs: K" if self.api == "chat" else "logprobs: K")
                + " (vLLM, SGLang and llama.cpp server do; an API that does not cannot serve the teacher cache)"
            ) from None
        return trace

    # -- readout ------------------------------------------------------------------------------------

    def read(self, row: dict[str, Any]) -> Reading:
        """The teacher's signal for one row (``example_id``, ``query``, ``item_text``)."""
        if not self.level_names:
            raise RuntimeError("set level_names (the label scheme's level names) before reading")
        eid, q, d = row["example_id"], row["query"], row["item_text"]
        if self.readout == "direct":
            return self._direct(eid, q, d, "direct")
        trace = self._ask(q, d, "cot", level_prefix=False)
        try:
            chain = parse(trace.text, q, d, self.level_names)
        except CoTParseError as e:
            out = self._direct(eid, q, d, "cot")
            out.requests += 1
            out.fallback = True
            out.answers.insert(0, trace.text)
            if out.signal is not None:
                out.signal.parse_error = str(e)
            return out
        verdicts, missing = [], 0
        for k, offset, words in self._points(trace.text):
            reading = read_words(trace, offset, words)
            if reading is None:  # cannot happen for a chain that parsed: its own word is always read
                return Reading(eid, None, f"no readable word at line {k + 1}", requests=1, answers=[trace.text])
            missing += reading.missing
            verdicts.append(reading)
        level = verdicts.pop()
        signal = TeacherSignal(
            example_id=eid,
            query=q,
            item_text=d,
            level_probs=level.probs(),
            verdict_probs=[v.probs() for v in verdicts],
            rationale=trace.text.strip(),
            evidence=evidence_spans(chain, q, d),
        )
        return Reading(eid, signal, missing_words=missing, requests=1)

    def _direct(self, eid: str, q: str, d: str, mode: Literal["cot", "direct"]) -> Reading:
        """The level distribution at the direct question (``mode`` cot: after the chain's prompt, ``completions``)."""
        if self.api == "completions":
            trace, offset = self._ask(q, d, mode, level_prefix=True), 0
        else:
            trace = self._ask(q, d, "direct", level_prefix=False)
            at = trace.text.lower().find(self.template.answer_prefix.lower())
            offset = at + len(self.template.answer_prefix) if at >= 0 else 0
        reading: WordReading | None = read_words(trace, offset, self.level_names)
        if reading is None:
            why = f"none of the level words {list(self.level_names)} is among the top {self.top_logprobs} tokens"
            return Reading(eid, None, why, requests=1, answers=[trace.text])
        return Reading(eid, TeacherSignal(eid, q, d, reading.probs()), missing_words=reading.missing, requests=1)

    def _points(self, text: str) -> list[tuple[int, int, tuple[str, ...]]]:
        """``(line index, offset after "=>" or "level:", words)`` of a parsed chain: dimensions, then level."""
        lead = len(text) - len(text.lstrip())
        out, offset = [], lead
        for k, line in enumerate(text.strip().splitlines(keepends=True)):
            stripped = line.rstrip("\r\n")
            if k < len(DIMENSIONS):
                out.append((k, offset + stripped.rfind("=>") + 2, VERDICTS))
            elif k == len(DIMENSIONS):
                prefix = self.template.answer_prefix
                out.append((k, offset + stripped.find(prefix) + len(prefix), self.level_names))
            offset += len(line)
        return out


def _take_lock(cache_dir: Path) -> FileLock:
    """The lock a local cache job holds too (``.<cache_dir name>.lock`` beside it): one writer at a time."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    path = cache_dir.parent / f".{cache_dir.name}.lock"
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise StoreError(
            f"{cache_dir}: another job is writing this teacher cache (it holds {path}); wait for it to finish and "
            "run this again (it resumes), or choose another cache_dir"
        ) from None
    return lock


def _clear(cache_dir: Path) -> None:
    if not cache_dir.exists():
        return
    if not (cache_dir / MANIFEST).exists() and any(cache_dir.iterdir()):
        raise StoreError(
            f"{cache_dir} is not empty and is not a teacher cache; overwrite: true only replaces a teacher cache. "
            "Choose another cache_dir"
        )
    log.info("teacher cache %s: overwrite=true, removing the old cache", cache_dir)
    shutil.rmtree(cache_dir)


def write_served_cache(
    teacher: ServedTeacher,
    rows: list[dict[str, Any]],
    cache_dir: str | Path,
    data: dict[str, Any],
    rows_per_shard: int = 256,
    overwrite: bool = False,
    max_unreadable_share: float = 0.05,
    log_every_s: float = 30.0,
) -> dict[str, Any]:
    """Ask ``teacher`` about every row not yet in the cache at ``cache_dir`` and write its answers there.

    Args:
        rows: the pairs (``example_id``, ``query``, ``item_text``), e.g. a data module's predict split.
        data: the manifest's data keys: ``label_scheme``, ``level_names``, ``item_fields`` (pinned),
            ``source_path``, ``split`` (free).
        rows_per_shard: rows per Parquet shard (a kill loses at most the rows not yet in a shard).
        overwrite: delete an existing teacher cache at ``cache_dir`` first (otherwise a matching one is resumed).
        max_unreadable_share: raise :class:`ServedTeacherError` (after writing the rest) when more of the rows asked
            for than this got no readable level distribution; they are not stored, so a rerun asks again.
    Returns a summary (counts, the first unreadable ids with the answers, pairs per second).
    """
    cache_dir = Path(cache_dir)
    teacher.level_names = tuple(data["level_names"])
    manifest = {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "teacher": teacher.identity(),
        "label_scheme": data["label_scheme"],
        "level_names": list(data["level_names"]),
        "item_fields": list(data["item_fields"]),
        "hidden_size": None,
        "source_path": data.get("source_path"),
        "split": data.get("split"),
        "server": teacher.client.base_url,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    lock = _take_lock(cache_dir)
    try:
        if overwrite:
            _clear(cache_dir)
        if (cache_dir / MANIFEST).exists():
            read_manifest(cache_dir, KIND)  # a damaged directory fails here, before any request
        store = AnnotationStore(
            cache_dir,
            manifest=manifest,
            fmt="parquet",
            rows_per_shard=rows_per_shard,
            shard_prefix="part-served",
            volatile_keys=(*VOLATILE_KEYS, "server"),
            kind=KIND,
            schema=cache_schema(),
        )
        expected = len({r["example_id"] for r in rows})
        try:
            with store:
                stats = _run(teacher, rows, store, log_every_s)
        except BackendError as e:
            raise BackendError(
                f"{e}. {len(store.done_ids())} of {expected} pairs are in {cache_dir}: run the same command again "
                "to ask for the rest"
            ) from e
        stats["written"] = store.rows_written
        ids = read_annotations(cache_dir, KIND).column(ID).to_pylist()
        if len(ids) != len(set(ids)):
            raise StoreError(f"{cache_dir}: {len(ids) - len(set(ids))} example ids were written twice")
        store.update_manifest(row_count=len(ids), expected_rows=expected, complete=len(ids) >= expected)
    finally:
        lock.release()
    summary = {"cache_dir": str(cache_dir), "rows": expected, "in_cache": len(ids), **stats}
    asked = stats["asked"]
    if asked and stats["unreadable"] / asked > max_unreadable_share:
        raise ServedTeacherError(
            f"{stats['unreadable']} of {asked} pairs got no readable level distribution (more than "
            f"max_unreadable_share={max_unreadable_share:g}); they are not in {cache_dir}. First: "
            f"{stats['unreadable_examples'][:3]}. Check that the served model follows the prompt (it should answer "
            "'level: <name>'), or raise top_logprobs"
        )
    return summary


def _run(teacher: ServedTeacher, rows: list[dict[str, Any]], store: AnnotationStore, log_every_s: float) -> dict:
    """Read the rows not in ``store`` (``teacher.client.concurrency`` requests in flight at most), append them."""
    done = store.done_ids()
    seen: set[str] = set()
    todo = []
    for r in rows:
        if r["example_id"] not in done and r["example_id"] not in seen:
            seen.add(r["example_id"])
            todo.append(r)
    if done:
        log.info(
            "teacher cache %s: %d rows are cached already; asking for the other %d", store.out_dir, len(done), len(todo)
        )
    stats: dict[str, Any] = {
        "cached_before": len(done), "asked": 0, "requests": 0, "parse_failures": 0,
        "missing_words": 0, "unreadable": 0, "unreadable_examples": [],
    }  # fmt: skip
    t0 = last = time.perf_counter()
    pending: set[Future] = set()
    todo_iter = iter(todo)
    pool = ThreadPoolExecutor(max_workers=teacher.client.concurrency, thread_name_prefix="served-teacher")
    try:

        def refill() -> None:
            while len(pending) < 2 * teacher.client.concurrency:  # a bounded queue: memory stays flat on any data size
                row = next(todo_iter, None)
                if row is None:
                    return
                pending.add(pool.submit(teacher.read, row))

        refill()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                pending.discard(f)
                r: Reading = f.result()  # a failed request (after its retries) stops the job here
                stats["asked"] += 1
                stats["requests"] += r.requests
                stats["missing_words"] += r.missing_words
                stats["parse_failures"] += r.fallback
                if r.signal is None:
                    stats["unreadable"] += 1
                    if len(stats["unreadable_examples"]) < 5:
                        stats["unreadable_examples"].append(
                            {"example_id": r.example_id, "why": r.unreadable, "answers": r.answers}
                        )
                    continue
                store.append([r.signal.to_row()])
            refill()
            if time.perf_counter() - last > log_every_s:
                last = time.perf_counter()
                log.info(
                    "served teacher: %d of %d pairs read (%.2f pairs/s)",
                    stats["asked"],
                    len(todo),
                    stats["asked"] / (last - t0),
                )
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    dt = time.perf_counter() - t0
    stats["pairs_per_s"] = round(stats["asked"] / dt, 2) if dt > 0 and stats["asked"] else None
    return stats
