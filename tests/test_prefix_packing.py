"""Token-tree rows (ellm_mkd.candidate_scoring): sequences that share a prefix packed into one row (the shared
tokens computed once; every distribution, loss and gradient that of a row per sequence), and the model's sliding
window kept along each path."""

from __future__ import annotations

import pytest
import torch
from helpers import TEACHER_CHAIN, TEACHER_LEVELS

from ellm_mkd.candidate_scoring import ROW_MULTIPLE, _pack, _tree_inputs, teacher_forced_scores
from ellm_mkd.readout import ReadoutPoint, score_points

LEVELS, CHAIN = TEACHER_LEVELS, TEACHER_CHAIN


def _teacher(path, **kw):
    from lightning_modules import TeacherLM

    m = TeacherLM(model=path, num_levels=4, use_lora=False, **kw)
    m.level_names = LEVELS
    return m


def _batch(n: int = 4) -> dict:
    queries = ["red drill", "red drill kit", "cordless red drill", "red drill 18v"][:n]
    items = [
        "Title: Red Drill | Brand: Voltara",
        "Title: Red Drill Kit",
        "Title: Red Drill, cordless",
        "Title: Red Drill",
    ][:n]
    return {
        "query": queries,
        "item_text": items,
        "labels": torch.tensor([1, 0, 2, 3][:n]),
        "rationale": [CHAIN] * n,
        "example_id": [str(i) for i in range(n)],
    }


def _responses(m, mode):
    from lightning_modules.teacher_objective import build_responses

    return build_responses(m.readout, _batch(), mode, 512, LEVELS)


def test_pack_shares_the_common_prefix_and_keeps_to_the_budget(tiny_llama):
    r = _responses(_teacher(tiny_llama), "direct")
    seqs = r.sequences
    common = 0
    while all(len(s) > common and s[common] == seqs[0][common] for s in seqs):
        common += 1
    assert common > 10  # the prompts' fixed instructions
    trees, tree_of, where = _pack(seqs, 4096)
    assert len(trees) == 1 and tree_of == [0, 0, 0, 0]
    assert len(trees[0]) <= common + sum(len(s) - common for s in seqs) < sum(map(len, seqs))
    for s, pos in zip(seqs, where):  # each token is where its sequence put it, at the position id it has alone
        assert [trees[0].tokens[p] for p in pos] == s and [trees[0].position_ids[p] for p in pos] == list(range(len(s)))
    budget = max(map(len, seqs)) + 10
    trees, tree_of, _ = _pack(seqs, budget)
    assert len(trees) > 1 and all(len(t) <= budget for t in trees) and tree_of == sorted(tree_of)
    assert len(_pack(seqs, 0)[0]) == len(seqs)


def test_rows_are_padded_to_a_few_widths_and_padding_sees_only_itself(tiny_llama):
    r = _responses(_teacher(tiny_llama), "direct")
    trees, _, _ = _pack(r.sequences, 0)
    ids, pos, visible = _tree_inputs(trees, pad_id=0)
    longest = max(map(len, trees))
    assert ids.shape[1] % ROW_MULTIPLE == 0 and longest <= ids.shape[1] < longest + ROW_MULTIPLE
    for i, t in enumerate(trees):
        pad = torch.arange(len(t), ids.shape[1])
        assert (ids[i, pad] == 0).all() and (visible[i, pad][:, pad] == torch.eye(len(pad), dtype=torch.bool)).all()
        assert not visible[i, : len(t), len(t) :].any() and not visible[i, len(t) :, : len(t)].any()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["direct", "cot"])
