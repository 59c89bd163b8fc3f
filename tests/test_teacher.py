"""The teacher: word-level readout, response-only loss, LoRA checkpoints and export, CLI fit/test.

Unit tests use a tiny random Llama with SmolLM2's tokenizer; the integration tests the bundled SmolLM2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TEACHER_CHAIN, TEACHER_LEVELS

from ellm_mkd.readout import CandidateSet, ReadoutPoint, TeacherReadout, score_points
from ellm_mkd.schema import DIMENSIONS, VERDICTS

LEVELS, CHAIN = TEACHER_LEVELS, TEACHER_CHAIN
QUERY, ITEM = "red drill", "Title: Red Drill | Brand: Voltara"


def _brute(model, prefix_ids, cands):
    """log p(candidate | prefix), one full forward per candidate, renormalised over the set."""
    out = []
    with torch.no_grad():
        for c in cands:
            lp = model(input_ids=torch.tensor([prefix_ids + c])).logits[0].float().log_softmax(-1)
            out.append(sum(lp[len(prefix_ids) - 1 + j, t] for j, t in enumerate(c)))
    return torch.stack(out).log_softmax(-1)


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama):
    from ellm_mkd.models import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_llama).eval(), load_tokenizer(tiny_llama)


def test_candidate_sets_handle_multi_token_and_prefix_words(smollm2_tokenizer):
    tok = smollm2_tokenizer
    cs = CandidateSet(tok, LEVELS, "level:", [tok.eos_token_id])
    assert [len(t) for t in cs.token_ids] == [1, 2, 1, 1]  # " partially relevant" is two tokens
    assert not cs.ambiguous
    amb = CandidateSet(tok, ("relevant", "relevant enough"), "level:", [tok.eos_token_id])
    assert amb.ambiguous and all(t[-1] == tok.eos_token_id for t in amb.token_ids)
    with pytest.raises(ValueError, match="prefixes"):
        CandidateSet(tok, ("relevant", "relevant enough"), "level:")


def test_score_points_equals_sequence_probabilities(tiny_lm):
    model, tok = tiny_lm
    cs = CandidateSet(tok, LEVELS, "level:", [tok.eos_token_id])
    prefix = tok("The answer, level:", add_special_tokens=False)["input_ids"]
    # the text continues with the two-token candidate: its second token is read from the same pass
    written = prefix + cs.token_ids[1]
    other = tok("Something else entirely, level:", add_special_tokens=False)["input_ids"]
    pts = [ReadoutPoint(0, len(prefix), cs), ReadoutPoint(1, len(other), cs)]
    got = score_points(model, [written, other], pts, tok.pad_token_id)
    for p, seq in zip(got, (prefix, other)):
        assert torch.allclose(p, _brute(model, seq, cs.token_ids), atol=1e-4)
        assert abs(float(p.exp().sum()) - 1.0) < 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_score_points_shares_candidate_prefixes_in_one_pass(tiny_llama, impl):
    """Multi-token candidates sharing a first token (" level0".." level3"), read where the text goes on
    with one of them, where it stops, and after a prefix of its own, all in one batched pass."""
    from ellm_mkd.models import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(tiny_llama).eval(), load_tokenizer(tiny_llama)
    model.set_attn_implementation(impl)
    cs = CandidateSet(tok, ("level0", "level1", "level2", "level3"), "level:", [tok.eos_token_id])
    assert all(len(t) == 2 for t in cs.token_ids) and len({t[0] for t in cs.token_ids}) == 1
    a = tok("Short text, level:", add_special_tokens=False)["input_ids"]
    b = tok("A rather longer text than the first one, level:", add_special_tokens=False)["input_ids"]
    own = tok("Its own prefix, level:", add_special_tokens=False)["input_ids"]
    seqs = [a + cs.token_ids[2] + [tok.eos_token_id], b]
    pts = [
        ReadoutPoint(0, len(a), cs),
        ReadoutPoint(1, len(b), cs),
        ReadoutPoint(0, 3, cs),
        ReadoutPoint(1, len(b), cs, prefix_ids=own),
    ]
    got = score_points(model, seqs, pts, tok.pad_token_id, rows_per_pass=2)
    for p, prefix in zip(got, (a, b, a[:3], own)):
        assert torch.allclose(p, _brute(model, prefix, cs.token_ids), atol=1e-4)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_generation_records_what_a_second_pass_would_read(tiny_llama, impl, monkeypatch):
    """Reading at points inside the written text comes from the generation steps, and candidates the
    text does not continue with run as nodes over the generation's cache: the same distributions as
    scoring the finished texts from scratch."""
    from ellm_mkd.models import load_causal_lm, load_tokenizer
    from ellm_mkd.readout import generate_recorded

    model, tok = load_causal_lm(tiny_llama).eval(), load_tokenizer(tiny_llama)
    model.set_attn_implementation(impl)
    cs = CandidateSet(tok, ("level0", "level1", "level2", "level3"), "level:", [tok.eos_token_id])
    verdicts = CandidateSet(tok, VERDICTS, "=>", tok("\n", add_special_tokens=False)["input_ids"])
    record = sorted({t for c in (cs, verdicts) for ids in c.token_ids for t in ids})
    prompts = ["A short prompt:", "A much longer prompt than the other one, with more words in it:"]
    gen = generate_recorded(model, tok, prompts, 12, record, [tok.eos_token_id])
    assert gen.step_logp.shape[:2] == (2, 12) and gen.cache is not None
    pts = []
    for i, text in enumerate(gen.tokens):
        n = gen.prompt_len[i]
        pts += [
            ReadoutPoint(i, n + 3, cs, prefix_ids=text[: n + 3]),  # inside the written text
            ReadoutPoint(i, n + 5, verdicts, prefix_ids=text[: n + 5]),
            ReadoutPoint(i, n + 2, cs, prefix_ids=text[:n] + tok("level:", add_special_tokens=False)["input_ids"]),
        ]
    import ellm_mkd.generation as generation

    with monkeypatch.context() as m:  # no fallback to a second pass over the texts
        m.setattr(generation, "score_points", lambda *a, **k: pytest.fail("scored the texts again"))
        got = gen.score(model, pts, tok.pad_token_id)
    want = score_points(model, gen.tokens, pts, tok.pad_token_id)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-4)
    assert len({tuple(g.tolist()) for g in got}) > 1


def test_generation_stops_rows_that_are_no_longer_viable(tiny_lm):
    """A row whose text ``viable`` rejects stops there; the other rows write what they would have
    written alone, with the same recorded distributions, and the batch ends with its longest row."""
    from ellm_mkd.readout import generate_recorded

    model, tok = tiny_lm
    cs = CandidateSet(tok, ("level0", "level1"), "level:", [tok.eos_token_id])
    record = sorted({t for ids in cs.token_ids for t in ids})
    prompts = ["A short prompt:", "A much longer prompt than the other one, with more words in it:"]
    full = generate_recorded(model, tok, prompts, 10, record, [tok.eos_token_id])
    seen = []

    def viable(i, text):
        seen.append((i, text))
        return i == 1 or len(tok(text, add_special_tokens=False)["input_ids"]) < 3

    part = generate_recorded(model, tok, prompts, 10, record, [tok.eos_token_id], viable=viable)
    n0 = part.prompt_len[0]
    assert len(full.tokens[0]) - n0 == 10 and 3 <= len(part.tokens[0]) - n0 < 10
    assert part.tokens[0] == full.tokens[0][: len(part.tokens[0])] and part.tokens[1] == full.tokens[1]
    assert full.texts[0].startswith(part.texts[0]) and part.texts[1] == full.texts[1]
    assert torch.allclose(part.step_logp[1], full.step_logp[1], atol=1e-5)
    assert {i for i, _ in seen} == {0, 1} and all(t for _, t in seen)
    # once every row is rejected the batch ends: fewer steps than the budget
    short = generate_recorded(
        model,
        tok,
        prompts,
        10,
        record,
        [tok.eos_token_id],
        viable=lambda i, t: len(tok(t, add_special_tokens=False)["input_ids"]) < 2,
    )
    assert short.step_logp.shape[1] < 10 and all(len(t) - n <= 3 for t, n in zip(short.tokens, short.prompt_len))


def test_cot_readout_reads_level_and_every_verdict(tiny_lm):
    model, tok = tiny_lm
    ro = TeacherReadout(model, tok, LEVELS)
    r = ro.cot([QUERY, QUERY], [ITEM, ITEM], responses=[CHAIN, "not a chain"])
    assert r.chains[0] is not None and r.chains[0].level == "partially relevant"
    assert r.errors[0] is None and "line 1" in r.errors[1] and r.parse_failures == 1
    assert torch.allclose(r.level_probs.sum(-1), torch.ones(2), atol=1e-5)
    assert r.verdict_probs.shape == (2, len(DIMENSIONS), len(VERDICTS))
    assert torch.allclose(r.verdict_probs[1], torch.full((len(DIMENSIONS), len(VERDICTS)), 0.25))
    # the level distribution is the one after "level:" at the end of the chain
    prompt = ro.prompts([QUERY], [ITEM], "cot")[0]
    cut = CHAIN[: CHAIN.rindex("level:") + len("level:")]
    ids = tok(prompt, add_special_tokens=False)["input_ids"] + tok(cut, add_special_tokens=False)["input_ids"]
    assert torch.allclose(r.level_probs[0].log(), _brute(model, ids, ro.levels.token_ids), atol=1e-4)
    # the usage verdict is read after its "=>"
    usage_cut = CHAIN[: CHAIN.index("=> partial") + 2]
    ids = tok(prompt, add_special_tokens=False)["input_ids"] + tok(usage_cut, add_special_tokens=False)["input_ids"]
    assert torch.allclose(
        r.verdict_probs[0, DIMENSIONS.index("usage")].log(), _brute(model, ids, ro.verdicts.token_ids), atol=1e-4
    )
    d = ro.direct([QUERY], [ITEM])
    assert d.level_probs.shape == (1, 4) and abs(float(d.level_probs.sum()) - 1) < 1e-5


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_chains_parse_and_keep_the_models_own_distributions(tiny_lm, temperature):
    """A random model writes no chain of its own; constrained, every chain it writes parses, is laid out as the
    renderer would write it, and reads the same distributions as the same text given back to the readout."""
    from ellm_mkd.cot import parse, render

    model, tok = tiny_lm
    q, d = [QUERY, "cordless drill 20v"], [ITEM, 'Title: Voltara 20V "Max" Cordless Drill']
    free = TeacherReadout(model, tok, LEVELS, max_new_tokens=120).cot(q, d)
    assert free.parse_failures == 2
    torch.manual_seed(0)
    ro = TeacherReadout(model, tok, LEVELS, max_new_tokens=200, constrain_chains=True)
    r = ro.cot(q, d, temperature=temperature)
    assert r.parse_failures == 0, r.errors
    for text, chain, query, item in zip(r.rationales, r.chains, q, d):
        assert render(parse(text, query, item, LEVELS)) == text and chain == parse(text, query, item, LEVELS)
    again = ro.cot(q, d, responses=r.rationales)
    assert torch.allclose(again.level_probs, r.level_probs, atol=1e-5)
    assert torch.allclose(again.verdict_probs, r.verdict_probs, atol=1e-5)
    # the writer takes whole words where the model would spell them a piece at a time: a budget of about the
    # chain's own token count is enough (a random model, pieces first, needed several times that)
    n = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in r.rationales)
    torch.manual_seed(0)
    tight = TeacherReadout(model, tok, LEVELS, max_new_tokens=n + 4, constrain_chains=True).cot(
        q, d, temperature=temperature
    )
    assert tight.parse_failures == 0 and tight.rationales == r.rationales, tight.errors


def test_forced_readout_scores_given_chains_and_writes_missing_ones(tiny_lm):
    model, tok = tiny_lm
    ro = TeacherReadout(model, tok, LEVELS, max_new_tokens=8)
    forced = ro.forced([QUERY, QUERY], [ITEM, ITEM], [CHAIN, None])
    scored = ro.cot([QUERY], [ITEM], responses=[CHAIN])
    assert torch.allclose(forced.level_probs[0], scored.level_probs[0], atol=1e-5)  # the given chain, read as in cot
    assert torch.allclose(forced.verdict_probs[0], scored.verdict_probs[0], atol=1e-5)
    assert forced.rationales[0] == CHAIN.strip() and forced.chains[0] is not None
    written = ro.cot([QUERY], [ITEM])  # greedy, so the missing chain is what cot writes
    assert forced.rationales[1] == written.rationales[0]
    assert torch.allclose(forced.level_probs[1], written.level_probs[0], atol=1e-5)


def test_forced_readout_needs_annotations(tiny_llama):
    m = _teacher(tiny_llama, test_mode="forced")
    with pytest.raises(ValueError, match="set data.annotations"):
        m.read({k: v for k, v in _batch().items() if k != "rationale"}, "forced")
    out = m.read(_batch(), "forced")
    assert out.parse_failures == 0 and out.chains[1].level == "irrelevant"


def _teacher(path, **kw):
    from lightning_modules import TeacherLM

    m = TeacherLM(model=path, num_levels=4, lora_r=4, lora_alpha=8, lora_dropout=0.0, **kw)
    m.level_names = LEVELS
    return m


def _batch():
    return {
        "query": [QUERY, "blue paint"],
        "item_text": [ITEM, "Title: Paint"],
        "labels": torch.tensor([1, 0]),
        "rationale": [
            CHAIN,
            CHAIN.replace("red", "blue")
            .replace("Red", "Paint")
            .replace('"drill"', '"paint"')
            .replace('"Drill"', '"Paint"')
            .replace("partially relevant", "irrelevant"),
        ],
        "example_id": ["a", "b"],
    }


def test_responses_put_points_where_the_readout_reads(tiny_llama):
    from lightning_modules.teacher_objective import build_responses

    m = _teacher(tiny_llama)
    tok = m.tokenizer
    direct = build_responses(m.readout, _batch(), "direct", 512, LEVELS)
    assert len(direct) == 2 and direct.kinds == ["level", "level"] and direct.targets == [1, 0]
    assert tok.decode(direct.sequences[0][direct.prompt_lengths[0] :]) == "level: partially relevant" + tok.eos_token
    # the point reads after "level:", where the readout's direct question reads
    assert direct.points[0].prefix_ids == m.readout._ids(m.readout.prompts([QUERY], [ITEM], "direct")[0] + "level:")
    cot = build_responses(m.readout, _batch(), "cot", 512, LEVELS)
    assert cot.kinds == ["verdict"] * 5 + ["level"] + ["verdict"] * 5 + ["level"]
    # match, absent, absent, match, partial, then the level; the second chain says irrelevant
    assert cot.targets[:6] == [VERDICTS.index(v) for v in ("match", "absent", "absent", "match", "partial")] + [1]
    assert cot.targets[11] == 0
    assert tok.decode(cot.sequences[0][cot.prompt_lengths[0] :]) == CHAIN + tok.eos_token
    short = build_responses(m.readout, _batch(), "cot", cot.prompt_lengths[0] + 12, LEVELS)
    assert short.truncated == 2 and "level" not in short.kinds  # the answers were cut off, their points dropped
    unlabelled = {**_batch(), "labels": torch.tensor([-1, 0])}
    assert len(build_responses(m.readout, unlabelled, "direct", 512, LEVELS)) == 1


@pytest.mark.parametrize("pack_tokens", [0, 1024])
def test_objective_terms_equal_hand_computed_ones(tiny_llama, pack_tokens):
    """Each term against one full forward per candidate (the level and verdict distributions as the
    readout renormalises them) and a plain next-token loss over the rest of the response; the same with
    the two chains packed into one row that shares their prompts' common prefix."""
    from lightning_modules.teacher_objective import build_responses

    kw = {"w_level": 1.0, "w_grade": 0.5, "w_verdicts": 0.25, "w_tokens": 0.1, "pack_tokens": pack_tokens}
    m = _teacher(tiny_llama, train_modes=["cot"], **kw)
    m.level_grades = torch.tensor([0.0, 1.0, 2.0, 3.0])
    m.eval()
    lm = m.model
    b = _batch()
    r = build_responses(m.readout, b, "cot", 512, LEVELS)
    level_ce, grade_se, verdict_ce, read = [], [], [], [set(), set()]
    for pt, kind, target in zip(r.points, r.kinds, r.targets):
        cands = pt.cset.token_ids
        lp = _brute(lm, pt.prefix_ids, cands)
        (level_ce if kind == "level" else verdict_ce).append(-lp[target])
        if kind == "level":
            grade_se.append(((lp.exp() @ m.level_grades - m.level_grades[target]) / 3.0) ** 2)
        read[pt.seq].update(pt.cut - 1 + j for j in range(len(cands[target])))
    tokens = []
    with torch.no_grad():
        for i, seq in enumerate(r.sequences):
            lp = lm(input_ids=torch.tensor([seq])).logits[0].float().log_softmax(-1)
            tokens += [-lp[p, seq[p + 1]] for p in range(r.prompt_lengths[i] - 1, len(seq) - 1) if p not in read[i]]
    want = {
        "level": torch.stack(level_ce).mean(),
        "grade": torch.stack(grade_se).mean(),
        "verdicts": torch.stack(verdict_ce).mean(),
        "tokens": torch.stack(tokens).mean(),
    }
    with torch.no_grad():
        loss, means, truncated = m.objective(b)
    assert truncated == 0 and set(means) == set(want)
    for k, v in want.items():
        assert abs(means[k] - float(v)) < 1e-4, (k, means[k], float(v))
    total = 1.0 * want["level"] + 0.5 * want["grade"] + 0.25 * want["verdicts"] + 0.1 * want["tokens"]
    assert abs(float(loss) - float(total)) < 1e-4


