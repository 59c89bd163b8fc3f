"""``TeacherCacheWriter``: a Lightning prediction writer that turns teacher predictions into a cache.

Use it from ``ellm-mkd predict --config configs/teacher/cache_*.yaml`` (see those files); the
format is :mod:`ellm_mkd.teacher_cache`. What it guarantees:

* **Atomic shards**: rows are buffered and written ``rows_per_shard`` at a time to a temporary
  file that is renamed into place, so a killed job leaves complete shards only.
* **Distributed**: under DDP every rank writes its own shards (prefix ``part-r<rank>``); Lightning's
  predict sampler gives each example to exactly one rank, and a rank never writes an id twice.
* **Resumable**: at ``setup`` (before the predict loader exists) the ids already in the cache are
  taken out of the predict split, so running the same command again finishes the job. The
  manifest pins the teacher (weights hash, template, readout mode); resuming with another teacher
  is an error, as is writing into a cache that another job made, unless ``overwrite: true``.
* **One job at a time**: rank 0 holds a lock beside the cache (``.<cache_dir name>.lock``) from setup
  to the end of the job; a second job writing the same cache stops at once with a message instead of
  doing all the work again and failing on ids written twice. The lock goes with the process that
  held it, so a killed job never leaves it behind.
* **Finalised**: when the job ends, rank 0 counts the rows of every shard and records
  ``row_count``, ``expected_rows`` and ``complete`` in the manifest.

The callback holds no weights and has no state in checkpoints.

Example (YAML)::

    trainer:
      callbacks:
        - class_path: callbacks.TeacherCacheWriter
          init_args: {cache_dir: runs/demo/teacher_cache, store_hidden: false}
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
from filelock import FileLock, Timeout
from lightning.pytorch.callbacks import BasePredictionWriter

from ellm_mkd.annotation_store import ID, MANIFEST, AnnotationStore, StoreError, read_annotations, read_manifest
from ellm_mkd.teacher_cache import KIND, SCHEMA_VERSION, VOLATILE_KEYS, cache_schema, signals_from_prediction

log = logging.getLogger(__name__)


class TeacherCacheWriter(BasePredictionWriter):
    """Write teacher predictions as a sharded, resumable cache; see the module docstring.

    Args:
        cache_dir: the cache directory.
        rows_per_shard: rows per Parquet shard (at most this many rows are lost to a kill).
        overwrite: delete an existing cache in ``cache_dir`` first (otherwise a matching cache is
            resumed and a different one is an error).
        store_hidden: also store the teacher's pooled hidden vector (float16) per example; costs one
            more forward pass per batch and ``2 * hidden_size`` bytes per example.
    """

    def __init__(self, cache_dir: str, rows_per_shard: int = 1024, overwrite: bool = False, store_hidden: bool = False):
        super().__init__(write_interval="batch")
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.cache_dir = Path(cache_dir)
        self.rows_per_shard = rows_per_shard
        self.overwrite = overwrite
        self.store_hidden = store_hidden
        self.store: AnnotationStore | None = None
        self.expected_rows = 0
        self.skipped = 0
        self._t0 = 0.0
        self._finalised = False
        self._lock: FileLock | None = None

    def lock_path(self) -> Path:
        """The lock file of this cache: beside it, so that ``overwrite`` can remove the directory."""
        return self.cache_dir.parent / f".{self.cache_dir.name}.lock"

    def _take_lock(self, trainer: L.Trainer) -> None:
        taken = True
        if trainer.is_global_zero:
            self.cache_dir.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(self.lock_path()))
            try:
                self._lock.acquire(timeout=0)
            except Timeout:
                self._lock, taken = None, False
        if not trainer.strategy.broadcast(taken, src=0):  # every rank stops, none waits in a barrier
            raise StoreError(
                f"{self.cache_dir}: another ellm-mkd predict is writing this teacher cache (it holds "
                f"{self.lock_path()}); wait for it to finish and run this again (it resumes), or choose another "
                "cache_dir"
            )

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- lifecycle --------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if not hasattr(pl_module, "cache_identity"):
            raise TypeError(
                f"TeacherCacheWriter needs a teacher (a module with cache_identity()), got {type(pl_module).__name__}"
            )
        self._finalised = False
        dm = trainer.datamodule
        self._take_lock(trainer)
        if self.overwrite and trainer.is_global_zero and self.cache_dir.exists():
            self._clear()
        trainer.strategy.barrier("teacher_cache_clear")
        done: set[str] = set()
        if (self.cache_dir / MANIFEST).exists():
            read_manifest(self.cache_dir, KIND)  # a damaged directory fails here, before any work
            done = set(read_annotations(self.cache_dir, KIND).column(ID).to_pylist())
        self.expected_rows = len(dm.full_predict_dataset())
        trainer.predict_loop.return_predictions = False  # the cache is the output: keep nothing in memory
        self.skipped = dm.exclude_from_predict(done) if done else 0
        if self.skipped:
            log.info(
                "teacher cache %s: %d of %d examples are cached already; predicting the other %d",
                self.cache_dir,
                self.skipped,
                self.expected_rows,
                self.expected_rows - self.skipped,
            )
        pl_module.predict_hidden = self.store_hidden

    def _clear(self) -> None:
        if not (self.cache_dir / MANIFEST).exists() and any(self.cache_dir.iterdir()):
            raise StoreError(
                f"{self.cache_dir} is not empty and is not a teacher cache; overwrite: true "
                "only replaces a teacher cache. Choose another cache_dir"
            )
        log.info("teacher cache %s: overwrite=true, removing the old cache", self.cache_dir)
        shutil.rmtree(self.cache_dir)

    def _manifest(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        dm = trainer.datamodule
        return {
            "kind": KIND,
            "schema_version": SCHEMA_VERSION,
            "teacher": pl_module.cache_identity(),
            "label_scheme": dm.scheme.describe(),
            "level_names": list(dm.level_names),
            "item_fields": list(dm.item_fields),
            "hidden_size": pl_module.model.config.hidden_size if self.store_hidden else None,
            "source_path": str(dm.source.path),
            "split": dm.predict_split,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # weights are restored from --ckpt_path by now, so the weights hash is the one that predicts
        manifest = self._manifest(trainer, pl_module)
        kwargs = dict(
            manifest=manifest,
            fmt="parquet",
            rows_per_shard=self.rows_per_shard,
            shard_prefix=f"part-r{trainer.global_rank}",
            volatile_keys=VOLATILE_KEYS,
            kind=KIND,
            schema=cache_schema(),
        )
        if trainer.is_global_zero:  # the first to open writes the manifest; the others check against it
            self.store = AnnotationStore(self.cache_dir, **kwargs)
        trainer.strategy.barrier("teacher_cache_open")
        if not trainer.is_global_zero:
            self.store = AnnotationStore(self.cache_dir, **kwargs)
        self._t0 = time.perf_counter()

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self.store is not None
        self.store.append([s.to_row() for s in signals_from_prediction(prediction)])

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.finalise(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # everything was cached before this run: the predict loop never started, finalise here
        if stage == "predict" and not self._finalised and self.store is None and self.skipped == self.expected_rows:
            self.finalise(trainer)
        if stage == "predict":
            self._release_lock()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release_lock()

    def finalise(self, trainer: L.Trainer) -> None:
        """Flush this rank's rows; rank 0 then records the row count and whether the cache is complete."""
        written = 0
        if self.store is not None:
            self.store.close()
            written = self.store.rows_written
        trainer.strategy.barrier("teacher_cache_flush")
        self._finalised = True
        if not trainer.is_global_zero:
            return
        ids = read_annotations(self.cache_dir, KIND).column(ID).to_pylist()
        if len(ids) != len(set(ids)):
            raise StoreError(f"{self.cache_dir}: {len(ids) - len(set(ids))} example ids were written twice")
        store = self.store
        if store is None:  # nothing predicted this run: reopen to update the manifest
            manifest = read_manifest(self.cache_dir, KIND)
            store = AnnotationStore(
                self.cache_dir,
                manifest={k: v for k, v in manifest.items() if k not in ("store_version", "format")},
                fmt="parquet",
                volatile_keys=VOLATILE_KEYS,
                kind=KIND,
                schema=cache_schema(),
            )
        store.update_manifest(
            row_count=len(ids), expected_rows=self.expected_rows, complete=len(ids) >= self.expected_rows
        )
        dt = time.perf_counter() - self._t0 if self._t0 else 0.0
        rate = f", {written / dt:.2f} pairs/s on rank 0" if written and dt else ""
        print(
            f"teacher cache: {len(ids)} of {self.expected_rows} examples in {self.cache_dir} "
            f"({written} written by rank 0 this run{rate})",
            flush=True,
        )