def test_packed_rows_give_the_same_scores_losses_and_gradients(tiny_llama, impl, mode):
    m = _teacher(tiny_llama)
    m.model.set_attn_implementation(impl)
    r = _responses(m, mode)
    # and a second copy of the first pair (its points and tokens land on the same tree positions), a text that is
    # the second one cut short (a prefix of another) and one that writes another level where the second one's point
    # reads (a token term there, with no point of its own); the token term over every position of every text
    last = [p for p in r.points if p.seq == 1][-1]
    other = last.cset.token_ids[0] if r.sequences[1][last.cut : last.cut + 1] != last.cset.token_ids[0][:1] else []
    other = other or last.cset.token_ids[-1]
    seqs = [
        *r.sequences,
        r.sequences[0],
        r.sequences[1][:-3],
        r.sequences[1][: last.cut] + other + [m.tokenizer.eos_token_id],
    ]
    copies = [ReadoutPoint(len(r.sequences), p.cut, p.cset, p.prefix_ids) for p in r.points if p.seq == 0]
    pts = [*r.points, *copies]
    positions = [range(0, len(s) - 1) for s in seqs]
    pad = m.tokenizer.pad_token_id
    results = []
    for pack in (0, 4096):
        m.model.zero_grad()
        points, tokens = teacher_forced_scores(m.model, seqs, pts, pad, positions, pack_tokens=pack)
        (torch.stack([p.max() for p in points]).sum() - tokens.sum()).backward()
        grads = {k: v.grad.clone() for k, v in m.model.named_parameters() if v.grad is not None}
        results.append((torch.stack(points).detach(), tokens.detach(), grads))
    (p0, t0, g0), (p1, t1, g1) = results
    assert p0.shape == p1.shape and t0.shape == t1.shape and t0.numel() > 0
    assert torch.allclose(p0, p1, atol=1e-5) and torch.allclose(t0, t1, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        scale = max(1.0, float(g0[k].abs().max()))  # sums of many terms: float error grows with them
        assert float((g0[k] - g1[k]).abs().max()) <= 1e-5 * scale, k


def test_packed_readout_equals_a_row_per_text(tiny_llama):
    """Direct and forced readouts (points after the text and after prefixes of their own), plus a text that
    shares nothing with the others: the same distributions packed or not."""
    m = _teacher(tiny_llama).eval()
    b = _batch()
    unpacked = m.readout.direct(b["query"], b["item_text"]).level_probs
    m.readout.pack_tokens = 4096
    assert torch.allclose(m.readout.direct(b["query"], b["item_text"]).level_probs, unpacked, atol=1e-5)
    tok, cs = m.tokenizer, m.readout.levels
    texts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Query: red drill, level:", "Query: hose, level:")]
    texts.append(tok("Something else entirely, level:", add_special_tokens=False)["input_ids"])
    own = tok("Query: red paint, level:", add_special_tokens=False)["input_ids"]
    pts = [ReadoutPoint(i, len(t), cs) for i, t in enumerate(texts)] + [ReadoutPoint(0, 3, cs, prefix_ids=own)]
    want = score_points(m.model, texts, pts, tok.pad_token_id)
    got = score_points(m.model, texts, pts, tok.pad_token_id, pack_tokens=4096)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)


