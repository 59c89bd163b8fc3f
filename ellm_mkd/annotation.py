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
    rationale (kept chain text or null), status (ok | disagrees), samples, parsed,
    votes (count per level), vote_share, agrees (vote == human label, or null)

Failed pairs: a pair none of whose sampled chains parses (the server answered ``content: null`` or
blank text, or prose instead of a chain) is re-sampled ``retries`` times with fresh seeds; if it
still fails it is *not* stored, so the next run with the same config tries it again. The failures
of a run are listed in ``failed.jsonl`` (example id, reason ``empty`` or ``no_parse``, the parser's
message and the start of the first answer) and counted in the summary. When more than
``max_failed_share`` of the pairs of a run failed — or the first :data:`FAIL_FAST_PAIRS` pairs all
failed, when the run stops at once instead of spending the server's time — :func:`run_annotation`
raises :class:`AnnotationFailed` (exit status 1) after keeping every good row.

At the end ``summary.json`` (over the whole store, earlier runs included) gives status counts, the
parse-failure rate of sampled chains, mean vote share, agreement rate and the level distribution,
plus this run's attempted and failed counts.

Progress: on a terminal a progress bar; otherwise (output to a log file) one plain log line every
:data:`PROGRESS_EVERY_S` seconds and one at the end.
"""

from __future__ import annotations

import json
import logging
import os
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

#: a run whose first this-many pairs all failed stops at once (the server or prompt is broken)
FAIL_FAST_PAIRS = 64
#: seconds between plain progress lines when stderr is not a terminal
PROGRESS_EVERY_S = 30.0
FAILED_FILE = "failed.jsonl"
_ANSWER_SHOWN = 200  # characters of a failed answer kept in failed.jsonl


class AnnotationFailed(RuntimeError):
    """Too many pairs of a run got no chain that parses; ``summary`` is what was written to summary.json."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


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
        retries: times a pair none of whose chains parsed is sampled again (fresh seeds) before it is
            left for a rerun.
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
        retries: int = 1,
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
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.retries = retries
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
        """One result per row; a row whose chains all failed to parse is sampled again up to ``retries``
        times, and comes back with ``status: no_parse`` and its ``failure`` if it never parses."""
        results = self._sample(rows, level_names, 0)
        for attempt in range(1, self.retries + 1):
            again = [i for i, res in enumerate(results) if res["status"] == "no_parse"]
            if not again:
                break
            for i, res in zip(again, self._sample([rows[i] for i in again], level_names, attempt)):
                results[i] = res
        return results

    def _sample(self, rows: Sequence[dict[str, Any]], level_names: Sequence[str], attempt: int) -> list[dict]:
        convs = [self.template.messages(r["query"], r["item_text"], level_names, "cot") for r in rows]
        outs = self.backend.generate(
            convs,
            n=self.samples,
            temperature=self.sampling_temperature,
            max_new_tokens=self.max_new_tokens,
            seed=None if self.seed is None else self.seed + attempt * self.samples,  # fresh samples on a retry
        )
        return [self._vote(r, texts, level_names) for r, texts in zip(rows, outs)]

    def _vote(self, row: dict[str, Any], texts: Sequence[str], level_names: Sequence[str]) -> dict[str, Any]:
        chains, errors = [], []
        for t in texts:
            try:
                chains.append((parse(t, row["query"], row["item_text"], level_names), t.strip()))
            except CoTParseError as e:
                errors.append(str(e))
        votes = Counter(c.level for c, _ in chains)
        human = level_names[row["label"]] if row["label"] is not None else None
        out = {"samples": len(texts), "parsed": len(chains), "votes": [votes.get(n, 0) for n in level_names]}
        if not chains:
            answers = [" ".join(t.split()) for t in texts if t and t.strip()]
            failure = {
                "reason": "no_parse" if answers else "empty",  # empty: content null or blank
                "error": errors[0] if errors else "no answer",
                "answer": answers[0][:_ANSWER_SHOWN] if answers else None,
            }
            return {
                **out,
                "status": "no_parse",
                "level": None,
                "rationale": None,
                "vote_share": 0.0,
                "agrees": None,
                "failure": failure,
            }
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