def _train(m, steps: int) -> tuple[list[float], dict[str, float]]:
    """``steps`` AdamW steps (lr 1e-2) of the trainable weights on ``_batch()``: the losses and the last term means."""
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss, means, _ = m.objective(_batch())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses, means


def test_lora_trains_adapter_only_and_loss_falls(tiny_llama):
    m = _teacher(tiny_llama)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    losses, means = _train(m, 8)
    assert set(means) == {"level", "grade", "verdicts", "tokens"}
    assert losses[-1] < losses[0] - 0.05, losses


def test_lora_on_the_last_layers_only_adapts_and_trains_those(tiny_llama, tmp_path):
    m = _teacher(tiny_llama, lora_last_layers=1)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".layers.1." in n for n in trainable), trainable
    assert not any(".layers.0." in n and "lora_" in n for n, _ in m.named_parameters())
    losses, _ = _train(m, 8)
    assert losses[-1] < losses[0] - 0.05, losses
    # the exported adapter keeps its layers: loading it rebuilds the same adapter, same outputs
    m.export(tmp_path / "export", merged=False)
    back = _teacher(tiny_llama, adapter=str(tmp_path / "export" / "adapter"))
    adapted = [[n for n, _ in t.named_parameters() if "lora_" in n] for t in (m, back)]
    assert adapted[0] == adapted[1]
    with torch.no_grad():
        assert torch.allclose(m.objective(_batch())[0], back.objective(_batch())[0], atol=1e-5)
    for bad in (0, 3):
        with pytest.raises(ValueError, match="lora_last_layers must be between 1 and the model's 2 layers"):
            _teacher(tiny_llama, lora_last_layers=bad)


