"""Helpers shared by test modules: teacher caches with real evidence, built without an LLM."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import torch

from ellm_mkd.annotation_store import AnnotationStore
from ellm_mkd.schema import DIMENSIONS, VERDICTS
from ellm_mkd.teacher_cache import KIND, SCHEMA_VERSION, VOLATILE_KEYS, TeacherSignal, cache_schema

#: the tiny teachers' level names and an annotated chain for the query "red drill" (test_teacher, test_prefix_packing)
TEACHER_LEVELS = ("irrelevant", "partially relevant", "relevant", "exact")
TEACHER_CHAIN = "\n".join(
    [
        'category: query "drill" | item "Drill" => match',
        "brand: query - | item - => absent",
        "model: query - | item - => absent",
        'attributes: query "red" | item "Red" => match',
        'usage: query "drill" | item "Drill" => partial',
        "level: partially relevant",
    ]
)


def rule_signals(dm, splits=("train", "val", "test")) -> list[TeacherSignal]:
    """Signals with real evidence: the rules annotator's chains, parsed, with made-up distributions."""
    from ellm_mkd.annotate_rules import RuleAnnotator
    from ellm_mkd.cot import evidence_spans, parse, render

    raw = {r["example_id"]: r for r in dm.table.to_pylist()}
    ann = RuleAnnotator(dm.level_names, brands={r["brand"] for r in raw.values() if r["brand"]})
    g = torch.Generator().manual_seed(0)
    out = []
    for split in splits:
        for r in dm.datasets[split].rows:
            text = render(ann.annotate(raw[r["example_id"]], r["item_text"]))
            chain = parse(text, r["query"], r["item_text"], dm.level_names)
            p = torch.rand(dm.num_levels, generator=g).softmax(-1).tolist()
            v = torch.rand(len(DIMENSIONS), len(VERDICTS), generator=g).softmax(-1).tolist()
            h = torch.randn(8, generator=g).to(torch.float16).float().tolist()
            out.append(
                TeacherSignal(
                    r["example_id"],
                    r["query"],
                    r["item_text"],
                    p,
                    v,
                    text,
                    None,
                    evidence_spans(chain, r["query"], r["item_text"]),
                    h,
                )
            )
    return out


def write_cache(path: Path, dm, signals: list[TeacherSignal], **manifest_over) -> None:
    manifest = {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "teacher": {"model": "rules", "weights_hash": "abc", "template_fingerprint": "t0", "readout": "cot"},
        "label_scheme": dm.scheme.describe(),
        "level_names": list(dm.level_names),
        "item_fields": list(dm.item_fields),
        "hidden_size": 8,
        **manifest_over,
    }
    with AnnotationStore(
        path, manifest, fmt="parquet", rows_per_shard=100, volatile_keys=VOLATILE_KEYS, kind=KIND, schema=cache_schema()
    ) as store:
        store.append([s.to_row() for s in signals])


def save_tiny_bert(out: Path, tokenizer, **config) -> str:
    """A randomly initialised 2-layer BERT (hidden 32) saved as a local HF directory with ``tokenizer``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        **config,
    )
    BertModel(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def run_cli_metrics(cmd: str, config: Path, tmp: Path, name: str, *args: str) -> dict[str, float]:
    """``python -m ellm_mkd <cmd> --config <config> ...`` in a subprocess with a CSV logger; the last logged
    value of every metric."""
    full = [
        sys.executable,
        "-m",
        "ellm_mkd",
        cmd,
        "--config",
        str(config),
        *args,
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir",
        str(tmp),
        "--trainer.logger.init_args.name",
        name,
        "--trainer.default_root_dir",
        str(tmp / name),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.precision",
        "32-true",
    ]
    r = subprocess.run(full, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    last: dict[str, float] = {}
    for row in csv.DictReader(open(next((tmp / name).rglob("metrics.csv")))):
        last.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return last


class SigtermAt(__import__("lightning").pytorch.Callback):
    """Sends this process a real SIGTERM once the trainer reaches ``step`` (what a scheduler does to a job)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


def catalog_with_empty_queries(d: Path, seed: int, row: int, drop_val_split: bool = False) -> Path:
    """The synthetic catalog in ``ellm-mkd data prepare``'s layout with one bad row (an empty query, row ``row``) in
    train and in val; ``drop_val_split``: val.parquet without its split column (the file names the split)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datamodules.synth import SynthConfig, write

    write(d, SynthConfig(seed=seed, num_queries=30 if drop_val_split else 20, items_per_query=4))
    for split in ("train", "val"):
        t = pq.read_table(d / f"{split}.parquet")
        queries = t.column("query").to_pylist()
        queries[row] = ""
        t = t.set_column(t.column_names.index("query"), "query", pa.array(queries))
        pq.write_table(t.drop_columns(["split"]) if drop_val_split and split == "val" else t, d / f"{split}.parquet")
    return d
