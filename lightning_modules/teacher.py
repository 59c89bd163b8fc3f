"""ELLM-rele, the teacher: a causal LM with LoRA that writes the chain of thought, and its readout.

Training (``ellm-mkd fit --config configs/teacher/smollm2_135m_lora.yaml``): for each annotated
example (``data.annotations``, written by ``ellm-mkd annotate``) the teacher reads the prompt of
:class:`~ellm_mkd.prompts.PromptTemplate` and learns the response. ``train_modes`` says which:

``cot``     the whole chain (dimension lines, then ``level: <name>``);
``direct``  the answer-first response ``level: <name>`` to the direct prompt, so the cheap
            one-pass readout is trained too.

The loss is :mod:`lightning_modules.teacher_objective`: the level and the verdicts are read as the
readout reads them and carry their own weighted terms (``w_level``, ``w_grade``, ``w_verdicts``), the
rest of the response a small next-token term (``w_tokens``). LoRA (peft) adapts the attention and MLP
projections named in ``lora_target_modules``; ``use_lora: false`` trains every weight.

Evaluation (``validate`` / ``test``) reads the relevance distribution with
:class:`~ellm_mkd.readout.TeacherReadout` in ``val_mode`` / ``test_mode`` and reports exactly the
students' metrics (:mod:`lightning_modules.evaluation`) plus, in ``cot`` mode, the parse-failure
rate and the dimension verdict accuracy on data that knows the true verdicts.
``predict`` returns, per example, the level and verdict distributions and the rationale (what the
teacher cache stores).

Checkpoints hold the trainable weights only (the LoRA adapter, a few MB; every weight with
``use_lora: false``), plus the base model's name; loading one rebuilds the base model from ``model``
and restores the adapter. Under FSDP (configs/trainer/fsdp_teacher.yaml) every rank writes its part of every
weight instead, and the export gathers the shards onto rank 0 first (:meth:`TeacherLM.gathered_model`).
At the end of ``fit`` the model takes the weights of the best checkpoint
(where a ``ModelCheckpoint`` monitors a validation metric, e.g. ``val/auc``), and the adapter and a
merged model directory (base + adapter, loadable by any transformers code as a plain causal LM; the
one to give as ``model`` after full fine-tuning) are written under ``export_dir``.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from datamodules.inputs import TextInputs
from ellm_mkd.cot import evidence_spans
from ellm_mkd.injection import InjectionAugment
from ellm_mkd.models import load_causal_lm, load_tokenizer, resolve_model, weights_dtype, with_adapter, with_lora
from ellm_mkd.prompts import COMMON_CONTROL_MARKERS, PromptTemplate
from ellm_mkd.readout import TeacherReadout, ensure_pad_token
from ellm_mkd.teacher_cache import weights_fingerprint

from .evaluation import STAGES, RelevanceEvaluation
from .teacher_objective import build_responses, combine, objective_terms

log = logging.getLogger(__name__)
Mode = Literal["cot", "direct"]
ReadMode = Literal["cot", "direct", "forced"]


class TeacherLM(RelevanceEvaluation, L.LightningModule):
    """The ELLM-rele teacher; see the module docstring.

    Args:
        model: bundled name (``smollm2-135m-instruct``), local Hugging Face directory, or hub id.
        num_levels: relevance levels K (linked from the data module by the CLI).
        relevant_level: first relevant level for AUC (linked from the data module).
        level_grades: raw grade of each level for the expected grade (default: train means).
        use_lora: train a LoRA adapter (else every weight).
        freeze_embeddings: in a full fine-tune, keep the token embeddings and the output head (often the same table)
            as loaded: Gemma 3 270M's 262k-token table is 168M of its 268M weights, and AdamW holds two fp32 copies.
        adapter: a trained LoRA adapter directory (``<export_dir>/adapter``, written by ``fit``) to
            start from, e.g. to predict or write a cache without a Lightning checkpoint; its own LoRA
            settings replace ``lora_*``.
        merge_adapter: fold ``adapter`` into the base weights as it loads, for reading only (cache 62 s against 95 s:
            docs/benchmarks.md#demo; readouts move in the last digits); ``fit`` refuses it.
        lora_r, lora_alpha, lora_dropout: LoRA rank, scaling numerator and dropout.
        lora_target_modules: module names that get adapters (Llama-style projections by default).
        lora_last_layers: adapters in the last this many transformer layers only (None: all); the backward pass
            stops below the lowest adapted layer (Gemma 3 270M, 9 of 18: a step 2.14 -> 1.60 s on 2 cores).
        lr, weight_decay, warmup_ratio, scheduler: AdamW and its schedule.
        max_seq_length: token budget of prompt + response; longer pairs lose the end of the response
            (counted in ``train/truncated``).
        train_modes: responses learned per example (``cot``, ``direct``).
        w_level, w_grade, w_verdicts, w_tokens: weights of the objective's terms
            (:mod:`lightning_modules.teacher_objective`): level cross-entropy at each readout point, squared
            error of the expected grade, verdict cross-entropy at each chain line, next-token loss of the
            rest of the response.
        injection_rate: share of training examples whose product text gets a random planted injection (an order in
            plain words, chat-control markers, a fake chain or ``level:`` line, a quote escape; any target level),
            the label unchanged, so the teacher learns that text posing as instructions says nothing about
            relevance (:mod:`ellm_mkd.injection`; the strings ``ellm-mkd bench injection`` measures are held out).
        injection_seed: seed of those draws (with the example id and the epoch).
        injection_neutral_rate: share of the other examples that get neutral seller text appended (no level).
        w_invariance: weight of KL(clean || planted) of the direct level distribution at each example that got an
            injection (the clean one read without gradient in the same step): the judgement, not only the
            label, must stay where it was (0: off; costs one more forward pass of the planted examples).
        val_mode, test_mode: readout used by ``validate`` and ``test`` (and ``predict``: ``test_mode``):
            ``direct`` (answer-first, one pass), ``cot`` (write the chain, then read), or ``forced``
            (read the verdicts and level after the *annotated* chain, ``data.annotations``, instead of
            writing one: one pass per pair, the fast way to a cache with verdicts and evidence on a CPU;
            the evidence is then the annotator's, the distributions the teacher's).
        max_new_tokens: generation budget of one chain in ``cot`` readout.
        stop_unparseable: in ``cot`` readout, stop writing a chain as soon as it can no longer parse (a
            line that breaks the schema, or evidence that does not occur in the inputs): its distributions
            come from the direct question either way, and its error names the same line; false writes
            every chain to its end.
        constrain_chains: in ``cot`` readout, write only what keeps the chain parseable (the likeliest token among
            those that do; :class:`~ellm_mkd.readout.TeacherReadout`): a chain then fails only at ``max_new_tokens``.
        gradient_checkpointing: recompute activations in the backward pass (memory for time).
        pack_tokens: pairs whose token sequences begin alike (the prompt's fixed instructions) are packed into rows
            of up to this many tokens, the shared part computed once, in training and readout (0: a row per pair).
        weights_dtype: dtype the base weights are loaded in (``bfloat16`` halves memory; ``auto``: bfloat16 where
            bf16 is native, else float32; :func:`ellm_mkd.models.weights_dtype`).
        template: the prompt template (system and user messages, answer prefix).
        export_dir: where ``fit`` writes ``adapter/`` and ``merged/`` (default: ``<log dir>/teacher``).
        save_merged: also write the merged model directory.
        trust_remote_code: allow model code from the model directory.
        log_figures: log confusion matrix, reliability diagram and PR curve images.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        num_levels: int = 4,
        relevant_level: int | None = None,
        level_grades: list[float] | None = None,
        use_lora: bool = True,
        freeze_embeddings: bool = False,
        adapter: str | None = None,
        merge_adapter: bool = False,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        lora_last_layers: int | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        scheduler: Literal["linear", "cosine", "constant"] = "linear",
        max_seq_length: int = 512,
        train_modes: list[Mode] = ("cot", "direct"),
        w_level: float = 1.0,
        w_grade: float = 0.0,
        w_verdicts: float = 1.0,
        w_tokens: float = 0.1,
        injection_rate: float = 0.0,
        injection_seed: int = 0,
        injection_neutral_rate: float = 0.0,
        w_invariance: float = 0.0,
        val_mode: ReadMode = "direct",
        test_mode: ReadMode = "cot",
        max_new_tokens: int = 160,
        stop_unparseable: bool = True,
        constrain_chains: bool = False,
        gradient_checkpointing: bool = False,
        pack_tokens: int = 1024,
        weights_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32",
        template: PromptTemplate | None = None,
        export_dir: str | None = None,
        save_merged: bool = True,
        trust_remote_code: bool = False,
        log_figures: bool = True,
    ):
        super().__init__()
        relevant_level = self.init_levels(num_levels, relevant_level, level_grades)
        train_modes = list(train_modes)
        if not train_modes or set(train_modes) - {"cot", "direct"}:
            raise ValueError(f"train_modes must be a non-empty subset of ['cot', 'direct'], got {train_modes}")
        if isinstance(template, dict):
            template = PromptTemplate(**template)
        self.save_hyperparameters(ignore=["template"])
        self.template = template or PromptTemplate()
        self.injections = InjectionAugment(injection_rate, injection_seed, injection_neutral_rate)

        self.model_path = resolve_model(model)
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code=trust_remote_code)
        ensure_pad_token(self.tokenizer)
        lm = self._load_lm()
        if gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            lm.config.use_cache = False
        if adapter:
            if not use_lora:
                raise ValueError("adapter is a LoRA adapter directory: it needs use_lora: true")
            lm = with_adapter(lm, adapter)
            self._trained_hash = weights_fingerprint(lm) if merge_adapter else None  # the teacher as trained
            lm = lm.merge_and_unload() if merge_adapter else lm
        elif use_lora:
            lm = with_lora(lm, lora_r, lora_alpha, lora_dropout, lora_target_modules, lora_last_layers)
        elif freeze_embeddings:
            for table in filter(None, (lm.get_input_embeddings(), lm.get_output_embeddings())):
                table.requires_grad_(False)
        self.model = lm
        self.predict_hidden = False  # set by the cache writer when it stores hidden vectors
        # set to {"example_id": [], "probs": [], "dim_probs": []} to keep this process's test readouts (the demo's
        # report reads them instead of a second pass over the test split)
        self.test_outputs: dict[str, list] | None = None
        self._readout: TeacherReadout | None = None
        self.train()

    # -- data ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            dm.connect(layout=TextInputs())  # strings: the teacher builds its own prompts
            self.connect_levels(dm, stage)
            if stage == "fit" and not getattr(dm, "annotations", None):
                raise ValueError(
                    "the teacher learns from annotated chains of thought: set data.annotations to the "
                    "directory written by ellm-mkd annotate"
                )
        from torchmetrics import SumMetric

        self._build_metrics()
        self.parse_failed = torch.nn.ModuleDict({s: SumMetric() for s in STAGES})
        self.parse_total = torch.nn.ModuleDict({s: SumMetric() for s in STAGES})
        self._readout = None

    @property
    def readout(self) -> TeacherReadout:
        if self._readout is None:
            hp = self.hparams
            args = (hp.max_new_tokens, hp.stop_unparseable, hp.pack_tokens, hp.get("constrain_chains", False))
            self._readout = TeacherReadout(self.model, self.tokenizer, self.level_names, self.template, *args)
        return self._readout

    @property
    def loss_weights(self) -> dict[str, float]:
        return {t: getattr(self.hparams, f"w_{t}", 0.0) for t in ("level", "grade", "verdicts", "tokens", "invariance")}

    def objective(
        self, batch: dict[str, Any], modes: list[Mode] | None = None, reference: dict[int, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, float], int]:
        """The weighted training loss of ``batch`` (:mod:`lightning_modules.teacher_objective`) over ``modes``
        (default ``train_modes``), each term's mean, and the number of truncated responses (``reference``: the
        clean level distributions of the ``invariance`` term, by batch position; direct responses). One forward
        pass per mode: a direct prompt is much shorter than a chain, so padding both kinds together would
        waste compute."""
        parts, truncated = [], 0
        for mode in modes or self.hparams.train_modes:
            responses = build_responses(self.readout, batch, mode, self.hparams.max_seq_length, self.level_names)
            truncated += responses.truncated
            if len(responses):
                ref = reference if mode == "direct" else None
                pad, pack = self.tokenizer.pad_token_id, self.hparams.pack_tokens
                parts.append(objective_terms(self.model, responses, pad, self.level_grades, ref, pack))
        if not parts:
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return zero, {}, truncated
        loss, means = combine(parts, self.loss_weights)
        return loss, means, truncated

    # -- steps ---------------------------------------------------------------------------------
    def with_injections(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with injections planted in the product text of about ``injection_rate`` of its examples."""
        if not (self.injections.rate or self.injections.neutral_rate):
            return batch
        markers = (*COMMON_CONTROL_MARKERS, *(self.tokenizer.all_special_tokens or ()))
        texts = self.injections(batch["item_text"], batch["example_id"], self.current_epoch, self.level_names, markers)
        return {**batch, "item_text": texts}

    def clean_reference(self, batch: dict[str, Any], planted: dict[str, Any]) -> dict[int, Tensor] | None:
        """The direct level distributions (no gradient) of the examples whose text ``planted`` changed."""
        changed = [i for i, (a, b) in enumerate(zip(batch["item_text"], planted["item_text"])) if a != b]
        if not self.hparams.w_invariance or not changed:
            return None
        probs = self.readout.direct([batch["query"][i] for i in changed], [batch["item_text"][i] for i in changed])
        return dict(zip(changed, probs.level_probs.detach()))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        planted = self.with_injections(batch)
        loss, means, truncated = self.objective(planted, reference=self.clean_reference(batch, planted))
        bs = len(batch["example_id"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for term, value in means.items():
            self.log(f"train/{term}", value, batch_size=bs)
        self.log("train/truncated", float(truncated), batch_size=bs, reduce_fx="sum")
        return loss

    def use_readout(self, mode: ReadMode, max_new_tokens: int | None = None) -> None:
        """Read ``test``/``predict`` (and a cache) with ``mode`` from now on, and write chains of at most
        ``max_new_tokens`` tokens when given; the one place other code changes how the teacher reads."""
        self.hparams.test_mode = mode
        if max_new_tokens is not None and max_new_tokens != self.hparams.max_new_tokens:
            self.hparams.max_new_tokens = max_new_tokens
            self._readout = None  # the readout holds the budget it was built with

    def read(self, batch: dict[str, Any], mode: ReadMode):
        if mode == "direct":
            return self.readout.direct(batch["query"], batch["item_text"])
        if mode == "forced":
            if batch.get("rationale") is None:
                raise ValueError(
                    "readout 'forced' scores the annotated chains: set data.annotations to a store "
                    "written by ellm-mkd annotate over the splits being read"
                )
            return self.readout.forced(batch["query"], batch["item_text"], batch["rationale"])
        return self.readout.cot(batch["query"], batch["item_text"])

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> None:
        mode = self.hparams.val_mode if stage == "val" else self.hparams.test_mode
        # the loss needs the chains; without them it would only repeat the direct readout's forward pass
        has_chains = batch.get("rationale") is not None and all(batch["rationale"])
        if stage == "val" and has_chains and "cot" in self.hparams.train_modes:
            loss, _, _ = self.objective(batch)
            self.log("val/loss", loss, batch_size=len(batch["example_id"]), sync_dist=True)
        r = self.read(batch, mode)
        dev = self.device
        probs = r.level_probs.to(dev)
        expected = probs.float() @ self.level_grades
        chained = mode in ("cot", "forced")
        if chained and r.parse_failures:
            # a chain that did not parse gave no verdicts: dimension accuracy is over parsed chains
            failed = torch.tensor([e is not None for e in r.errors], device=batch["dim_targets"].device)
            batch = {**batch, "dim_targets": batch["dim_targets"].masked_fill(failed[:, None], -100)}
        self.update_eval_metrics(stage, batch, probs, expected, r.verdict_probs.to(dev), dims=chained)
        if stage == "test" and self.test_outputs is not None:
            self.test_outputs["example_id"] += list(batch["example_id"])
            self.test_outputs["probs"] += r.level_probs.float().tolist()
            self.test_outputs["dim_probs"] += r.verdict_probs.float().tolist()
        if chained:
            self.parse_failed[stage].update(torch.tensor(float(r.parse_failures), device=dev))
            self.parse_total[stage].update(torch.tensor(float(len(r.errors)), device=dev))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def extra_epoch_results(self, stage: str) -> dict[str, float]:
        total = float(self.parse_total[stage].compute())
        out = {"parse_failure_rate": float(self.parse_failed[stage].compute()) / total} if total else {}
        self.parse_failed[stage].reset()
        self.parse_total[stage].reset()
        return out

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Per example: level and verdict distributions, the chain, its evidence spans (character
        offsets into ``query`` / ``item_text``) and, with ``predict_hidden``, the pooled hidden vector.
        ``has_verdicts`` is False where the verdicts are placeholders (direct readout, unparsed chain)."""
        mode = self.hparams.test_mode
        r = self.read(batch, mode)
        evidence = [
            evidence_spans(c, q, d) if c is not None else []
            for c, q, d in zip(r.chains, batch["query"], batch["item_text"])
        ]
        out = {
            "example_id": batch["example_id"],
            "query": batch["query"],
            "item_text": batch["item_text"],
            "probs": r.level_probs,
            "expected_grade": r.level_probs @ self.level_grades.cpu(),
            "dim_probs": r.verdict_probs,
            "has_verdicts": [c is not None for c in r.chains],
            "rationale": r.rationales,
            "parse_error": r.errors,
            "evidence": evidence,
            "mode": mode,
        }
        if self.predict_hidden:
            out["hidden"] = self.readout.hidden(r)
        return out

    def cache_identity(self) -> dict[str, Any]:
        """What pins this teacher's outputs in a cache manifest: base model, weights hash (base + adapter as trained,
        also where ``merge_adapter`` folded it in), prompt template fingerprint, readout mode and budget."""
        constrained = self.hparams.get("constrain_chains") and self.hparams.test_mode == "cot"
        return {
            "model": self.hparams.model,
            "weights_hash": getattr(self, "_trained_hash", None) or weights_fingerprint(self.model),
            "template_fingerprint": self.template.fingerprint(),
            "readout": self.hparams.test_mode,
            "max_new_tokens": self.hparams.max_new_tokens if self.hparams.test_mode != "direct" else None,
            **({"constrain_chains": True} if constrained else {}),
        }

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        from transformers import get_scheduler

        hp = self.hparams
        if hp.adapter and hp.merge_adapter:
            raise ValueError(
                f"merge_adapter: true folded {hp.adapter} into the base weights, for reading only (false to train)"
            )
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, fused=fused)
        total = int(self.trainer.estimated_stepping_batches)
        name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[hp.scheduler]
        sched = get_scheduler(name, opt, num_warmup_steps=int(hp.warmup_ratio * total), num_training_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoints and export ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the trainable weights and buffers only: the frozen base model is rebuilt from ``model``."""
        if not self.hparams.use_lora or self._sharded():
            return  # sharded: every rank writes its own part of every weight (the loader expects them all)
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        buffers = {n for n, _ in self.named_buffers() if not n.startswith("model.")}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable or k in buffers}
        checkpoint["teacher_base_model"] = self.hparams.model
        checkpoint["prompt_template"] = self.template.__dict__

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "prompt_template" in checkpoint:
            self.template = PromptTemplate(**checkpoint["prompt_template"])
        if self.hparams.use_lora and "state_dict" in checkpoint:  # sharded: the strategy loads the weights
            state = self.state_dict()
            missing = {k: v for k, v in state.items() if k not in checkpoint["state_dict"]}
            checkpoint["state_dict"] = {**missing, **checkpoint["state_dict"]}

    def export(self, out_dir: str | Path, merged: bool = True, model: torch.nn.Module | None = None) -> Path:
        """Write ``adapter/`` (peft) and ``merged/`` (plain causal LM + tokenizer) under ``out_dir``; of
        ``model`` where given (an unwrapped copy holding every weight, see :meth:`gathered_model`)."""
        out, model = Path(out_dir), self.model if model is None else model
        info = {
            "base_model": self.hparams.model,
            "base_model_path": self.model_path,
            "level_names": list(self.level_names),
            "template": self.template.__dict__,
            "template_fingerprint": self.template.fingerprint(),
            "weights_hash": weights_fingerprint(model),
        }
        if self.hparams.use_lora:
            model.save_pretrained(out / "adapter")
            self.tokenizer.save_pretrained(out / "adapter")
        if merged or not self.hparams.use_lora:
            lm = copy.deepcopy(model)
            if self.hparams.use_lora:
                lm = lm.merge_and_unload()
            lm.save_pretrained(out / "merged")
            self.tokenizer.save_pretrained(out / "merged")
        (out / "teacher.json").write_text(json.dumps(info, indent=2))
        return out

    def restore_best(self) -> str | None:
        """Load the best checkpoint's weights (the fit's ``ModelCheckpoint`` with a ``monitor``) into this
        model; returns its path, or None where there is none (no monitor, or nothing validated)."""
        cb = self.trainer.checkpoint_callback if self._trainer is not None else None
        best = getattr(cb, "best_model_path", "") if cb is not None and getattr(cb, "monitor", None) else ""
        if not best or not Path(best).exists():
            return None
        if self._sharded():  # every rank loads its own part of the checkpoint's weights (a collective)
            self.trainer.strategy.load_checkpoint(best)
        else:
            state = torch.load(best, map_location=self.device, weights_only=False)["state_dict"]
            self.load_state_dict(state, strict=not self.hparams.use_lora)
        score = getattr(cb, "best_model_score", None)
        log.info("teacher: best validated weights restored (%s %s) from %s", cb.monitor, score, best)
        return best

    def _load_lm(self) -> torch.nn.Module:
        """The base causal LM read from ``model`` in ``weights_dtype`` (no LoRA layers)."""
        dtype, remote = weights_dtype(self.hparams.weights_dtype), self.hparams.trust_remote_code
        return load_causal_lm(self.model_path, trust_remote_code=remote, torch_dtype=dtype)

    def _sharded(self) -> bool:
        """Whether the weights are split over the ranks (Lightning's FSDP strategy, or one derived from it)."""
        from lightning.pytorch.strategies import FSDPStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)

    def gathered_model(self) -> torch.nn.Module | None:
        """Under FSDP: every rank sends its shards (call it on all of them), and rank 0 gets a plain copy of
        ``self.model`` (base weights read again from ``model``, LoRA layers rebuilt from the adapter's config)
        holding every weight; None on the other ranks. Rank 0 needs host memory for the model twice."""
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = self.trainer.strategy.model
        on_cpu = self.device.type == "cpu"  # (offloading from the CPU would hand back views of freed buffers)
        gather = FullStateDictConfig(offload_to_cpu=not on_cpu, rank0_only=True)
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, gather):
            state = wrapped.state_dict()
            if on_cpu:
                state = {k: v.clone() for k, v in state.items()}
        if self.trainer.global_rank != 0:
            return None
        twin = self._load_lm()
        if self.hparams.use_lora:
            from peft import get_peft_model

            twin = get_peft_model(twin, copy.deepcopy(self.model.peft_config["default"]))
        twin.load_state_dict({k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
        return twin

    def on_fit_end(self) -> None:
        self.restore_best()
        out = self.hparams.export_dir or str(Path(self.trainer.log_dir or self.trainer.default_root_dir) / "teacher")
        twin = self.gathered_model() if self._sharded() else None  # (a collective: before rank 0 goes on alone)
        if self.trainer.global_rank != 0:
            return
        self.export(out, merged=self.hparams.save_merged, model=twin)
        log.info("teacher written to %s (adapter/, merged/, teacher.json)", out)
