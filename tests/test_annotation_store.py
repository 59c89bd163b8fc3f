"""AnnotationStore on real files: round trips, sharding, resume, manifests, corruption and SIGKILL safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ellm_mkd.annotation_store import AnnotationStore, StoreError, read_annotations, read_manifest

REPO = Path(__file__).resolve().parent.parent
MANIFEST = {
    "teacher": {"backend": "openai-chat", "model": "teacher-7b"},
    "prompt": "abc123",
    "n": 4,
    "created": "2025-01-01T00:00:00Z",
}
FMTS = ["jsonl", "parquet"]


def rows(lo: int, hi: int) -> list[dict]:
    return [
        {
            "example_id": f"ex{i:05d}",
            "query": f"drill {i}",
            "label": i % 4,
            "score": i / 8,
            "ok": i % 2 == 0,
            "note": None,
            "probs": [0.25, 0.5, 0.125, 0.125],
            "texts": ["a", "b"],
            "verdicts": {"brand": "match", "model": "absent"},
        }
        for i in range(lo, hi)
    ]


def shards(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix in (".jsonl", ".parquet") and not p.name.startswith("."))


@pytest.mark.parametrize("fmt", FMTS)
def test_round_trip(tmp_path, fmt):
    with AnnotationStore(tmp_path / "s", MANIFEST, fmt=fmt, rows_per_shard=7) as store:
        store.append(rows(0, 20))
    assert store.rows_written == 20
    table = read_annotations(tmp_path / "s")
    assert table.to_pylist() == rows(0, 20)
    manifest = read_manifest(tmp_path / "s")
    assert manifest == {**json.loads(json.dumps(MANIFEST)), "store_version": 1, "format": fmt}
    assert read_manifest(tmp_path / "s" / "manifest.json") == manifest


def test_both_formats_give_the_same_columns(tmp_path):
    tables = {}
    for fmt in FMTS:
        with AnnotationStore(tmp_path / fmt, MANIFEST, fmt=fmt, rows_per_shard=4) as store:
            store.append(rows(0, 10))
        tables[fmt] = read_annotations(tmp_path / fmt)
    assert tables["jsonl"].schema == tables["parquet"].schema
    assert tables["jsonl"].schema.field("verdicts").type == pa.struct([("brand", pa.string()), ("model", pa.string())])


@pytest.mark.parametrize("fmt", FMTS)
def test_rows_per_shard(tmp_path, fmt):
    store = AnnotationStore(tmp_path, MANIFEST, fmt=fmt, rows_per_shard=10)
    store.append(rows(0, 25))
    assert len(shards(tmp_path)) == 2 and store.rows_written == 20  # 5 rows still buffered
    store.close()
    files = shards(tmp_path)
    assert [f.name for f in files] == [f.name for f in store.shard_files]
    assert all(f.name.startswith(f"part-{store.run_id}-") for f in files)
    sizes = [pq.read_metadata(f).num_rows if fmt == "parquet" else len(f.read_text().splitlines()) for f in files]
    assert sizes == [10, 10, 5] and store.rows_written == 25
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.append(rows(30, 31))


@pytest.mark.parametrize("fmt", FMTS)
def test_resume_skips_done_and_duplicates(tmp_path, fmt):
    with AnnotationStore(tmp_path, MANIFEST, fmt=fmt, rows_per_shard=4) as first:
        first.append(rows(0, 15))
    again = {**MANIFEST, "created": "2025-06-01T00:00:00Z"}  # a volatile key
    with AnnotationStore(tmp_path, again, fmt=fmt, rows_per_shard=4) as second:
        assert second.done_ids() == {f"ex{i:05d}" for i in range(15)}
        assert second.manifest["created"] == MANIFEST["created"]  # the stored manifest stays
        second.append(rows(10, 30) + rows(20, 22))  # 5 done, 2 duplicated within the call
        second.append(rows(29, 31))  # 29 is buffered already
    assert second.run_id != first.run_id
    assert second.skipped_duplicates == 5 + 2 + 1 and second.rows_written == 16
    ids = read_annotations(tmp_path).column("example_id").to_pylist()
    assert sorted(ids) == [f"ex{i:05d}" for i in range(31)]


def test_manifest_mismatch_overwrite_and_format(tmp_path):
    with AnnotationStore(tmp_path, MANIFEST, rows_per_shard=5) as store:
        store.append(rows(0, 12))
    other = {**MANIFEST, "prompt": "def456", "extra": 1}
    with pytest.raises(StoreError) as e:
        AnnotationStore(tmp_path, other)
    msg = str(e.value)
    assert str(tmp_path) in msg and "'prompt'" in msg and '"abc123"' in msg and '"def456"' in msg
    assert "'extra'" in msg and "(absent)" in msg and "overwrite=True" in msg
    with pytest.raises(StoreError, match="holds jsonl shards"):
        AnnotationStore(tmp_path, MANIFEST, fmt="parquet")
    with AnnotationStore(tmp_path, other, fmt="parquet", overwrite=True) as store:
        assert store.done_ids() == set()
        store.append(rows(100, 103))
    assert [p.suffix for p in shards(tmp_path)] == [".parquet"]
    assert read_manifest(tmp_path)["prompt"] == "def456"
    assert read_annotations(tmp_path).column("example_id").to_pylist() == ["ex00100", "ex00101", "ex00102"]


def test_empty_missing_and_bad_inputs(tmp_path):
    AnnotationStore(tmp_path / "empty", MANIFEST).close()
    table = read_annotations(tmp_path / "empty")
    assert table.num_rows == 0 and table.column_names == ["example_id"]
    with pytest.raises(StoreError, match="does not exist") as e:
        read_annotations(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="manifest.json is missing"):
        read_annotations(tmp_path / "plain")
    (tmp_path / "plain" / "part-x-00000.jsonl").write_text('{"example_id": "a"}\n')
    with pytest.raises(StoreError, match="no manifest.json"):
        AnnotationStore(tmp_path / "plain", MANIFEST)
    with pytest.raises(ValueError, match="reserved"):
        AnnotationStore(tmp_path / "r", {"format": "jsonl"})
    store = AnnotationStore(tmp_path / "bad", MANIFEST)
    with pytest.raises(StoreError, match="string 'example_id'"):
        store.append([{"id": "a"}])
    with pytest.raises(StoreError, match="not JSON-able"):
        store.append([{"example_id": "a", "x": object()}])
    store.close()
    pq_store = AnnotationStore(tmp_path / "pq", MANIFEST, fmt="parquet")
    pq_store.append([{"example_id": "a", "x": 1}, {"example_id": "b", "x": "text"}])
    with pytest.raises(StoreError, match="mixed types"):
        pq_store.flush()
    assert [p.name for p in (tmp_path / "pq").iterdir()] == ["manifest.json"]  # no shard, no tmp left


def test_corrupt_shards(tmp_path):
    with AnnotationStore(tmp_path / "j", MANIFEST, rows_per_shard=5) as store:
        store.append(rows(0, 5))
    shard = shards(tmp_path / "j")[0]
    lines = shard.read_text().splitlines()
    lines[2] = lines[2][:40]
    shard.write_text("\n".join(lines) + "\n")
    with pytest.raises(StoreError, match="line 3") as e:
        read_annotations(tmp_path / "j")
    assert shard.name in str(e.value)
    with pytest.raises(StoreError, match="line 3"):
        AnnotationStore(tmp_path / "j", MANIFEST)  # done_ids reads every shard

    with AnnotationStore(tmp_path / "p", MANIFEST, fmt="parquet") as store:
        store.append(rows(0, 5))
    shard = shards(tmp_path / "p")[0]
    shard.write_bytes(shard.read_bytes()[:-20])
    with pytest.raises(StoreError, match="cannot read the parquet shard") as e:
        read_annotations(tmp_path / "p")
    assert shard.name in str(e.value)


def test_stale_tmp_files_and_rank_prefixes(tmp_path):
    AnnotationStore(tmp_path, MANIFEST).close()
    stale = tmp_path / ".tmp-part-20250101T000000000000Z_1_0-00003.jsonl"
    other_rank = tmp_path / ".tmp-part-r1-20250101T000000000000Z_1_0-00000.jsonl"
    for p in (stale, other_rank):
        p.write_text('{"example_id": "half')
    assert read_annotations(tmp_path).num_rows == 0  # readers ignore .tmp- files
    r0 = AnnotationStore(tmp_path, MANIFEST, shard_prefix="part-r0", rows_per_shard=2)
    assert stale.exists() and other_rank.exists()  # not r0's leftovers
    r1 = AnnotationStore(tmp_path, MANIFEST, shard_prefix="part-r1", rows_per_shard=2)
    assert not other_rank.exists() and stale.exists()
    AnnotationStore(tmp_path, MANIFEST).close()
    assert not stale.exists()
    r0.append(rows(0, 2))
    r1.append(rows(2, 4))
    assert r0.done_ids() == r1.done_ids() == {f"ex{i:05d}" for i in range(4)}
    r0.append(rows(2, 3))  # written by rank 1: seen on disk, skipped
    assert r0.skipped_duplicates == 1
    r0.close(), r1.close()
    assert sorted(p.name.split("-")[1] for p in shards(tmp_path)) == ["r0", "r1"]
    with pytest.raises(ValueError, match="shard_prefix"):
        AnnotationStore(tmp_path, MANIFEST, shard_prefix="bad/prefix")


CHILD = """
import sys, time
from ellm_mkd.annotation_store import AnnotationStore
out, fmt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = AnnotationStore(out, {"job": "kill"}, fmt=fmt, rows_per_shard=10)
for start in range(0, n, 5):
    store.append([{"example_id": f"ex{i:05d}", "text": "x" * 4000, "score": i / 7} for i in range(start, start + 5)])
    time.sleep(0.03)
