"""``MKDistillation``: the blended loss of Multi-dimensional Knowledge Distillation.

A Lightning callback that adds the teacher's knowledge to a student's training loss. The student
keeps its own terms (``hard`` level cross-entropy, ``grade``, ``dim`` on known verdicts); this
callback adds, from the teacher keys every batch carries when the data module has a ``teacher``
(:mod:`datamodules.teacher_batch`):

============================  ====================================================================
term (``train/loss/<name>``)  what it is
============================  ====================================================================
``labels``                    only when ``w_labels`` is set: the level cross-entropy with this
                              weight and schedule, in place of the student's own ``hard`` term
                              (the callback names what it replaces: :meth:`replaces`)
``soft``                      ``T^2 * KL(teacher_T || student_T)`` on the level distribution
                              (``w_soft``, ``kd_temperature``)
``dim_kd``                    KL between the teacher's verdict distributions and the student's
                              dimension heads, weighted per dimension (``w_dim_kd``, ``dim_weights``)
``rationale``                 KL between the normalised evidence mask and the student's token
                              distribution: the cross-encoder's [CLS]-to-token attention (chosen
                              ``attention_layers`` / ``attention_heads``), each tower's pooling
                              weights for the two-tower student (``w_rationale``)
``rationale_embedding``       ``1 - cos`` between the pair embedding and a learned projection of
                              the rationale's embedding (``w_rationale_embedding``)
============================  ====================================================================

Each term only counts rows that have the signal it needs (a teacher row; parsed verdicts; evidence
on the student's tokens; a chain), so rows without a teacher (or teacher-labelled augmentation
rows without a label) train on what they have. Each weight can follow a :class:`Schedule` (off for
a share of training, then a linear ramp to its full value); the factors are logged as
``train/mkd/<name>_factor``; the epoch mean of each weighted term, reduced over DDP ranks, as
``train/mkd/<name>``. The terms are added while training only: validation and test
losses stay the student's own, comparable between a baseline and a distilled run.

The rationale embedding is the masked mean of the chain's tokens (``rationale_ids``) through a
frozen copy of the student's encoder as it was before training (``rationale_embedding: chain``;
computed once per example and kept in memory: with a teacher cache, every training chain is
embedded before the first epoch, in batches of similar length and split over DDP ranks, and the
time it took is logged as ``train/mkd/chain_embedding_seconds``; with a live teacher, as each example
first appears), or the teacher's hidden vector from the cache
(``teacher_hidden``; write the cache with ``store_hidden: true``). Its projection is a training
module of the student (``RelevanceStudent.add_training_module``): it trains and synchronises
under DDP, and never enters the exported state_dict. The frozen encoder lives in this callback,
not in the student, and the teacher lives in the data module: neither is in a student checkpoint.

YAML (LightningCLI, section ``distill`` of ``ellm-mkd fit``)::

    distill:
      enabled: true
      w_soft: 1.0
      kd_temperature: 2.0
      w_dim_kd: 0.5
      w_rationale: 0.1
      w_rationale_embedding: 0.1
      schedules: {rationale: {delay: 0.1, ramp: 0.2}}
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ellm_mkd.schema import DIMENSIONS

from .losses import (
    RationaleProjection,
    dimension_kd_loss,
    distribution_kd_loss,
    rationale_attention_loss,
    rationale_embedding_loss,
)

log = logging.getLogger(__name__)
TERMS = ("labels", "soft", "dim_kd", "rationale", "rationale_embedding")


@dataclass
class Schedule:
    """How a term's weight moves over training, in shares of the total optimizer steps."""

    delay: float = 0.0
    """share of training during which the term is off (or at ``start``)"""
    ramp: float = 0.0
    """share of training, after the delay, over which the factor rises linearly from ``start`` to 1"""
    start: float = 0.0
    """factor during the delay and at the start of the ramp"""

    def __post_init__(self) -> None:
        if not (0 <= self.delay <= 1 and 0 <= self.ramp <= 1 and 0 <= self.start <= 1):
            raise ValueError(f"schedule delay, ramp and start must lie in [0, 1], got {self}")

    def factor(self, progress: float) -> float:
        """Weight factor at ``progress`` (share of training done, 0..1)."""
        if progress < self.delay:
            return self.start
        if self.ramp <= 0:
            return 1.0
        return self.start + (1.0 - self.start) * min(1.0, (progress - self.delay) / self.ramp)


