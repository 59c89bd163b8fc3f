"""``ellm-mkd export``: ONNX graphs equal to the student in PyTorch, int8 copies, the model card, the
sentence-transformers folder, and clear errors. Tiny random students; one integration test on MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from shipping import ITEM_FIELDS, export_both, tiny_student, write_run

from ellm_mkd.commands.main import main
from ellm_mkd.serving import ModelCard, Scorer

PAIRS = [
    ("cordless drill 20v", "Title: Voltara 20V Drill | Brand: Voltara"),
    ("paint", "Title: Interior Flat Paint, 1 gal, white, for walls and ceilings | Color: white"),
    ("hose", "Title: Hose"),
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_encoder, synth_dir) -> dict[str, tuple[Path, Path]]:
    return export_both(tmp_path_factory.mktemp("ship"), tiny_encoder, synth_dir, "--quantize", "true")


def _torch_scores(ckpt: Path, pairs):
    from ellm_mkd.commands.score import load_scorer

    scorer, _ = load_scorer(str(ckpt))
    return scorer.score_pairs(*zip(*pairs))


def test_cross_encoder_export_matches_pytorch_and_card_describes_it(exports, synth_dir, capsys):
    ckpt, out = exports["cross_encoder"]
    assert {"cross_encoder.onnx", "cross_encoder.int8.onnx", "model.json", "tokenizer"} <= {
        p.name for p in out.iterdir()
    }
    card = ModelCard.load(out)
    assert card.kind == "cross_encoder" and card.item_fields == ITEM_FIELDS
    assert card.level_names == ["irrelevant", "complement", "substitute", "exact"]  # the catalog's scheme
    assert card.level_grades == pytest.approx([1.0, 1.6, 2.3, 2.9])
    assert card.parity["fp32"]["ok"] and card.parity["fp32"]["max_abs_level_probs"] < 1e-5
    assert card.parity["int8"]["pairs"] == card.parity["fp32"]["pairs"] >= 10
    assert card.training["data"]["sha256"] and card.training["teacher"] is None
    assert card.training["checkpoint_sha256"] and card.metrics["val/ndcg10"] == 0.5
    # a batch and sequence length the export never saw: the axes are dynamic
    ref = _torch_scores(ckpt, PAIRS)
    got = Scorer.from_export(out, batch_size=2).score_pairs(*zip(*PAIRS))
    assert np.abs(got.level_probs - ref.level_probs).max() < 1e-5
    assert np.abs(got.expected_grade - ref.expected_grade).max() < 1e-5
    assert np.abs(got.dim_probs - ref.dim_probs).max() < 1e-5
    assert np.allclose(ref.level_probs.sum(-1), 1.0, atol=1e-5)
    int8 = Scorer.from_export(out, precision="int8").score_pairs(*zip(*PAIRS))
    assert np.abs(int8.level_probs - ref.level_probs).max() < 0.05


def test_sentence_transformers_cross_encoder_scores_the_same(exports):
    from sentence_transformers import CrossEncoder

    ckpt, out = exports["cross_encoder"]
    card = json.loads((out / "model.json").read_text())
    assert card["sentence_transformers"]["path"] == "sentence_transformers"
    ce = CrossEncoder(str(out / "sentence_transformers"), device="cpu")
    probs = ce.predict(PAIRS, apply_softmax=True, show_progress_bar=False)
    ref = _torch_scores(ckpt, PAIRS)
    assert np.abs(np.asarray(probs) - ref.level_probs).max() < 1e-4
    assert ce.model.config.id2label[3] == "exact"


def test_two_tower_exports_towers_and_scorer(exports):
    ckpt, out = exports["two_tower"]
    card = ModelCard.load(out)
    assert set(card.graphs) == {"query_tower", "item_tower", "scorer"}
    assert all((out / g["fp32"]).is_file() and (out / g["int8"]).is_file() for g in card.graphs.values())
    assert card.sentence_transformers["path"] is None and "two-tower" in card.sentence_transformers["why"]
    from lightning_modules.serving_graphs import load_student

    student = load_student(ckpt)
    scorer = Scorer.from_export(out)
    items = [p[1] for p in PAIRS]
    assert np.abs(scorer.embed("item", items) - student.embed_texts(items, "item").numpy()).max() < 1e-5
    ref = _torch_scores(ckpt, PAIRS)
    got = scorer.score_pairs(*zip(*PAIRS))
    assert np.abs(got.level_probs - ref.level_probs).max() < 1e-5
    # the scorer graph alone, on vectors computed ahead of time, gives the same scores
    q = scorer.embed("query", [p[0] for p in PAIRS])
    again = scorer.score_vectors(q, scorer.embed("item", items))
    assert np.abs(again.expected_grade - got.expected_grade).max() < 1e-6


def test_graphs_equal_the_students_forward(tiny_encoder):
    from lightning_modules.serving_graphs import serving_graphs

    student = tiny_student("cross_encoder", tiny_encoder)
    batch = {"query": [p[0] for p in PAIRS], "item_text": [p[1] for p in PAIRS]}
    student.input_layout().encode(batch, with_offsets=False)
    with torch.no_grad():
        want = student(batch)
        probs, grade, dims = serving_graphs(student)["cross_encoder"](
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        )
    assert torch.allclose(probs, want.probs, atol=1e-6) and torch.allclose(grade, want.expected_grade, atol=1e-6)
    assert torch.allclose(dims, want.dim_logits.softmax(-1), atol=1e-6)


def test_export_errors_are_one_line(exports, tmp_path, capsys):
    ckpt, out = exports["cross_encoder"]
    assert main(["export", str(ckpt), "--out", str(out)]) == 1
    assert "exists and is not empty (pass --overwrite true)" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x")]) == 1
    assert "nope.ckpt: checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {"model.lm_head.weight": torch.zeros(1)}, "hyper_parameters": {}}, bad)
    assert main(["export", str(bad), "--out", str(tmp_path / "y")]) == 1
    assert "not a student checkpoint" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--out", str(tmp_path / "z"), "--train_config", str(tmp_path / "no.yaml")]) == 1
    assert "no.yaml: train config not found" in capsys.readouterr().err


@pytest.mark.integration
def test_minilm_cross_encoder_export_parity(tmp_path, synth_dir):
    """The bundled MiniLM-L6 as a cross-encoder: fp32 ONNX equals PyTorch, int8 stays close, and the
    sentence-transformers folder scores the same pairs the same way."""
    ckpt = write_run(tmp_path / "runs", "cross_encoder", "minilm-l6", synth_dir, spread=1.0)
    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--out", str(out), "--quantize", "true"]) == 0
    card = ModelCard.load(out)
    assert card.parity["fp32"]["ok"] and card.parity["fp32"]["max_abs_expected_grade"] < 1e-4
    assert card.parity["int8"]["max_abs_level_probs"] < 0.1
    assert card.parity["sentence_transformers"]["max_abs_level_probs"] < 1e-4
    assert card.encoder == "minilm-l6" and card.max_seq_length == 48
