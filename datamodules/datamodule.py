"""``RelevanceDataModule``: one LightningDataModule for the teacher and every student.

It loads a :class:`~datamodules.validation.DataSource` once (validated, split, bucketed), serves
train/val/test/predict loaders, and lets the model's input layout tokenize in the collator, with
dynamic padding (each batch is padded to its own longest sequence, not to the token budget).

The input layout (tokenizer, token budget, pair or towers: :mod:`datamodules.inputs`) is bound late
with :meth:`RelevanceDataModule.connect`, because it belongs to the model: the LightningCLI builds
the data module from config, then the model calls ``datamodule.connect(layout=...)`` in its
``setup``. The model's ``max_seq_length`` is thus the one token budget; the data section has none.
One data module serves a cross-encoder (pair input), a two-tower student (one input per tower) and
a causal-LM teacher (strings only; the teacher builds its own prompts).

Every batch carries, besides token ids:

=================  ========================  ==============================================
key                type                      meaning
=================  ========================  ==============================================
``example_id``     list[str]                 stable ids (join key for teacher caches)
``query``          list[str]                 query text
``item_text``      list[str]                 rendered item (``datamodules.text``)
``labels``         LongTensor [B]            level, ``-100`` when unlabelled
``grades``         FloatTensor [B]           raw grade (RMSE target), NaN when unlabelled
``gains``          FloatTensor [B]           nDCG gain, NaN when unlabelled
``bucket_ids``     LongTensor [B]            index into ``schema.BUCKETS``
``query_ids``      LongTensor [B]            dense id of the normalised query (nDCG groups)
``dim_targets``    LongTensor [B, 5]         verdict index per CoT dimension, ``-100`` unknown
``rationale``      list[str | None]          the annotated chain of thought (only with
                                             ``annotations``; ``None`` where a row has none)
=================  ========================  ==============================================

With ``teacher`` (a :class:`~datamodules.teacher_signal.TeacherSource`: a teacher cache, or a live
teacher) every batch also carries the teacher's level and verdict distributions, its chain, and
*rationale tokens*: masks over the student's own input tokens covered by the chain's evidence
(through the tokenizer's offsets, for pair and tower inputs) and the chain in student tokens;
the keys are listed in :mod:`datamodules.teacher_batch`.

``annotations`` joins the output of ``ellm-mkd annotate`` by ``example_id``: the teacher learns to
write those chains. The store's manifest must agree with this data module (same level names and
item fields, since the chains quote the rendered item text); training rows without a kept chain
are an error or left out of training, by ``missing_annotations``.

``extra_fields`` is the seam for per-example signals joined later (teacher caches): any row key
named there is collated by stacking into a tensor of the given dtype.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from ellm_mkd.schema import BUCKETS, DIMENSIONS, VERDICTS, normalize_text

from .augment import Augmentation, file_pairs, sample_pairs
from .inputs import InputLayout, TextInputs
from .sampling import LengthGroupedSampler, ResumableLoader
from .splits import limit_by_query, select_split
from .teacher_batch import add_teacher_fields
from .teacher_signal import TeacherSource
from .text import DEFAULT_ITEM_FIELDS, check_item_fields, render_item
from .validation import DataSource, LoadReport, load_examples

log = logging.getLogger(__name__)

_VERDICT_INDEX = {v: i for i, v in enumerate(VERDICTS)}
_BUCKET_INDEX = {b: i for i, b in enumerate(BUCKETS)}


class RelevanceDataset(Dataset):
    """Rows of one split as plain dicts (picklable, so ``num_workers > 0`` works)."""

    def __init__(
        self, table: pa.Table, item_fields: Sequence[str], query_index: dict[str, int], sort_by_length: bool = False
    ):
        cols = table.to_pydict()
        self.rows: list[dict[str, Any]] = []
        for i in range(table.num_rows):
            r = {k: cols[k][i] for k in cols}
            item_text, _ = render_item(r, item_fields)
            self.rows.append(
                {
                    "example_id": r["example_id"],
                    "query": r["query"],
                    "item_id": r["item_id"],
                    "item_text": item_text,
                    "label": r["label"],
                    "grade": r["grade"],
                    "gain": r["gain"],
                    "bucket": r["query_bucket"],
                    "query_id": query_index[normalize_text(r["query"])],
                    "dims": [r.get(f"dim_{d}") for d in DIMENSIONS],
                }
            )
        if sort_by_length:
            # evaluation order does not change any metric; similar lengths share a batch, so less padding
            self.rows.sort(key=lambda r: len(r["query"]) + len(r["item_text"]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


class Collator:
    """Rows -> batch dict: the fields every model gets, then the model's own inputs from its
    :class:`~datamodules.inputs.InputLayout` (tokenized with dynamic padding), then the teacher's."""

    def __init__(
        self,
        layout: InputLayout,
        extra_fields: dict[str, torch.dtype] | None = None,
        teacher: Any = None,
        num_levels: int = 0,
        rationale_max_length: int = 128,
        rationale: bool = False,
    ):
        self.layout = layout
        self.rationale = rationale
        self.extra_fields = dict(extra_fields or {})
        self.teacher = teacher
        self.num_levels = num_levels
        self.rationale_max_length = rationale_max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        nan = float("nan")
        batch: dict[str, Any] = {
            "example_id": [r["example_id"] for r in rows],
            "query": [r["query"] for r in rows],
            "item_text": [r["item_text"] for r in rows],
            "labels": torch.tensor([-100 if r["label"] is None else r["label"] for r in rows], dtype=torch.long),
            "grades": torch.tensor([nan if r["grade"] is None else r["grade"] for r in rows], dtype=torch.float32),
            "gains": torch.tensor([nan if r["gain"] is None else r["gain"] for r in rows], dtype=torch.float32),
            "bucket_ids": torch.tensor([_BUCKET_INDEX[r["bucket"]] for r in rows], dtype=torch.long),
            "query_ids": torch.tensor([r["query_id"] for r in rows], dtype=torch.long),
            "dim_targets": torch.tensor(
                [[_VERDICT_INDEX.get(v, -100) if v else -100 for v in r["dims"]] for r in rows], dtype=torch.long
            ),
        }
        if self.rationale:  # annotations joined (a row without a kept chain, or an augmented one: None)
            batch["rationale"] = [r.get("rationale") for r in rows]
        for name, dtype in self.extra_fields.items():
            batch[name] = torch.as_tensor([r[name] for r in rows], dtype=dtype)
        encodings = self.layout.encode(batch, with_offsets=self.teacher is not None)
        if self.teacher is not None:
            add_teacher_fields(
                batch, self.teacher.signals(rows), self.num_levels, self.layout, encodings, self.rationale_max_length
            )
        return batch


