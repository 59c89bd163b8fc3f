"""``ellm-mkd bench mkd --pool_source``: pools of further (logged) queries instead of more items per labelled
query, on real synthetic catalogs written to disk, a tiny random teacher and a tiny random encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from datamodules.synth import SynthConfig, write
from datamodules.validation import DataSource, load_examples
from ellm_mkd.commands.bench import bench_main
from ellm_mkd.commands.bench.mkd_pools import file_pool_files
from ellm_mkd.schema import normalize_text

FIELDS = ["title", "brand", "color", "attributes"]


def _queries(directory: Path) -> set[str]:
    return {
        normalize_text(q)
        for split in ("train", "val", "test")
        for q in pq.read_table(directory / f"{split}.parquet").column("query").to_pylist()
    }


def _examples(directory: Path):
    """The table the benchmark's data module loads for a catalog directory."""
    return load_examples(DataSource(path=str(directory)))[0]


def _pool_queries(path: str) -> list[str]:
    return [normalize_text(q) for q in pq.read_table(path).column("query").to_pylist()]


def test_pools_of_further_queries_leave_out_own_and_excluded_queries_and_nest(tmp_path):
    own, logs, teacher = tmp_path / "own", tmp_path / "logs", tmp_path / "teacher"
    write(own, SynthConfig(num_queries=40, items_per_query=4))
    write(logs, SynthConfig(num_queries=200, items_per_query=4))  # the same catalog: seed 0
    write(teacher, SynthConfig(num_queries=80, items_per_query=4, seed=0, val_fraction=0.2))
    data = {"source": {"path": str(own)}, "item_fields": FIELDS}
    n = 50
    files = file_pool_files(tmp_path / "out", data, _examples(own), [0, 1, 3], n, str(logs), [str(teacher)], seed=0)
    assert sorted(files) == [1, 3]
    one, three = _pool_queries(files[1]), _pool_queries(files[3])
    shared = (_queries(own) | _queries(teacher)) & _queries(logs)
    assert shared  # the sources do share queries, so leaving them out is tested
    assert not set(three) & (_queries(own) | _queries(teacher))
    assert set(one) < set(three)  # a larger pool holds every smaller one
    per_query = {q: three.count(q) for q in set(three)}
    assert all(one.count(q) == per_query[q] for q in set(one))  # whole queries
    for p, got in ((1, one), (3, three)):  # about p times the labelled pairs: at most one query more
        assert p * n <= len(got) < p * n + max(per_query.values())
    table = pq.read_table(files[3])
    assert table.column_names == ["query", "item_id", *FIELDS]  # labels and verdicts dropped
    # another seed orders the queries otherwise
    other = file_pool_files(tmp_path / "other", data, _examples(own), [1], n, str(logs), [str(teacher)], seed=1)
    assert set(_pool_queries(other[1])) != set(one)


def test_a_pool_source_too_small_for_the_pool_says_so(tmp_path):
    own, logs = tmp_path / "own", tmp_path / "logs"
    write(own, SynthConfig(num_queries=40, items_per_query=4))
    write(logs, SynthConfig(num_queries=50, items_per_query=4))
    data = {"source": {"path": str(own)}, "item_fields": FIELDS}
    with pytest.raises(ValueError, match=r"pool 8x: .*logs holds only \d+ pairs of further queries"):
        file_pool_files(tmp_path / "out", data, _examples(own), [8], 50, str(logs), [], seed=0)


def test_bench_mkd_with_a_pool_of_logged_queries(tmp_path, tiny_llama, tiny_encoder):
    """The teacher judges a pool of further queries' pairs; the MKD row trains on them beside the labelled pairs;
    the catalog itself has no item pool; the report names the pool source."""
    logs = tmp_path / "logs"
    write(logs, SynthConfig(num_queries=120, items_per_query=5))
    out_json, out_md = tmp_path / "mkd_logs.json", tmp_path / "benchmarks.md"
    args = [
        "mkd",
        *("--teacher_dir", tiny_llama, "--teacher_how", "a tiny random model", "--encoder", tiny_encoder),
        *("--work_dir", str(tmp_path / "work"), "--num_queries", "24", "--items_per_query", "5"),
        *("--val_fraction", "0.25", "--test_fraction", "0.25", "--teacher_eval", "16"),
        *("--pools", "[0,1]", "--pool_source", str(logs), "--rows", "[baseline,soft]", "--compare_row", "soft"),
        *("--seeds", "[0]", "--students", "[two_tower]", "--epochs", "1", "--train_batches", "2"),
        *("--name", "mkd_logs", "--out_json", str(out_json), "--out_md", str(out_md)),
    ]
    assert bench_main(args) == 0
    res = json.loads(out_json.read_text())
    work = tmp_path / "work" / "data"
    assert not (work / "pool.parquet").exists()  # no item pool was drawn from the catalog
    pool = pq.read_table(work / "pool_1x.parquet").to_pylist()
    sizes = res["setup"]["split_pairs"]
    assert len(pool) >= sizes["train"] and not {normalize_text(r["query"]) for r in pool} & _queries(work)
    assert res["setup"]["cache_rows"] == sizes["train"] + len(pool)  # the teacher judged the pool
    assert res["setup"]["pool_source"] == str(logs)
    assert [(r["row"], r["pool"]) for r in res["rows"]] == [("baseline", 0), ("soft", 0), ("soft", 1)]
    (config,) = (tmp_path / "work" / "tensorboard" / "two_tower_soft_pool1x_s0").glob("version_*/config.yaml")
    assert str(work / "pool_1x.parquet") in config.read_text()
    assert f"(pairs of further queries from `{logs}`)" in out_md.read_text()


def test_the_pool_source_and_its_exclusions_are_part_of_the_setup_fingerprint():
    """A resumed benchmark never reads a cache written for another pool source (or other exclusions)."""
    from types import SimpleNamespace

    from ellm_mkd.commands.bench.mkd import TEACHER_KEYS, _fingerprint

    def opts(pools, source=None, exclude=()):
        keys = ("num_queries", "items_per_query", "encoder", "epochs", "train_batches", "seed", *TEACHER_KEYS)
        keys += ("val_fraction", "test_fraction")
        return SimpleNamespace(
            **dict.fromkeys(keys, 1),
            pools=pools,
            pool_after=None,
            pool_source=source,
            pool_exclude=list(exclude),
            teacher_calibration=False,
            student_calibration=False,
        )

    data = {"source": {"path": "work/data"}}
    items, logs = _fingerprint(opts([0, 2]), data), _fingerprint(opts([0, 2], "logs"), data)
    assert len({items, logs, _fingerprint(opts([0, 2], "logs", ["teacher"]), data)}) == 3
    assert _fingerprint(opts([0], "logs"), data) == _fingerprint(opts([0]), data)  # no pool: the source is unread
    assert _fingerprint(opts([0, 2], "logs"), data, teacher=False) == _fingerprint(opts([0, 2]), data, teacher=False)
