"""The baselines ``ellm-mkd bench students`` puts beside the students: a sentence-transformers
``CrossEncoder`` on the same weights and pairs, a global-mean grade and a TF-IDF reference (see
:mod:`ellm_mkd.commands.bench.students` for how each is trained and scored)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .common import TestRows, grade_range, now, result_row, score_model_metrics

log = logging.getLogger(__name__)


BASELINE_NAME = "st_cross_encoder"

REFERENCE_NAMES = ("global_mean", "tfidf_char_3_5")


def _titles_by_id(dm) -> dict[str, str]:
    t = dm.table
    return dict(zip(t.column("example_id").to_pylist(), t.column("title").to_pylist()))


def run_st_baseline(
    dm, ref_cfg: dict[str, Any], seed: int, work_dir: Path, text: str = "title", evaluate: bool = True
) -> dict[str, Any]:
    """Train and test the sentence-transformers CrossEncoder on the data module's split (module docstring).
    ``evaluate=False`` trains only (the row has training figures alone)."""
    try:
        import datasets  # noqa: F401  (CrossEncoderTrainer needs it)
        from sentence_transformers import CrossEncoder
        from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
        from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
        from transformers import TrainerCallback
    except ImportError as e:
        raise ImportError(
            f"the sentence-transformers baseline needs sentence-transformers and datasets "
            f"(pip install 'ellm-mkd[bench]'), or run with --baseline false: {e}"
        ) from e
    from datasets import Dataset

    from ellm_mkd.models import resolve_model

    low, high = grade_range(dm.scheme)
    if text not in ("title", "rendered"):
        raise ValueError(f"--baseline_text must be title or rendered, got {text!r}")
    titles = _titles_by_id(dm)

    def item(r: dict[str, Any]) -> str:
        return titles[r["example_id"]] if text == "title" else r["item_text"]

    train_rows = dm.datasets["train"].rows
    train = Dataset.from_dict(
        {
            "query": [r["query"] for r in train_rows],
            "title": [item(r) for r in train_rows],
            "label": [(float(r["grade"]) - low) / (high - low) for r in train_rows],
        }
    )
    test = TestRows(dm)
    test_pairs = [(r["query"], item(r)) for r in dm.datasets["test"].rows]

    precision = ref_cfg["precision"]
    bf16 = precision.startswith("bf16")
    fp16 = precision.startswith("16")
    use_cpu = ref_cfg["accelerator"] == "CPUAccelerator" or not torch.cuda.is_available()
    device = "cpu" if use_cpu else "cuda"
    torch.manual_seed(seed)
    t0 = now()
    model = CrossEncoder(
        resolve_model(ref_cfg["encoder"]), num_labels=1, max_length=ref_cfg["max_seq_length"], device=device
    )
    load_s = now() - t0

    class _Timer(TrainerCallback):
        def __init__(self) -> None:
            self.train_s, self.steps, self._mark = 0.0, 0, 0.0

        def _t(self) -> float:
            if not use_cpu:
                torch.cuda.synchronize()
            return now()

        def on_epoch_begin(self, args, state, control, **kw):
            self._mark = self._t()

        def on_step_end(self, args, state, control, **kw):
            now = self._t()
            self.train_s += now - self._mark
            self.steps += 1
            self._mark = now

    out_dir = work_dir / BASELINE_NAME / f"seed{seed}"
    args = CrossEncoderTrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=ref_cfg["epochs"],
        per_device_train_batch_size=ref_cfg["batch_size"],
        per_device_eval_batch_size=ref_cfg["eval_batch_size"],
        learning_rate=ref_cfg["lr"],
        warmup_steps=ref_cfg["warmup_ratio"],  # a float < 1 is a ratio of the total steps
        lr_scheduler_type={"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[
            ref_cfg["scheduler"]
        ],
        weight_decay=ref_cfg["weight_decay"],
        max_grad_norm=ref_cfg["gradient_clip_val"] or 0.0,
        bf16=bf16,
        fp16=fp16,
        use_cpu=use_cpu,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=ref_cfg["num_workers"],
        dataloader_pin_memory=not use_cpu,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=50,
        report_to="none",
    )
    timer = _Timer()
    trainer = CrossEncoderTrainer(
        model=model, args=args, train_dataset=train, loss=BinaryCrossEntropyLoss(model), callbacks=[timer]
    )
    log.info("bench: fitting %s (seed %d, %d training pairs, %s)", BASELINE_NAME, seed, len(train), precision)
    t0 = now()
    trainer.train()
    fit_s = now() - t0
    infer_s, flat = 0.0, {}
    if evaluate:
        amp = torch.autocast(device, dtype=torch.bfloat16 if bf16 else torch.float16, enabled=bf16 or fp16)
        t0 = now()
        with amp:
            scores = model.predict(
                test_pairs, batch_size=ref_cfg["eval_batch_size"], show_progress_bar=False, convert_to_tensor=True
            )
        if not use_cpu:
            torch.cuda.synchronize()
        infer_s = now() - t0
        scores = scores.float().cpu().reshape(-1)
        pred_grade = low + (high - low) * scores
        flat = score_model_metrics(dm, test, pred_grade, scores)
    cfg = {
        "model": "sentence_transformers.CrossEncoder(num_labels=1) + CrossEncoderTrainer, BinaryCrossEntropyLoss",
        "encoder": ref_cfg["encoder"],
        "precision": "bf16 autocast (TrainingArguments bf16=True" + (", use_cpu=True)" if use_cpu else ")")
        if bf16
        else ("fp16 autocast" if fp16 else "fp32"),
        "epochs": ref_cfg["epochs"],
        "batch_size": ref_cfg["batch_size"],
        "eval_batch_size": ref_cfg["eval_batch_size"],
        "max_seq_length": ref_cfg["max_seq_length"],
        "lr": ref_cfg["lr"],
        "warmup_ratio": ref_cfg["warmup_ratio"],
        "scheduler": ref_cfg["scheduler"],
        "weight_decay": ref_cfg["weight_decay"],
        "max_grad_norm": args.max_grad_norm,
        "optimizer": f"{getattr(args.optim, 'value', args.optim)} (transformers Trainer default)",
        "target": f"(grade - {low:g}) / {high - low:g}",
        "item_text": "the raw title" if text == "title" else "the students' rendered item text",
        "train_pairs": len(train),
        "train_pairs_processed": len(train) * int(ref_cfg["epochs"]),
        "optimizer_steps": timer.steps,
        "test_pairs": len(test_pairs),
        "num_workers": ref_cfg["num_workers"],
    }
    throughput = {"train_pairs_per_s": len(train) * int(ref_cfg["epochs"]) / max(timer.train_s, 1e-9)}
    if evaluate:
        throughput["infer_pairs_per_s"] = len(test_pairs) / max(infer_s, 1e-9)
    timings = {"load": load_s, "fit": fit_s, "train_batches": timer.train_s, "test_loop": infer_s}
    return result_row(BASELINE_NAME, "baseline", seed, flat, throughput, cfg, timings)


def run_references(dm, split_seed: int) -> list[dict[str, Any]]:
    """``global_mean`` and ``tfidf_char_3_5`` on the data module's split (module docstring)."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    titles = _titles_by_id(dm)
    train_rows = dm.datasets["train"].rows
    test_rows = dm.datasets["test"].rows
    test = TestRows(dm)
    g_train = np.array([r["grade"] for r in train_rows], dtype=np.float64)
    base_cfg = {"train_pairs": len(train_rows), "test_pairs": len(test_rows)}
    rows = []

    t0 = now()
    mean = float(g_train.mean())
    flat = score_model_metrics(dm, test, torch.full((len(test),), mean), None, keys=("rmse",))
    rows.append(
        result_row(
            "global_mean",
            "reference",
            split_seed,
            flat,
            None,
            {**base_cfg, "predicted_grade": round(mean, 4)},
            {"total": now() - t0},
        )
    )

    t0 = now()
    q_train = [r["query"] for r in train_rows]
    t_train = [titles[r["example_id"]] for r in train_rows]
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5))
    vec.fit(q_train + t_train)

    def cosine(qs: list[str], ts: list[str]) -> np.ndarray:
        a, b = vec.transform(qs), vec.transform(ts)  # rows are L2-normalised: the dot product is the cosine
        return np.asarray(a.multiply(b).sum(axis=1)).reshape(-1)

    c_train = cosine(q_train, t_train)
    slope, intercept = np.polyfit(c_train, g_train, 1)
    c_test = cosine([r["query"] for r in test_rows], [titles[r["example_id"]] for r in test_rows])
    pred = torch.tensor(intercept + slope * c_test, dtype=torch.float32)
    flat = score_model_metrics(dm, test, pred, torch.tensor(c_test, dtype=torch.float32))
    rows.append(
        result_row(
            "tfidf_char_3_5",
            "reference",
            split_seed,
            flat,
            None,
            {
                **base_cfg,
                "vectorizer": "TfidfVectorizer(analyzer='char_wb', ngram_range=(3, 5)) on train queries + titles",
                "grade": f"{intercept:.4f} + {slope:.4f} * cosine (least squares on train)",
            },
            {"total": now() - t0},
        )
    )
    return rows
