"""Generation backends for the LLM annotator: sampled completions for chat conversations.

A :class:`GenerationBackend` turns a batch of conversations (OpenAI-style messages) into ``n``
sampled assistant texts each. The annotator does not care where they come from; this module
ships one backend that speaks the OpenAI chat-completions protocol, which every common serving
stack offers (vLLM, SGLang, llama.cpp server, TGI, hosted APIs), so the teacher runs wherever it
is served and the annotator stays a plain HTTP client. :class:`TransformersBackend` runs a local
causal LM (the bundled SmolLM2, a fine-tuned teacher's ``merged/`` directory, any HF model) with
batched generation, for machines without a server.

:class:`OpenAIChatBackend` design:

* one ``httpx.Client`` shared by a thread pool of ``concurrency`` workers (the connection pool is
  sized to match), so a batch of conversations is in flight at once; results keep input order;
* ``n`` completions per conversation: by default one request asks for ``n``; a server that ignores
  ``n`` (llama.cpp server answers one choice) gets follow-up requests until ``n`` are collected.
  With ``n_per_request=False`` every completion is its own ``n=1`` request (sent in parallel);
* seeds: a request that starts at completion ``j`` of a conversation sends ``seed + j``, so
  follow-up and ``n=1`` requests do not replay the first sample when a seed is given;
* every request goes through one helper, :meth:`OpenAIChatBackend._post`, that owns timeouts and
  retries: connection errors, timeouts, HTTP 429 and 5xx are retried with exponential backoff
  (``backoff_s * 2**attempt`` plus up to 25 % jitter, or the server's ``Retry-After``, in seconds
  or as an HTTP date, capped at ``max_retry_after_s``); other 4xx answers are the caller's mistake
  and fail at once. Every failure is a :class:`BackendError` naming the URL and what to do;
* ``timeout_s`` is a *deadline* for each attempt, from sending the request to the answer's last
  byte, not only the longest wait for one read: the answer is read as a stream and an attempt
  still unfinished after ``timeout_s`` is cut off, so a server that drips its answer a few bytes at
  a time cannot hold a worker forever (connect and each read also time out after ``timeout_s``;
  the response headers are capped at 16 KB by h11). An answer over :data:`MAX_ANSWER_BYTES` is
  refused. One attempt therefore ends within about ``2 * timeout_s`` (a stream that stalls just
  before the deadline waits out one read timeout), the whole call within
  ``(max_retries + 1) * (2 * timeout_s + max_retry_after_s)``;
* ``message.content: null`` (a server that stopped before writing any text) becomes ``""``: the
  caller's parser rejects that one sample instead of the whole batch failing here (the annotator
  counts such answers and leaves their pairs for a rerun).

The API key is read once, from the environment variable named by ``api_key_env``; it is sent as
``Authorization: Bearer ...`` and never appears in :meth:`~OpenAIChatBackend.describe`, in
``repr`` or in error messages.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Protocol, Self, runtime_checkable

import httpx

from .prompts import neutralize_special_tokens

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]
_MANAGED_KEYS = ("model", "messages", "n", "temperature", "max_tokens", "seed")
_BODY_SHOWN = 300  # characters of a server's error body quoted in a BackendError
_jitter = random.Random()  # jitter only spaces out retries; it never touches sampled outputs
#: the largest chat-completions answer read (a few chains of a few hundred tokens are a few KB)
MAX_ANSWER_BYTES = 32 << 20


class BackendError(RuntimeError):
    """A generation request that failed for good (after retries, where retrying made sense)."""


@runtime_checkable
class GenerationBackend(Protocol):
    """Something that samples assistant texts for chat conversations."""

    name: str

    def generate(
        self,
        conversations: list[Conversation],
        n: int,
        temperature: float,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> list[list[str]]:
        """For each conversation (OpenAI-style messages: ``[{"role": "system"|"user", "content": ...}]``),
        ``n`` sampled completions (assistant text only). The output has ``len(conversations)`` lists
        of ``n`` strings each, in input order."""
        ...

    def describe(self) -> dict:
        """JSON-able identity (backend kind, model, url) for manifests; never includes the API key."""
        ...


def _shorten(text: str, limit: int = _BODY_SHOWN) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_message(response: httpx.Response) -> str:
    """The server's own words for an error answer: ``error.message`` of a JSON body, else the raw body."""
    try:
        body = response.json()
    except ValueError:
        return _shorten(response.text) or "(empty body)"
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message")))
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return _shorten(err["message"])
        if isinstance(err, str):
            return _shorten(err)
    return _shorten(json.dumps(body, ensure_ascii=False))


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds: a number of seconds or an HTTP date (``None`` when absent or unreadable,
    so backoff applies instead)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = max(when.timestamp() - time.time(), 0.0)
    return seconds if seconds >= 0 and seconds == seconds else None


