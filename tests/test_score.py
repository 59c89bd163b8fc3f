"""``ellm-mkd score`` (and ``ellm-mkd predict`` on a student): score files in every format, from an export or a
checkpoint, the two-tower item index, and bad input reported by file, line and column."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from shipping import export_both

from ellm_mkd.commands.main import main

LEVELS = ["irrelevant", "complement", "substitute", "exact"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_encoder, synth_dir) -> dict[str, tuple[Path, Path]]:
    return export_both(tmp_path_factory.mktemp("score"), tiny_encoder, synth_dir, "--sentence_transformers", "false")


def read_scores(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return list(csv.DictReader(path.open()))


@pytest.mark.parametrize("kind", ["cross_encoder", "two_tower"])
def test_score_file_from_export_equals_checkpoint_in_every_format(kind, runs, synth_dir, tmp_path, capsys):
    ckpt, export = runs[kind]
    data = synth_dir / "test.parquet"
    files = {}
    for ext in ("parquet", "csv", "jsonl"):
        files[ext] = tmp_path / f"scores.{ext}"
        args = ["score", str(data), "--model", str(export), "--out", str(files[ext]), "--chunk_rows", "50"]
        assert main([*args, "--progress", "false"]) == 0
    assert f"pairs: {files['jsonl']}" in capsys.readouterr().out
    assert main(["score", str(data), "--model", str(ckpt), "--out", str(tmp_path / "ckpt.parquet")]) == 0
    rows = read_scores(files["parquet"])
    n = pq.read_metadata(data).num_rows
    assert len(rows) == n
    dims = ["category", "brand", "model", "attributes", "usage"]
    want = ["example_id", "query", "item_id", "label", "grade", "expected_grade", "level"]
    want += [f"p_{lv}" for lv in LEVELS] + [c for d in dims for c in (d, f"{d}_p")]
    assert list(rows[0]) == want
    probs = np.array([[r[f"p_{lv}"] for lv in LEVELS] for r in rows])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert {r["level"] for r in rows} <= set(LEVELS) and {r["category"] for r in rows} <= {
        "match",
        "partial",
        "mismatch",
        "absent",
    }
    # the same numbers whatever the format, and from the checkpoint in PyTorch
    for other in (read_scores(files["csv"]), read_scores(files["jsonl"]), read_scores(tmp_path / "ckpt.parquet")):
        assert [r["example_id"] for r in other] == [r["example_id"] for r in rows]
        got = np.array([float(r["expected_grade"]) for r in other])
        assert np.abs(got - np.array([r["expected_grade"] for r in rows])).max() < 1e-5
    # refuses to overwrite
    assert main(["score", str(data), "--model", str(export), "--out", str(files["csv"])]) == 1
    assert "exists (pass --overwrite true" in capsys.readouterr().err


def test_two_tower_item_index_is_built_once_and_reused(runs, synth_dir, tmp_path, capsys):
    ckpt, export = runs["two_tower"]
    data, index = synth_dir / "val.parquet", tmp_path / "index"
    base = ["score", str(data), "--model", str(export), "--item_index", str(index), "--progress", "false"]
    assert main([*base, "--out", str(tmp_path / "a.parquet")]) == 0
    first = capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "b.parquet")]) == 0
    second = capsys.readouterr().out
    n_items = len(set(pq.read_table(data, columns=["item_id"]).column("item_id").to_pylist()))
    assert f"({n_items:,} items; {n_items:,} embedded, 0 reused)" in first
    assert f"({n_items:,} items; 0 embedded, {n_items:,} reused)" in second
    assert main(["score", str(data), "--model", str(export), "--out", str(tmp_path / "c.parquet")]) == 0
    a, c = (pq.read_table(tmp_path / f).column("expected_grade").to_numpy() for f in ("a.parquet", "c.parquet"))
    assert np.abs(a - c).max() < 1e-5  # precomputed item vectors give the same scores
    # an index made by another model is refused
    assert (
        main(["score", str(data), "--model", str(ckpt), "--item_index", str(index), "--out", str(tmp_path / "d.csv")])
        == 1
    )
    assert "this item index was built with model_fingerprint=" in capsys.readouterr().err
    cross = runs["cross_encoder"][1]
    assert (
        main(["score", str(data), "--model", str(cross), "--item_index", str(index), "--out", str(tmp_path / "e.csv")])
        == 1
    )
    assert "--item_index is for a two-tower student" in capsys.readouterr().err


def test_bad_input_is_located_and_policy_applies(runs, tmp_path, capsys):
    export = runs["cross_encoder"][1]
    src = tmp_path / "pairs.csv"
    src.write_text("query,title,item_id\nred drill,Voltara Drill,A1\nblue paint,,A2\nhose,Garden Hose,A3\n")
    out = tmp_path / "s.csv"
    assert main(["score", str(src), "--model", str(export), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "pairs.csv:3: column 'title': title is empty [empty_field]" in err and not out.exists()
    args = ["--on_error", "quarantine", "--quarantine_path", str(tmp_path / "q.jsonl"), "--mapping.item_id", "item_id"]
    assert main(["score", str(src), "--model", str(export), "--out", str(out), *args]) == 0
    assert "rejected rows: 1" in capsys.readouterr().out
    rows = read_scores(out)
    assert [r["item_id"] for r in rows] == ["A1", "A3"] and "label" not in rows[0]  # an unlabelled file
    assert main(["score", str(src), "--model", str(tmp_path / "none"), "--out", str(tmp_path / "x.csv")]) == 1
    assert "none: model not found" in capsys.readouterr().err
    assert main(["score", str(src), "--model", str(export), "--out", str(tmp_path / "x.txt")]) == 1
    assert "cannot tell the output format" in capsys.readouterr().err


def test_predict_on_a_student_writes_a_scores_file(runs, tiny_encoder, synth_dir, tmp_path, capsys):
    ckpt, export = runs["cross_encoder"]
    root = tmp_path / "predict"
    args = ["predict", "--config", "configs/students/cross_encoder.yaml", "--ckpt_path", str(ckpt)]
    args += ["--model.init_args.encoder", tiny_encoder, "--model.init_args.max_seq_length", "48"]
    args += [
        "--data.source.path",
        str(synth_dir),
        "--data.item_fields",
        json.dumps(["title", "brand", "color", "attributes"]),
    ]
    args += ["--trainer.logger", "false", "--trainer.default_root_dir", str(root), "--trainer.accelerator", "cpu"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true"]
    assert main(args) == 0
    path = root / "scores.parquet"
    assert f"scores: {path}" in capsys.readouterr().out
    predicted = {r["example_id"]: r for r in read_scores(path)}
    assert (
        main(
            [
                "score",
                str(synth_dir),
                "--only_split",
                "test",
                "--model",
                str(export),
                "--out",
                str(tmp_path / "s.parquet"),
            ]
        )
        == 0
    )
    scored = read_scores(tmp_path / "s.parquet")
    assert set(predicted) == {r["example_id"] for r in scored}
    for r in scored:
        p = predicted[r["example_id"]]
        assert p["item_id"] == r["item_id"] and p["query"] == r["query"] and p["label"] == r["label"]
        assert abs(p["expected_grade"] - r["expected_grade"]) < 1e-4 and p["category"] == r["category"]
    # a writer listed in the config is used as configured (its own file), not doubled by the default one
    cfg = tmp_path / "writer.yaml"
    cfg.write_text(
        "trainer:\n  callbacks:\n    - class_path: callbacks.StudentScoreWriter\n"
        f"      init_args: {{out: {tmp_path / 'chosen.csv'}}}\n"
    )
    root2 = tmp_path / "predict2"
    again = [a if a != str(root) else str(root2) for a in args]
    assert main([*again, "--config", str(cfg)]) == 0
    assert not (root2 / "scores.parquet").exists()
    chosen = read_scores(tmp_path / "chosen.csv")
    assert {r["example_id"] for r in chosen} == set(predicted)
    # a trainer.predict called from Python (not the command) writes no scores file
    from ellm_mkd.commands.lightning_cli import cli_main

    root3 = tmp_path / "predict3"
    plain = [a if a != str(root) else str(root3) for a in args[1:] if a not in ("--ckpt_path", str(ckpt))]
    cli = cli_main(plain, run=False)
    out = cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt))
    assert len(out) > 0
    assert not list(root3.rglob("scores*"))
