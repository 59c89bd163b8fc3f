"""``ellm-mkd serve --model DIR|CKPT``: a JSON HTTP scoring service on LitServe, with dynamic batching.

``POST /predict`` with ``{"query": "...", "items": [{"item_id": "...", "title": "...", "brand": ...}, ...]}``
answers ``{"query": ..., "results": [{"item_id", "expected_grade", "level", "level_probs": {level: p},
"dimensions": {dim: {"verdict": v, "probs": {verdict: p}}}}, ...]}``, one result per item in order: the
scores ``ellm-mkd score`` gives for the same pairs. Item fields are rendered as in training (the model's
``item_fields``); a field the model was not trained on is accepted and ignored. A two-tower student served
with ``--item_index DIR`` (built by ``ellm-mkd score --item_index``) also takes items by ``item_id`` alone and
reads their vectors from the index instead of encoding them.

Requests waiting at the same time are scored together (``--max_batch_size`` requests, waiting at most
``--batch_timeout`` seconds for a batch to fill). ``GET /health`` answers ``ok`` once the model is loaded;
``GET /info`` gives the model card (levels, dimensions, item fields, parity) and the server settings.

Bad requests never reach the model: they get a 4xx JSON answer ``{"detail": ...}`` — 422 for missing
fields, wrong types, empty or too long strings, too many items, or unknown keys; 400 for a body that is
not valid JSON or not UTF-8; 413 for a body over ``--max_request_bytes``.
"""

# no ``from __future__ import annotations``: LitServe reads decode_request's annotation to build the endpoint,
# and needs the ScoreRequest class itself, not its name
import functools
import json
import os
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from jsonargparse import ArgumentParser
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ellm_mkd.schema import ITEM_FIELDS

#: what request validation reads: the limits and the item index (set by ``serve`` in the environment, so every
#: server process sees them)
LIMITS_ENV = "ELLM_MKD_SERVE_LIMITS"
DEFAULT_LIMITS = {"max_items": 256, "max_query_chars": 512, "max_field_chars": 20000}


def limits() -> dict[str, Any]:
    return {**DEFAULT_LIMITS, "item_index": None, **json.loads(os.environ.get(LIMITS_ENV, "{}"))}


@functools.cache
def _index_ids(directory: str) -> frozenset[str]:
    return frozenset(json.loads((Path(directory) / "items.json").read_text(encoding="utf-8"))["ids"])


def _no_surrogates(v: str | None) -> str | None:
    if v is not None and any("\ud800" <= c <= "\udfff" for c in v):
        raise ValueError("text holds an unpaired surrogate (not valid Unicode)")
    return v


class Item(BaseModel):
    """One item: its fields (``title`` required) and an optional id echoed back; with a two-tower item index,
    an ``item_id`` of the index alone."""

    model_config = ConfigDict(extra="forbid")
    item_id: str | None = Field(default=None, max_length=512)
    title: str | None = Field(default=None, min_length=1)
    brand: str | None = None
    color: str | None = None
    description: str | None = None
    bullets: str | None = None
    attributes: str | None = None

    @field_validator(*ITEM_FIELDS, "item_id")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        v = _no_surrogates(v)
        cap = limits()["max_field_chars"]
        if v is not None and len(v) > cap:
            raise ValueError(f"{len(v)} characters, more than the limit of {cap}")
        return v

    @model_validator(mode="after")
    def _title_or_indexed_id(self) -> "Item":
        if self.title is not None:
            return self
        index = limits()["item_index"]
        if not index:
            raise ValueError("title is required (this server has no item index to look item ids up in)")
        if self.item_id is None or self.item_id not in _index_ids(index):
            raise ValueError(f"no title, and item_id {self.item_id!r} is not in the server's item index")
        return self