def test_merged_adapter_reads_as_the_adapter_does_and_refuses_to_train(tiny_llama, tmp_path):
    m = _teacher(tiny_llama)
    _train(m, 4)  # LoRA B starts at zero: trained, the adapter changes the readout
    m.export(tmp_path / "export", merged=False)
    adapter = str(tmp_path / "export" / "adapter")
    kept, merged = (_teacher(tiny_llama, adapter=adapter, merge_adapter=flag).eval() for flag in (False, True))
    base = _teacher(tiny_llama).eval()
    assert any("lora_" in n for n, _ in kept.named_parameters())
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    read = [t.read(_batch(), "direct").level_probs for t in (kept, merged, base)]
    assert torch.allclose(read[0], read[1], atol=1e-5), (read[0], read[1])
    assert not torch.allclose(read[0], read[2], atol=1e-3)  # the adapter is in the merged weights
    # the cache still names the teacher as trained: teacher.json's hash (base + adapter), as without merging
    info = json.loads((tmp_path / "export" / "teacher.json").read_text())
    assert merged.cache_identity()["weights_hash"] == kept.cache_identity()["weights_hash"] == info["weights_hash"]
    with pytest.raises(ValueError, match=r"merge_adapter: true folded .*adapter into the base weights, for reading"):
        merged.configure_optimizers()