class _Progress:
    """A tqdm bar on a terminal; otherwise one plain log line every :data:`PROGRESS_EVERY_S` seconds."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.done = total, desc, 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        self.lines = enabled and not sys.stderr.isatty()
        if enabled and not self.lines:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="pair", file=sys.stderr)

    def update(self, k: int, force: bool = False) -> None:
        self.done += k
        if self.bar is not None:
            self.bar.update(k)
        now = time.monotonic()
        if self.lines and (force or now - self.last >= PROGRESS_EVERY_S):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info(
                "%s: %d/%d pairs (%.0f%%), %.2f pairs/s, %.0fs elapsed, about %.0fs left",
                self.desc,
                self.done,
                self.total,
                100 * self.done / max(self.total, 1),
                rate,
                now - self.t0,
                eta,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines and self.done:
            self.update(0, force=True)


def _write_failed(out: Path, failed: list[dict[str, Any]]) -> Path | None:
    """This run's failed pairs as JSON lines (replacing an earlier run's list); None when there are none."""
    path = out / FAILED_FILE
    if not failed:
        path.unlink(missing_ok=True)
        return None
    tmp = out / f".tmp-{FAILED_FILE}"
    tmp.write_text("".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failed), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _failure_message(out: Path, summary: dict[str, Any], max_failed_share: float, stopped_early: bool) -> str:
    n, tried = summary["failed_this_run"], summary["attempted_this_run"]
    reasons = summary["failures_this_run"]
    why = (
        f"the first {tried} pairs all failed, so the run stopped"
        if stopped_early
        else f"more than max_failed_share={max_failed_share:g}"
    )
    return (
        f"{out}: {n} of {tried} pair(s) got no chain that parses ({why}): "
        f"{reasons.get('empty', 0)} with only empty answers (content null or blank), "
        f"{reasons.get('no_parse', 0)} with answers that are not a chain (e.g. {summary['first_failure']}). "
        f"They are not stored; {summary['failed_file']} lists them. Check the server, model and max_new_tokens, "
        "then run the same command again to retry them (good rows are kept)"
    )


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
    max_failed_share: float = 0.5,
) -> dict[str, Any]:
    """Annotate the examples of ``splits`` of ``data`` (a :class:`~datamodules.RelevanceDataModule`)
    into the store ``out``; returns the summary (also written to ``out/summary.json``). Raises
    :class:`AnnotationFailed` (after storing every good row) when more than ``max_failed_share`` of
    this run's pairs got no chain that parses."""
    if annotator == "llm" and llm is None:
        raise ValueError("annotator: llm needs an llm section (backend, samples, sampling_temperature, ...)")
    if not 0 <= max_failed_share <= 1:
        raise ValueError(f"max_failed_share must be in [0, 1], got {max_failed_share}")
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
    failed: list[dict[str, Any]] = []
    attempted, stopped_early = 0, False
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
        bar = _Progress(len(todo), f"annotate ({annotator})", progress)
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            results = (
                _rules_rows(rules, batch, table_rows, level_names)
                if rules is not None
                else llm.annotate_batch(batch, level_names)
            )
            keep = []
            for r, res in zip(batch, results):
                base = {"example_id": r["example_id"], "split": r["split"]}
                if res["status"] == "no_parse":  # not stored: the next run tries the pair again
                    failed.append({**base, "samples": res["samples"], **res["failure"]})
                else:
                    keep.append({**base, "annotator": annotator, "label": r["label"], **res})
            store.append(keep)
            attempted += len(batch)
            bar.update(len(batch))
            if attempted >= FAIL_FAST_PAIRS and len(failed) == attempted and attempted < len(todo):
                stopped_early = True
                break
        bar.close()
    written = store.rows_written  # after close: the last shard is flushed on exit
    out = Path(out)
    failed_file = _write_failed(out, failed)
    summary = summarize_store(out, level_names)
    seconds = time.time() - t0
    summary.update(
        {
            "attempted_this_run": attempted,
            "written_this_run": written,
            "failed_this_run": len(failed),
            "failures_this_run": dict(Counter(f["reason"] for f in failed)),
            "failed_file": str(failed_file) if failed_file else None,
            "seconds_this_run": round(seconds, 2),
            "pairs_per_s_this_run": round(written / max(seconds, 1e-9), 2),
            "out": str(out),
        }
    )
    if failed:
        first = failed[0]
        summary["first_failure"] = f"{first['example_id']}: {first['error']}" + (
            f"; answer {first['answer']!r}" if first["answer"] else ""
        )
        log.warning("%s: %d of %d pair(s) got no chain that parses; see %s", out, len(failed), attempted, failed_file)
    if summary["status"].get("no_parse"):
        log.warning(
            "%s: %d row(s) stored as no_parse by an earlier version count as done; pass overwrite=True to redo them",
            out,
            summary["status"]["no_parse"],
        )
    Path(out, "summary.json").write_text(json.dumps(summary, indent=2))
    if stopped_early or (attempted and len(failed) / attempted > max_failed_share):
        raise AnnotationFailed(_failure_message(out, summary, max_failed_share, stopped_early), summary)
    return summary
