"""The ``ellm-mkd`` entry point as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_file

EXE = [sys.executable, "-m", "ellm_mkd"]
REPO = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_help_lists_every_command():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("fit", "validate", "test", "predict", "data", "demo"):
        assert f"\n  {cmd} " in r.stdout
    assert run("frobnicate").returncode == 2


def test_lightning_subcommands_reach_lightning_cli():
    r = run("fit", "--help")
    assert r.returncode == 0 and "--trainer" in r.stdout and "--data.source.path" in r.stdout


def test_synth_then_check(tmp_path):
    out = tmp_path / "cat"
    r = run("data", "synth", "--out", str(out), "--num_queries", "60", "--items_per_query", "6", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert {"train.parquet", "val.parquet", "test.parquet"} <= {p.name for p in out.iterdir()}
    again = run("data", "synth", "--out", str(out), "--num_queries", "60")
    assert again.returncode == 1 and "--overwrite" in again.stderr  # never replaces a catalog unasked
    r = run("data", "check", str(out), "--json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "s.json").read_text())["summary"]
    assert summary["rows"] == sum(d["rows"] for d in summary["splits"].values())
    assert f"examples: {summary['rows']:,}" in r.stdout and "unseen" in r.stdout


def test_check_exit_codes_and_located_errors(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("id,query,title,label\n1,drill,Drill,E\n2,,Saw,E\n3,bit,Bit,Q\n", encoding="utf-8")
    r = run("data", "check", str(p), "--scheme", "esci", "--mapping.source_id", "id")
    assert r.returncode == 1
    assert "bad.csv:3: column 'query': query is empty" in r.stderr
    assert "bad.csv:4: column 'label'" in r.stderr
    q = tmp_path / "rejected.jsonl"
    r = run("data", "check", str(p), "--scheme", "esci", "--on_error", "quarantine", "--quarantine_path", str(q))
    assert r.returncode == 0 and "rejected: 2" in r.stdout and str(q) in r.stdout
    assert len(q.read_text().splitlines()) == 2


def test_check_accepts_a_config_file(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("q\tt\tgrade\ndrill\tDrill\t3\nsaw\tSaw\t1\n", encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mapping: {query: q, title: t, label: grade}\nscheme: {name: ordinal, low: 1, high: 3}\n")
    r = run("data", "check", "--config", str(cfg), str(p))
    assert r.returncode == 0, r.stderr
    assert "rows read: 2" in r.stdout and "label scheme: ordinal" in r.stdout


@pytest.mark.shared_data
def test_check_homedepot_counts():
    path = shared_file("homedepot", "train.csv.zip")
    r = run("data", "check", str(path), "--preset", "homedepot")
    assert r.returncode == 0, r.stderr
    assert "rows read: 74,067" in r.stdout
    assert "distinct strings: 11,795" in r.stdout
    assert "read as cp1252" in r.stdout


@pytest.mark.shared_data
def test_check_esci_sample_counts():
    path = shared_file("esci_sample", "esci_sample.csv")
    r = run("data", "check", str(path), "--preset", "esci")
    assert r.returncode == 0, r.stderr
    assert "rows read: 200" in r.stdout
    for name, n in (("exact", "138"), ("substitute", "49"), ("complement", "1"), ("irrelevant", "12")):
        assert any(line.split()[:2] == [name, n] for line in r.stdout.splitlines()), (name, r.stdout)


def test_bf16_falls_back_to_float32_only_on_cpus_without_native_bf16(monkeypatch):
    import torch

    from ellm_mkd.commands import lightning_cli as lc

    monkeypatch.delenv(lc.KEEP_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(lc, "cpu_has_native_bf16", lambda: False)
    assert lc.resolve_precision("bf16-mixed", "cpu") == "32-true"
    assert lc.resolve_precision("32-true", "cpu") == "32-true"
    assert lc.resolve_precision("bf16-mixed", "gpu") == "bf16-mixed"
    monkeypatch.setenv(lc.KEEP_BF16_ENV, "1")
    assert lc.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    monkeypatch.delenv(lc.KEEP_BF16_ENV)
    monkeypatch.setattr(lc, "cpu_has_native_bf16", lambda: True)
    assert lc.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, synth_dir):
    """A failing command prints one line naming the command and the problem, and exits 1; --debug (or
    ELLM_MKD_DEBUG=1) gives the traceback."""
    args = [
        "test",
        "--config",
        str(REPO / "configs/students/cross_encoder.yaml"),
        "--data.source.path",
        str(synth_dir),
        "--ckpt_path",
        str(tmp_path / "missing.ckpt"),
    ]
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "ellm-mkd test: error:" in r.stderr and "missing.ckpt" in r.stderr and "--debug" in r.stderr
    r = run(*args, "--debug", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = run("cache", "inspect", str(tmp_path / "nothing-here"), cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "nothing-here" in r.stderr


def test_a_cli_built_in_process_is_freed_with_its_model_and_trainer(tiny_encoder, synth_dir):
    """The demo and the benchmarks build one CLI per stage in one process: nothing may keep the last one alive."""
    import gc
    import weakref

    from ellm_mkd.commands.lightning_cli import cli_main

    cli = cli_main(
        ["--config", str(REPO / "configs" / "students" / "cross_encoder.yaml"), "--model.init_args.encoder",
         tiny_encoder, "--data.source.path", str(synth_dir), "--trainer.logger", "false"],
        run=False,
    )  # fmt: skip
    refs = [weakref.ref(x) for x in (cli, cli.model, cli.datamodule, cli.trainer)]
    del cli
    gc.collect()
    assert [r() for r in refs] == [None] * 4