class ScoreRequest(BaseModel):
    """A query and the items to score against it."""

    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1)
    items: list[Item] = Field(min_length=1)

    @field_validator("query")
    @classmethod
    def _query(cls, v: str) -> str:
        _no_surrogates(v)
        if not v.strip():
            raise ValueError("query is blank")
        cap = limits()["max_query_chars"]
        if len(v) > cap:
            raise ValueError(f"{len(v)} characters, more than the limit of {cap}")
        return v

    @field_validator("items")
    @classmethod
    def _items(cls, v: list[Item]) -> list[Item]:
        cap = limits()["max_items"]
        if len(v) > cap:
            raise ValueError(f"{len(v)} items, more than the limit of {cap} per request")
        return v


class ScoringAPI(ls.LitAPI):
    """Decodes validated requests into (query, item texts), scores every pair of a batch of requests
    in one call, and splits the scores back per request."""

    def __init__(
        self, model: str, precision: str, batch_size: int, threads: int | None, item_index: str | None, **kw: Any
    ):
        super().__init__(**kw)
        self.model, self.precision, self.pair_batch, self.threads = model, precision, batch_size, threads
        self.item_index = item_index

    def setup(self, device: str) -> None:
        from ellm_mkd.serving.item_index import ItemIndex

        from .score import load_scorer

        self.scorer, fingerprint = load_scorer(self.model, self.precision, self.pair_batch, threads=self.threads)
        self.index = None
        if self.item_index:
            self.index = ItemIndex(self.item_index, fingerprint, self.scorer.card.item_fields)

    def decode_request(self, request: ScoreRequest) -> dict[str, Any]:
        from datamodules.text import render_item

        fields = self.scorer.card.item_fields
        items = [it.model_dump() for it in request.items]
        return {
            "query": request.query,
            "ids": [it["item_id"] for it in items],
            "texts": [render_item(it, fields)[0] if it["title"] is not None else None for it in items],
        }

    def batch(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return inputs

    def predict(self, x: Any) -> Any:
        reqs = x if isinstance(x, list) else [x]
        queries = [r["query"] for r in reqs for _ in r["texts"]]
        texts = [t for r in reqs for t in r["texts"]]
        if self.index is not None:
            scores = self._score_with_index(queries, texts, [i for r in reqs for i in r["ids"]])
        else:
            scores = self.scorer.score_pairs(queries, texts)
        out, start = [], 0
        for r in reqs:
            n = len(r["texts"])
            out.append({"request": r, "scores": scores.take(slice(start, start + n))})
            start += n
        return out if isinstance(x, list) else out[0]

    def _score_with_index(self, queries: list[str], texts: list[str | None], ids: list[str | None]) -> Any:
        """Two-tower: items given by id take their vector from the index, the others are embedded."""
        import numpy as np

        s = self.scorer
        uq = sorted(set(queries))
        qv = s.embed("query", uq)
        qrow = {q: i for i, q in enumerate(uq)}
        new = sorted({t for t in texts if t is not None})
        tv = s.embed("item", new) if new else None
        trow = {t: i for i, t in enumerate(new)}
        vecs = [tv[trow[t]] if t is not None else self.index.get([i])[0] for t, i in zip(texts, ids)]
        return s.score_vectors(qv[[qrow[q] for q in queries]], np.stack(vecs))

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        card, s, r = self.scorer.card, output["scores"], output["request"]
        results = []
        for i, item_id in enumerate(r["ids"]):
            results.append(
                {
                    "item_id": item_id,
                    "expected_grade": float(s.expected_grade[i]),
                    "level": card.level_names[int(s.level_probs[i].argmax())],
                    "level_probs": {n: float(p) for n, p in zip(card.level_names, s.level_probs[i])},
                    "dimensions": {
                        d: {
                            "verdict": card.verdicts[int(s.dim_probs[i, j].argmax())],
                            "probs": {v: float(p) for v, p in zip(card.verdicts, s.dim_probs[i, j])},
                        }
                        for j, d in enumerate(card.dimensions)
                    },
                }
            )
        return {"query": r["query"], "results": results}


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="ellm-mkd serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=str, required=True, help="export directory (model.json) or student .ckpt")
    p.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--precision", type=str, default="fp32", help="export directory: fp32 | int8 graphs")
    p.add_argument("--max_batch_size", type=int, default=16, help="requests scored together (dynamic batching)")
    p.add_argument("--batch_timeout", type=float, default=0.005, help="seconds to wait for a batch to fill")
    p.add_argument("--batch_size", type=int, default=64, help="pairs per model call")
    p.add_argument("--workers", type=int, default=1, help="model worker processes")
    p.add_argument("--threads", type=int | None, default=None, help="onnxruntime intra-op threads per worker")
    p.add_argument("--max_items", type=int, default=DEFAULT_LIMITS["max_items"], help="items per request")
    p.add_argument("--max_query_chars", type=int, default=DEFAULT_LIMITS["max_query_chars"], help="query length")
    p.add_argument("--max_field_chars", type=int, default=DEFAULT_LIMITS["max_field_chars"], help="item field length")
    p.add_argument("--max_request_bytes", type=int, default=1 << 20, help="largest request body (413 above it)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait before a 504")
    p.add_argument(
        "--item_index", type=str | None, default=None, help="two-tower: an item index (ellm-mkd score --item_index)"
    )
    return p


def build_server(cfg: Any):
    """The LitServer for parsed ``serve`` options (also used by ``bench serve``)."""
    from ellm_mkd.serving import CARD_FILE, ModelCard

    for name in ("max_batch_size", "batch_size", "workers", "max_items", "max_query_chars", "max_request_bytes"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.item_index:
        _check_item_index(cfg)
    os.environ[LIMITS_ENV] = json.dumps({**{k: getattr(cfg, k) for k in DEFAULT_LIMITS}, "item_index": cfg.item_index})
    meta: dict[str, Any] = {"model": cfg.model, "precision": cfg.precision, "limits": limits()}
    if os.path.isfile(os.path.join(cfg.model, CARD_FILE)):
        card = ModelCard.load(cfg.model).to_json()
        meta["card"] = {k: card[k] for k in ("kind", "levels", "dimensions", "verdicts", "item_fields", "parity")}
    api = ScoringAPI(
        cfg.model,
        cfg.precision,
        cfg.batch_size,
        cfg.threads,
        cfg.item_index,
        max_batch_size=cfg.max_batch_size,
        batch_timeout=cfg.batch_timeout if cfg.max_batch_size > 1 else 0.0,
        api_path="/predict",
    )
    server = ls.LitServer(
        api,
        accelerator="cpu",
        devices=1,
        workers_per_device=cfg.workers,
        timeout=cfg.timeout,
        model_metadata=meta,
        max_payload_size=cfg.max_request_bytes,
    )
    server.app.add_exception_handler(RequestValidationError, _validation_error)
    return server


def _check_item_index(cfg: Any) -> None:
    """Refuse, before starting, an index that is missing, or made by another model or precision."""
    from .score import model_fingerprint

    meta = Path(cfg.item_index) / "index.json"
    if not meta.is_file():
        raise FileNotFoundError(2, "no item index here (build one with ellm-mkd score --item_index)", str(meta))
    saved = json.loads(meta.read_text(encoding="utf-8")).get("model_fingerprint")
    if saved != model_fingerprint(cfg.model, cfg.precision):
        raise ValueError(
            f"{cfg.item_index}: this item index was built by another model or precision than --model "
            f"{cfg.model} --precision {cfg.precision}; build it again with ellm-mkd score --item_index"
        )


async def _validation_error(request: Any, exc: RequestValidationError) -> JSONResponse:
    """422 with where and what, without echoing the input back (it may be huge, or not encodable)."""
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": detail})


def serve_main(argv: list[str]) -> int:
    cfg = _parser().parse_args(argv)
    server = build_server(cfg)
    print(f"serving {cfg.model} on http://{cfg.host}:{cfg.port}/predict (health: /health, metadata: /info)", flush=True)
    server.run(host=cfg.host, port=cfg.port, generate_client_file=False, num_api_servers=1)
    return 0