class MKDistillation(L.Callback):
    """Distil a teacher's level distribution, dimension verdicts and rationale into a student.

    See the module docstring for the terms. A weight of 0 turns its term off.

    Args:
        enabled: False makes the callback a no-op (a baseline run from the same config).
        w_labels: weight of the level cross-entropy under this callback's schedule, replacing the
            student's own ``hard`` term; ``None`` keeps the student's (e.g. set it to let labels fade
            while the teacher ramps in).
        w_soft: weight of the level-distribution KD.
        kd_temperature: temperature T of the level KD (the loss is scaled by T^2).
        w_dim_kd: weight of the dimension-verdict KD (the student's own ``w_dim`` weighs its
            dimension heads against known verdicts).
        dim_weights: per-dimension weights (by name; missing dimensions weigh 1).
        dim_temperature: temperature of the verdict KD.
        w_rationale: weight of the evidence-mask alignment.
        attention_layers: cross-encoder layers whose [CLS]-to-token attention is aligned.
        attention_heads: heads averaged (None: all).
        w_rationale_embedding: weight of the pair-embedding alignment to the projected rationale.
        rationale_embedding: ``chain`` (the chain through a frozen copy of the student encoder) or
            ``teacher_hidden`` (the teacher's vector from the cache).
        schedules: a :class:`Schedule` per term name (labels, soft, dim_kd, rationale,
            rationale_embedding).
    """

    CHAIN_BATCH = 64  # chains per frozen-encoder pass when they are embedded up front

    def __init__(
        self,
        enabled: bool = True,
        w_labels: float | None = None,
        w_soft: float = 1.0,
        kd_temperature: float = 2.0,
        w_dim_kd: float = 0.5,
        dim_weights: dict[str, float] | None = None,
        dim_temperature: float = 1.0,
        w_rationale: float = 0.1,
        attention_layers: list[int] | None = None,
        attention_heads: list[int] | None = None,
        w_rationale_embedding: float = 0.1,
        rationale_embedding: Literal["chain", "teacher_hidden"] = "chain",
        schedules: dict[str, Schedule] | None = None,
    ):
        super().__init__()
        for name, w in (
            ("w_soft", w_soft),
            ("w_dim_kd", w_dim_kd),
            ("w_rationale", w_rationale),
            ("w_rationale_embedding", w_rationale_embedding),
            ("w_labels", w_labels or 0.0),
        ):
            if w < 0:
                raise ValueError(f"distill.{name} must be >= 0, got {w}")
        if kd_temperature <= 0 or dim_temperature <= 0:
            raise ValueError("distill.kd_temperature and distill.dim_temperature must be > 0")
        unknown = set(dim_weights or {}) - set(DIMENSIONS)
        if unknown:
            raise ValueError(f"distill.dim_weights: unknown dimension(s) {sorted(unknown)}; known: {list(DIMENSIONS)}")
        schedules = {k: (Schedule(**v) if isinstance(v, dict) else v) for k, v in (schedules or {}).items()}
        unknown = set(schedules) - set(TERMS)
        if unknown:
            raise ValueError(f"distill.schedules: unknown term(s) {sorted(unknown)}; known: {list(TERMS)}")
        self.enabled = enabled
        self.w_labels, self.w_soft, self.kd_temperature = w_labels, w_soft, kd_temperature
        self.w_dim_kd, self.dim_temperature = w_dim_kd, dim_temperature
        self.dim_weights = torch.tensor([(dim_weights or {}).get(d, 1.0) for d in DIMENSIONS], dtype=torch.float32)
        self.w_rationale = w_rationale
        self.attention_layers = tuple(attention_layers or (-1,))
        self.attention_heads = None if attention_heads is None else tuple(attention_heads)
        self.w_rationale_embedding, self.rationale_embedding = w_rationale_embedding, rationale_embedding
        self.schedules = schedules
        self._frozen: nn.Module | None = None
        self._rationale_cache: dict[str, Tensor] = {}
        self._total_steps = 1
        #: seconds spent embedding the training chains before the first epoch (None: not done)
        self.chain_embedding_seconds: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        dm = trainer.datamodule
        teacher = getattr(dm, "teacher", None)
        if teacher is None:
            raise ValueError(
                "distill: MKDistillation needs a teacher signal: set data.teacher (e.g. "
                "class_path: datamodules.teacher_signal.CachedTeacher, init_args: {cache_dir: <cache dir>}), "
                "or distill.enabled: false for a run on labels alone"
            )
        if not hasattr(pl_module, "add_training_module"):
            raise TypeError(f"distill: {type(pl_module).__name__} is not a relevance student")
        if self.w_rationale_embedding:
            if self.rationale_embedding == "teacher_hidden":
                width = teacher.hidden_size
                if width is None:
                    raise ValueError(
                        "distill: rationale_embedding: teacher_hidden needs a teacher cache written with "
                        "store_hidden: true (this cache has no hidden vectors)"
                    )
            else:
                self._frozen = copy.deepcopy(pl_module.chain_encoder()).eval().requires_grad_(False)
                width = self._frozen.config.hidden_size
            if "training_modules" not in pl_module._modules or "rationale_projection" not in pl_module.training_modules:
                with torch.random.fork_rng(devices=[]):  # the same start for any number of processes
                    torch.manual_seed(0)
                    proj = RationaleProjection(width, pl_module.pair_dim)
                pl_module.add_training_module("rationale_projection", proj)
        if self.w_rationale:  # after the frozen copy, which keeps the fast attention
            pl_module.prepare_rationale_alignment(self.attention_layers)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self._frozen is not None and getattr(trainer.datamodule.teacher, "lookup", False):
            self._embed_training_chains(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total_steps = max(int(trainer.estimated_stepping_batches), 1)
        if self.chain_embedding_seconds is not None and trainer.logger is not None:
            trainer.logger.log_metrics({"train/mkd/chain_embedding_seconds": self.chain_embedding_seconds}, step=0)

    # -- the terms -------------------------------------------------------------------------------
    def factor(self, name: str, step: int) -> float:
        sched = self.schedules.get(name)
        return 1.0 if sched is None else sched.factor(step / self._total_steps)

    def replaces(self) -> set[str]:
        """The student's own terms this callback takes the place of while training (``hard`` when
        ``w_labels`` is set); the student leaves them out."""
        return {"hard"} if self.enabled and self.w_labels is not None else set()

    def loss_terms(self, pl_module: L.LightningModule, batch: dict[str, Any], out: Any) -> dict[str, Tensor]:
        if not self.enabled or not pl_module.training or "teacher_probs" not in batch:
            return {}
        step = pl_module.global_step
        weights = {
            "labels": self.w_labels or 0.0,
            "soft": self.w_soft,
            "dim_kd": self.w_dim_kd,
            "rationale": self.w_rationale,
            "rationale_embedding": self.w_rationale_embedding,
        }
        factors = {k: self.factor(k, step) for k in TERMS}
        terms: dict[str, Tensor] = {}
        if self.w_labels is not None:
            labels = batch["labels"]
            terms["labels"] = (
                F.cross_entropy(out.level_logits.float(), labels, ignore_index=-100)
                if (labels != -100).any()
                else out.level_logits.sum() * 0.0
            )
        if self.w_soft:
            terms["soft"] = distribution_kd_loss(
                out.level_logits, batch["teacher_probs"], self.kd_temperature, mask=batch["teacher_present"]
            )
        if self.w_dim_kd:
            terms["dim_kd"] = dimension_kd_loss(
                out.dim_logits,
                batch["teacher_verdict_probs"],
                mask=batch["teacher_verdicts_present"],
                dim_weights=self.dim_weights.to(out.dim_logits.device),
                temperature=self.dim_temperature,
            )
        if self.w_rationale:
            terms["rationale"] = self._rationale_term(pl_module, batch, out)
        if self.w_rationale_embedding:
            terms["rationale_embedding"] = self._embedding_term(pl_module, batch, out)
        bs = len(batch["example_id"])
        weighted = {k: (weights[k] * factors[k]) * v for k, v in terms.items()}
        for k, v in weighted.items() if pl_module._trainer is not None else ():
            # epoch means reduced over DDP ranks (the per-step values are the student's train/loss/<name>)
            pl_module.log(f"train/mkd/{k}", v.detach(), on_step=False, on_epoch=True, sync_dist=True, batch_size=bs)
            if k in self.schedules:
                pl_module.log(f"train/mkd/{k}_factor", factors[k], batch_size=bs)
        return weighted

    def _rationale_term(self, pl_module: L.LightningModule, batch: dict[str, Any], out: Any) -> Tensor:
        """The mean over the student's input sequences (the pair; or each tower) of the KL between the
        normalised evidence mask and the student's token distribution on that sequence."""
        parts = pl_module.rationale_alignment(batch, out, self.attention_heads)
        return torch.stack([rationale_attention_loss(*part) for part in parts]).mean()

    def _embedding_term(self, pl_module: L.LightningModule, batch: dict[str, Any], out: Any) -> Tensor:
        proj = pl_module.training_modules["rationale_projection"]
        if self.rationale_embedding == "teacher_hidden":
            target = batch["teacher_hidden"].to(out.pair_embedding.device)
            mask = batch["teacher_present"]
        else:
            target = self._chain_embeddings(batch, out.pair_embedding.device)
            mask = batch["teacher_present"] & torch.tensor(
                [bool(r) for r in batch["teacher_rationale"]], device=batch["teacher_present"].device
            )
        return rationale_embedding_loss(out.pair_embedding, target, proj, mask=mask.to(out.pair_embedding.device))

    @torch.no_grad()
    def _chain_embeddings(self, batch: dict[str, Any], device: torch.device) -> Tensor:
        """Mean-pooled frozen-encoder vectors of the chains, computed once per example (zeros for a
        row without a chain: the loss masks it out)."""
        ids = batch["example_id"]
        has = [bool(c) for c in batch["teacher_rationale"]]
        todo = [i for i, e in enumerate(ids) if has[i] and e not in self._rationale_cache]
        if todo:
            sel = torch.tensor(todo)
            vecs = self._pool(batch["rationale_ids"][sel].to(device), batch["rationale_attention_mask"][sel].to(device))
            for j, i in enumerate(todo):
                self._rationale_cache[ids[i]] = vecs[j]
        zero = torch.zeros(self._frozen.config.hidden_size)
        return torch.stack([self._rationale_cache[e] if h else zero for e, h in zip(ids, has)]).to(device)

    def _pool(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        """``[N, R]`` chain tokens -> ``[N, H]`` masked means of the frozen encoder's last layer (on CPU)."""
        frozen = self._frozen.to(input_ids.device)
        hidden = frozen(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        m = mask.unsqueeze(-1).float()
        return ((hidden * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu()

    @torch.no_grad()
    def _embed_training_chains(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Embed every training example's chain once, before the first epoch.

        The chains are shared out over the DDP ranks, sorted by length so that a batch pads little, and
        tokenized as the collator does (``rationale_max_length``); each rank ends with all of them.
        """
        t0 = time.perf_counter()
        dm = trainer.datamodule
        rows = dm.datasets["train"].rows
        chains = {
            r["example_id"]: s.rationale
            for r, s in zip(rows, dm.teacher.signals(rows))
            if s is not None and s.rationale and s.parse_error is None
        }  # what batches carry
        ids = sorted(sorted(chains)[trainer.global_rank :: trainer.world_size], key=lambda e: len(chains[e]))
        mine: dict[str, Tensor] = {}
        for start in range(0, len(ids), self.CHAIN_BATCH):
            part = ids[start : start + self.CHAIN_BATCH]
            enc = pl_module.tokenizer(
                [chains[e] for e in part],
                padding=True,
                truncation=True,
                max_length=dm.rationale_max_length,
                return_tensors="pt",
            )
            vecs = self._pool(enc["input_ids"].to(pl_module.device), enc["attention_mask"].to(pl_module.device))
            mine.update({e: vecs[k].clone() for k, e in enumerate(part)})
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, mine)
            for p in parts:
                self._rationale_cache.update(p)
        else:
            self._rationale_cache.update(mine)
        self.chain_embedding_seconds = time.perf_counter() - t0
        log.info(
            "distill: embedded %d training chains in %.1f s (once, before the first epoch)",
            len(chains),
            self.chain_embedding_seconds,
        )

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # settings only: the cached chain vectors are recomputed, the frozen encoder is rebuilt
        return {
            "w_soft": self.w_soft,
            "w_dim_kd": self.w_dim_kd,
            "w_rationale": self.w_rationale,
            "w_rationale_embedding": self.w_rationale_embedding,
            "kd_temperature": self.kd_temperature,
        }
