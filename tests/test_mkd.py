"""MKDistillation: the terms against hand computation, schedules, learning, checkpoints, CLI and DDP."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import rule_signals, run_cli_metrics, save_tiny_bert, write_cache

from callbacks import MKDistillation, Schedule
from datamodules.datamodule import RelevanceDataModule
from datamodules.teacher_signal import CachedTeacher
from ellm_mkd.schema import DIMENSIONS
from lightning_modules import CrossEncoderStudent, TwoTowerStudent

REPO = Path(__file__).resolve().parent.parent
ITEM_FIELDS = ["title", "brand", "color", "attributes"]
STUDENTS = {
    "cross_encoder": (CrossEncoderStudent, {}),
    "two_tower": (TwoTowerStudent, {"pooling": "weighted", "scorer_hidden": 32}),
}


def _cache_for(data: Path, path: Path) -> Path:
    """A cache over train/val/test with the rules' evidence and random teacher distributions; some
    training rows have no signal, some no verdicts, some no chain, so every mask has work to do."""
    dm = RelevanceDataModule({"path": str(data)}, item_fields=ITEM_FIELDS)
    dm.setup("fit")
    sigs = rule_signals(dm)
    for i, s in enumerate(sigs[:120]):  # the first signals are training rows
        if i % 3 == 1:
            s.verdict_probs = None
        elif i % 3 == 2:
            s.rationale, s.evidence = "", []
    sigs = [s for i, s in enumerate(sigs) if i >= 120 or i % 3]  # and 40 have no signal at all
    write_cache(path, dm, sigs)
    return path


@pytest.fixture(scope="module")
def cache(synth_dir, tmp_path_factory) -> Path:
    return _cache_for(synth_dir, tmp_path_factory.mktemp("mkd") / "cache")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """A 40-query catalog and its cache: one epoch of it is quick in several processes."""
    from datamodules.synth import SynthConfig, write

    root = tmp_path_factory.mktemp("mkd_small")
    write(root / "data", SynthConfig(seed=1, num_queries=40, items_per_query=8))
    return root / "data", _cache_for(root / "data", root / "cache")


def build(kind, encoder, synth_dir, cache, batch_size=16, **kw):
    cls, extra = STUDENTS[kind]
    dm = RelevanceDataModule(
        {"path": str(synth_dir)},
        item_fields=ITEM_FIELDS,
        batch_size=batch_size,
        teacher=CachedTeacher(str(cache), missing="hard_label"),
    )
    model = cls(
        encoder=encoder,
        num_levels=dm.num_levels,
        relevant_level=dm.relevant_level,
        max_seq_length=64,
        log_figures=False,
        **{"lr": 1e-3, **extra, **kw},
    )
    return model, dm


def trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kw,
    )


def attach(model, dm, cb):
    """What fit does before the first step, without a trainer: data set up, tokenizer bound, callback set up."""
    dm.setup("fit")
    dm.connect(layout=model.input_layout())
    cb.setup(SimpleNamespace(datamodule=dm), model, "fit")
    model.train()


def first_batch(dm, with_teacher_rows=True):
    for batch in dm.train_dataloader():
        if not with_teacher_rows or (batch["teacher_present"].any() and not batch["teacher_present"].all()):
            return batch
    raise AssertionError("no batch found")


# -- unit ------------------------------------------------------------------------------------------


def test_schedule_factors():
    s = Schedule(delay=0.2, ramp=0.4)
    assert [s.factor(p) for p in (0.0, 0.19, 0.2, 0.4, 0.6, 0.9)] == pytest.approx([0, 0, 0, 0.5, 1, 1])
    assert Schedule(delay=0.5, start=0.25).factor(0.1) == 0.25 and Schedule(delay=0.5).factor(0.5) == 1.0
    with pytest.raises(ValueError, match="lie in"):
        Schedule(delay=1.5)


def test_bad_settings_name_the_option():
    with pytest.raises(ValueError, match="distill.w_soft"):
        MKDistillation(w_soft=-1)
    with pytest.raises(ValueError, match="dim_weights.*colour"):
        MKDistillation(dim_weights={"colour": 2.0})
    with pytest.raises(ValueError, match="schedules.*softt"):
        MKDistillation(schedules={"softt": {"delay": 0.1}})


def test_no_teacher_is_a_clear_error(tiny_encoder, synth_dir, tmp_path):
    model = CrossEncoderStudent(encoder=tiny_encoder, log_figures=False)
    dm = RelevanceDataModule({"path": str(synth_dir)}, item_fields=ITEM_FIELDS)
    with pytest.raises(ValueError, match="needs a teacher signal: set data.teacher"):
        trainer(tmp_path, [MKDistillation()], max_steps=1).fit(model, datamodule=dm)


@pytest.mark.parametrize("kind", list(STUDENTS))
def test_terms_equal_hand_computation(kind, tiny_encoder, synth_dir, cache, tmp_path):
    torch.manual_seed(0)
    model, dm = build(kind, tiny_encoder, synth_dir, cache)
    dw = {"brand": 2.0, "usage": 0.5}
    cb = MKDistillation(
        w_labels=0.7,
        w_soft=1.3,
        kd_temperature=2.0,
        w_dim_kd=0.4,
        dim_weights=dw,
        w_rationale=0.2,
        w_rationale_embedding=0.3,
        schedules={"soft": {"delay": 0.0, "ramp": 0.5}},
    )
    attach(model, dm, cb)
    cb._total_steps = 10
    model.eval()  # no dropout, so the hand computation sees the same forward
    model.training = True  # ... while the callback still counts it as training
    batch = first_batch(dm)
    out = model(batch)
    terms = cb.loss_terms(model, batch, out)
    assert set(terms) == {"labels", "soft", "dim_kd", "rationale", "rationale_embedding"}
    assert terms["soft"].item() == 0.0  # step 0 of 10, ramping over the first half: factor 0

    # soft at factor 1 (progress 0/1 -> 0 < ramp... use a schedule-free callback state)
    cb.schedules = {}
    terms = cb.loss_terms(model, batch, out)
    present = batch["teacher_present"]
    T = 2.0
    pt = batch["teacher_probs"][present].clamp_min(1e-8)
    pt = (pt.log() / T).softmax(-1)
    ls = (out.level_logits[present].float() / T).log_softmax(-1)
    soft = (pt * (pt.log() - ls)).sum(-1).mean() * T * T
    assert terms["soft"].item() == pytest.approx(1.3 * soft.item(), rel=1e-4)

    hard = F.cross_entropy(out.level_logits, batch["labels"])
    assert terms["labels"].item() == pytest.approx(0.7 * hard.item(), rel=1e-5)
    # it takes the place of the student's own hard term: the student leaves that out
    assert cb.replaces() == {"hard"} and MKDistillation(w_labels=None).replaces() == set()

    # dim: rows with verdicts, per-dimension weights, mean over rows, weighted mean over dimensions
    has_v = batch["teacher_verdicts_present"]
    w = torch.tensor([dw.get(d, 1.0) for d in DIMENSIONS])
    tv = batch["teacher_verdict_probs"][has_v].clamp_min(1e-8)
    lv = out.dim_logits[has_v].float().log_softmax(-1)
    per_dim = (tv * (tv.log() - lv)).sum(-1).mean(0)
    assert terms["dim_kd"].item() == pytest.approx(0.4 * (per_dim * w).sum().item() / w.sum().item(), rel=1e-4)

    # rationale: KL(normalised evidence mask || student token distribution), rows with evidence
    def kl_to_mask(dist, mask, attn):
        m = mask * attn
        rows = m.sum(-1) > 0
        q = m[rows] / m[rows].sum(-1, keepdim=True)
        a = dist[rows]
        return torch.where(q > 0, q * (q.clamp_min(1e-30).log() - (a + 1e-8).log()), 0.0).sum(-1).mean()

    if kind == "cross_encoder":
        att = out.extras["attentions"][-1].mean(1) * batch["attention_mask"]  # the last layer's [CLS] row
        att = att / att.sum(-1, keepdim=True)
        rat = kl_to_mask(att, batch["rationale_mask"], batch["attention_mask"])
    else:
        rat = (
            sum(
                kl_to_mask(out.extras[f"{s}_pool_weights"], batch[f"{s}_rationale_mask"], batch[f"{s}_attention_mask"])
                for s in ("query", "item")
            )
            / 2
        )
    assert terms["rationale"].item() == pytest.approx(0.2 * rat.item(), rel=1e-4)

    # embedding: 1 - cos(pair, P(mean of the chain through the frozen encoder)) on rows with a chain
    enc = model.encoder if kind == "cross_encoder" else model.item_encoder
    chain = torch.tensor([bool(r) for r in batch["teacher_rationale"]]) & present
    assert 0 < chain.sum() < len(chain)
    with torch.no_grad():
        h = enc(input_ids=batch["rationale_ids"], attention_mask=batch["rationale_attention_mask"]).last_hidden_state
    m = batch["rationale_attention_mask"].unsqueeze(-1).float()
    r = (h * m).sum(1) / m.sum(1)
    proj = model.training_modules["rationale_projection"]
    cos = F.cosine_similarity(out.pair_embedding[chain].float(), proj(r[chain]).float(), dim=-1)
    assert terms["rationale_embedding"].item() == pytest.approx(0.3 * (1 - cos).mean().item(), rel=1e-4)


def test_cls_attention_from_projections_equals_eager_maps(still_encoder, synth_dir, cache):
    """The cross-encoder reads [CLS]-to-token attention from its layers' own query/key projections
    (the encoder keeps SDPA): the same rows as eager attention maps, with gradients into the encoder."""
    import copy

    model, dm = build("cross_encoder", still_encoder, synth_dir, cache)
    dm.setup("fit")
    dm.connect(layout=model.input_layout())
    model.train()
    eager = copy.deepcopy(model.encoder)
    eager.set_attn_implementation("eager")
    model.request_attentions([0, -1])
    assert model.encoder.config._attn_implementation != "eager"
    batch = first_batch(dm)
    out = model(batch)
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    maps = eager(**kw, output_attentions=True).attentions
    real = batch["attention_mask"][:, None, :].bool()
    for row, full in zip(out.extras["attentions"], (maps[0], maps[-1])):
        assert row.shape == full[:, :, 0, :].shape
        assert torch.allclose(row[real.expand_as(row)], full[:, :, 0, :][real.expand_as(row)], atol=1e-5)
    out.extras["attentions"][0].sum().backward()
    assert model.encoder.embeddings.word_embeddings.weight.grad is not None
    assert not model._projections  # nothing kept past the step
    model.request_attentions([-1, 1])  # one layer named twice (2 layers): one row
    assert len(model(batch).extras["attentions"]) == 1
    model.eval()
    assert "attentions" not in model(batch).extras  # only while training
    with pytest.raises(ValueError, match="attention_layers"):
        model.request_attentions([2])


def test_rows_without_signals_do_not_count(tiny_encoder, synth_dir, cache, tmp_path):
    model, dm = build("cross_encoder", tiny_encoder, synth_dir, cache)
    cb = MKDistillation(w_rationale_embedding=0.0)
    attach(model, dm, cb)
    batch = first_batch(dm)
    out = model(batch)
    keep = batch["teacher_present"]
    base = cb.loss_terms(model, batch, out)
    # scrambling what absent rows carry changes nothing
    b2 = dict(batch)
    b2["teacher_probs"] = batch["teacher_probs"].clone()
    b2["teacher_probs"][~keep] = torch.tensor([0.97, 0.01, 0.01, 0.01])[: dm.num_levels]
    assert cb.loss_terms(model, b2, out)["soft"].item() == pytest.approx(base["soft"].item(), rel=1e-6)
    # a batch with no teacher row gives zeros that still reach every parameter the term uses
    b3 = dict(batch)
    for k in ("teacher_present", "teacher_verdicts_present"):
        b3[k] = torch.zeros_like(batch[k])
    b3["rationale_mask"] = torch.zeros_like(batch["rationale_mask"])
    zero = cb.loss_terms(model, b3, out)
    assert all(v.item() == 0.0 and v.requires_grad for v in zero.values())


@pytest.mark.parametrize("kind", list(STUDENTS))
def test_rationale_alignment_moves_the_student_toward_the_evidence(kind, tiny_encoder, synth_dir, cache, tmp_path):
    """With only the rationale term, a few steps lower it: the student's token distribution learns."""
    torch.manual_seed(0)
    model, dm = build(kind, tiny_encoder, synth_dir, cache, w_hard=0.0, w_grade=0.0, w_dim=0.0, lr=3e-3)
    cb = MKDistillation(w_soft=0.0, w_dim_kd=0.0, w_rationale=1.0, w_rationale_embedding=0.0)
    attach(model, dm, cb)
    batch = first_batch(dm)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(batch)
        loss = cb.loss_terms(model, batch, out)["rationale"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# -- through Lightning -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(STUDENTS))
def test_fit_logs_terms_and_checkpoint_is_the_student_alone(kind, tiny_encoder, synth_dir, cache, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    cls = STUDENTS[kind][0]
    model, dm = build(kind, tiny_encoder, synth_dir, cache)
    cb = MKDistillation(schedules={"rationale": {"delay": 0.5}})
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=CSVLogger(tmp_path, name="log"),
        callbacks=[cb, ckpt],
        default_root_dir=tmp_path,
    )
    t.fit(model, datamodule=dm)
    rows = list(csv.DictReader(open(next((tmp_path / "log").rglob("metrics.csv")))))
    logged = {k for r in rows for k, v in r.items() if v}
    for name in ("soft", "dim_kd", "rationale", "rationale_embedding"):
        assert f"train/loss/{name}" in logged and f"train/mkd/{name}" in logged
    assert "train/mkd/rationale_factor" in logged and "train/mkd/chain_embedding_seconds" in logged

    path = tmp_path / "ckpt" / "last.ckpt"
    raw = torch.load(path, weights_only=False, map_location="cpu")
    fresh = cls(
        encoder=tiny_encoder, num_levels=dm.num_levels, log_figures=False, max_seq_length=64, **STUDENTS[kind][1]
    )
    assert set(raw["state_dict"]) == set(fresh.state_dict())  # no teacher, no projection, no frozen encoder
    assert set(raw["training_modules_state"]) == {
        "training_modules.rationale_projection.linear.weight",
        "training_modules.rationale_projection.linear.bias",
    }
    restored = cls.load_from_checkpoint(path, map_location="cpu")  # strict
    b = next(iter(dm.val_dataloader()))
    model.eval(), restored.eval()
    assert torch.allclose(model(b).level_logits, restored(b).level_logits, atol=1e-5)

    # resume with the callback: the projection comes back as it was saved
    model2, dm2 = build(kind, tiny_encoder, synth_dir, cache)
    cb2 = MKDistillation(schedules={"rationale": {"delay": 0.5}})
    t2 = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=5,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        callbacks=[cb2],
    )
    seen = {}

    class Peek(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["w"] = pl_module.training_modules.rationale_projection.linear.weight.detach().clone()

    t2.callbacks.append(Peek())
    t2.fit(model2, datamodule=dm2, ckpt_path=path)
    assert torch.equal(seen["w"], raw["training_modules_state"]["training_modules.rationale_projection.linear.weight"])


@pytest.mark.parametrize("kind", list(STUDENTS))
def test_training_chains_are_embedded_once_before_the_first_epoch(kind, tiny_encoder, synth_dir, cache, tmp_path):
    """With a teacher cache every training chain is embedded up front (length-sorted batches), each
    vector equal to the chain alone through the frozen encoder; the training steps embed nothing."""
    model, dm = build(kind, tiny_encoder, synth_dir, cache)
    cb = MKDistillation()
    calls = []

    class Count(L.Callback):
        def on_train_start(self, trainer, pl_module):
            pool = cb._pool
            cb._pool = lambda ids, mask: calls.append(len(ids)) or pool(ids, mask)

    trainer(tmp_path, [cb, Count()], max_steps=3, limit_val_batches=0).fit(model, datamodule=dm)
    assert calls == []
    signals = dict(
        zip([r["example_id"] for r in dm.datasets["train"].rows], dm.teacher.signals(dm.datasets["train"].rows))
    )
    chained = {e for e, s in signals.items() if s is not None and s.rationale}
    assert 0 < len(chained) < len(signals) and set(cb._rationale_cache) == chained
    assert cb.chain_embedding_seconds is not None and cb.chain_embedding_seconds > 0
    tok = model.tokenizer
    for e in sorted(chained)[:5]:
        enc = tok([signals[e].rationale], truncation=True, max_length=dm.rationale_max_length, return_tensors="pt")
        with torch.no_grad():
            h = cb._frozen(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        assert torch.allclose(cb._rationale_cache[e], h.mean(1)[0], atol=1e-5)


def test_teacher_hidden_embedding_and_missing_hidden(tiny_encoder, synth_dir, cache, tmp_path):
    model, dm = build("two_tower", tiny_encoder, synth_dir, cache)
    cb = MKDistillation(rationale_embedding="teacher_hidden")
    attach(model, dm, cb)
    assert model.training_modules["rationale_projection"].rationale_dim == 8  # the cache's hidden width
    batch = first_batch(dm)
    assert cb.loss_terms(model, batch, model(batch))["rationale_embedding"].item() > 0


# -- CLI and DDP -----------------------------------------------------------------------------------


def _cli(cmd, tmp, name, kind, encoder, data, cache, *extra):
    return run_cli_metrics(
        cmd,
        REPO / "configs" / "students" / f"{kind}.yaml",
        tmp,
        name,
        "--model.init_args.encoder",
        encoder,
        "--data.source.path",
        str(data),
        "--data.item_fields",
        "[" + ",".join(ITEM_FIELDS) + "]",
        "--data.teacher",
        "datamodules.teacher_signal.CachedTeacher",
        "--data.teacher.cache_dir",
        str(cache),
        "--data.teacher.missing",
        "hard_label",
        "--distill.enabled",
        "true",
        *extra,
    )


@pytest.fixture(scope="module")
def still_encoder(tmp_path_factory, minilm_tokenizer) -> str:
    """A tiny random BERT without dropout: with lr 0 every process computes the same losses."""
    return save_tiny_bert(
        tmp_path_factory.mktemp("still_bert"),
        minilm_tokenizer,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", list(STUDENTS))
def test_two_processes_give_the_loss_of_one(kind, tmp_path, still_encoder, small):
    """One epoch at lr 0 (weights fixed, no dropout): the epoch means of every distillation term,
    reduced over 2 gloo processes with half the batch each, equal the 1-process means; DDP raises
    on any parameter without a gradient, so finishing also proves no unused parameters."""
    common = (
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.num_sanity_val_steps",
        "0",
        "--model.init_args.lr",
        "0",
        "--model.init_args.head_lr",
        "0",
        "--model.init_args.head_dropout",
        "0",
        "--trainer.callbacks",
        "[]",
    )
    data, cache = small
    one = _cli(
        "fit",
        tmp_path,
        "one",
        kind,
        still_encoder,
        data,
        cache,
        "--data.batch_size",
        "8",
        "--trainer.devices",
        "1",
        *common,
    )
    two = _cli(
        "fit",
        tmp_path,
        "two",
        kind,
        still_encoder,
        data,
        cache,
        "--data.batch_size",
        "4",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        *common,
    )
    for name in ("soft", "dim_kd", "rationale", "rationale_embedding"):
        key = f"train/mkd/{name}_epoch" if f"train/mkd/{name}_epoch" in one else f"train/mkd/{name}"
        assert two[key] == pytest.approx(one[key], rel=0.03), key


def test_a_callback_term_replaces_a_student_term_only_when_it_says_so(tiny_encoder, synth_dir, cache, tmp_path):
    """``distill.w_labels`` takes the place of the student's ``hard`` (named, not by a key clash); without it
    the student's ``hard`` stays beside the distillation terms, and a name clash is an error."""
    model, dm = build("cross_encoder", tiny_encoder, synth_dir, cache)
    model.log = lambda *args, **kwargs: None  # no trainer to log to
    for w_labels, expected in ((0.5, {"labels"}), (None, {"hard"})):
        cb = MKDistillation(w_labels=w_labels, w_rationale=0.0, w_rationale_embedding=0.0)
        attach(model, dm, cb)
        model._trainer = SimpleNamespace(callbacks=[cb], global_step=0)
        batch = first_batch(dm)
        names = set(model.loss_terms(batch, model(batch)))
        assert names & {"hard", "labels"} == expected
        assert {"grade", "dim", "soft", "dim_kd"} <= names

    class Clashing:
        def loss_terms(self, pl_module, batch, out):
            return {"grade": out.level_logits.sum() * 0.0}

    model._trainer = SimpleNamespace(callbacks=[Clashing()], global_step=0)
    with pytest.raises(ValueError, match=r"adds loss terms the student already has: \['grade'\]"):
        model.loss_terms(batch, model(batch))
    model._trainer = None