class _DeadlineExceeded(Exception):
    """An attempt that did not receive its whole answer within ``timeout_s``."""


class _AnswerTooLarge(Exception):
    """An answer body over :data:`MAX_ANSWER_BYTES`."""


class OpenAIChatBackend:
    """Sampled completions from an OpenAI-compatible ``/chat/completions`` endpoint.

    ``base_url`` is the API root, e.g. ``http://127.0.0.1:8000/v1`` (vLLM, SGLang) or
    ``http://127.0.0.1:8080/v1`` (llama.cpp server). ``max_retries`` counts retries after the first
    attempt. ``extra_body`` adds fields to every request (``top_p``, ``stop``, ...); it may not set
    the fields the backend manages itself (model, messages, n, temperature, max_tokens, seed).
    ``timeout_s`` is the deadline of one attempt, start to last byte (see the module docstring);
    ``max_retry_after_s`` caps how long a server's ``Retry-After`` may make the backend wait.
    """

    name = "openai-chat"
    server_kind = "chat-completions"  #: how messages name the server

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        n_per_request: bool = True,
        extra_body: dict | None = None,
        max_retry_after_s: float = 60.0,
    ):
        base_url = base_url.strip().rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must start with http:// or https://, got {base_url!r} (e.g. http://127.0.0.1:8000/v1)"
            )
        if not model:
            raise ValueError("model must name the served model (the server's /v1/models lists them)")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0 or backoff_s < 0:
            raise ValueError(f"max_retries and backoff_s must be >= 0, got {max_retries} and {backoff_s}")
        if not max_retry_after_s >= 0:
            raise ValueError(f"max_retry_after_s must be >= 0, got {max_retry_after_s}")
        extra_body = dict(extra_body or {})
        clash = [k for k in _MANAGED_KEYS if k in extra_body]
        if clash:
            raise ValueError(f"extra_body may not set {clash}: the backend sets them from generate()'s arguments")
        try:
            json.dumps(extra_body)
        except TypeError as e:
            raise ValueError(f"extra_body must be JSON-able: {e}") from e

        self.base_url, self.model = base_url, model
        self.url = f"{base_url}/chat/completions"
        self.api_key_env = api_key_env
        self.concurrency, self.timeout_s = concurrency, float(timeout_s)
        self.max_retries, self.backoff_s = max_retries, float(backoff_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self.n_per_request, self.extra_body = n_per_request, extra_body

        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(api_key_env) if api_key_env else None
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    # -- public API -----------------------------------------------------------------------------

    def generate(
        self,
        conversations: list[Conversation],
        n: int,
        temperature: float,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> list[list[str]]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self._client.is_closed:
            raise BackendError(f"the backend for {self.url} is closed")
        if not conversations:
            return []
        # a task: (conversation index, completions wanted, index of its first completion)
        if self.n_per_request:
            tasks = [(i, n, 0) for i in range(len(conversations))]
        else:
            tasks = [(i, 1, j) for i in range(len(conversations)) for j in range(n)]
        results: list[list[str | None]] = [[None] * n for _ in conversations]

        def run(task: tuple[int, int, int]) -> None:
            i, k, start = task
            texts = self._collect(conversations[i], k, start, temperature, max_new_tokens, seed)
            results[i][start : start + k] = texts

        if len(tasks) == 1 or self.concurrency == 1:
            for task in tasks:
                run(task)
        else:
            pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(tasks)), thread_name_prefix="openai-chat")
            try:
                futures = [pool.submit(run, t) for t in tasks]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for f in futures:  # in submission order: the first failing task's error is raised
                    if f in done and f.exception() is not None:
                        raise f.exception()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        return [list(texts) for texts in results]  # type: ignore[arg-type]

    def describe(self) -> dict:
        out: dict[str, Any] = {"backend": self.name, "model": self.model, "base_url": self.base_url}
        if self.extra_body:
            out["extra_body"] = dict(self.extra_body)
        return out

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OpenAIChatBackend(url={self.url!r}, model={self.model!r}, concurrency={self.concurrency})"

    # -- internals ------------------------------------------------------------------------------

    def _collect(
        self, messages: Conversation, k: int, start: int, temperature: float, max_new_tokens: int, seed: int | None
    ) -> list[str]:
        """``k`` completions of one conversation, asking again while the server returns fewer."""
        texts: list[str] = []
        while len(texts) < k:
            want = k - len(texts)
            body: dict[str, Any] = {
                "model": self.model,
                # the server renders its own chat template: break the common control markers in the text first
                "messages": [{**m, "content": neutralize_special_tokens(m["content"])} for m in messages],
                "n": want,
                "temperature": temperature,
                "max_tokens": max_new_tokens,
            }
            if seed is not None:
                body["seed"] = seed + start + len(texts)
            body.update(self.extra_body)
            texts.extend(self._choices(self._post(body))[:want])
        return texts

    def _choices(self, payload: Any) -> list[str]:
        """Assistant texts of a chat-completions answer, in ``choices[].index`` order."""
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list) or not choices:
            got = _shorten(json.dumps(payload, ensure_ascii=False), 200)
            raise BackendError(
                f"malformed answer from {self.url}: no 'choices' list (got {got}); "
                "is base_url an OpenAI-compatible API root such as http://host:port/v1?"
            )
        if all(isinstance(c, dict) and isinstance(c.get("index"), int) for c in choices):
            choices = sorted(choices, key=lambda c: c["index"])
        texts = []
        for pos, choice in enumerate(choices):
            message = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(message, dict) or "content" not in message:
                raise BackendError(
                    f"malformed answer from {self.url}: choice {pos} has no message.content "
                    f"({_shorten(json.dumps(choice, ensure_ascii=False), 200)})"
                )
            content = message["content"]
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise BackendError(
                    f"malformed answer from {self.url}: choice {pos} message.content is "
                    f"{type(content).__name__}, not a string"
                )
            texts.append(content)
        return texts

    def _send(self, body: dict[str, Any]) -> tuple[int, httpx.Headers, bytes]:
        """One attempt: status, headers and the whole body, read as a stream within the deadline."""
        deadline = time.monotonic() + self.timeout_s
        with self._client.stream("POST", self.url, json=body) as response:
            if time.monotonic() > deadline:
                raise _DeadlineExceeded
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise _AnswerTooLarge
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise _DeadlineExceeded
            return response.status_code, response.headers, b"".join(chunks)

    def _post(self, body: dict[str, Any]) -> Any:
        """POST one request with a deadline and retries; the parsed JSON answer or :class:`BackendError`."""
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            retry_after: float | None = None
            try:
                status, headers, content = self._send(body)
            except (httpx.TimeoutException, _DeadlineExceeded) as e:
                what = "a read or connect timeout" if isinstance(e, httpx.TimeoutException) else "the answer unfinished"
                problem = f"no complete answer within timeout_s={self.timeout_s:g}s ({what})"
                final = BackendError(
                    f"the {self.server_kind} server at {self.url} timed out: {problem}, "
                    f"{attempts} attempt(s). Raise timeout_s, lower concurrency or "
                    "max_new_tokens, or check the server's load"
                )
            except _AnswerTooLarge:
                raise BackendError(
                    f"the {self.server_kind} server at {self.url} sent an answer over {MAX_ANSWER_BYTES} bytes; "
                    f"lower max_new_tokens or samples, or check that base_url points at a {self.server_kind} API"
                ) from None
            except (httpx.NetworkError, httpx.RemoteProtocolError) as e:
                problem = f"{type(e).__name__}: {e}"
                final = BackendError(
                    f"cannot reach the {self.server_kind} server at {self.url}: {e or type(e).__name__} "
                    f"({attempts} attempt(s)). Start it (vLLM, SGLang, llama.cpp server ...) "
                    "or fix base_url"
                )
            except httpx.HTTPError as e:  # bad URL, unsupported protocol ...: retrying cannot help
                raise BackendError(f"cannot send a request to {self.url}: {type(e).__name__}: {e}; fix base_url") from e
            else:
                response = httpx.Response(status, headers=headers, content=content)
                if status < 300:
                    try:
                        return response.json()
                    except ValueError:
                        raise BackendError(
                            f"malformed answer from {self.url}: HTTP {status} but the body is not "
                            f"JSON ({_shorten(response.text, 200)!r})"
                        ) from None
                message = _error_message(response)
                if status != 429 and status < 500:
                    hint = {
                        401: " (set the API key in the environment variable "
                        f"{self.api_key_env or '(api_key_env is None)'})",
                        404: " (check base_url, which should end in /v1, and the model name)",
                    }.get(status, "")
                    raise BackendError(
                        f"the {self.server_kind} server at {self.url} refused the request: "
                        f"HTTP {status}: {message}{hint}"
                    )
                problem = f"HTTP {status}: {message}"
                retry_after = _retry_after(response)
                final = BackendError(
                    f"the {self.server_kind} server at {self.url} answered {problem} "
                    f"({attempts} attempt(s)); the server is overloaded or failing, retry later"
                )
            if attempt == attempts - 1:
                raise final
            if retry_after is not None:
                delay = min(retry_after, self.max_retry_after_s)
                if retry_after > self.max_retry_after_s:
                    problem += f" (Retry-After {retry_after:g}s capped at max_retry_after_s={self.max_retry_after_s:g})"
            else:
                delay = self.backoff_s * 2**attempt
                delay += _jitter.uniform(0, 0.25 * delay)
            log.warning("%s: %s; retry %d/%d in %.2fs", self.url, problem, attempt + 1, self.max_retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises


class TransformersBackend:
    """A local transformers causal LM: the chat template, then one batched ``generate`` per
    ``batch_size`` conversations with ``n`` sampled sequences each (:func:`ellm_mkd.readout.generate_batched`).

    Args:
        model: bundled name, local Hugging Face directory (e.g. a teacher's ``merged/``), or hub id.
        batch_size: conversations per ``generate`` call.
        device: ``cpu``, ``cuda``, ... (default: CUDA when available).
        dtype: weights dtype (``bfloat16`` on GPUs halves memory).
        trust_remote_code: allow model code from the model directory.
    """

    name = "transformers"

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        batch_size: int = 8,
        device: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ):
        import torch

        from .models import load_causal_lm, load_tokenizer, model_fingerprint, resolve_model
        from .readout import ensure_pad_token

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = model
        self.path = resolve_model(model)
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.tokenizer = load_tokenizer(self.path, trust_remote_code=trust_remote_code)
        ensure_pad_token(self.tokenizer)
        self.model = (
            load_causal_lm(self.path, trust_remote_code=trust_remote_code, torch_dtype=getattr(torch, dtype))
            .to(self.device)
            .eval()
        )
        self.fingerprint = model_fingerprint(self.path)

    def generate(
        self,
        conversations: list[Conversation],
        n: int,
        temperature: float,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> list[list[str]]:
        import torch

        from .prompts import chat_prompt
        from .readout import generate_batched

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if seed is not None:
            torch.manual_seed(seed)
        out: list[list[str]] = []
        prompts = [chat_prompt(self.tokenizer, c) for c in conversations]
        for start in range(0, len(prompts), self.batch_size):
            out += generate_batched(
                self.model,
                self.tokenizer,
                prompts[start : start + self.batch_size],
                max_new_tokens,
                temperature=temperature,
                num_return_sequences=n,
            )
        return out

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model_name, "weights": self.fingerprint, "dtype": self.dtype}

    def close(self) -> None:
        pass
