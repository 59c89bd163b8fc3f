"""What every relevance student shares: heads, loss terms, optimisation, evaluation, logging.

A student subclass implements :meth:`RelevanceStudent.encode_batch`, which returns the pair
representation ``[B, H]`` (plus optional extras such as token scores); this class turns it into

* ``level_logits [B, K]`` through the level head,
* ``expected_grade [B]`` = sum_k p_k * g_k, with ``g_k`` the mean raw grade of level ``k`` in the
  training data (a buffer, so it travels with the checkpoint),
* ``dim_logits [B, D, V]`` through one small head per chain-of-thought dimension
  (D = 5 dimensions, V = 4 verdicts), so the served model can say *why*.

Loss terms (each logged on its own as ``train/loss/<name>``), summed with their weights:

``hard``   cross-entropy of the level head against the labels (``w_hard``);
``grade``  squared error of the expected grade against the raw grade, scaled to [0, 1] by the
           grade range (``w_grade``): the term that makes RMSE an objective, not a side effect;
``dim``    cross-entropy of each dimension head against the known verdicts (``w_dim``);
           rows whose verdict is unknown (-100) do not count.

With ``temperature_scaling`` one temperature ``T`` of the level logits (Guo et al. 2017, arXiv 1706.04599) is
fitted after every validation epoch, by the least negative log-likelihood of the validation labels over a grid,
and kept in the ``level_temperature`` buffer (so each checkpoint holds the one fitted on its own validation
outputs). Outside training and validation the logits are divided by it: test, predict and the exported graphs
give calibrated level probabilities (and the expected grade from them); validation figures are the raw model's.
With ``calibration_bias`` as well, one bias per level is fitted with it (bias-corrected temperature scaling,
Alexandari et al. 2020, arXiv 1901.06852; :func:`ellm_mkd.calibration.fit_temperature_bias`) and kept in the
``level_bias`` buffer, the logits becoming ``z / T + b``: the correction for training targets whose level mix is not
the labelled pairs' (a teacher-labelled pool of further catalog items holds other levels than the labelled set).

Callbacks that define ``loss_terms(pl_module, batch, output) -> dict[str, Tensor]`` (weighted
already) add their terms to the same sum (a term of the same name replaces the student's own);
this is how distillation plugs in without the student knowing the teacher.

Parameters that only serve training (e.g. the rationale projection of distillation) are added by
callbacks with :meth:`RelevanceStudent.add_training_module`. They train and synchronise under
DDP like any parameter, and resume with ``--ckpt_path``, but they are kept out of the checkpoint's
``state_dict`` (under ``training_modules_state`` instead), so ``load_from_checkpoint`` and the
exported student are exactly the student.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.inputs import InputLayout
from ellm_mkd.schema import DIMENSIONS, VERDICTS

from .evaluation import RelevanceEvaluation


@dataclass
class StudentOutput:
    """What a student computes for a batch."""

    level_logits: Tensor  # [B, K]
    expected_grade: Tensor  # [B]
    dim_logits: Tensor  # [B, D, V]
    pair_embedding: Tensor  # [B, H]
    extras: dict[str, Tensor] = field(default_factory=dict)  # e.g. token scores, pooling weights

    @property
    def probs(self) -> Tensor:
        return self.level_logits.float().softmax(-1)


class RelevanceStudent(RelevanceEvaluation, L.LightningModule):
    """Base class of the students (not used directly). See the module docstring.

    Args:
        encoder: bundled name (``minilm-l6``), local Hugging Face directory, or hub id.
        num_levels: relevance levels K (linked from the data module by the CLI).
        relevant_level: first level counted as relevant for AUC (linked from the data module).
        level_grades: raw grade of each level for the expected grade; default: the mean grade of
            each level in the training split, measured at fit start.
        head_dropout: dropout before the heads.
        lr: peak learning rate of the encoder.
        head_lr: peak learning rate of the heads (default: ``lr``).
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights).
        warmup_ratio: share of training steps of linear warm-up.
        scheduler: decay after warm-up: ``linear``, ``cosine`` or ``constant``.
        w_hard, w_grade, w_dim: weights of the loss terms.
        max_seq_length: token budget of one input: the only one (the data module gets it with the
            student's input layout, :meth:`input_layout`).
        trust_remote_code: allow model code from the model directory (off unless you trust it).
        log_figures: log confusion matrix, reliability diagram and PR curve images to TensorBoard.
        temperature_scaling: fit the level logits' temperature on the validation split (see the module docstring).
        calibration_bias: with ``temperature_scaling``, fit one bias per level with the temperature (see the module
            docstring): for distillation from an unlabelled pool whose level mix differs from the labelled pairs'.
    """

    def __init__(
        self,
        encoder: str = "minilm-l6",
        num_levels: int = 4,
        relevant_level: int | None = None,
        level_grades: list[float] | None = None,
        head_dropout: float = 0.1,
        lr: float = 5e-5,
        head_lr: float | None = None,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        scheduler: Literal["linear", "cosine", "constant"] = "linear",
        w_hard: float = 1.0,
        w_grade: float = 1.0,
        w_dim: float = 0.3,
        max_seq_length: int = 128,
        trust_remote_code: bool = False,
        log_figures: bool = True,
        temperature_scaling: bool = False,
        calibration_bias: bool = False,
    ):
        super().__init__()
        relevant_level = self.init_levels(num_levels, relevant_level, level_grades)
        self.save_hyperparameters()
        if calibration_bias and not temperature_scaling:
            raise ValueError("calibration_bias is fitted with the temperature: set temperature_scaling: true as well")
        self.register_buffer("level_temperature", torch.tensor(1.0))
        self.register_buffer("level_bias", torch.zeros(num_levels))
        self._calibration_rows: list[tuple[Tensor, Tensor, Tensor]] = []  # this validation epoch's labelled pairs:
        # (level logits, labels, query ids)

    # -- to implement ------------------------------------------------------------------------
    def encode_batch(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Pair representation ``[B, H]`` and extras."""
        raise NotImplementedError

    @staticmethod
    def _drop_pooler(encoder: nn.Module) -> nn.Module:
        """The students pool for themselves; an encoder's own pooler (BERT's) would be a parameter
        without gradient, which DDP rejects."""
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        return encoder

    # -- heads ---------------------------------------------------------------------------------
    def _build_heads(self, hidden: int) -> None:
        """Create the level head and one head per CoT dimension on a ``hidden``-wide representation."""
        self.dropout = nn.Dropout(self.hparams.head_dropout)
        self.level_head = nn.Linear(hidden, self.num_levels)
        self.dim_heads = nn.ModuleDict({d: nn.Linear(hidden, len(VERDICTS)) for d in DIMENSIONS})
        self.train()  # from_pretrained returns encoders in eval mode; dropout must be on for fit

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.level_head.parameters(), *self.dim_heads.parameters(), *self.training_parameters()]

    @property
    def pair_dim(self) -> int:
        """Width of the pair representation (``StudentOutput.pair_embedding``)."""
        return self.level_head.in_features

    # -- training-only modules and attentions (the seams distillation uses) ------------------------
    def add_training_module(self, name: str, module: nn.Module) -> nn.Module:
        """Register ``module`` as a training-only part of the student (see the module docstring).
        Call it before the optimizers are built (a callback's ``setup``)."""
        if "training_modules" not in self._modules:
            self.training_modules = nn.ModuleDict()
        self.training_modules[name] = module
        return module

    def training_parameters(self) -> list[nn.Parameter]:
        return [*self.training_modules.parameters()] if "training_modules" in self._modules else []

    def request_attentions(self, layers: Sequence[int] = (-1,)) -> None:
        """Return the [CLS]-to-token attention of ``layers`` as ``extras["attentions"]`` while training
        (students that have attention over the pair: the cross-encoder)."""
        raise NotImplementedError(f"{type(self).__name__} has no attention maps to return")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict", {})
        moved = {k: sd.pop(k) for k in [k for k in sd if k.startswith("training_modules.")]}
        if moved:
            checkpoint["training_modules_state"] = moved

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict")
        if sd is not None:
            sd.setdefault("level_temperature", torch.tensor(1.0))  # a checkpoint from before temperature scaling
            sd.setdefault("level_bias", torch.zeros(self.num_levels))  # ... or before the calibration bias
        if sd is None or "training_modules" not in self._modules:
            return
        # resuming with the same callbacks: put them back; a checkpoint made without them: start fresh
        sd.update(checkpoint.get("training_modules_state", {}))
        for k, v in self.training_modules.state_dict(prefix="training_modules.").items():
            sd.setdefault(k, v)

    def forward(self, batch: dict[str, Any]) -> StudentOutput:
        h, extras = self.encode_batch(batch)
        z = self.dropout(h)
        level_logits = self.level_head(z).float()
        if not self.training:
            level_logits = level_logits / self.level_temperature + self.level_bias
        dim_logits = torch.stack([self.dim_heads[d](z) for d in DIMENSIONS], dim=1).float()
        expected = level_logits.softmax(-1) @ self.level_grades
        return StudentOutput(level_logits, expected, dim_logits, h, extras)

    # -- losses --------------------------------------------------------------------------------
    def loss_terms(self, batch: dict[str, Any], out: StudentOutput) -> dict[str, Tensor]:
        hp = self.hparams
        labels = batch["labels"]
        terms: dict[str, Tensor] = {}
        labelled = labels != -100
        zero = out.level_logits.sum() * 0.0  # keeps every term in the graph (DDP: no unused parameters)
        if hp.w_hard:
            terms["hard"] = hp.w_hard * (
                F.cross_entropy(out.level_logits, labels, ignore_index=-100) if labelled.any() else zero
            )
        if hp.w_grade:
            grades = batch["grades"]
            ok = ~torch.isnan(grades)
            span = (self.level_grades.max() - self.level_grades.min()).clamp_min(1e-6)
            terms["grade"] = hp.w_grade * (
                F.mse_loss(out.expected_grade[ok] / span, grades[ok] / span) if ok.any() else zero
            )
        if hp.w_dim:
            tgt = batch["dim_targets"]
            known = tgt != -100
            terms["dim"] = hp.w_dim * (
                F.cross_entropy(out.dim_logits[known], tgt[known]) if known.any() else out.dim_logits.sum() * 0.0
            )
        trainer = self._trainer
        if trainer is not None and self.training:
            # callbacks that add terms (MKDistillation): each names the student terms it replaces, and
            # its own terms have names of their own, so nothing is overwritten by accident
            for cb in trainer.callbacks:
                fn = getattr(cb, "loss_terms", None)
                if not callable(fn):
                    continue
                for name in cb.replaces() if callable(getattr(cb, "replaces", None)) else ():
                    terms.pop(name, None)
                extra = fn(self, batch, out)
                clash = set(extra) & set(terms)
                if clash:
                    raise ValueError(f"{type(cb).__name__} adds loss terms the student already has: {sorted(clash)}")
                terms.update(extra)
        return terms

    # -- what each student says about its own inputs -----------------------------------------
    def input_layout(self) -> InputLayout:
        """How this student takes its inputs: tokenization and the evidence masks over its tokens."""
        raise NotImplementedError

    def chain_encoder(self) -> nn.Module:
        """The encoder whose frozen copy embeds the teacher's chains (the rationale embedding)."""
        raise NotImplementedError

    def prepare_rationale_alignment(self, attention_layers: Sequence[int]) -> None:
        """Get ready to expose the token distributions :meth:`rationale_alignment` reads (called once,
        before training, by the distillation callback)."""

    def rationale_alignment(
        self, batch: dict[str, Any], out: StudentOutput, attention_heads: Sequence[int] | None
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per input sequence of this student: its distribution over tokens ``[B, T]``, the evidence
        mask over the same tokens and the attention mask; the rationale term aligns the first to the
        second (:func:`callbacks.losses.rationale_attention_loss`)."""
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            dm.connect(layout=self.input_layout())
            self.connect_levels(dm, stage)
        self._build_metrics()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self(batch)
        terms = self.loss_terms(batch, out)
        loss = torch.stack(list(terms.values())).sum()
        bs = len(batch["example_id"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in terms.items():
            self.log(f"train/loss/{k}", v, batch_size=bs)
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> None:
        out = self(batch)
        terms = self.loss_terms(batch, out)
        self.log(
            f"{stage}/loss",
            torch.stack(list(terms.values())).sum(),
            batch_size=len(batch["example_id"]),
            sync_dist=True,
        )
        self.update_eval_metrics(stage, batch, out.probs, out.expected_grade.float(), out.dim_logits)
        if stage == "val" and self.hparams.get("temperature_scaling"):
            keep = batch["labels"] >= 0
            qids = batch.get("query_ids")
            if qids is None:  # a hand-built batch: no cross-fitted ECE (-1 marks it)
                qids = torch.full_like(batch["labels"], -1)
            self._calibration_rows.append((out.level_logits[keep].detach().float(), batch["labels"][keep], qids[keep]))

    # -- temperature scaling -------------------------------------------------------------------
    #: the temperatures tried: 0.25 to 4, log-spaced (each step ~3%)
    TEMPERATURE_GRID = torch.logspace(-2, 2, 97, base=2.0)

    def on_validation_epoch_start(self) -> None:
        self.level_temperature.fill_(1.0)  # validation reads the raw model
        self.level_bias.zero_()
        self._calibration_rows = []

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.hparams.get("temperature_scaling") or self.trainer.sanity_checking:
            return
        logits, labels, qids = self._gathered_calibration_rows()
        bias = bool(self.hparams.get("calibration_bias"))
        if len(labels) and bias:
            from ellm_mkd.calibration import fit_temperature_bias

            t, b = fit_temperature_bias(logits.cpu(), labels.cpu())
            self.level_temperature.fill_(t)
            self.level_bias.copy_(b.to(self.level_bias))
        elif len(labels):  # the grid temperature of the least NLL over every rank's pairs
            grid = self.TEMPERATURE_GRID.to(logits.device)
            nll = torch.zeros(len(grid), device=logits.device)
            for z, y in zip(logits.split(4096), labels.split(4096)):  # [G, n, K] a chunk at a time
                lp = (z[None] / grid[:, None, None]).log_softmax(-1)
                nll += -lp.gather(-1, y[None, :, None].expand(len(grid), -1, 1)).sum((1, 2))
            self.level_temperature.fill_(float(grid[int(nll.argmin())]))
        self.log("val/temperature", self.level_temperature, sync_dist=False)
        if bias:
            for name, value in zip(self.level_names, self.level_bias.tolist()):
                self.log(f"val/level_bias/{name}", value, sync_dist=False)
        self._log_cross_fitted_ece(logits, labels, qids, bias)

    def _log_cross_fitted_ece(self, logits: Tensor, labels: Tensor, qids: Tensor, bias: bool) -> None:
        """``val/ece_calibrated_cv``: the ECE this epoch's model would have on queries its calibration did not see
        (:func:`ellm_mkd.calibration.cross_fitted_ece`, two folds of validation queries): what chooses between
        settings by calibration, since test figures are the calibrated model's. Not logged with fewer than two
        validation queries, or pairs without query ids."""
        groups = qids.tolist()
        if len(set(groups)) < 2 or -1 in groups:
            return
        from ellm_mkd.calibration import cross_fitted_ece

        ece = cross_fitted_ece(logits.cpu(), labels.cpu(), groups, bias=bias)
        self.log("val/ece_calibrated_cv", ece, sync_dist=False)
        self.last_results.setdefault("val", {})["ece_calibrated_cv"] = ece

    def _gathered_calibration_rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """This validation epoch's (logits, labels, query ids) of every rank, in rank order."""
        k = self.num_levels
        rows = self._calibration_rows
        self._calibration_rows = []
        logits = torch.cat([z for z, _, _ in rows]) if rows else torch.zeros(0, k, device=self.device)
        labels = torch.cat([y for _, y, _ in rows]) if rows else torch.zeros(0, dtype=torch.long, device=self.device)
        qids = torch.cat([q for _, _, q in rows]) if rows else torch.zeros(0, dtype=torch.long, device=self.device)
        if self.trainer.world_size > 1:  # shards differ in length: pad, gather, trim
            counts = self.all_gather(torch.tensor([len(labels)], device=self.device)).flatten().tolist()
            pad = max(counts) - len(labels)
            z = self.all_gather(torch.cat([logits, logits.new_zeros(pad, k)]))
            y = self.all_gather(torch.cat([labels, labels.new_zeros(pad)]))
            q = self.all_gather(torch.cat([qids, qids.new_zeros(pad)]))
            logits = torch.cat([z[r, :n] for r, n in enumerate(counts)])
            labels = torch.cat([y[r, :n] for r, n in enumerate(counts)])
            qids = torch.cat([q[r, :n] for r, n in enumerate(counts)])
        return logits, labels, qids

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = self(batch)
        return {
            "example_id": batch["example_id"],
            "probs": out.probs.cpu(),
            "expected_grade": out.expected_grade.float().cpu(),
            "dim_probs": out.dim_logits.float().softmax(-1).cpu(),
        }

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        from transformers import get_scheduler

        hp = self.hparams
        head_ids = {id(p) for p in self.head_parameters()}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            no_decay = p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name
            groups.setdefault((id(p) in head_ids, no_decay), []).append(p)
        param_groups = [
            {
                "params": ps,
                "lr": (hp.head_lr or hp.lr) if head else hp.lr,
                "weight_decay": 0.0 if nd else hp.weight_decay,
            }
            for (head, nd), ps in groups.items()
        ]
        # The fused kernel (CPU and CUDA) makes the step ~8x faster on CPU than the for-each one:
        # measured here 165 ms -> 21 ms per step for MiniLM-L6, i.e. 73 -> 130 training pairs/s.
        fused = all(
            p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for g in param_groups for p in g["params"]
        )
        opt = torch.optim.AdamW(param_groups, lr=hp.lr, fused=fused)
        total = int(self.trainer.estimated_stepping_batches)
        name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[hp.scheduler]
        sched = get_scheduler(name, opt, num_warmup_steps=int(hp.warmup_ratio * total), num_training_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