def test_bench_packing_compares_settings_on_the_same_batches(tmp_path, tiny_llama):
    """``ellm-mkd bench packing`` on a tiny catalog: the same first-batch loss for every setting, fewer tokens
    through the model and one row per batch when packed, and its markdown section."""
    import json

    from datamodules.datamodule import RelevanceDataModule
    from datamodules.synth import SynthConfig, write
    from ellm_mkd.annotation import run_annotation
    from ellm_mkd.commands.bench import bench_main

    data, ann = tmp_path / "data", tmp_path / "annotations"
    write(data, SynthConfig(seed=0, num_queries=16, items_per_query=4))
    fields = ["title", "brand", "color", "attributes"]
    run_annotation(RelevanceDataModule({"path": str(data)}, item_fields=fields), ann, "rules", splits=["train"])
    out_json, out_md = tmp_path / "packing.json", tmp_path / "benchmarks.md"
    args = ["packing", "--data", str(data), "--annotations", str(ann), "--teacher_model", tiny_llama]
    args += ["--batch_size", "4", "--steps", "2", "--readout_pairs", "8", "--pack_tokens", "[0, 4096]"]
    assert bench_main([*args, "--out_json", str(out_json), "--out_md", str(out_md)]) == 0
    res = json.loads(out_json.read_text())
    plain, packed = res["settings"]
    assert (plain["pack_tokens"], packed["pack_tokens"]) == (0, 4096)
    assert plain["rows_per_batch"] == 4 and packed["rows_per_batch"] == 1
    assert packed["tokens_per_batch"] < plain["tokens_per_batch"]
    assert packed["loss_difference"] < 1e-4 and plain["loss_difference"] == 0
    assert packed["step_s"] > 0 and packed["readout_pairs_per_s"] > 0
    assert packed["step_speedup"] == plain["step_s"] / packed["step_s"]
    assert "| 4096 | 1.0 |" in out_md.read_text()


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory, smollm2_tokenizer):
    """A randomly initialised 2-layer Gemma 3 (a sliding layer with a 4-token window, then a full one)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    tok = smollm2_tokenizer
    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return Gemma3ForCausalLM(cfg).eval(), tok


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("pack", [0, 4096])
def test_tree_rows_keep_the_sliding_window_of_the_model(tiny_gemma, impl, pack):
    """Texts much longer than the sliding window, read by the trees (packed or not) and by the model's own forward
    pass: the same distributions, so the sliding layers see only the window along each path."""
    from ellm_mkd.candidate_scoring import CandidateSet

    model, tok = tiny_gemma
    model.set_attn_implementation(impl)
    cs = CandidateSet(tok, LEVELS, "level:", [tok.eos_token_id])
    head = "Answer with level: one of four words. Query: "
    texts = [tok(head + q + ", level:", add_special_tokens=False)["input_ids"] for q in ("red drill", "garden hose")]
    assert min(map(len, texts)) > 3 * 4
    pts = [ReadoutPoint(i, len(t), cs) for i, t in enumerate(texts)] + [ReadoutPoint(0, 9, cs)]
    got = score_points(model, texts, pts, tok.pad_token_id, pack_tokens=pack)
    for g, prefix in zip(got, (texts[0], texts[1], texts[0][:9])):
        want = []
        with torch.no_grad():
            for c in cs.token_ids:
                lp = model(input_ids=torch.tensor([prefix + c])).logits[0].float().log_softmax(-1)
                want.append(sum(lp[len(prefix) - 1 + j, t] for j, t in enumerate(c)))
        assert torch.allclose(g, torch.stack(want).log_softmax(-1), atol=1e-4)


_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_tree_rows_match_a_plain_forward_on_each_device(arch, impl, device, tiny_gemma, tiny_llama):
    """Sequences with a long shared prefix, packed into one tree row and one row each, on the CPU and (where there
    is one) a CUDA GPU: every hidden state is that of the model's own causal forward pass over that sequence alone."""
    import copy

    from transformers import LlamaForCausalLM

    from ellm_mkd.candidate_scoring import _tree_hidden

    model = copy.deepcopy(tiny_gemma[0]) if arch == "gemma3" else LlamaForCausalLM.from_pretrained(tiny_llama)
    model = model.eval().to(device)
    model.set_attn_implementation(impl)
    torch.manual_seed(0)
    prefix = torch.randint(1, 500, (60,)).tolist()
    seqs = [prefix + torch.randint(1, 500, (n,)).tolist() for n in (20, 35, 7, 50)]
    with torch.no_grad():
        for pack in (0, 4096):
            trees, tree_of, where = _pack(seqs, pack)
            hidden = _tree_hidden(model, trees, 0)
            for i, s in enumerate(seqs):
                want = model.model(input_ids=torch.tensor([s], device=device)).last_hidden_state[0]
                assert torch.allclose(hidden[tree_of[i], where[i]], want, atol=1e-3), (pack, i)