@pytest.mark.parametrize("tied", [True, False])
def test_full_fine_tune_can_keep_the_embeddings_as_loaded(tiny_llama, tmp_path, tied):
    import shutil

    from ellm_mkd.models import load_causal_lm

    path = tiny_llama
    if not tied:  # an output head of its own: it stays as loaded too
        path = str(shutil.copytree(tiny_llama, tmp_path / "untied"))
        lm = load_causal_lm(tiny_llama)
        lm.config.tie_word_embeddings = False
        lm.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.detach().clone())
        lm.save_pretrained(path)
    m = _teacher(path, use_lora=False, freeze_embeddings=True)
    tables = [m.model.get_input_embeddings().weight, m.model.get_output_embeddings().weight]
    assert (tables[0] is tables[1]) == tied
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen and all("embed_tokens" in n or "lm_head" in n for n in frozen)
    losses, _ = _train(m, 6)
    after = dict(m.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], p) for n, p in after.items() if n not in frozen)
    assert losses[-1] < losses[0] - 0.05, losses
    full = _teacher(path, use_lora=False)  # the default trains every weight
    assert all(p.requires_grad for p in full.parameters())


def test_checkpoint_holds_the_adapter_only_and_restores_it(tiny_llama, tmp_path):
    m = _teacher(tiny_llama)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a trained adapter (lora_B starts at zero)
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k or not k.startswith("model.") for k in ckpt["state_dict"])
    assert "level_grades" in ckpt["state_dict"]
    fresh = _teacher(tiny_llama)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    m.eval(), fresh.eval()
    b = _batch()
    assert torch.allclose(
        m.readout.direct(b["query"], b["item_text"]).level_probs,
        fresh.readout.direct(b["query"], b["item_text"]).level_probs,
        atol=1e-6,
    )

    out = m.export(tmp_path / "teacher")
    from ellm_mkd.models import load_causal_lm

    merged = load_causal_lm(str(out / "merged")).eval()
    x = torch.tensor([m.tokenizer("red drill level: exact")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, m.model(input_ids=x).logits, atol=1e-4)
    assert (out / "adapter" / "adapter_config.json").exists()
    info = json.loads((out / "teacher.json").read_text())
    assert info["level_names"] == list(LEVELS) and info["template_fingerprint"]


def _annotate(synth_dir: Path, out: Path, fields: str = "[title,brand]") -> None:
    from ellm_mkd.commands.annotate import annotate_main

    assert (
        annotate_main(
            [
                "--data.source.path",
                str(synth_dir),
                "--data.item_fields",
                fields,
                "--out",
                str(out),
                "--progress",
                "false",
            ]
        )
        == 0
    )


def test_teacher_loaded_without_checkpoint_weighs_graded_data_with_train_means(tiny_llama, tmp_path):
    """A teacher read from its merged directory has no checkpoint to restore the level grades from: on graded data
    (Home Depot's 1..3) its expected grade, RMSE and cache must use the training split's mean grade of each level,
    as fit measured them, not the level indices."""
    import csv

    from datamodules.datamodule import RelevanceDataModule
    from lightning_modules import TeacherLM

    grades = (1.0, 1.33, 2.33, 2.67, 3.0)
    rows = [[str(i), str(100 + i), f"Product {i}", f"query {i // 3}", str(grades[i % 5])] for i in range(90)]
    path = tmp_path / "hd.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["id", "product_uid", "product_title", "search_term", "relevance"], *rows])
    dm = RelevanceDataModule({"path": str(path), "preset": "homedepot"}, item_fields=["title"], relevant_level=2)
    m = TeacherLM(model=tiny_llama, num_levels=3, relevant_level=2, log_figures=False)
    assert not bool(m.level_grades_set)
    m.connect_levels(dm, "test")
    means = dm.level_grade_means()
    assert bool(m.level_grades_set) and m.level_grades.tolist() == pytest.approx(means)
    assert means[0] < 2.0 <= means[1] < 2.5 <= means[2]  # grades, not the indices 0, 1, 2


@pytest.mark.slow
def test_cli_fit_then_test_reports_student_metrics(tiny_llama, synth_dir, tmp_path):
    ann = tmp_path / "ann"
    _annotate(synth_dir, ann)
    run = tmp_path / "run"
    common = [
        "--config",
        "configs/teacher/smollm2_135m_lora.yaml",
        f"--model.init_args.model={tiny_llama}",
        f"--data.source.path={synth_dir}",
        f"--data.annotations={ann}",
        "--data.item_fields=[title,brand]",
        "--data.batch_size=2",
        "--data.eval_batch_size=8",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={run}",
        f"--trainer.logger.init_args.save_dir={run}",
        f"--model.init_args.export_dir={run}/teacher",
        "--model.init_args.max_new_tokens=8",
    ]
    subprocess.run(
        [sys.executable, "-m", "ellm_mkd", "fit", *common, "--trainer.max_steps=3", "--trainer.limit_val_batches=1"],
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    ckpt = run / "tb" / "checkpoints" / "last.ckpt"  # beside the logger's versions, not inside one
    assert ckpt.exists() and ckpt.stat().st_size < 5_000_000  # the adapter, not the base model
    assert (run / "teacher" / "merged" / "config.json").exists()
    from ellm_mkd.commands.lightning_cli import cli_main

    cli = cli_main(["test", *common, f"--ckpt_path={ckpt}", "--trainer.limit_test_batches=1", "--trainer.logger=false"])
    res = cli.model.last_results["test"]
    # a random model writes no valid chain: every pair is a parse failure, read by the fallback
    assert res["parse_failure_rate"] == 1.0
    assert res["count"] > 0 and res["rmse"] > 0 and 0.0 <= res["macro_f1"] <= 1.0
    assert not any(k.startswith("dim_acc/") for k in res)  # no parsed chain, no verdicts to score
    # a test pass can keep its readouts (the demo's report): they are what predict reads for the same pairs
    cli.model.test_outputs = {"example_id": [], "probs": [], "dim_probs": []}
    cli.trainer.limit_test_batches = 1
    cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    kept = cli.model.test_outputs
    cli.datamodule.predict_split, cli.datamodule.predict_dataset = "test", None
    cli.trainer.limit_predict_batches = 1
    pred = cli.trainer.predict(cli.model, cli.datamodule)[0]
    assert kept["example_id"] == list(pred["example_id"]) and len(kept["example_id"]) == len(pred["example_id"]) > 0
    assert torch.allclose(torch.tensor(kept["probs"]), pred["probs"].float(), atol=1e-5)
    assert torch.allclose(torch.tensor(kept["dim_probs"]), pred["dim_probs"].float(), atol=1e-5)
    # the weights hash that teacher.json pins is the one a cache made from the checkpoint or the adapter records
    pinned = json.loads((run / "teacher" / "teacher.json").read_text())["weights_hash"]
    assert cli.model.cache_identity()["weights_hash"] == pinned
    from lightning_modules import TeacherLM

    from_adapter = TeacherLM(model=tiny_llama, adapter=str(run / "teacher" / "adapter"), log_figures=False)
    assert from_adapter.cache_identity()["weights_hash"] == pinned
    assert TeacherLM(model=tiny_llama, log_figures=False).cache_identity()["weights_hash"] != pinned


def test_fit_validates_and_keeps_the_best_weights(tiny_llama, synth_dir, tmp_path):
    """Validation (direct AUC) selects the checkpoint; after fit the model and its export hold the best
    validated weights, and restore_best brings them back over any later change."""
    from ellm_mkd.commands.lightning_cli import cli_main

    ann = tmp_path / "ann"
    _annotate(synth_dir, ann)
    run = tmp_path / "run"
    cli = cli_main(
        [
            "fit",
            "--config",
            "configs/teacher/smollm2_135m_lora.yaml",
            f"--model.init_args.model={tiny_llama}",
            "--model.init_args.train_modes=[direct]",
            "--model.init_args.lr=0.05",
            f"--data.source.path={synth_dir}",
            f"--data.annotations={ann}",
            "--data.item_fields=[title,brand]",
            "--data.batch_size=4",
            "--data.eval_batch_size=16",
            "--trainer.accelerator=cpu",
            "--trainer.max_steps=6",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=2",
            f"--trainer.default_root_dir={run}",
            f"--trainer.logger.init_args.save_dir={run}",
            f"--model.init_args.export_dir={run}/teacher",
            "--model.init_args.save_merged=false",
        ]
    )
    cb = cli.trainer.checkpoint_callback
    assert cb.monitor == "val/auc" and cb.mode == "max"
    scores = {Path(k).name: float(v) for k, v in cb.best_k_models.items()}
    assert scores and float(cb.best_model_score) == max(scores.values())
    best = torch.load(cb.best_model_path, weights_only=False)["state_dict"]
    model = cli.model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(best) >= set(trainable)
    for n, p in trainable.items():
        assert torch.equal(p.detach(), best[n])
    with torch.no_grad():
        for p in trainable.values():
            p.add_(1.0)
    assert model.restore_best() == cb.best_model_path
    assert all(torch.equal(p.detach(), best[n]) for n, p in trainable.items())
    from safetensors.torch import load_file

    exported = load_file(run / "teacher" / "adapter" / "adapter_model.safetensors")
    name = next(n for n in trainable if "lora_B" in n)
    key = next(k for k in exported if k in name.replace(".default", "").removeprefix("model."))
    assert torch.equal(exported[key], best[name])


@pytest.mark.slow
@pytest.mark.integration
def test_smollm2_lora_steps_lower_the_loss_and_readout_is_a_distribution():
    from ellm_mkd.commands.lightning_cli import cpu_has_native_bf16
    from lightning_modules import TeacherLM

    m = TeacherLM(model="smollm2-135m-instruct", num_levels=4, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    m.level_names = LEVELS
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_native_bf16()):  # emulated bf16 is ~20x slower
            loss, _, _ = m.objective(_batch())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    m.eval()
    b = _batch()
    r = m.readout.cot(b["query"], b["item_text"], responses=b["rationale"])
    assert r.parse_failures == 0
    assert torch.allclose(r.level_probs.sum(-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(r.verdict_probs.sum(-1), torch.ones(2, len(DIMENSIONS)), atol=1e-5)


@pytest.mark.slow
@pytest.mark.integration
def test_smollm2_zero_shot_chains_stop_once_they_cannot_parse_with_the_same_readout():
    """The bundled SmolLM2 without fine-tuning breaks the schema: stopping its chains as soon as they
    cannot parse gives the same distributions and parse failures (on the same lines) as writing them
    to the budget, in fewer tokens."""
    from ellm_mkd.models import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm("smollm2-135m-instruct").eval(), load_tokenizer("smollm2-135m-instruct")
    q = [QUERY, "blue paint", "cordless drill 20v"]
    d = [ITEM, "Title: Paint", "Title: Voltara 20V Cordless Drill | Brand: Voltara"]
    whole = TeacherReadout(model, tok, LEVELS, max_new_tokens=64, stop_unparseable=False).cot(q, d)
    fast = TeacherReadout(model, tok, LEVELS, max_new_tokens=64).cot(q, d)
    assert torch.allclose(fast.level_probs, whole.level_probs, atol=1e-5)
    assert torch.allclose(fast.verdict_probs, whole.verdict_probs, atol=1e-5)
    for f, w in zip(fast.errors, whole.errors):
        assert (f is None) == (w is None) and (f is None or f.split(":")[0] == w.split(":")[0])  # "line N"
    assert all(w.startswith(f) for f, w in zip(fast.rationales, whole.rationales))
    assert sum(len(f) < len(w) for f, w in zip(fast.rationales, whole.rationales)) >= 1


@pytest.mark.slow
@pytest.mark.integration
def test_smollm2_zero_shot_chains_parse_when_constrained():
    """The bundled SmolLM2 without fine-tuning writes no chain that parses; constrained, it writes one for each
    pair, its evidence quoting the pair."""
    from ellm_mkd.cot import parse
    from ellm_mkd.models import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm("smollm2-135m-instruct").eval(), load_tokenizer("smollm2-135m-instruct")
    q, d = ["blue paint", "drill"], ["Title: Paint", "Title: Voltara Drill"]  # short texts: short chains
    assert TeacherReadout(model, tok, LEVELS, max_new_tokens=64).cot(q, d).parse_failures == 2
    r = TeacherReadout(model, tok, LEVELS, max_new_tokens=160, constrain_chains=True).cot(q, d)
    assert r.parse_failures == 0, r.errors
    assert [c.level for c in r.chains] == [parse(t, a, b, LEVELS).level for t, a, b in zip(r.rationales, q, d)]
