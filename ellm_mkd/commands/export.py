"""``ellm-mkd export CKPT --out DIR``: a student checkpoint -> a self-contained directory to ship.

What the directory holds (``model.json`` describes it: :mod:`ellm_mkd.serving.card`):

* ONNX graphs (``torch.onnx``; dynamic batch and sequence axes): the cross-encoder as one graph from
  token ids to level probabilities, expected grade and dimension-verdict probabilities; the two-tower
  as ``query_tower.onnx``, ``item_tower.onnx`` and ``scorer.onnx``; with ``--quantize true`` also an
  int8 copy of each (onnxruntime dynamic quantisation, ``*.int8.onnx``);
* ``tokenizer/``; for a BERT-family cross-encoder with CLS pooling, ``sentence_transformers/``: a
  Hugging Face sequence-classification model that ``sentence_transformers.CrossEncoder(dir)`` loads,
  whose softmax is the student's level distribution;
* ``model.json``: levels and grades, dimensions and verdicts, item fields and rendering, token budget,
  the training data, teacher and checkpoint fingerprints, metrics, and the parity measured here: every
  graph is run in onnxruntime and in PyTorch on the same sample pairs, and the export fails when fp32
  differs by more than ``--tolerance``.

The data settings (item fields, label scheme) come from the run's ``config.yaml`` that ``ellm-mkd fit``
saved beside the checkpoint (``--train_config`` to name another).
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from jsonargparse import ArgumentParser

from ellm_mkd.schema import DIMENSIONS, VERDICTS
from ellm_mkd.serving import ModelCard, OnnxRunner, PairScores, Scorer, TorchRunner

from .export_provenance import SAMPLE_PAIRS, checkpoint_metrics, sha256_file, training_context

log = logging.getLogger(__name__)
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: the BERT pooler is tanh(W h + b); with W = EPS * I it is linear to a relative 1e-5 on hidden values |h| < 5
ST_POOLER_EPS = 1e-3


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="ellm-mkd export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=str, help="a student checkpoint (.ckpt) written by ellm-mkd fit")
    p.add_argument("--out", type=str, required=True, help="output directory (must not exist, or --overwrite)")
    p.add_argument("--overwrite", type=bool, default=False, help="replace an existing export directory")
    p.add_argument("--quantize", type=bool, default=False, help="also write int8 graphs (dynamic quantisation)")
    p.add_argument(
        "--train_config", type=str | None, default=None, help="the run's config.yaml (default: found beside the ckpt)"
    )
    p.add_argument("--exporter", type=str, default="torchscript", help="torchscript (fast, default) | dynamo")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (dynamo needs >= 18)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest fp32 ONNX-vs-PyTorch difference allowed")
    p.add_argument("--sentence_transformers", type=bool, default=True, help="write sentence_transformers/ too")
    return p


def _token_inputs(tokenizer: Any) -> list[str]:
    names = [n for n in TOKEN_INPUTS if n in tokenizer.model_input_names]
    return names if "input_ids" in names and "attention_mask" in names else ["input_ids", "attention_mask"]


def _export_graph(
    graph: Any, args: tuple, path: Path, inputs: list[str], outputs: list[str], exporter: str, opset: int
) -> None:
    import torch

    dynamic = {n: {0: "batch", 1: "seq"} for n in inputs if n in TOKEN_INPUTS}
    dynamic.update({n: {0: "batch"} for n in inputs if n not in TOKEN_INPUTS})
    dynamic.update({n: {0: "batch"} for n in outputs})
    kw: dict[str, Any] = {"input_names": inputs, "output_names": outputs}
    if exporter == "dynamo":
        dims = {"batch": torch.export.Dim("batch"), "seq": torch.export.Dim("seq")}
        kw["dynamic_shapes"] = tuple({a: dims[n] for a, n in dynamic[i].items()} for i in inputs)
        kw["opset_version"] = max(opset, 18)
        kw["external_data"] = False
    elif exporter == "torchscript":
        kw["dynamic_axes"] = dynamic
        kw["opset_version"] = opset
    else:
        raise ValueError(f"--exporter must be torchscript or dynamo, got {exporter!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, args, str(path), dynamo=exporter == "dynamo", **kw)


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "consider pre-processing" is advice for convolutional models
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def _diff(a: PairScores, b: PairScores) -> dict[str, float]:
    return {
        "max_abs_level_probs": float(np.abs(a.level_probs - b.level_probs).max()),
        "max_abs_expected_grade": float(np.abs(a.expected_grade - b.expected_grade).max()),
        "max_abs_dim_probs": float(np.abs(a.dim_probs - b.dim_probs).max()),
        "same_top_level": float((a.level_probs.argmax(-1) == b.level_probs.argmax(-1)).mean()),
    }


def _sentence_transformers_dir(student: Any, card: ModelCard, out: Path) -> dict[str, Any]:
    """A ``BertForSequenceClassification`` whose logits are the level head's (see ``ST_POOLER_EPS``)."""
    import torch
    from transformers import AutoConfig, BertForSequenceClassification

    if card.kind != "cross_encoder":
        return {"path": None, "why": "a two-tower student is not a sequence-classification model"}
    cfg = student.encoder.config
    if student.pooling != "cls" or cfg.model_type != "bert":
        return {
            "path": None,
            "why": "only a BERT-family cross-encoder with CLS pooling maps onto a sequence-classification model "
            f"(pooling {student.pooling}, encoder {cfg.model_type})",
        }
    config = AutoConfig.for_model(
        "bert",
        **{k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type", "transformers_version")},
    )
    config.num_labels = card.num_levels
    config.id2label = dict(enumerate(card.level_names))
    config.label2id = {n: i for i, n in enumerate(card.level_names)}
    config.level_grades = card.level_grades
    model = BertForSequenceClassification(config).eval()
    missing, unexpected = model.bert.load_state_dict(student.encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        return {"path": None, "why": f"encoder weights do not fit BertModel (missing {missing}, extra {unexpected})"}
    h = cfg.hidden_size
    with torch.no_grad():
        model.bert.pooler.dense.weight.copy_(torch.eye(h) * ST_POOLER_EPS)
        model.bert.pooler.dense.bias.zero_()
        t = float(student.level_temperature)  # a fitted temperature and level biases are folded into the classifier
        model.classifier.weight.copy_(student.level_head.weight / (ST_POOLER_EPS * t))
        model.classifier.bias.copy_(student.level_head.bias / t + student.level_bias)
    d = out / "sentence_transformers"
    model.save_pretrained(d)
    student.tokenizer.save_pretrained(d)
    return {
        "path": d.name,
        "usage": "CrossEncoder(dir).predict([(query, item_text)], apply_softmax=True) -> level probabilities",
        "note": f"the BERT pooler is set to {ST_POOLER_EPS} * identity so that tanh is linear; the classifier "
        "is the level head scaled back (divided by the fitted temperature, plus the fitted level biases); "
        "expected grade = probabilities @ config.level_grades",
    }


def _st_parity(directory: Path, pairs: list[tuple[str, str]], ref: PairScores, max_len: int) -> dict[str, Any]:
    try:
        from sentence_transformers import CrossEncoder
    except ImportError:
        return {"checked": False, "why": "sentence-transformers is not installed (pip install '.[bench]')"}

    ce = CrossEncoder(str(directory), max_length=max_len, device="cpu")
    probs = np.asarray(ce.predict(pairs, apply_softmax=True, show_progress_bar=False, batch_size=len(pairs)))
    return {"max_abs_level_probs": float(np.abs(probs - ref.level_probs).max())}


def make_card(student: Any, item_fields: list[str], level_names: list[str]) -> ModelCard:
    """The card of ``student`` (no graph files yet)."""
    from datamodules.text import FIELD_LABELS, SEPARATOR, check_item_fields
    from lightning_modules.serving_graphs import student_kind

    item_fields = list(check_item_fields(item_fields))
    if len(level_names) != student.num_levels:
        raise ValueError(f"{len(level_names)} level names for a student with {student.num_levels} levels")
    return ModelCard(
        kind=student_kind(student),
        level_names=list(level_names),
        level_grades=[float(g) for g in student.level_grades.tolist()],
        relevant_level=int(student.relevant_level),
        dimensions=list(DIMENSIONS),
        verdicts=list(VERDICTS),
        item_fields=item_fields,
        max_seq_length=int(student.hparams.max_seq_length),
        inputs=_token_inputs(student.tokenizer),
        item_rendering={
            "separator": SEPARATOR,
            "field_labels": {f: FIELD_LABELS[f] for f in item_fields},
            "labelled": len(item_fields) > 1,
            "max_chars_per_field": 1000,
            "layout": "one 'Label: value' segment per non-empty field, in item_fields order, joined by the separator",
        },
        encoder=str(student.hparams.encoder),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


def graph_inputs(card: ModelCard) -> dict[str, list[str]]:
    if card.kind == "cross_encoder":
        return {"cross_encoder": card.inputs}
    return {"query_tower": card.inputs, "item_tower": card.inputs, "scorer": ["query_vec", "item_vec"]}


def torch_scorer(student: Any, item_fields: list[str], level_names: list[str], batch_size: int = 64) -> Scorer:
    """A :class:`Scorer` running the student's graphs in PyTorch (what a checkpoint is scored with)."""
    from lightning_modules.serving_graphs import serving_graphs

    card = make_card(student, item_fields, level_names)
    return Scorer(card, student.tokenizer, TorchRunner(serving_graphs(student), graph_inputs(card)), batch_size)


def export_student(
    student: Any,
    out: Path,
    *,
    item_fields: list[str],
    level_names: list[str],
    quantize: bool = False,
    exporter: str = "torchscript",
    opset: int = 17,
    tolerance: float = 1e-4,
    sentence_transformers: bool = True,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> ModelCard:
    """Write ``student``'s graphs, tokenizer, sentence-transformers folder and ``model.json`` to ``out``
    (an empty or new directory); checks parity and raises when fp32 ONNX is off by more than ``tolerance``."""
    import torch

    from datamodules.text import render_item
    from lightning_modules.serving_graphs import serving_graphs

    out.mkdir(parents=True, exist_ok=True)
    card = make_card(student, item_fields, level_names)
    card.training, card.metrics = dict(training or {}), dict(metrics or {})
    kind, tok, inputs = card.kind, student.tokenizer, card.inputs
    graphs = serving_graphs(student)
    pairs = [(q, render_item(item, item_fields)[0]) for q, item in SAMPLE_PAIRS]
    sample = Scorer(card, tok, TorchRunner({}, {}), batch_size=len(pairs))
    enc = sample.encode_pairs(*zip(*pairs)) if kind == "cross_encoder" else sample.encode_texts([p[0] for p in pairs])
    token_args = tuple(torch.from_numpy(enc[k]) for k in inputs)
    for name, graph in graphs.items():
        if name == "scorer":
            h = student.query_encoder.config.hidden_size
            g_inputs, g_outputs = ["query_vec", "item_vec"], ["level_probs", "expected_grade", "dim_probs"]
            args = (torch.randn(2, h), torch.randn(2, h))
        elif name.endswith("_tower"):
            g_inputs, g_outputs, args = inputs, [name.replace("_tower", "_vec")], token_args
        else:
            g_inputs, g_outputs, args = inputs, ["level_probs", "expected_grade", "dim_probs"], token_args
        _export_graph(graph, args, out / f"{name}.onnx", g_inputs, g_outputs, exporter, opset)
        card.graphs[name] = {"fp32": f"{name}.onnx", "inputs": g_inputs, "outputs": g_outputs}
        if quantize:
            _quantize(out / f"{name}.onnx", out / f"{name}.int8.onnx")
            card.graphs[name]["int8"] = f"{name}.int8.onnx"
    tok.save_pretrained(out / card.tokenizer)

    # parity: the same pairs through PyTorch and onnxruntime
    ref = Scorer(card, tok, TorchRunner(graphs, graph_inputs(card))).score_pairs(*zip(*pairs))
    for precision in ("fp32", "int8") if quantize else ("fp32",):
        got = Scorer(card, tok, OnnxRunner(out, card, precision)).score_pairs(*zip(*pairs))
        card.parity[precision] = {"pairs": len(pairs), **_diff(got, ref)}
    fp32 = card.parity["fp32"]
    worst = max(v for k, v in fp32.items() if k.startswith("max_abs"))
    card.parity["fp32"]["tolerance"] = tolerance
    card.parity["fp32"]["ok"] = worst <= tolerance
    card.sentence_transformers = (
        _sentence_transformers_dir(student, card, out) if sentence_transformers else {"path": None, "why": "not asked"}
    )
    if card.sentence_transformers.get("path"):
        st = _st_parity(out / card.sentence_transformers["path"], pairs, ref, card.max_seq_length)
        card.parity["sentence_transformers"] = {"pairs": len(pairs), **st}
    card.save(out)
    if worst > tolerance:
        raise ValueError(
            f"{out}: ONNX fp32 differs from PyTorch by {worst:.2e} (> --tolerance {tolerance:g}) on the sample "
            f"pairs: {fp32}; the export is kept for inspection but should not be shipped"
        )
    return card


def export_main(argv: list[str]) -> int:
    from lightning_modules.serving_graphs import load_student

    cfg = _parser().parse_args(argv)
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(17, "output directory exists and is not empty (pass --overwrite true)", str(out))
        shutil.rmtree(out)
    ckpt = Path(cfg.checkpoint)
    student = load_student(ckpt)
    ctx = training_context(ckpt, cfg.train_config, student.num_levels)
    for w in ctx.pop("warnings"):
        print(f"warning: {w}")
    training = {"checkpoint": str(ckpt), "checkpoint_sha256": sha256_file(ckpt), **ctx["provenance"]}
    card = export_student(
        student,
        out,
        item_fields=ctx["item_fields"],
        level_names=ctx["level_names"],
        quantize=cfg.quantize,
        exporter=cfg.exporter,
        opset=cfg.opset,
        tolerance=cfg.tolerance,
        sentence_transformers=cfg.sentence_transformers,
        training=training,
        metrics=checkpoint_metrics(ckpt),
    )
    for precision, p in card.parity.items():
        shown = (f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in p.items() if k != "ok")
        print(f"parity {precision} vs PyTorch: " + ", ".join(shown))
    if not card.sentence_transformers.get("path"):
        print(f"sentence-transformers folder: not written ({card.sentence_transformers.get('why')})")
    print(f"graphs: {', '.join(f'{n}.onnx' for n in card.graphs)}" + (" (+ .int8.onnx)" if cfg.quantize else ""))
    print(f"export: {out} (model.json describes it)")
    return 0
