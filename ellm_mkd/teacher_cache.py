"""The teacher knowledge cache: what the teacher said about each example, for the students.

A cache is a directory written by :class:`callbacks.TeacherCacheWriter` during
``ellm-mkd predict --config configs/teacher/cache_*.yaml``; the shards, atomic writes, per-rank
prefixes and resume come from :class:`~ellm_mkd.annotation_store.AnnotationStore` (Parquet format,
with the explicit :func:`cache_schema`)::

    cache_dir/manifest.json                    what the rows mean (below)
    cache_dir/part-r{rank}-{run}-{seq}.parquet complete shards, one writer per rank

One row per example (:class:`TeacherSignal` is the same record in memory):

==================  ==========================  ================================================
column              type                        meaning
==================  ==========================  ================================================
``example_id``      string                      join key (``ellm_mkd.schema.make_example_id``)
``query``           string                      the query the teacher read
``item_text``       string                      the rendered item the teacher read; evidence
                                                offsets point into these two strings, and the
                                                reader refuses rows whose texts differ from the data
``level_probs``     list<float32> [K]           the teacher's relevance distribution
``verdict_probs``   list<float32> [D*V] or null verdict distribution per CoT dimension (row-major
                                                ``[dimension][verdict]``); null in ``direct``
                                                readout and for chains that did not parse
``rationale``       string                      the generated chain ("" in ``direct`` readout, and where
                                                the chain did not parse)
``parse_error``     string or null              why the chain did not parse (null: it did)
``evidence``        list<struct>                ``{dimension, side, start, end}``: character
                                                offsets of the chain's evidence in ``query``
                                                (side ``query``) or ``item_text`` (side ``item``)
``hidden``          list<float16> [H] or null   pooled teacher hidden vector (``store_hidden``)
==================  ==========================  ================================================

The manifest pins ``schema_version``, the teacher (``model``, ``weights_hash`` of its parameters,
``template_fingerprint``, ``readout`` mode), the label scheme and ``level_names``, the
``item_fields`` the item text was rendered from, and ``hidden_size``; when the job ends it also
records ``row_count``, ``expected_rows`` and ``complete``. :class:`TeacherCache` refuses a cache
whose pinned keys differ from what the reader expects, with a message naming each key.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from ellm_mkd.schema import DIMENSIONS, VERDICTS

from .annotation_store import ID, StoreError, read_annotations, read_manifest

SCHEMA_VERSION = 1
KIND = "teacher cache"
#: manifest keys that may change between runs writing the same cache
VOLATILE_KEYS = ("created", "row_count", "expected_rows", "complete", "source_path", "split")

EVIDENCE_TYPE = pa.struct(
    [("dimension", pa.string()), ("side", pa.string()), ("start", pa.int32()), ("end", pa.int32())]
)


def cache_schema() -> pa.Schema:
    """Parquet schema of a cache shard (see the module docstring)."""
    return pa.schema(
        [
            pa.field(ID, pa.string(), nullable=False),
            pa.field("query", pa.string(), nullable=False),
            pa.field("item_text", pa.string(), nullable=False),
            pa.field("level_probs", pa.list_(pa.float32()), nullable=False),
            pa.field("verdict_probs", pa.list_(pa.float32())),
            pa.field("rationale", pa.string()),
            pa.field("parse_error", pa.string()),
            pa.field("evidence", pa.list_(EVIDENCE_TYPE)),
            pa.field("hidden", pa.list_(pa.float16())),
        ]
    )


class CacheMismatchError(StoreError):
    """A cache made by another teacher, template, label scheme, item rendering or schema version."""


@dataclass
class TeacherSignal:
    """What the teacher says about one example, from the cache or from a live teacher.

    ``verdict_probs`` is ``[D][V]`` or None (no verdicts: direct readout or an unparsed chain);
    ``evidence`` holds ``(dimension, side, start, end)`` character offsets into ``query`` / ``item_text``.
    """

    example_id: str
    query: str
    item_text: str
    level_probs: list[float]
    verdict_probs: list[list[float]] | None = None
    rationale: str = ""
    parse_error: str | None = None
    evidence: list[tuple[str, str, int, int]] = field(default_factory=list)
    hidden: list[float] | None = None

    def to_row(self) -> dict[str, Any]:
        vp = None if self.verdict_probs is None else [float(x) for row in self.verdict_probs for x in row]
        return {
            ID: self.example_id,
            "query": self.query,
            "item_text": self.item_text,
            "level_probs": [float(x) for x in self.level_probs],
            "verdict_probs": vp,
            "rationale": self.rationale,
            "parse_error": self.parse_error,
            "evidence": [{"dimension": d, "side": s, "start": int(a), "end": int(b)} for d, s, a, b in self.evidence],
            "hidden": None if self.hidden is None else [float(x) for x in self.hidden],
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TeacherSignal:
        vp = row.get("verdict_probs")
        v = len(VERDICTS)
        return cls(
            example_id=row[ID],
            query=row["query"],
            item_text=row["item_text"],
            level_probs=list(row["level_probs"]),
            verdict_probs=None if vp is None else [list(vp[i : i + v]) for i in range(0, len(vp), v)],
            rationale=row.get("rationale") or "",
            parse_error=row.get("parse_error"),
            evidence=[(e["dimension"], e["side"], e["start"], e["end"]) for e in row.get("evidence") or []],
            hidden=row.get("hidden"),
        )


def signals_from_prediction(prediction: dict[str, Any]) -> list[TeacherSignal]:
    """A teacher ``predict_step`` output (a batch) -> one :class:`TeacherSignal` per example."""
    n = len(prediction["example_id"])
    probs = prediction["probs"].float().tolist()
    verdicts = prediction["dim_probs"].float().tolist()
    hidden = prediction.get("hidden")
    hidden = hidden.to(torch.float16).float().tolist() if hidden is not None else [None] * n
    return [
        TeacherSignal(
            example_id=prediction["example_id"][i],
            query=prediction["query"][i],
            item_text=prediction["item_text"][i],
            level_probs=probs[i],
            verdict_probs=verdicts[i] if prediction["has_verdicts"][i] else None,
            # a chain that did not parse is no rationale: its error (which names the line) is kept instead
            rationale=(prediction["rationale"][i] or "") if prediction["parse_error"][i] is None else "",
            parse_error=prediction["parse_error"][i],
            evidence=list(prediction["evidence"][i]),
            hidden=hidden[i],
        )
        for i in range(n)
    ]


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A hash of every parameter's name, dtype, shape and values (the teacher's weights hash).

    Reads each tensor once (about a second for a 135M-parameter model in float32); the same
    weights loaded the same way (base model + the same adapter) give the same hash.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return h.hexdigest()


def describe_mismatch(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """``key: cache has X, expected Y`` for every expected key (dotted for nested dicts) that differs."""
    out = []
    for key, want in expected.items():
        have = stored.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            out += [f"{key}.{line}" for line in describe_mismatch(have, want)]
        elif have != want:
            out.append(f"{key}: cache has {have!r}, expected {want!r}")
    return out


class TeacherCache:
    """Read a cache directory: its manifest, its rows as :class:`TeacherSignal` by ``example_id``.

    Args:
        path: the cache directory.
        expect: manifest keys and the values they must have (nested dicts compare key by key), e.g.
            ``{"level_names": [...], "item_fields": [...], "teacher": {"weights_hash": ...}}``;
            ``schema_version`` is always checked.
    Raises :class:`CacheMismatchError` naming every differing key, or ``StoreError`` for a missing
    or damaged directory.
    """

    def __init__(self, path: str | Path, expect: dict[str, Any] | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, KIND)
        if self.manifest.get("kind") != KIND:
            raise CacheMismatchError(
                f"{self.path}: not a teacher cache (its manifest has kind "
                f"{self.manifest.get('kind')!r}); write one with ellm-mkd predict "
                "--config configs/teacher/cache_*.yaml"
            )
        problems = describe_mismatch(self.manifest, {"schema_version": SCHEMA_VERSION, **(expect or {})})
        if problems:
            raise CacheMismatchError(
                f"{self.path}: the teacher cache does not match this run ("
                + "; ".join(problems)
                + "). It is stale or from another teacher, prompt "
                "template, label scheme or item rendering: write the cache again with "
                "ellm-mkd predict, or point at the right one"
            )
        self.table = read_annotations(self.path, KIND)
        self._index: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            ids = self.table.column(ID).to_pylist() if self.table.num_rows else []
            dup = [k for k, c in Counter(ids).items() if c > 1]
            if dup:
                raise StoreError(
                    f"{self.path}: {len(dup)} example_id(s) occur in more than one row "
                    f"(first: {dup[:3]}); the cache is damaged, write it again"
                )
            self._index = {e: i for i, e in enumerate(ids)}
        return self._index

    def signals(self, ids: list[str] | None = None) -> dict[str, TeacherSignal]:
        """Signals of ``ids`` that have a row (all rows when ``ids`` is None)."""
        index = self.index
        rows = list(index.values()) if ids is None else [index[e] for e in ids if e in index]
        if not rows:
            return {}
        sub = self.table.take(pa.array(rows, pa.int64())).to_pylist()
        return {r[ID]: TeacherSignal.from_row(r) for r in sub}


def entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def highlight(text: str, spans: list[tuple[str, int, int]]) -> str:
    """``text`` with each ``(dimension, start, end)`` span wrapped as ``[words]{dimension}``."""
    out, pos = [], 0
    for dim, start, end in sorted(spans, key=lambda s: (s[1], -s[2])):
        if start < pos:  # nested or overlapping evidence: the outer span is already marked
            continue
        out += [text[pos:start], "[", text[start:end], "]{", dim, "}"]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def inspect(path: str | Path, examples: int = 3) -> str:
    """A readable summary of a cache: manifest, row count, teacher argmax levels, entropy, rationales."""
    import json

    cache = TeacherCache(path)
    m = cache.manifest
    names = m.get("level_names") or []
    lines = [f"teacher cache {cache.path}", "manifest:"]
    lines += [f"  {k}: {json.dumps(m[k], ensure_ascii=False)}" for k in sorted(m)]
    n = len(cache)
    lines.append(
        f"rows: {n}"
        + (f" of {m['expected_rows']} expected" if m.get("expected_rows") is not None else "")
        + ("" if m.get("complete") else "  (incomplete: the writing job has not finished; run it again to resume)")
    )
    if not n:
        return "\n".join(lines)
    probs = cache.table.column("level_probs").to_pylist()
    counts = Counter(max(range(len(p)), key=p.__getitem__) for p in probs)
    lines.append(
        "teacher argmax level: "
        + ", ".join(
            f"{names[k] if k < len(names) else k} {counts.get(k, 0)} ({counts.get(k, 0) / n:.1%})"
            for k in range(len(probs[0]))
        )
    )
    lines.append(
        f"mean entropy of the level distribution: {sum(map(entropy, probs)) / n:.3f} nats "
        f"(uniform: {math.log(len(probs[0])):.3f})"
    )
    errors = sum(e is not None for e in cache.table.column("parse_error").to_pylist())
    has_verdicts = [v is not None for v in cache.table.column("verdict_probs").to_pylist()]
    lines.append(f"rows with verdicts: {sum(has_verdicts)}; chains that did not parse: {errors}")
    order = sorted(range(n), key=lambda i: not has_verdicts[i])[:examples]  # parsed chains first
    ids = cache.table.column(ID).to_pylist()
    sigs = cache.signals([ids[i] for i in order])
    for sig in (sigs[ids[i]] for i in order):
        level = max(range(len(sig.level_probs)), key=sig.level_probs.__getitem__)
        q_spans = [(d, a, b) for d, s, a, b in sig.evidence if s == "query"]
        i_spans = [(d, a, b) for d, s, a, b in sig.evidence if s == "item"]
        lines += [
            "",
            f"example {sig.example_id}: level {names[level] if level < len(names) else level} "
            f"(p={sig.level_probs[level]:.2f})",
            f"  query: {highlight(sig.query, q_spans)}",
            f"  item:  {highlight(sig.item_text, i_spans)}",
        ]
        if sig.rationale:
            lines += ["  chain:"] + [f"    {ln}" for ln in sig.rationale.splitlines()]
        if sig.verdict_probs is not None:
            lines.append(
                "  verdicts: "
                + ", ".join(
                    f"{d}={VERDICTS[max(range(len(v)), key=v.__getitem__)]}"
                    for d, v in zip(DIMENSIONS, sig.verdict_probs)
                )
            )
    return "\n".join(lines)
