"""ELLM-rele, the teacher: a causal LM with LoRA that writes the chain of thought, and its readout.

Training (``ellm-mkd fit --config configs/teacher/smollm2_135m_lora.yaml``): for each annotated
example (``data.annotations``, written by ``ellm-mkd annotate``) the teacher reads the prompt of
:class:`~ellm_mkd.prompts.PromptTemplate` and learns the response; the loss counts the response
tokens only (prompt and padding are masked). ``train_modes`` says which responses it learns:

``cot``     the whole chain (dimension lines, then ``level: <name>``);
``direct``  the answer-first response ``level: <name>`` to the direct prompt, so the cheap
            one-pass readout is trained too.

Only the output-layer rows of response positions are computed (``lm_head`` over a 49k vocabulary at
every prompt position would dominate time and memory). LoRA (peft) adapts the attention and MLP
projections named in ``lora_target_modules``; ``use_lora: false`` trains every weight.

Evaluation (``validate`` / ``test``) reads the relevance distribution with
:class:`~ellm_mkd.readout.TeacherReadout` in ``val_mode`` / ``test_mode`` and reports exactly the
students' metrics (:mod:`lightning_modules.evaluation`) plus, in ``cot`` mode, the parse-failure
rate and the dimension verdict accuracy on data that knows the true verdicts.
``predict`` returns, per example, the level and verdict distributions and the rationale (what the
teacher cache stores).

Checkpoints hold the trainable weights only (the LoRA adapter, a few MB), plus the base model's
name; loading one rebuilds the base model from ``model`` and restores the adapter. At the end of
``fit`` the adapter and a merged model directory (base + adapter, loadable by any transformers
code as a plain causal LM) are written under ``export_dir``.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.inputs import TextInputs
from ellm_mkd.cot import evidence_spans
from ellm_mkd.models import load_causal_lm, load_tokenizer, resolve_model
from ellm_mkd.prompts import PromptTemplate
from ellm_mkd.readout import TeacherReadout, ensure_pad_token, lm_parts

from .evaluation import STAGES, RelevanceEvaluation

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
        adapter: a trained LoRA adapter directory (``<export_dir>/adapter``, written by ``fit``) to
            start from, e.g. to predict or write a cache without a Lightning checkpoint; its own LoRA
            settings replace ``lora_*``.
        lora_r, lora_alpha, lora_dropout: LoRA rank, scaling numerator and dropout.
        lora_target_modules: module names that get adapters (Llama-style projections by default).
        lr, weight_decay, warmup_ratio, scheduler: AdamW and its schedule.
        max_seq_length: token budget of prompt + response; longer pairs lose the end of the response
            (counted in ``train/truncated``).
        train_modes: responses learned per example (``cot``, ``direct``).
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
        gradient_checkpointing: recompute activations in the backward pass (memory for time).
        weights_dtype: dtype the base weights are loaded in (``bfloat16`` halves memory on GPUs).
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
        adapter: str | None = None,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        scheduler: Literal["linear", "cosine", "constant"] = "linear",
        max_seq_length: int = 512,
        train_modes: list[Mode] = ("cot", "direct"),
        val_mode: ReadMode = "direct",
        test_mode: ReadMode = "cot",
        max_new_tokens: int = 160,
        stop_unparseable: bool = True,
        gradient_checkpointing: bool = False,
        weights_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
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

        self.model_path = resolve_model(model)
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code=trust_remote_code)
        ensure_pad_token(self.tokenizer)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[weights_dtype]
        lm = load_causal_lm(self.model_path, trust_remote_code=trust_remote_code, torch_dtype=dtype)
        if gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            lm.config.use_cache = False
        if adapter:
            from peft import PeftModel

            if not use_lora:
                raise ValueError("adapter is a LoRA adapter directory: it needs use_lora: true")
            lm = PeftModel.from_pretrained(lm, adapter, is_trainable=True)
        elif use_lora:
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=list(lora_target_modules),
                task_type="CAUSAL_LM",
            )
            lm = get_peft_model(lm, cfg)
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
            self._readout = TeacherReadout(
                self.model,
                self.tokenizer,
                self.level_names,
                self.template,
                self.hparams.max_new_tokens,
                self.hparams.stop_unparseable,
            )
        return self._readout

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def build_training_batch(
        self, batch: dict[str, Any], modes: list[Mode] | None = None
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """``input_ids``, ``attention_mask``, ``labels`` (-100 outside responses) and the number of
        truncated sequences, for every example x every mode (default: ``train_modes``)."""
        eos = self.readout.stop_ids[:1] or [self.tokenizer.eos_token_id]
        seqs: list[tuple[list[int], int]] = []
        for q, d, lab, rationale, eid in zip(
            batch["query"],
            batch["item_text"],
            batch["labels"].tolist(),
            batch.get("rationale") or [None] * len(batch["query"]),
            batch["example_id"],
        ):
            for mode in modes or self.hparams.train_modes:
                if mode == "cot":
                    if not rationale:
                        raise ValueError(f"example {eid} has no annotated chain of thought to learn")
                    response = rationale.strip()
                else:
                    if lab < 0:
                        continue
                    response = f"{self.template.answer_prefix} {self.level_names[lab]}"
                prompt = self.template.prompt(self.tokenizer, q, d, self.level_names, mode)
                p_ids = self._ids(prompt)
                seqs.append((p_ids + self._ids(response) + eos, len(p_ids)))
        if not seqs:
            empty = torch.zeros((0, 0), dtype=torch.long, device=self.device)
            return empty, empty, empty, 0
        limit = self.hparams.max_seq_length
        truncated = sum(len(s) > limit for s, _ in seqs)
        width = min(max(len(s) for s, _ in seqs), limit)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (s, n_prompt) in enumerate(seqs):
            s = s[:limit]
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            labels[i, n_prompt : len(s)] = ids[i, n_prompt : len(s)]
        dev = self.device
        return ids.to(dev), mask.to(dev), labels.to(dev), truncated

    def response_loss(self, ids: Tensor, mask: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy of the response tokens (next-token prediction, prompt masked); ``mean`` or ``sum``."""
        backbone, head = lm_parts(self.model)
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        target = labels[:, 1:]
        sel = target != -100
        if not sel.any():
            return hidden.sum() * 0.0
        logits = head(hidden[:, :-1][sel]).float()
        return F.cross_entropy(logits, target[sel], reduction=reduction)

    # -- steps ---------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # one forward per mode: a direct prompt is ~50 tokens shorter than a chain, so padding the
        # two kinds together would waste a quarter of the step; the loss is still the mean over all
        # response tokens of the batch
        total, tokens, truncated = None, 0, 0
        for mode in self.hparams.train_modes:
            ids, mask, labels, trunc = self.build_training_batch(batch, [mode])
            if not ids.numel():
                continue
            part = self.response_loss(ids, mask, labels, reduction="sum")
            total = part if total is None else total + part
            tokens += int((labels[:, 1:] != -100).sum())
            truncated += trunc
        loss = total / max(tokens, 1)
        bs = len(batch["example_id"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
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
        if batch.get("rationale") is not None and all(batch["rationale"]) and "cot" in self.hparams.train_modes:
            ids, mask, labels, _ = self.build_training_batch(batch)
            self.log(
                f"{stage}/loss",
                self.response_loss(ids, mask, labels),
                batch_size=len(batch["example_id"]),
                sync_dist=True,
            )
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
        """What pins this teacher's outputs in a cache manifest: base model, weights hash (of the weights
        as loaded now, adapter included), prompt template fingerprint, readout mode and budget."""
        from ellm_mkd.teacher_cache import weights_fingerprint

        return {
            "model": self.hparams.model,
            "weights_hash": weights_fingerprint(self.model),
            "template_fingerprint": self.template.fingerprint(),
            "readout": self.hparams.test_mode,
            "max_new_tokens": self.hparams.max_new_tokens if self.hparams.test_mode != "direct" else None,
        }

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        from transformers import get_scheduler

        hp = self.hparams
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
        if not self.hparams.use_lora:
            return
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        buffers = {n for n, _ in self.named_buffers() if not n.startswith("model.")}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable or k in buffers}
        checkpoint["teacher_base_model"] = self.hparams.model
        checkpoint["prompt_template"] = self.template.__dict__

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "prompt_template" in checkpoint:
            self.template = PromptTemplate(**checkpoint["prompt_template"])
        if self.hparams.use_lora:
            state = self.state_dict()
            missing = {k: v for k, v in state.items() if k not in checkpoint["state_dict"]}
            checkpoint["state_dict"] = {**missing, **checkpoint["state_dict"]}

    def export(self, out_dir: str | Path, merged: bool = True) -> Path:
        """Write ``adapter/`` (peft) and ``merged/`` (plain causal LM + tokenizer) under ``out_dir``."""
        out = Path(out_dir)
        from ellm_mkd.teacher_cache import weights_fingerprint

        info = {
            "base_model": self.hparams.model,
            "base_model_path": self.model_path,
            "level_names": list(self.level_names),
            "template": self.template.__dict__,
            "template_fingerprint": self.template.fingerprint(),
            "weights_hash": weights_fingerprint(self.model),
        }
        if self.hparams.use_lora:
            self.model.save_pretrained(out / "adapter")
            self.tokenizer.save_pretrained(out / "adapter")
        if merged or not self.hparams.use_lora:
            lm = copy.deepcopy(self.model)
            if self.hparams.use_lora:
                lm = lm.merge_and_unload()
            lm.save_pretrained(out / "merged")
            self.tokenizer.save_pretrained(out / "merged")
        (out / "teacher.json").write_text(json.dumps(info, indent=2))
        return out

    def on_fit_end(self) -> None:
        if self.trainer.global_rank != 0:
            return
        out = self.hparams.export_dir or str(Path(self.trainer.log_dir or self.trainer.default_root_dir) / "teacher")
        self.export(out, merged=self.hparams.save_merged)
        log.info("teacher written to %s (adapter/, merged/, teacher.json)", out)
