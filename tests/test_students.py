"""Students on a tiny random encoder: shapes, loss terms, training, checkpoints, serving paths."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules.datamodule import RelevanceDataModule
from datamodules.validation import DataSource
from lightning_modules import CrossEncoderStudent, TwoTowerStudent
from lightning_modules.two_tower import TowerInputs, in_batch_negatives_loss

STUDENTS = {
    "cross_encoder": (CrossEncoderStudent, {}),
    "two_tower": (TwoTowerStudent, {"pooling": "weighted", "w_in_batch": 0.1, "scorer_hidden": 32}),
}


def build(kind, encoder, synth_dir, **kw):
    cls, extra = STUDENTS[kind]
    dm = RelevanceDataModule(DataSource(path=str(synth_dir)), batch_size=16)
    model = cls(
        encoder=encoder,
        num_levels=dm.num_levels,
        relevant_level=dm.relevant_level,
        lr=1e-3,
        max_seq_length=64,
        log_figures=False,
        **{**extra, **kw},
    )
    return model, dm


def trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


@pytest.mark.parametrize("kind", list(STUDENTS))
def test_forward_and_loss_terms(kind, tiny_encoder, synth_dir, tmp_path):
    model, dm = build(kind, tiny_encoder, synth_dir)
    dm.setup("fit")
    dm.connect(layout=model.input_layout())
    model.level_grades.copy_(torch.tensor(dm.level_grade_means()))
    batch = next(iter(dm.train_dataloader()))
    out = model(batch)
    b = len(batch["example_id"])
    assert out.level_logits.shape == (b, 4) and out.dim_logits.shape == (b, 5, 4) and out.expected_grade.shape == (b,)
    assert torch.allclose(out.probs.sum(-1), torch.ones(b))
    lo, hi = model.level_grades.min(), model.level_grades.max()
    assert ((out.expected_grade >= lo - 1e-5) & (out.expected_grade <= hi + 1e-5)).all()
    terms = model.loss_terms(batch, out)
    expected = {"hard", "grade", "dim"} | ({"in_batch"} if kind == "two_tower" else set())
    assert set(terms) == expected and all(torch.isfinite(v) for v in terms.values())
    # every parameter receives a gradient (DDP needs no find_unused_parameters)
    sum(terms.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    # unlabelled rows and unknown verdicts do not count
    batch["labels"][:] = -100
    batch["grades"][:] = float("nan")
    batch["dim_targets"][:] = -100
    terms = model.loss_terms(batch, model(batch))
    assert all(float(v.detach()) == 0.0 for v in terms.values())


def test_level_grades_are_train_means(tiny_encoder, synth_dir, tmp_path):
    model, dm = build("cross_encoder", tiny_encoder, synth_dir)
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.fit(model, dm)
    assert model.level_grades.tolist() == pytest.approx(dm.level_grade_means())
    assert bool(model.level_grades_set)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(STUDENTS))
def test_training_lowers_loss_and_checkpoint_reloads(kind, tiny_encoder, synth_dir, tmp_path):
    L.seed_everything(0)
    model, dm = build(kind, tiny_encoder, synth_dir, warmup_ratio=0.0, scheduler="constant", head_dropout=0.0)
    dm.setup("fit")
    dm.connect(layout=model.input_layout())
    # a fixed batch of training rows: training must lower the loss on the data it fits
    batch = dm.collator()(dm.datasets["train"].rows[:32])
    model.eval()
    with torch.no_grad():
        before = float(sum(model.loss_terms(batch, model(batch)).values()))
    t = trainer(tmp_path, max_epochs=3, limit_val_batches=2, num_sanity_val_steps=0)
    model.train()
    t.fit(model, dm)
    model.eval()
    with torch.no_grad():
        out = model(batch)
        after = float(sum(model.loss_terms(batch, out).values()))
    assert after < before
    assert {"val/auc", "val/rmse", "val/ndcg10", "val/dim_acc/category"} <= set(t.callback_metrics)
    ckpt = tmp_path / "m.ckpt"
    t.save_checkpoint(ckpt)
    cls = STUDENTS[kind][0]
    loaded = cls.load_from_checkpoint(ckpt)
    loaded.eval()
    with torch.no_grad():
        again = loaded(batch)
    assert torch.allclose(again.level_logits, out.level_logits, atol=1e-5)
    assert torch.equal(loaded.level_grades, model.level_grades)


def test_temperature_is_fitted_on_validation_and_used_outside_it(tiny_encoder, synth_dir, tmp_path):
    """The temperature after a validation epoch is the grid point with the least NLL of the validation labels
    under the raw logits (by hand); training and validation read the raw logits, test and predict the
    calibrated ones; the checkpoint keeps it; a checkpoint without one loads with T = 1. The ECE after calibration
    on other validation queries is logged (cross_fitted_ece on the raw logits, by hand)."""
    from ellm_mkd.calibration import cross_fitted_ece

    L.seed_everything(0)
    model, dm = build("cross_encoder", tiny_encoder, synth_dir, temperature_scaling=True, head_dropout=0.0)
    with torch.no_grad():
        model.level_head.weight.mul_(30.0)  # an overconfident head: the fitted T is well above 1
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0)
    t.fit(model, dm)
    T = float(model.level_temperature)
    assert float(t.callback_metrics["val/temperature"]) == T
    model.eval()
    logits, labels, qids = [], [], []
    with torch.no_grad():
        model.level_temperature.fill_(1.0)
        for batch in dm.val_dataloader():
            logits.append(model(batch).level_logits)
            labels.append(batch["labels"])
            qids.append(batch["query_ids"])
        model.level_temperature.fill_(T)
    logits, labels, qids = torch.cat(logits), torch.cat(labels), torch.cat(qids)
    keep = labels >= 0
    nll = [float(F.cross_entropy(logits[keep] / g, labels[keep], reduction="sum")) for g in model.TEMPERATURE_GRID]
    assert T == float(model.TEMPERATURE_GRID[min(range(len(nll)), key=nll.__getitem__)]) and T > 1.5
    # the ECE after calibration on the other validation queries, logged and kept with the validation results
    cv = cross_fitted_ece(logits[keep], labels[keep], qids[keep].tolist())
    assert float(t.callback_metrics["val/ece_calibrated_cv"]) == pytest.approx(cv, abs=1e-4)
    assert model.last_results["val"]["ece_calibrated_cv"] == pytest.approx(cv, abs=1e-4)
    batch = next(iter(dm.val_dataloader()))
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        calibrated = model(batch)
        model.train()
        raw = model(batch)  # training reads the raw logits
        model.eval()
    assert torch.allclose(calibrated.level_logits * T, raw.level_logits, atol=1e-4)
    assert torch.allclose(raw.level_logits, logits[: len(raw.level_logits)], atol=1e-4)
    assert torch.allclose(calibrated.expected_grade, calibrated.probs @ model.level_grades)
    assert torch.allclose(model.predict_step(batch, 0)["probs"], calibrated.probs)
    ckpt = tmp_path / "t.ckpt"
    t.save_checkpoint(ckpt)
    assert float(CrossEncoderStudent.load_from_checkpoint(ckpt).level_temperature) == T
    old = torch.load(ckpt, weights_only=False)
    del old["state_dict"]["level_temperature"]
    torch.save(old, ckpt)
    assert float(CrossEncoderStudent.load_from_checkpoint(ckpt).level_temperature) == 1.0


def test_calibration_bias_is_fitted_with_the_temperature_on_validation(tiny_encoder, synth_dir, tmp_path):
    """With calibration_bias, the temperature and level biases after a validation epoch are those
    fit_temperature_bias finds on the raw validation logits (by hand); test and predict read raw / T + b; the
    checkpoint keeps the biases, one from before them loads with zeros; a bias without the temperature is refused."""
    from ellm_mkd.calibration import cross_fitted_ece, fit_temperature_bias

    L.seed_everything(0)
    model, dm = build(
        "two_tower", tiny_encoder, synth_dir, temperature_scaling=True, calibration_bias=True, head_dropout=0.0
    )
    with torch.no_grad():
        model.level_head.weight.mul_(30.0)
        model.level_head.bias.copy_(torch.tensor([2.0, -1.0, 0.5, -1.5]))  # a level mix the labels do not have
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0)
    t.fit(model, dm)
    T, bias = float(model.level_temperature), model.level_bias.clone()
    assert float(t.callback_metrics["val/temperature"]) == T
    assert float(t.callback_metrics[f"val/level_bias/{model.level_names[0]}"]) == pytest.approx(float(bias[0]))
    model.eval()
    logits, labels, qids = [], [], []
    with torch.no_grad():
        model.level_temperature.fill_(1.0)
        model.level_bias.zero_()
        for batch in dm.val_dataloader():
            logits.append(model(batch).level_logits)
            labels.append(batch["labels"])
            qids.append(batch["query_ids"])
        model.level_temperature.fill_(T)
        model.level_bias.copy_(bias)
    logits, labels, qids = torch.cat(logits), torch.cat(labels), torch.cat(qids)
    keep = labels >= 0
    hand_t, hand_bias = fit_temperature_bias(logits[keep], labels[keep])
    cv = cross_fitted_ece(logits[keep], labels[keep], qids[keep].tolist(), bias=True)
    assert float(t.callback_metrics["val/ece_calibrated_cv"]) == pytest.approx(cv, abs=1e-4)
    assert T == pytest.approx(hand_t, rel=1e-4) and torch.allclose(bias, hand_bias, atol=1e-4)
    assert float(bias.abs().max()) > 0.1 and abs(float(bias.sum())) < 1e-4
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        calibrated = model(batch)
    assert torch.allclose(calibrated.level_logits, logits[: len(batch["labels"])] / T + bias, atol=1e-4)
    assert torch.allclose(model.predict_step(batch, 0)["probs"], calibrated.probs)
    ckpt = tmp_path / "b.ckpt"
    t.save_checkpoint(ckpt)
    assert torch.equal(TwoTowerStudent.load_from_checkpoint(ckpt).level_bias, bias)
    old = torch.load(ckpt, weights_only=False)
    del old["state_dict"]["level_bias"]
    torch.save(old, ckpt)
    assert not TwoTowerStudent.load_from_checkpoint(ckpt).level_bias.any()
    with pytest.raises(ValueError, match="temperature_scaling"):
        build("two_tower", tiny_encoder, synth_dir, calibration_bias=True)


def test_test_metrics_per_bucket(tiny_encoder, synth_dir, tmp_path):
    model, dm = build("cross_encoder", tiny_encoder, synth_dir)
    t = trainer(tmp_path)
    t.test(model, dm)
    res = model.last_results["test"]
    for key in ("rmse", "auc", "spearman", "ndcg10", "macro_f1", "ece", "unseen/auc", "tail/rmse"):
        assert key in res and not math.isnan(res[key]), key


def test_two_tower_precomputed_vectors_match_forward(tiny_encoder, synth_dir, tmp_path):
    model, dm = build("two_tower", tiny_encoder, synth_dir)
    dm.setup("fit")
    dm.connect(layout=TowerInputs(model.tokenizer, 64))
    model.setup("test")
    batch = next(iter(dm.test_dataloader()))
    model.eval()
    with torch.no_grad():
        out = model(batch)
        q = model.embed_texts(batch["query"], "query")
        d = model.embed_texts(batch["item_text"], "item")
        rep = model.score_vectors(q, d)
        logits = model.level_head(rep)
    assert torch.allclose(logits, out.level_logits, atol=1e-4)
    w = out.extras["item_pool_weights"]
    assert torch.allclose(w.sum(-1), torch.ones(len(w)), atol=1e-5)


def test_in_batch_negatives_loss_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    pos = torch.tensor([True, True, False])
    qid = torch.tensor([0, 1, 1])
    t = 0.5
    loss = in_batch_negatives_loss(q, d, pos, qid, t)
    qn, dn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(d, dim=-1)
    s = qn @ dn.T / t
    # row 0: all three items are candidates; row 1: item 2 is the same query's other item -> masked
    l0 = -torch.log_softmax(s[0], -1)[0]
    l1 = -torch.log_softmax(s[1, :2], -1)[1]
    assert float(loss) == pytest.approx(float((l0 + l1) / 2), rel=1e-6)
    assert float(in_batch_negatives_loss(q, d, torch.zeros(3, dtype=torch.bool), qid, t)) == 0.0


def test_bad_arguments(tiny_encoder):
    with pytest.raises(ValueError, match="relevant_level"):
        CrossEncoderStudent(encoder=tiny_encoder, num_levels=3, relevant_level=3)
    with pytest.raises(ValueError, match="level_grades has 2"):
        CrossEncoderStudent(encoder=tiny_encoder, num_levels=3, level_grades=[1.0, 2.0])


@pytest.mark.slow
def test_cli_fit_test_predict_with_checkpoint(tmp_path, tiny_encoder, synth_dir):
    """fit -> test --ckpt_path -> predict through the real LightningCLI entry (two-tower config)."""
    import subprocess
    import sys
    from pathlib import Path

    cfg = Path(__file__).resolve().parent.parent / "configs" / "students" / "two_tower.yaml"
    common = [
        "--config",
        str(cfg),
        "--model.init_args.encoder",
        tiny_encoder,
        "--data.source.path",
        str(synth_dir),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "tb"),
        "--trainer.enable_progress_bar",
        "false",
        "--data.batch_size",
        "16",
    ]

    def run(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "ellm_mkd", *args], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    run(
        "fit",
        *common,
        "--trainer.max_steps",
        "4",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.val_check_interval",
        "2",
    )
    ckpt = next(tmp_path.rglob("*.ckpt"))
    r = run("test", *common, "--ckpt_path", str(ckpt))
    assert "test/auc" in r.stdout and "test/unseen/auc" in r.stdout
    run("predict", *common, "--ckpt_path", str(ckpt), "--trainer.limit_predict_batches", "2")
    loaded = TwoTowerStudent.load_from_checkpoint(ckpt)
    assert loaded.hparams.pooling == "weighted" and loaded.hparams.encoder == tiny_encoder
