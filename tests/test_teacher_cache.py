"""Teacher cache: format, writer (real CLI, kill + resume, DDP), manifest checks, join into batches."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from helpers import rule_signals as _rule_signals
from helpers import write_cache as _write_cache

from datamodules.teacher_batch import spans_to_token_mask
from ellm_mkd.annotation_store import StoreError, read_annotations
from ellm_mkd.teacher_cache import (
    SCHEMA_VERSION,
    CacheMismatchError,
    TeacherCache,
    TeacherSignal,
    inspect,
    weights_fingerprint,
)

REPO = Path(__file__).resolve().parent.parent
CACHE_CFG = REPO / "configs" / "teacher" / "cache_smollm2_direct.yaml"
COT_CFG = REPO / "configs" / "teacher" / "cache_smollm2_cot.yaml"
ITEM_FIELDS = ["title", "brand", "color", "attributes"]


def _dm(synth_dir, **kw):
    from datamodules.datamodule import RelevanceDataModule

    kw.setdefault("item_fields", ITEM_FIELDS)
    return RelevanceDataModule({"path": str(synth_dir)}, **kw)


# -- unit -------------------------------------------------------------------------------------------


def test_spans_to_token_mask_overlap_rules():
    offsets = [(0, 0), (0, 4), (5, 10), (11, 14), (0, 0), (0, 3), (4, 8), (0, 0)]
    seq = [None, 0, 0, 0, None, 1, 1, None]
    mask = spans_to_token_mask(offsets, seq, {0: [(6, 8)], 1: [(0, 2)]})
    assert mask == [0, 0, 1, 0, 0, 1, 0, 0]  # partial overlap counts; sides never mix; specials never count


def test_an_unparsed_chain_is_no_rationale_for_students(minilm_tokenizer):
    from datamodules.inputs import TextInputs
    from datamodules.teacher_batch import add_teacher_fields
    from ellm_mkd.teacher_cache import TeacherSignal

    ok = TeacherSignal("a", "red drill", "Title: Red Drill", [0.1, 0.2, 0.3, 0.4], rationale="level: exact")
    bad = TeacherSignal(
        "b",
        "red drill",
        "Title: Red Drill",
        [0.1, 0.2, 0.3, 0.4],
        rationale="The product is",
        parse_error="line 1: expected 'category: ...'",
    )
    batch = {}
    add_teacher_fields(batch, [ok, bad, None], 4, TextInputs(), {})
    assert batch["teacher_rationale"] == ["level: exact", "", ""]


def test_signal_row_round_trip_and_weights_hash():
    s = TeacherSignal(
        "e1",
        "red drill",
        "Title: Drill",
        [0.1, 0.9],
        [[0.25] * 4] * 5,
        "chain",
        None,
        [("category", "query", 4, 9)],
        [0.5, -1.0],
    )
    assert TeacherSignal.from_row(s.to_row()) == s
    m = torch.nn.Linear(3, 2)
    h = weights_fingerprint(m)
    assert h == weights_fingerprint(m)
    with torch.no_grad():
        m.weight[0, 0] += 1e-3
    assert weights_fingerprint(m) != h


# -- reader, checks and join -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rule_cache(synth_dir, tmp_path_factory):
    dm = _dm(synth_dir)
    dm.setup("fit")
    path = tmp_path_factory.mktemp("cache") / "rules"
    sigs = _rule_signals(dm)
    _write_cache(path, dm, sigs)
    return path, {s.example_id: s for s in sigs}


@pytest.mark.parametrize("inputs", ["pair", "towers"])
def test_every_cached_field_reaches_the_batch_unchanged(rule_cache, synth_dir, minilm_tokenizer, inputs):
    from datamodules.teacher_signal import CachedTeacher
    from lightning_modules.cross_encoder import PairInputs
    from lightning_modules.two_tower import TowerInputs

    path, by_id = rule_cache
    dm = _dm(synth_dir, teacher=CachedTeacher(str(path)), batch_size=16)
    dm.connect(layout={"pair": PairInputs, "towers": TowerInputs}[inputs](minilm_tokenizer, 128))
    dm.setup("fit")
    seen = 0
    for batch in dm.train_dataloader():
        assert batch["teacher_present"].all()
        for i, eid in enumerate(batch["example_id"]):
            s = by_id[eid]
            assert torch.equal(batch["teacher_probs"][i], torch.tensor(s.level_probs))
            assert torch.equal(batch["teacher_verdict_probs"][i], torch.tensor(s.verdict_probs))
            assert torch.equal(batch["teacher_hidden"][i], torch.tensor(s.hidden))
            assert batch["teacher_rationale"][i] == s.rationale
            n = int(batch["rationale_attention_mask"][i].sum())
            assert (
                batch["rationale_ids"][i, :n].tolist()
                == minilm_tokenizer(s.rationale, truncation=True, max_length=128)["input_ids"]
            )
            # the tokens marked as rationale are exactly the tokens overlapping the evidence words
            sides = (
                [("pair", "rationale_mask", None)]
                if inputs == "pair"
                else [("query", "query_rationale_mask", "query"), ("item", "item_rationale_mask", "item")]
            )
            for _, key, side in sides:
                enc = (
                    minilm_tokenizer(
                        s.query, s.item_text, truncation="only_second", max_length=128, return_offsets_mapping=True
                    )
                    if side is None
                    else minilm_tokenizer(
                        getattr(s, "query" if side == "query" else "item_text"),
                        truncation=True,
                        max_length=128,
                        return_offsets_mapping=True,
                    )
                )
                seq_ids = enc.sequence_ids()
                want = []
                for (a, b), sid in zip(enc["offset_mapping"], seq_ids):
                    which = ("query" if sid == 0 else "item") if side is None else side
                    spans = [(x, y) for _, sd, x, y in s.evidence if sd == which]
                    want.append(float(sid is not None and b > a and any(a < y and b > x for x, y in spans)))
                got = batch[key][i].tolist()
                assert got[: len(want)] == want and not any(got[len(want) :])
            seen += 1
    assert seen == len(dm.datasets["train"])
    # evidence exists in these chains, so masks are not all empty
    assert batch[("rationale_mask" if inputs == "pair" else "item_rationale_mask")].sum() > 0


def test_manifest_mismatches_are_refused_with_the_key(rule_cache, synth_dir, tmp_path):
    from datamodules.teacher_signal import CachedTeacher

    path, _ = rule_cache
    dm = _dm(synth_dir, item_fields=["title", "brand"], teacher=CachedTeacher(str(path)))
    with pytest.raises(CacheMismatchError, match="item_fields: cache has"):
        dm.setup("fit")
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    (teacher_dir / "teacher.json").write_text(json.dumps({"weights_hash": "other", "template_fingerprint": "t0"}))
    dm = _dm(synth_dir, teacher=CachedTeacher(str(path), teacher_dir=str(teacher_dir)))
    with pytest.raises(CacheMismatchError, match="teacher.weights_hash: cache has 'abc', expected 'other'"):
        dm.setup("fit")
    with pytest.raises(CacheMismatchError, match="schema_version"):
        TeacherCache(path, expect={"schema_version": SCHEMA_VERSION + 1})


def test_stale_texts_and_missing_rows(synth_dir, tmp_path):
    from datamodules.teacher_signal import CachedTeacher

    dm = _dm(synth_dir)
    dm.setup("fit")
    sigs = _rule_signals(dm, splits=("train",))
    stale = [
        TeacherSignal(**{**s.__dict__, "item_text": s.item_text + " x"}) if i == 3 else s for i, s in enumerate(sigs)
    ]
    _write_cache(tmp_path / "stale", dm, stale)
    with pytest.raises(
        ValueError, match=rf"1 cached example\(s\) were made from another query or item text.*{sigs[3].example_id}"
    ):
        _dm(synth_dir, teacher=CachedTeacher(str(tmp_path / "stale"))).setup("fit")

    _write_cache(tmp_path / "half", dm, sigs[: len(sigs) // 2])
    with pytest.raises(
        ValueError, match=rf"{len(sigs) - len(sigs) // 2} of {len(sigs)} training examples have no teacher"
    ):
        _dm(synth_dir, teacher=CachedTeacher(str(tmp_path / "half"))).setup("fit")
    dm2 = _dm(synth_dir, teacher=CachedTeacher(str(tmp_path / "half"), missing="hard_label"), batch_size=len(sigs))
    dm2.setup("fit")
    batch = next(iter(dm2.train_dataloader()))
    assert int(batch["teacher_present"].sum()) == len(sigs) // 2
    assert not batch["teacher_probs"][~batch["teacher_present"]].any()


def test_inspect_shows_manifest_levels_and_highlighted_evidence(rule_cache, capsys, tmp_path):
    from ellm_mkd.commands.main import main

    path, by_id = rule_cache
    text = inspect(path, examples=2)
    assert f"rows: {len(by_id)}" in text and "teacher argmax level:" in text and "mean entropy" in text
    assert "]{category}" in text and "chain:" in text
    assert main(["cache", "inspect", str(path), "--examples", "1"]) == 0
    assert "teacher argmax level:" in capsys.readouterr().out
    assert main(["cache", "inspect", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- writer through the real CLI -------------------------------------------------------------------


def _predict_args(config: Path, model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "predict",
        "--config",
        str(config),
        "--model.init_args.model",
        model,
        "--data.source.path",
        str(data),
        "--trainer.callbacks.init_args.cache_dir",
        str(out),
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.precision",
        "32-true",
        "--trainer.default_root_dir",
        str(out.parent / "predict_run"),
        *extra,
    ]


@pytest.mark.slow
def test_writer_direct_cache_via_cli(tiny_llama, synth_dir, tmp_path, capsys):
    from ellm_mkd.commands.main import main

    out = tmp_path / "cache"
    hidden = ["--trainer.callbacks.init_args.store_hidden", "true"]
    assert (
        main(
            _predict_args(
                CACHE_CFG, tiny_llama, synth_dir, out, *hidden, "--trainer.callbacks.init_args.rows_per_shard", "256"
            )
        )
        == 0
    )
    dm = _dm(synth_dir)
    dm.setup("predict")
    all_ids = {r["example_id"] for s in ("train", "val", "test") for r in dm.datasets[s].rows}
    cache = TeacherCache(out)
    m = cache.manifest
    assert m["row_count"] == len(all_ids) == m["expected_rows"] and m["complete"] is True
    assert m["teacher"]["readout"] == "direct" and len(m["teacher"]["weights_hash"]) == 32 and m["hidden_size"] == 32
    assert set(cache.index) == all_ids
    sig = next(iter(cache.signals(list(all_ids)[:1]).values()))
    assert sum(sig.level_probs) == pytest.approx(1.0, abs=1e-4) and sig.verdict_probs is None and len(sig.hidden) == 32
    assert not list(out.glob(".tmp-*"))
    # the same command again: nothing left to do, nothing written twice
    assert main(_predict_args(CACHE_CFG, tiny_llama, synth_dir, out, *hidden)) == 0
    lock = FileLock(str(out.parent / f".{out.name}.lock"))
    lock.acquire(timeout=0)  # the job released it at its end: free now (Timeout otherwise)
    lock.release()
    # a second writer while one holds the cache stops at once, with nothing written
    shards = sorted(p.name for p in out.glob("*.parquet"))
    with lock.acquire(timeout=0):
        with pytest.raises(StoreError, match="another ellm-mkd predict is writing this teacher cache"):
            main(
                [
                    *_predict_args(
                        CACHE_CFG,
                        tiny_llama,
                        synth_dir,
                        out,
                        *hidden,
                        "--trainer.callbacks.init_args.overwrite",
                        "true",
                    ),
                    "--debug",
                ]
            )
    assert sorted(p.name for p in out.glob("*.parquet")) == shards  # overwrite did not run: the lock comes first
    ids = read_annotations(out).column("example_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(all_ids)
    # another readout (or teacher, template, hidden setting) may not write into this cache
    # (the command says so in one line and exits 1; with --debug the StoreError itself comes through)
    assert (
        main(_predict_args(CACHE_CFG, tiny_llama, synth_dir, out, *hidden, "--model.init_args.test_mode", "cot")) == 1
    )
    assert re.search(
        r"ellm-mkd predict: error: .*different manifest \(differing keys \['teacher'\]\)", capsys.readouterr().err
    )
    with pytest.raises(StoreError, match=r"differing keys \['hidden_size'\]"):
        main([*_predict_args(CACHE_CFG, tiny_llama, synth_dir, out), "--debug"])

    # offline and online: a live teacher gives the same typed signal as the cache it would write
    from datamodules.teacher_signal import CachedTeacher
    from lightning_modules.live_teacher import LiveTeacher

    batches = {}
    for name, source in (("cache", CachedTeacher(str(out))), ("live", LiveTeacher(model=tiny_llama, readout="direct"))):
        dm = _dm(synth_dir, teacher=source, batch_size=8)
        dm.setup("fit")
        batches[name] = dm.collator()(dm.datasets["train"].rows[:8])
    assert batches["cache"]["example_id"] == batches["live"]["example_id"]
    assert torch.allclose(batches["cache"]["teacher_probs"], batches["live"]["teacher_probs"], atol=1e-5)
    assert batches["live"]["teacher_present"].all() and not batches["live"]["teacher_verdicts_present"].any()


def _all_ids(synth_dir) -> set[str]:
    dm = _dm(synth_dir)
    dm.setup("predict")
    return {r["example_id"] for s in ("train", "val", "test") for r in dm.datasets[s].rows}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_writer_leaves_whole_shards_and_resumes(tiny_llama, synth_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "ellm_mkd",
        *_predict_args(
            COT_CFG,
            tiny_llama,
            synth_dir,
            out,
            "--model.init_args.max_new_tokens",
            "12",
            "--trainer.callbacks.init_args.rows_per_shard",
            "32",
            "--data.eval_batch_size",
            "16",
        ),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_annotations(out).num_rows  # every shard on disk reads: none is half-written
    expected = _all_ids(synth_dir)
    assert 0 < partial < len(expected) and partial % 32 == 0
    assert not json.loads((out / "manifest.json").read_text()).get("complete")
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ids = read_annotations(out).column("example_id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == expected
    m = TeacherCache(out).manifest
    assert m["complete"] is True and m["row_count"] == len(expected)
    sig = next(iter(TeacherCache(out).signals(ids[:1]).values()))
    assert sig.rationale == "" and sig.parse_error  # a random tiny model does not write the schema: no rationale


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_writer_shards_without_duplicates(tiny_llama, synth_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "ellm_mkd",
        *_predict_args(CACHE_CFG, tiny_llama, synth_dir, out, "--trainer.strategy", "ddp", "--trainer.devices", "2"),
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    prefixes = {p.name.split("-")[1] for p in out.glob("part-*.parquet")}
    assert prefixes == {"r0", "r1"}  # each rank wrote its own shards
    ids = read_annotations(out).column("example_id").to_pylist()
    expected = _all_ids(synth_dir)
    assert len(ids) == len(set(ids)) and set(ids) == expected  # none twice, none skipped
    m = TeacherCache(out).manifest
    assert m["complete"] is True and m["row_count"] == len(expected)