class RelevanceDataModule(L.LightningDataModule):
    """Relevance examples for every model; see the module docstring for the batch contract.

    Args:
        source: the dataset: path, preset (mapping + label scheme), reading and error policy, split.
        batch_size: training batch size per process.
        eval_batch_size: validation/test/predict batch size (default: ``2 * batch_size``).
        num_workers: DataLoader worker processes.
        item_fields: item fields rendered into the item text, in order.
        predict_split: the split ``predict`` runs over (``all``: train, val and test, e.g. for a teacher cache).
        sort_eval_by_length: serve val/test/predict rows ordered by text length (less padding,
            faster evaluation; predictions carry their ``example_id``).
        group_by_length: training batches of rows of similar text length, in random order
            (:class:`~datamodules.sampling.LengthGroupedSampler`): less padding for an LLM teacher.
        relevant_level: first level that counts as relevant for AUC (default: the top level).
            Home Depot with cut points (2.0, 2.5): level 2, i.e. mean grade >= 2.5.
        annotations: directory written by ``ellm-mkd annotate``; adds ``rationale`` to the batches.
        missing_annotations: a training row without a kept chain is an ``error`` (listing the first
            ids), is left out of training (``skip``, counted in the log), or stays with no chain
            (``keep``: e.g. a forced teacher readout writes one for it).
        teacher: where the teacher's signals come from (``datamodules.teacher_signal.CachedTeacher`` for a
            cache written by ``ellm-mkd predict``, or ``LiveTeacher``); adds the teacher keys to batches.
        rationale_max_length: token budget of the teacher's chain in student tokens (``rationale_ids``).
        augment: teacher-labelled augmentation: unlabelled pairs (a file, or catalog items sampled for
            each training query) added to the training split with no label; see :mod:`datamodules.augment`.
        limit_pairs: at most this many pairs per split (``{train: 3000, test: 2000}``), as whole queries
            in the order of a hash of the query seeded with the split seed: a query-disjoint subsample
            of a large dataset (a teacher fine-tune or an ablation that has to fit a time budget).
    """

    def __init__(
        self,
        source: DataSource,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        item_fields: Sequence[str] = DEFAULT_ITEM_FIELDS,
        predict_split: Literal["train", "val", "test", "all"] = "test",
        relevant_level: int | None = None,
        sort_eval_by_length: bool = True,
        group_by_length: bool = False,
        annotations: str | None = None,
        missing_annotations: Literal["error", "skip", "keep"] = "error",
        teacher: TeacherSource | None = None,
        rationale_max_length: int = 128,
        augment: Augmentation | None = None,
        limit_pairs: dict[str, int] | None = None,
    ):
        super().__init__()
        limit_pairs = dict(limit_pairs or {})
        bad = sorted(set(limit_pairs) - {"train", "val", "test"})
        if bad:
            raise ValueError(f"data.limit_pairs: keys are splits (train, val, test), got {bad}")
        for split, n in limit_pairs.items():
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"data.limit_pairs.{split} must be an integer >= 1, got {n!r}")
        self.limit_pairs = limit_pairs
        if isinstance(augment, dict):
            augment = Augmentation(**augment)
        if isinstance(source, dict):
            source = DataSource(**source)
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError("batch sizes must be >= 1")
        self.source = source
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.item_fields = check_item_fields(item_fields)
        self.layout: InputLayout = TextInputs()  # until a model connects its own
        self.predict_split = predict_split
        self.sort_eval_by_length = sort_eval_by_length
        self.group_by_length = group_by_length
        self.annotations = annotations
        self.missing_annotations = missing_annotations
        self.teacher = teacher
        self.rationale_max_length = rationale_max_length
        self.augment = augment
        self._augmented = False
        self._teacher_bound = False
        self.predict_dataset: RelevanceDataset | None = None  # the predict split less excluded rows
        self.extra_fields: dict[str, torch.dtype] = {}
        self.scheme = source.resolved_scheme()
        k = self.scheme.num_levels
        self.relevant_level = k - 1 if relevant_level is None else relevant_level
        if not 0 < self.relevant_level < k:
            raise ValueError(f"relevant_level must be in 1..{k - 1} for a {k}-level scheme, got {relevant_level}")
        self.table: pa.Table | None = None
        self.report: LoadReport | None = None
        self.datasets: dict[str, RelevanceDataset] = {}
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches trained) of a restored checkpoint

    # Resuming mid-epoch: saved with every checkpoint (see sampling.ResumableLoader) --------------
    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_epoch": trainer.current_epoch, "train_batches_done": done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_at = (state["train_epoch"], state["train_batches_done"]) if state else None

    def _batches_to_skip(self) -> int:
        at, self._resume_at = self._resume_at, None
        return at[1] if at is not None and self.trainer is not None and self.trainer.current_epoch == at[0] else 0

    # Late binding -----------------------------------------------------------------------------
    def connect(self, layout: InputLayout | None = None, batch_size: int | None = None) -> None:
        """Bind what the model knows and the config does not: how it takes its inputs (tokenizer,
        token budget, pair or towers; :mod:`datamodules.inputs`). Models call it in their ``setup``;
        until then batches carry strings only."""
        if layout is not None:
            if not isinstance(layout, InputLayout):
                raise TypeError(f"connect(layout=...) needs an InputLayout, got {type(layout).__name__}")
            self.layout = layout
        if batch_size is not None:
            self.batch_size = batch_size

    @property
    def num_levels(self) -> int:
        return self.scheme.num_levels

    @property
    def level_names(self) -> tuple[str, ...]:
        return self.scheme.level_names

    def level_grade_means(self) -> list[float]:
        """Mean raw grade of each level in the training split (a level with no rows: its index)."""
        if "train" not in self.datasets:  # (a teacher signal bound inside setup asks with the splits already read)
            self.setup("fit")
        sums = [0.0] * self.num_levels
        counts = [0] * self.num_levels
        for r in self.datasets["train"].rows:
            if r["label"] is not None and r["grade"] is not None:
                sums[r["label"]] += r["grade"]
                counts[r["label"]] += 1
        return [sums[k] / counts[k] if counts[k] else float(k) for k in range(self.num_levels)]

    # Lifecycle ----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.table is None:
            self.table, self.report = load_examples(self.source)
            for w in self.report.warnings:
                log.warning(w)
            queries = sorted({normalize_text(q) for q in self.table.column("query").to_pylist()})
            self._query_index = {q: i for i, q in enumerate(queries)}
        rationales = self._load_annotations() if self.annotations else None
        for split in ("train", "val", "test"):
            if split not in self.datasets:
                ds = RelevanceDataset(
                    select_split(self.table, split),
                    self.item_fields,
                    self._query_index,
                    sort_by_length=self.sort_eval_by_length and split != "train",
                )
                if split in self.limit_pairs:
                    ds.rows = limit_by_query(
                        ds.rows, self.limit_pairs[split], self.source.split.seed, split, f"data.limit_pairs.{split}"
                    )
                if rationales is not None:
                    self._join_rationales(ds, split, rationales)
                self.datasets[split] = ds
        if self.augment is not None and not self._augmented:
            self._add_augmentation()
            self._augmented = True
        if self.teacher is not None and not self._teacher_bound:
            self.teacher.bind(self)
            self._teacher_bound = True
            if self.augment is not None:
                self._drop_unlabelled_without_teacher()

    def _add_augmentation(self) -> None:
        aug, train = self.augment, self.datasets["train"]
        rows: list[dict[str, Any]] = []
        if aug.source is not None:
            table, report = load_examples(aug.source)
            for w in report.warnings:
                log.warning(w)
            for q in sorted({normalize_text(q) for q in table.column("query").to_pylist()} - set(self._query_index)):
                self._query_index[q] = len(self._query_index)
            held_out = {normalize_text(r["query"]) for split in ("val", "test") for r in self.datasets[split].rows}
            known = {r["example_id"] for ds in self.datasets.values() for r in ds.rows}
            rows += file_pairs(
                RelevanceDataset(table, self.item_fields, self._query_index).rows, held_out, known, aug.source.path
            )
        if aug.items_per_query:
            rows += sample_pairs(train.rows, aug.items_per_query, aug.seed)
        seen = {r["example_id"] for r in train.rows}
        unique = []
        for r in rows:  # a pair in the file and among the sampled ones joins once
            if r["example_id"] not in seen:
                seen.add(r["example_id"])
                unique.append(r)
        rows = unique
        train.rows = train.rows + rows
        log.info(
            "augmentation: %d unlabelled pairs join the %d training examples", len(rows), len(train.rows) - len(rows)
        )

    def _drop_unlabelled_without_teacher(self) -> None:
        train = self.datasets["train"]
        keep = [r for r in train.rows if not r.get("augmented") or self.teacher.covers(r["example_id"])]
        dropped = len(train.rows) - len(keep)
        if dropped:
            log.info(
                "augmentation: %d unlabelled pairs have no teacher signal and are left out of training "
                "(write the teacher cache with the same data.augment setting to use them)",
                dropped,
            )
        train.rows = keep

    def full_predict_dataset(self) -> RelevanceDataset:
        """The rows ``predict`` runs over: one split, or every split in turn (``predict_split: all``)."""
        if self.predict_split != "all":
            return self.datasets[self.predict_split]
        ds = copy.copy(self.datasets["train"])
        ds.rows = [r for split in ("train", "val", "test") for r in self.datasets[split].rows]
        return ds

    def exclude_from_predict(self, example_ids: set[str]) -> int:
        """Leave ``example_ids`` out of the predict split (a resumed teacher cache); returns how many
        were left out. Call it after ``setup`` and before the predict loader is built."""
        ds = self.predict_dataset or self.full_predict_dataset()
        keep = [r for r in ds.rows if r["example_id"] not in example_ids]
        removed = len(ds.rows) - len(keep)
        # a copy: the val/test loaders keep every row when the predict split is one of them
        self.predict_dataset = copy.copy(ds)
        self.predict_dataset.rows = keep
        return removed

    def _load_annotations(self) -> dict[str, str]:
        from ellm_mkd.annotation_store import read_annotations, read_manifest

        manifest = read_manifest(self.annotations)
        for key, ours in (("level_names", list(self.level_names)), ("item_fields", list(self.item_fields))):
            theirs = manifest.get(key)
            if theirs is not None and list(theirs) != ours:
                raise ValueError(
                    f"{self.annotations}: the annotations were made with {key}={theirs}, this data "
                    f"module uses {ours}; the chains quote the item text, so annotate again with "
                    "the same data settings (or set item_fields to match)"
                )
        table = read_annotations(self.annotations)
        if table.num_rows == 0:
            raise ValueError(f"{self.annotations}: the annotation store has no rows")
        cols = table.select([c for c in ("example_id", "rationale") if c in table.column_names]).to_pydict()
        if "rationale" not in cols:
            raise ValueError(f"{self.annotations}: annotation rows have no 'rationale' field")
        return {e: r for e, r in zip(cols["example_id"], cols["rationale"]) if r}

    def _join_rationales(self, ds: RelevanceDataset, split: str, rationales: dict[str, str]) -> None:
        missing = []
        for r in ds.rows:
            r["rationale"] = rationales.get(r["example_id"])
            if r["rationale"] is None:
                missing.append(r["example_id"])
        if split != "train" or not missing or self.missing_annotations == "keep":
            return
        if self.missing_annotations == "error":
            raise ValueError(
                f"{self.annotations}: {len(missing)} of {len(ds.rows)} training examples have no kept "
                f"chain of thought (first: {missing[:5]}); run ellm-mkd annotate over the training "
                "split, or set data.missing_annotations: skip to train on the annotated rows only"
            )
        ds.rows = [r for r in ds.rows if r["rationale"] is not None]
        log.info(
            "%s: %d training examples have no kept chain and are left out (%d remain)",
            self.annotations,
            len(missing),
            len(ds.rows),
        )
        if not ds.rows:
            raise ValueError(f"{self.annotations}: no training example has a kept chain of thought")

    def collator(self) -> Collator:
        return Collator(
            self.layout,
            self.extra_fields,
            self.teacher,
            self.num_levels,
            self.rationale_max_length,
            rationale=self.annotations is not None,
        )

    def _loader(self, split: str, train: bool, ds: RelevanceDataset | None = None) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError("call setup() before asking for a dataloader")
        excluded = ds is not None and ds is not self.datasets[split]  # a resumed prediction may have nothing left
        ds = ds if ds is not None else self.datasets[split]
        if len(ds) == 0 and not excluded:
            raise ValueError(f"{self.source.path}: the {split} split is empty; check split fractions")
        bs = self.batch_size if train else (self.eval_batch_size or 2 * self.batch_size)
        sampler = None
        if train and self.group_by_length:
            lengths = [len(r["query"]) + len(r["item_text"]) + len(r.get("rationale") or "") for r in ds.rows]
            sampler = LengthGroupedSampler(lengths, bs, seed=torch.initial_seed() % 2**31)
        return (ResumableLoader if train else DataLoader)(
            ds,
            batch_size=bs,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collator(),
            persistent_workers=self.num_workers > 0,
            drop_last=False,
            **({"skip": self._batches_to_skip} if train else {}),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(
            "train" if self.predict_split == "all" else self.predict_split,
            False,
            self.predict_dataset or self.full_predict_dataset(),
        )


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