store.close()
"""


@pytest.mark.parametrize("fmt", FMTS)
def test_sigkill_leaves_complete_shards_and_resume_completes(tmp_path, fmt):
    n = 2000  # ~12 s to finish; it is killed after a few shards
    out = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out), fmt, str(n)], env=env, cwd=REPO, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            if out.is_dir() and len(shards(out)) >= 4:
                break
            time.sleep(0.005)
        assert child.poll() is None, f"the child ended early: {child.stderr.read().decode()}"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()

    files = shards(out)
    assert len(files) >= 4
    for f in files:  # every shard on disk is complete
        if fmt == "jsonl":
            assert [json.loads(line)["text"] for line in f.read_text().splitlines()] == ["x" * 4000] * 10
        else:
            assert pq.read_table(f).num_rows == 10
    on_disk = read_annotations(out).column("example_id").to_pylist()
    assert on_disk == [f"ex{i:05d}" for i in range(len(on_disk))] and len(on_disk) % 10 == 0

    (out / f".tmp-part-20250101T000000000000Z_9_0-00007.{fmt}").write_bytes(b'{"example_id": "ex0')
    with AnnotationStore(out, {"job": "kill"}, fmt=fmt, rows_per_shard=64) as resumed:
        assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
        done = resumed.done_ids()
        assert done == set(on_disk)
        for start in range(0, n, 100):
            resumed.append(
                [{"example_id": f"ex{i:05d}", "text": "x" * 4000, "score": i / 7} for i in range(start, start + 100)]
            )
    assert resumed.skipped_duplicates == len(done) and resumed.rows_written == n - len(done)
    ids = read_annotations(out).column("example_id").to_pylist()
    assert len(ids) == n and sorted(ids) == [f"ex{i:05d}" for i in range(n)]
