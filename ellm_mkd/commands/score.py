"""``ellm-mkd score DATA --model DIR|CKPT --out FILE``: batch scoring of any file the readers accept.

DATA is checked exactly as ``data check`` and training check it (same presets, ``--mapping.*``, label scheme,
problems and ``--on_error`` policy; a label column is optional), but streamed: checked in a first pass, then
read again and scored in chunks of ``--chunk_rows``, each appended to the output (Parquet, CSV or JSON lines,
from the name or ``--out_format``). Memory follows the chunk, not the file (:mod:`datamodules.streaming`: what
is kept per row while the file is checked, what stays in memory, and why). Columns: ``example_id``, ``query``,
``item_id`` (and ``label``/``grade`` when the file has labels), ``expected_grade``, ``level`` (most likely),
``p_<level>`` per level and, per chain-of-thought dimension, the most likely verdict and its probability
(``category``, ``category_p``, ...): the explanation of the score.

``--model`` is a directory written by ``ellm-mkd export`` (onnxruntime; ``--precision int8`` for the
quantised graphs) or a student checkpoint (PyTorch; the run's ``config.yaml`` gives the item fields).
Two-tower: ``--item_index DIR`` keeps the item vectors of the catalog in DIR and reuses them next time
(only new or changed items are embedded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from datamodules.stream_reader import StreamStats
from datamodules.streaming import stream_examples
from datamodules.validation import DataSource
from ellm_mkd.serving import CARD_FILE, ModelCard, Scorer
from ellm_mkd.serving.item_index import ItemIndex
from ellm_mkd.serving.writer import ScoreWriter, output_format


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="ellm-mkd score", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of the options below")
    p.add_argument("path", type=str, help="data file (CSV/TSV/JSONL/Parquet, plain/.gz/.zip) or examples directory")
    p.add_argument("--model", type=str, required=True, help="export directory (model.json) or student .ckpt")
    p.add_argument("--out", type=str, required=True, help="output file: .parquet, .csv or .jsonl")
    p.add_argument("--out_format", type=str, default="auto", help="auto (from --out) | parquet | csv | jsonl")
    p.add_argument("--overwrite", type=bool, default=False, help="replace an existing output file")
    p.add_argument("--precision", type=str, default="fp32", help="export directory: fp32 | int8 graphs")
    p.add_argument("--batch_size", type=int, default=64, help="pairs per model call")
    p.add_argument("--chunk_rows", type=int, default=4096, help="rows scored and written at a time")
    p.add_argument(
        "--only_split", type=str, default="all", help="all | train | val | test: score one of the data's splits"
    )
    p.add_argument("--item_index", type=str | None, default=None, help="two-tower: item vector index directory")
    p.add_argument("--train_config", type=str | None, default=None, help="checkpoint: the run's config.yaml")
    p.add_argument("--threads", type=int | None, default=None, help="onnxruntime intra-op threads (default: all)")
    p.add_argument("--progress", type=bool, default=True, help="show a progress bar on stderr")
    p.add_class_arguments(DataSource, skip={"path"}, sub_configs=True)
    p.set_defaults(require_label=False)
    return p


def load_scorer(
    model: str,
    precision: str = "fp32",
    batch_size: int = 64,
    train_config: str | None = None,
    threads: int | None = None,
) -> tuple[Scorer, str]:
    """A scorer for an export directory or a student checkpoint, and a fingerprint of the model it runs."""
    path = Path(model)
    if path.is_dir():
        if not (path / CARD_FILE).is_file():
            raise FileNotFoundError(2, f"no {CARD_FILE}: not a directory written by ellm-mkd export", str(path))
        return Scorer.from_export(path, precision, batch_size, threads), model_fingerprint(model, precision)
    if not path.is_file():
        raise FileNotFoundError(2, "model not found (an export directory or a .ckpt)", str(path))
    from lightning_modules.serving_graphs import load_student

    from .export import torch_scorer
    from .export_provenance import training_context

    if threads:
        import torch

        torch.set_num_threads(threads)
    student = load_student(path)
    ctx = training_context(path, train_config, student.num_levels)
    for w in ctx["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return torch_scorer(student, ctx["item_fields"], ctx["level_names"], batch_size), model_fingerprint(model)


def model_fingerprint(model: str, precision: str = "fp32") -> str:
    """What item vectors depend on: the graph files of an export (at ``precision``) or the checkpoint file."""
    from .export_provenance import sha256_file

    path = Path(model)
    if not path.is_dir():
        return sha256_file(path)
    card = ModelCard.load(path)
    h = hashlib.sha256(precision.encode())
    for name in sorted(card.graphs):
        file = card.graphs[name].get(precision)
        h.update(name.encode() + ((path / file).read_bytes() if file else b""))
    return h.hexdigest()


def _source(cfg: Any, init: Any) -> DataSource:
    kw = {f.name: init[f.name] for f in dataclasses.fields(DataSource) if f.name != "path" and f.name in init}
    return DataSource(path=cfg.path, **kw)


def score_file(
    scorer: Scorer,
    source: DataSource,
    out: Path,
    fmt: str = "auto",
    split: str = "all",
    chunk_rows: int = 4096,
    item_index: ItemIndex | None = None,
    progress: bool = True,
    stats: StreamStats | None = None,
) -> tuple[int, Any]:
    """Score every pair of ``source`` into ``out``; returns (rows written, the load report).

    The data is streamed (:func:`datamodules.streaming.stream_examples`): it is checked first, as
    ``load_examples`` checks it (same problems, ``--on_error`` policy and quarantine file; under ``error`` a
    bad file is refused before anything is written), then read again ``chunk_rows`` rows at a time, so
    memory follows the chunk, not the file (plus, while the file is checked, its ids and pair hashes). The
    output is what scoring ``load_examples``'s table would give: the same rows, order, columns and values
    (two-tower with ``item_index``: item vectors embedded chunk by chunk, equal to float rounding).
    Passes over the data: one that checks it and one that scores it; one before those for a text file (size
    caps and encoding); one more when ``split`` is not ``all`` or with ``item_index`` (what the scored rows
    hold, and their new items embedded chunk by chunk); one more when a later duplicate pair makes an earlier
    row bad (its text for the report). A compressed Parquet file is first inflated to a temporary file.
    ``stats`` (optional) counts what the reader held."""
    from tqdm import tqdm

    if split not in ("all", "train", "val", "test"):
        raise ValueError(f"--only_split must be all, train, val or test, got {split!r}")
    if chunk_rows < 1:
        raise ValueError(f"--chunk_rows must be >= 1, got {chunk_rows}")
    with stream_examples(source, chunk_rows, stats) as stream:
        report = stream.report
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        if split == "all" and item_index is None:
            total, labelled = stream.rows, stream.any_label()
        else:  # a pass before the pairs: what the rows of the split hold, and (two-tower) their items' vectors
            with contextlib.closing(stream.chunks(split)) as chunks:
                total, labelled = survey_rows(scorer, chunks, item_index)
        bar = tqdm(total=total, unit="pair", disable=not progress, file=sys.stderr, desc="score")
        with ScoreWriter(out, fmt) as writer, contextlib.closing(stream.chunks(split)) as chunks:
            for chunk in chunks:
                writer.write(score_rows(scorer, chunk.to_pylist(), labelled, item_index))
                bar.update(chunk.num_rows)
        bar.close()
    return writer.rows, report


def survey_rows(scorer: Scorer, chunks: Iterable[Any], item_index: ItemIndex | None) -> tuple[int, bool]:
    """Rows in ``chunks`` and whether one carries a label; with ``item_index``, every item of the rows gets
    its vector (embedded chunk by chunk, only where new or changed; an item id seen again with another text
    is embedded again, so the last text wins, as one lookup of the whole file gives) and the index is saved.
    ``added``/``reused`` count items once per run, as one lookup of the whole file would. The vectors are the
    same model outputs as one lookup's, embedded in other batches: equal to float rounding (~1e-7).
    Memory: one chunk, and per item its id and text hash (the index itself holds every item)."""
    from datamodules.text import render_item
    from ellm_mkd.serving.item_index import text_hash

    fields = scorer.card.item_fields
    rows, labelled = 0, False
    seen: dict[str, tuple[str | None, str]] = {}  # item id -> (hash in the index before this run, latest hash)
    counts = (item_index.added, item_index.reused) if item_index is not None else (0, 0)
    for chunk in chunks:
        rows += chunk.num_rows
        labelled = labelled or chunk.column("label").null_count < chunk.num_rows
        if item_index is None:
            continue
        cols = chunk.select(["item_id", *fields]).to_pylist()
        items = {r["item_id"]: render_item(r, fields)[0] for r in cols}
        todo = {}
        for i, text in items.items():
            h = text_hash(text)
            if i not in seen:
                k = item_index.row.get(i)
                seen[i] = (None if k is None else item_index.hashes[k], h)
            elif seen[i][1] == h:
                continue
            seen[i] = (seen[i][0], h)
            todo[i] = text
        if todo:
            item_index.lookup(list(todo), list(todo.values()), lambda texts: scorer.embed("item", texts))
    if item_index is not None:  # lookup counted per chunk; count each item once for the run instead
        embedded = sum(before != last for before, last in seen.values())
        item_index.added = counts[0] + embedded
        item_index.reused = counts[1] + len(seen) - embedded
        item_index.save()
    return rows, labelled


def score_rows(scorer: Scorer, rows: list[dict], labelled: bool, item_index: ItemIndex | None) -> dict[str, list]:
    """The output columns of one chunk of example rows (``labelled``: with ``label`` and ``grade``; with
    ``item_index``, two-tower item vectors from it)."""
    from datamodules.text import render_item

    card = scorer.card
    queries = [r["query"] for r in rows]
    if item_index is not None:
        ids = [r["item_id"] for r in rows]
        uq = sorted(set(queries))
        qv = scorer.embed("query", uq)
        qrow = {q: i for i, q in enumerate(uq)}
        scores = scorer.score_vectors(qv[[qrow[q] for q in queries]], item_index.get(ids))
    else:
        scores = scorer.score_pairs(queries, [render_item(r, card.item_fields)[0] for r in rows])
    columns: dict[str, list[Any]] = {
        "example_id": [r["example_id"] for r in rows],
        "query": queries,
        "item_id": [r["item_id"] for r in rows],
    }
    if labelled:
        columns["label"] = [None if r["label"] is None else card.level_names[r["label"]] for r in rows]
        columns["grade"] = [r["grade"] for r in rows]
    columns.update(scorer.columns(scores))
    return columns


def score_main(argv: list[str]) -> int:
    parser = _parser()
    cfg = parser.parse_args(argv)
    init = parser.instantiate(cfg)
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(17, "output file exists (pass --overwrite true to replace it)", str(out))
    output_format(out, cfg.out_format)  # a name we cannot write: say so before reading anything
    source = _source(cfg, init)
    scorer, fingerprint = load_scorer(cfg.model, cfg.precision, cfg.batch_size, cfg.train_config, cfg.threads)
    index = None
    if cfg.item_index:
        if scorer.card.kind != "two_tower":
            raise ValueError("--item_index is for a two-tower student (this model is a cross-encoder)")
        index = ItemIndex(cfg.item_index, fingerprint, scorer.card.item_fields)
    rows, report = score_file(scorer, source, out, cfg.out_format, cfg.only_split, cfg.chunk_rows, index, cfg.progress)
    if report.rows_rejected:
        print(f"rejected rows: {report.rows_rejected:,} (quarantined to {report.quarantine_path})")
    if index is not None:
        print(f"item index: {cfg.item_index} ({len(index):,} items; {index.added:,} embedded, {index.reused:,} reused)")
    print(f"scored {rows:,} pairs: {out}")
    return 0
