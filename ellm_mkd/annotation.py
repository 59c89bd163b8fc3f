"""Chains of thought for every example, written to a resumable store (``ellm-mkd annotate``).

Two annotators:

``rules``  :class:`~ellm_mkd.annotate_rules.RuleAnnotator`: lexical and attribute matching (the
           true verdicts where the data has them), the human label's level. One chain per example.
``llm``    self-consistency with a generation backend (a local transformers model or any
           OpenAI-compatible server, :mod:`ellm_mkd.backends`): ``samples`` chains are sampled per
           pair at ``sampling_temperature``, each parsed strictly (:func:`ellm_mkd.cot.parse`); the
           level is the majority vote of the chains that parsed; the kept chain is the first whose
           level is the vote, and with ``require_label_agreement`` only when the vote equals the human
           label. Each row records the votes, the vote share (votes for the winner / samples) and
           whether the vote agrees with the human label.

Output (:class:`~ellm_mkd.annotation_store.AnnotationStore`): JSONL or Parquet shards, each written
to a temporary file and renamed, so a killed run loses at most the rows in flight and a rerun with
the same config skips every finished ``example_id``. One row per example::

    example_id, split, annotator, label (human level or null), level (kept or voted level name),
    rationale (kept chain text or null), status (ok | no_parse | disagrees), samples, parsed,
    votes (count per level), vote_share, agrees (vote == human label, or null)

At the end ``summary.json`` (over the whole store, earlier runs included) gives status counts, the
parse-failure rate of sampled chains, mean vote share, agreement rate and the level distribution.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from .annotate_rules import RuleAnnotator
from .annotation_store import AnnotationStore, read_annotations
from .backends import GenerationBackend
from .cot import SCHEMA_VERSION, CoTParseError, parse, render
from .prompts import PromptTemplate

log = logging.getLogger(__name__)


class LLMAnnotator:
    """Self-consistency annotation with a generation backend.

    Args:
        backend: where chains come from (``ellm_mkd.backends.TransformersBackend`` or
            ``ellm_mkd.backends.OpenAIChatBackend``).
        samples: chains sampled per pair (k).
        sampling_temperature: temperature of those samples (0 would make every sample the same).
        max_new_tokens: generation budget of one chain.
        require_label_agreement: keep a chain only when the vote equals the human label (rows
            without a label keep the vote's chain).
        seed: sampling seed passed to the backend.
        template: the prompt template (the teacher must later be trained with the same one).
    """

    def __init__(
        self,
        backend: GenerationBackend | None = None,
        samples: int = 5,
        sampling_temperature: float = 0.7,
        max_new_tokens: int = 160,
        require_label_agreement: bool = True,
        seed: int | None = 0,
        template: PromptTemplate | None = None,
    ):
        if backend is None:
            raise ValueError(
                "the llm annotator needs llm.backend (ellm_mkd.backends.TransformersBackend or "
                "ellm_mkd.backends.OpenAIChatBackend with its init_args)"
            )
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if samples > 1 and sampling_temperature <= 0:
            raise ValueError("several samples per pair need a sampling_temperature > 0 (else they are all the same)")
        self.backend = backend
        self.samples = samples
        self.sampling_temperature = sampling_temperature
        self.max_new_tokens = max_new_tokens
        self.require_label_agreement = require_label_agreement
        self.seed = seed
        self.template = template or PromptTemplate()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend.describe(),
            "samples": self.samples,
            "sampling_temperature": self.sampling_temperature,
            "max_new_tokens": self.max_new_tokens,
            "require_label_agreement": self.require_label_agreement,
            "seed": self.seed,
            "template": self.template.fingerprint(),
        }

    def annotate_batch(self, rows: Sequence[dict[str, Any]], level_names: Sequence[str]) -> list[dict[str, Any]]:
        convs = [self.template.messages(r["query"], r["item_text"], level_names, "cot") for r in rows]
        outs = self.backend.generate(
            convs,
            n=self.samples,
            temperature=self.sampling_temperature,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
        )
        return [self._vote(r, texts, level_names) for r, texts in zip(rows, outs)]

    def _vote(self, row: dict[str, Any], texts: Sequence[str], level_names: Sequence[str]) -> dict[str, Any]:
        chains = []
        for t in texts:
            try:
                chains.append((parse(t, row["query"], row["item_text"], level_names), t.strip()))
            except CoTParseError:
                pass
        votes = Counter(c.level for c, _ in chains)
        human = level_names[row["label"]] if row["label"] is not None else None
        out = {"samples": len(texts), "parsed": len(chains), "votes": [votes.get(n, 0) for n in level_names]}
        if not chains:
            return {**out, "status": "no_parse", "level": None, "rationale": None, "vote_share": 0.0, "agrees": None}
        top = max(votes.values())
        tied = [n for n in level_names if votes.get(n, 0) == top]
        winner = human if human in tied else tied[0]
        agrees = None if human is None else winner == human
        kept = next(text for c, text in chains if c.level == winner)
        status = "ok"
        if self.require_label_agreement and agrees is False:
            status, kept = "disagrees", None
        return {
            **out,
            "status": status,
            "level": winner,
            "rationale": kept,
            "vote_share": top / len(texts),
            "agrees": agrees,
        }


def _rules_rows(
    annotator: RuleAnnotator,
    rows: Sequence[dict[str, Any]],
    table_rows: dict[str, dict[str, Any]],
    level_names: Sequence[str],
) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        chain = annotator.annotate(table_rows[r["example_id"]], r["item_text"])
        text = render(chain)
        parse(text, r["query"], r["item_text"], level_names)  # the rules must produce what the teacher is taught
        votes = [int(n == chain.level) for n in level_names]
        out.append(
            {
                "samples": 1,
                "parsed": 1,
                "votes": votes,
                "status": "ok",
                "level": chain.level,
                "rationale": text,
                "vote_share": 1.0,
                "agrees": True if r["label"] is not None else None,
            }
        )
    return out


def summarize_store(path: str | Path, level_names: Sequence[str]) -> dict[str, Any]:
    """Counts over every row of an annotation store (earlier runs included)."""
    t = read_annotations(path)
    cols = t.to_pydict() if t.num_rows else {}
    n = t.num_rows
    status = Counter(cols.get("status", []))
    samples = sum(cols.get("samples", []))
    parsed = sum(cols.get("parsed", []))
    agrees = [a for a in cols.get("agrees", []) if a is not None]
    shares = [s for s, st in zip(cols.get("vote_share", []), cols.get("status", [])) if st != "no_parse"]
    kept = Counter(lv for lv, st in zip(cols.get("level", []), cols.get("status", [])) if st == "ok")
    return {
        "rows": n,
        "status": dict(status),
        "kept": status.get("ok", 0),
        "sampled_chains": samples,
        "parse_failure_rate": (samples - parsed) / samples if samples else None,
        "mean_vote_share": sum(shares) / len(shares) if shares else None,
        "agreement_rate": sum(agrees) / len(agrees) if agrees else None,
        "kept_level_distribution": {name: kept.get(name, 0) for name in level_names},
    }


def run_annotation(
    data: Any,
    out: str | Path,
    annotator: Literal["rules", "llm"] = "rules",
    llm: LLMAnnotator | None = None,
    splits: Sequence[str] = ("train", "val"),
    format: Literal["jsonl", "parquet"] = "jsonl",
    rows_per_shard: int = 256,
    batch_size: int = 16,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Annotate the examples of ``splits`` of ``data`` (a :class:`~datamodules.RelevanceDataModule`)
    into the store ``out``; returns the summary (also written to ``out/summary.json``)."""
    if annotator == "llm" and llm is None:
        raise ValueError("annotator: llm needs an llm section (backend, samples, sampling_temperature, ...)")
    data.setup("fit")
    level_names = tuple(data.level_names)
    manifest = {
        "kind": "annotations",
        "annotator": annotator,
        "cot_schema_version": SCHEMA_VERSION,
        "level_names": list(level_names),
        "item_fields": list(data.item_fields),
        "data": str(data.source.path),
        "llm": llm.describe() if annotator == "llm" and llm is not None else None,
    }
    rows = [dict(r, split=s) for s in splits for r in data.datasets[s].rows]
    if limit is not None:
        rows = rows[:limit]
    t0 = time.time()
    with AnnotationStore(out, manifest, fmt=format, rows_per_shard=rows_per_shard, overwrite=overwrite) as store:
        done = store.done_ids()
        todo = [r for r in rows if r["example_id"] not in done]
        log.info(
            "%s: %d examples in %s, %d already annotated, %d to do",
            out,
            len(rows),
            list(splits),
            len(rows) - len(todo),
            len(todo),
        )
        rules = None
        table_rows: dict[str, dict[str, Any]] = {}
        if annotator == "rules":
            cols = data.table.to_pydict()
            names = list(cols)
            brands = {b for b in cols.get("brand", []) if b}
            rules = RuleAnnotator(level_names, brands)
            wanted = {r["example_id"] for r in todo}
            for i, eid in enumerate(cols["example_id"]):
                if eid in wanted:
                    table_rows[eid] = {k: cols[k][i] for k in names}
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"annotate ({annotator})", unit="pair", disable=not progress, file=sys.stderr)
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            results = (
                _rules_rows(rules, batch, table_rows, level_names)
                if rules is not None
                else llm.annotate_batch(batch, level_names)
            )
            store.append(
                [
                    {
                        "example_id": r["example_id"],
                        "split": r["split"],
                        "annotator": annotator,
                        "label": r["label"],
                        **res,
                    }
                    for r, res in zip(batch, results)
                ]
            )
            bar.update(len(batch))
        bar.close()
    written = store.rows_written  # after close: the last shard is flushed on exit
    summary = summarize_store(out, level_names)
    summary.update(
        {
            "written_this_run": written,
            "seconds_this_run": round(time.time() - t0, 2),
            "pairs_per_s_this_run": round(written / max(time.time() - t0, 1e-9), 2),
            "out": str(out),
        }
    )
    Path(out, "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
