"""``ellm-mkd data widen``: the teacher's wider labelled set keeps the students' evaluation and pool out."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from datamodules.readers import DataError
from datamodules.synth import SynthConfig, write
from datamodules.widen import widen_examples
from ellm_mkd.schema import normalize_text


def _queries(path) -> set[str]:
    return {normalize_text(q) for q in pq.read_table(path, columns=["query"])["query"].to_pylist()}


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory):
    root = tmp_path_factory.mktemp("widen")
    write(root / "base", SynthConfig(seed=0, num_queries=40, items_per_query=4, pool_items_per_query=4))
    write(root / "extra", SynthConfig(seed=0, num_queries=120, items_per_query=4))
    return root


def test_widen_adds_only_queries_base_never_uses(catalogs, tmp_path):
    base, extra, out = catalogs / "base", catalogs / "extra", tmp_path / "teacher"
    summary = widen_examples(base, extra, out)
    held = set().union(*(_queries(base / f) for f in ("train.parquet", "val.parquet", "test.parquet", "pool.parquet")))
    for split in ("train", "val"):
        widened = pq.read_table(out / f"{split}.parquet")
        base_rows = pq.read_table(base / f"{split}.parquet")
        extra_rows = pq.read_table(extra / f"{split}.parquet")
        ids = widened["example_id"].to_pylist()
        assert ids[: base_rows.num_rows] == base_rows["example_id"].to_pylist()  # base kept whole, first
        assert len(ids) == len(set(ids))
        added = widened.slice(base_rows.num_rows)
        assert added.num_rows > 0 and not _queries_of(added) & held
        # exactly the extra rows whose query base never uses are added, in their order
        kept = [i for i, q in zip(extra_rows["example_id"].to_pylist(), extra_rows["query"].to_pylist())
                if normalize_text(q) not in held]  # fmt: skip
        assert added["example_id"].to_pylist() == kept
        dropped = extra_rows.num_rows - added.num_rows
        assert summary["splits"][split] == {
            "base_rows": base_rows.num_rows,
            "added_rows": added.num_rows,
            "added_queries": len(_queries_of(added)),
            "dropped_rows": dropped,
            "rows": widened.num_rows,
        }
    assert summary["splits"]["train"]["dropped_rows"] > 0  # the two catalogs share queries: the filter acted
    assert pq.read_table(out / "test.parquet").equals(pq.read_table(base / "test.parquet"))
    assert json.loads((out / "widen.json").read_text())["splits"] == summary["splits"]
    assert summary["base_queries_held_out"] == len(held)


def _queries_of(table) -> set[str]:
    return {normalize_text(q) for q in table["query"].to_pylist()}


def test_widen_val_false_keeps_base_validation(catalogs, tmp_path):
    widen_examples(catalogs / "base", catalogs / "extra", tmp_path / "t", widen_val=False)
    assert pq.read_table(tmp_path / "t" / "val.parquet").equals(pq.read_table(catalogs / "base" / "val.parquet"))


def test_widen_errors_name_the_file(catalogs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty / 'train.parquet'}: not found"):
        widen_examples(catalogs / "base", empty, tmp_path / "t")
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    for split in ("train", "val", "test"):
        table = pq.read_table(catalogs / "extra" / f"{split}.parquet")
        pq.write_table(table.drop_columns(["title"]), narrow / f"{split}.parquet")
    with pytest.raises(DataError, match=r"narrow/train.parquet: column\(s\) \['title'\] missing"):
        widen_examples(catalogs / "base", narrow, tmp_path / "t")
    assert not (tmp_path / "t" / "train.parquet").exists()  # nothing half-written


def test_widen_cli(catalogs, tmp_path):
    exe = [sys.executable, "-m", "ellm_mkd", "data", "widen", "--base", str(catalogs / "base")]
    out = tmp_path / "t"
    args = [*exe, "--extra", str(catalogs / "extra"), "--out", str(out)]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "added rows" in r.stdout and (out / "widen.json").is_file()
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 1 and "--overwrite true" in again.stderr  # never replaces tables unasked
    bad = subprocess.run([*exe, "--extra", str(tmp_path), "--out", str(out / "x")], capture_output=True, text=True)
    assert bad.returncode == 1 and f"{tmp_path / 'train.parquet'}: not found" in bad.stderr
    assert "Traceback" not in bad.stderr
