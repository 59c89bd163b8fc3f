"""Two 'nodes' on 127.0.0.1: the multi-node path run as a cluster runs it, on CPUs (gloo).

Every 2-node run is two launchers, ``torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 1 --master_addr
127.0.0.1 --master_port P -m ellm_mkd ...`` (the form of ``scripts/torchrun/common.sh``, with ``--max_restarts 0``:
a stopped job ends, and the test starts it again as a scheduler's requeue would), each in its own process group
with its own log, under a hard timeout that kills both groups (a collective one rank never joins waits for ever).
The trainer is the shipped overlay ``configs/trainer/multinode.yaml`` with ``num_nodes 2, devices 1``, CPU, fp32;
the models are tiny random ones (a 2-layer Llama teacher, a 2-layer BERT student without dropout).

* Teacher cache: ``predict`` with ``configs/teacher/cache_smollm2_direct.yaml`` on 2 nodes writes each node's
  shards (``part-r0``, ``part-r1``), every example exactly once, and the distributions of a 1-process cache.
* Student: ``fit`` with ``configs/students/cross_encoder.yaml`` + ``configs/mkd/soft.yaml`` from that cache: both
  nodes train every step, one checkpoint directory, and the weights and metrics of a 1-process run with the same
  global batch (4 rows per node, 8 in the one process).
* Preemption: SIGTERM to node 1's launcher in the middle of epoch 1 (torchrun passes it to its worker). Both
  nodes stop at the same batch and ``last.ckpt`` is saved there (``callbacks.CheckpointOnPreemption`` has the
  ranks agree at each batch's end; with Lightning's own handler alone the signalled rank waited in a broadcast
  until its launcher SIGKILLed it, and nothing was saved). ``--ckpt_path last`` on both nodes goes on from that
  step, trains the batches that epoch had left (``RelevanceDataModule`` saves the position; Lightning alone
  restarts the epoch's data from its first batch) and ends with the weights and metrics of the uninterrupted run.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_bert

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
}
HW = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
NODES = ["--config", "configs/trainer/multinode.yaml", "--trainer.num_nodes", "2", "--trainer.devices", "1", *HW]
ONE = ["--config", "configs/trainer/multinode.yaml", "--trainer.num_nodes", "1", "--trainer.devices", "1", *HW]
TIMEOUT = 300  # seconds for one run; a few tens of seconds each on a busy 2-core machine
EPOCHS, BATCHES = 2, 6  # of a student fit: 12 optimizer steps
HOLD = 7  # the preempted run: node 1 is signalled after step 7, the first batch of epoch 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """One run: ``nodes`` torchrun launchers (``nodes=0``: one plain ``python -m ellm_mkd`` process), each in its
    own process group, writing ``<name>.node<r>.log``."""

    def __init__(self, tmp: Path, name: str, args: list[str], nodes: int = 2):
        self.name, self.procs = name, []
        self.logs = [tmp / f"{name}.node{r}.log" for r in range(max(nodes, 1))]
        port = free_port()
        for rank, log in enumerate(self.logs):
            launcher = ["-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(rank)]
            launcher += ["--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
            launcher += ["--max_restarts", "0"]
            cmd = [sys.executable, *(launcher if nodes else []), "-m", "ellm_mkd", *args]
            with open(log, "w") as out:
                self.procs.append(
                    subprocess.Popen(
                        cmd, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )

    def out(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def tails(self, n: int = 3000) -> str:
        return "\n".join(f"--- {self.name}, node {r} ---\n{self.out(r)[-n:]}" for r in range(len(self.logs)))

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def wait(self, deadline: float) -> list[int]:
        """Exit codes; a run still going at ``deadline`` (monotonic) is killed and fails the test."""
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"{self.name} did not finish in time (a rank waits in a collective?):\n{self.tails()}")
        return [p.returncode for p in self.procs]

    def check(self, deadline: float) -> Job:
        assert self.wait(deadline) == [0] * len(self.procs), self.tails()
        return self


def run_all(*jobs: Job) -> list[Job]:
    """Waits for jobs started together (they share the machine), each within TIMEOUT of the start."""
    deadline = time.monotonic() + TIMEOUT
    try:
        return [job.check(deadline) for job in jobs]
    finally:
        for job in jobs:
            job.kill()


class StepFiles(__import__("lightning").pytorch.Callback):
    """Touches ``<out>/rank<R>.step<S>`` after every training batch: per-rank evidence, and a clock for the test.
    With ``hold_at``, rank 0 waits there until ``<out>/go`` exists (the test signals a node meanwhile)."""

    def __init__(self, out: str, hold_at: int = -1):
        self.out, self.hold_at = Path(out), hold_at

    def on_train_batch_end(self, trainer, *args) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.step{trainer.global_step}").touch()
        if trainer.global_rank == 0 and trainer.global_step == self.hold_at:
            deadline = time.monotonic() + TIMEOUT
            while not (self.out / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)


def steps(marks: Path) -> dict[int, list[int]]:
    """Rank -> the global steps it finished, from :class:`StepFiles`."""
    out: dict[int, list[int]] = {0: [], 1: []}
    for p in marks.glob("rank*.step*"):
        rank, step = p.name[4:].split(".step")
        out.setdefault(int(rank), []).append(int(step))
    return {r: sorted(s) for r, s in out.items()}


def ranks_joined(job: Job) -> None:
    for r in (0, 1):
        assert f"Initializing distributed: GLOBAL_RANK: {r}, MEMBER: {r + 1}/2" in job.out(r), job.tails()


def by_epoch(metrics_csv: Path) -> dict[int, dict[str, float]]:
    """The last value of every metric in each epoch of a CSVLogger file (rank 0 writes it: epoch metrics are
    reduced over the ranks)."""
    out: dict[int, dict[str, float]] = {}
    for row in csv.DictReader(open(metrics_csv)):
        values = {k: float(v) for k, v in row.items() if v not in ("", None)}
        out.setdefault(int(values["epoch"]), {}).update(values)
    return out


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def max_weight_diff(a: Path, b: Path) -> float:
    sa, sb = ckpt(a)["state_dict"], ckpt(b)["state_dict"]
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].is_floating_point())


# -- the runs, once for the tests below -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    """320 pairs over 40 queries: 232 train (29 batches of 8), 32 val, 56 test."""
    from datamodules.synth import SynthConfig, write

    out = tmp_path_factory.mktemp("multinode_data") / "data"
    write(out, SynthConfig(seed=1, num_queries=40, items_per_query=8))
    return out


@pytest.fixture(scope="module")
def still_encoder(tmp_path_factory, minilm_tokenizer) -> str:
    """A tiny random BERT without dropout: 1 and 2 processes compute the same steps."""
    kw = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return save_tiny_bert(tmp_path_factory.mktemp("still_bert"), minilm_tokenizer, **kw)


def predict_args(tiny_llama: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "predict",
        "--config",
        "configs/teacher/cache_smollm2_direct.yaml",
        "--model.init_args.model",
        tiny_llama,
        "--data.source.path",
        str(data),
        "--trainer.callbacks.init_args.cache_dir",
        str(out),
        "--trainer.callbacks.init_args.rows_per_shard",
        "64",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(out.parent / f"{out.name}_run"),
        *extra,
    ]


@pytest.fixture(scope="module")
def caches(tiny_llama, catalog, tmp_path_factory) -> tuple[Job, Path, Path]:
    """The teacher cache written by 2 nodes, and by 1 process (at the same time)."""
    tmp = tmp_path_factory.mktemp("multinode_cache")
    two = Job(tmp, "cache2", predict_args(tiny_llama, catalog, tmp / "two", *NODES))
    one = Job(tmp, "cache1", predict_args(tiny_llama, catalog, tmp / "one", *HW), nodes=0)
    run_all(two, one)
    return two, tmp / "two", tmp / "one"


def fit_args(encoder: str, data: Path, cache: Path, root: Path, batch_size: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        "configs/students/cross_encoder.yaml",
        "--config",
        "configs/mkd/soft.yaml",
        "--model.init_args.encoder",
        encoder,
        "--model.init_args.head_dropout",
        "0",
        "--model.init_args.lr",
        "1e-3",  # large enough that 12 steps move every metric
        "--model.init_args.head_lr",
        "1e-2",
        "--data.source.path",
        str(data),
        "--data.teacher.init_args.cache_dir",
        str(cache),
        "--data.batch_size",
        str(batch_size),
        "--trainer.max_epochs",
        str(EPOCHS),
        "--trainer.limit_train_batches",
        str(BATCHES),
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.logger.init_args.name",
        "soft",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.callbacks+=test_multinode.StepFiles",
        "--trainer.callbacks.init_args.out",
        str(root / "marks"),
        *extra,
    ]


@pytest.fixture(scope="module")
def fits(caches, still_encoder, catalog, tmp_path_factory) -> tuple[Job, Path, Path]:
    """The student fit from the 2-node cache on 2 nodes (batch 4 each) and in 1 process (batch 8)."""
    tmp = tmp_path_factory.mktemp("multinode_fit")
    cache = caches[1]
    two = Job(tmp, "fit2", fit_args(still_encoder, catalog, cache, tmp / "two", 4, *NODES))
    one = Job(tmp, "fit1", fit_args(still_encoder, catalog, cache, tmp / "one", 8, *ONE), nodes=0)
    run_all(two, one)
    return two, tmp / "two", tmp / "one"


# -- (b) the teacher cache --------------------------------------------------------------------------------------


def test_two_nodes_write_the_cache_of_one_process(caches):
    import pyarrow.parquet as pq

    from ellm_mkd.annotation_store import read_annotations
    from ellm_mkd.teacher_cache import TeacherCache

    job, two, one = caches
    ranks_joined(job)
    ids: dict[str, list[str]] = {}
    for rank in (0, 1):  # each node wrote its own shards, rows_per_shard at a time
        shards = sorted(two.glob(f"part-r{rank}-*.parquet"))
        assert len(shards) == 3, sorted(p.name for p in two.iterdir())  # 160 rows: 64 + 64 + 32
        ids[f"r{rank}"] = [i for s in shards for i in pq.read_table(s).column("example_id").to_pylist()]
    assert len(ids["r0"]) == len(ids["r1"]) == 160 and not set(ids["r0"]) & set(ids["r1"])
    expected = set(read_annotations(one).column("example_id").to_pylist())
    every = ids["r0"] + ids["r1"]
    assert len(every) == len(set(every)) == len(expected) == 320 and set(every) == expected  # none twice, none missing
    m2, m1 = TeacherCache(two).manifest, TeacherCache(one).manifest
    assert m2["complete"] is True and m2["row_count"] == m2["expected_rows"] == 320
    assert m1["complete"] is True and m1["row_count"] == m1["expected_rows"] == 320
    assert m2["teacher"] == m1["teacher"]  # same weights hash, template and readout
    assert not list(two.glob(".tmp-*"))
    # the same pairs in other batches (a rank's share, padded to its own longest prompt): fp32 rounding only
    # (measured 2e-7)
    s2, s1 = TeacherCache(two).signals(sorted(expected)), TeacherCache(one).signals(sorted(expected))
    diff = max(abs(a - b) for e in expected for a, b in zip(s2[e].level_probs, s1[e].level_probs, strict=True))
    assert diff < 1e-5, diff


# -- (a) the student fit with MKD from that cache ----------------------------------------------------------------


def test_two_node_student_fit_equals_one_process(fits):
    """Same examples in the same global batches: Lightning's DistributedSampler draws one seeded permutation;
    with 1 replica the process takes rows 0-7 of it per step, with 2 each node takes every other of those 8. No
    dropout, and every row has a label and a teacher signal, so DDP's mean of the two 4-row gradients is the
    8-row gradient: what is left is float32 summation order (measured ~2e-6 on the weights after 12 steps).
    Tolerances: 1e-4 on weights, 1e-4 on losses, 1e-3 on the ranking metrics (32 validation rows, an even
    number: no row repeated to pad a node's share)."""
    job, two, one = fits
    ranks_joined(job)
    assert steps(two / "marks") == {0: list(range(1, 13)), 1: list(range(1, 13))}  # both nodes, every step
    # one checkpoint directory, written once (rank 0), and one logger version
    assert {p.parent for p in two.rglob("*.ckpt")} == {two / "soft" / "checkpoints"}
    assert sorted(p.name for p in (two / "soft" / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (two / "soft").iterdir()) == ["checkpoints", "version_0"]
    last = ckpt(two / "soft" / "checkpoints" / "last.ckpt")
    assert (last["global_step"], last["epoch"]) == (EPOCHS * BATCHES, EPOCHS - 1)
    assert max_weight_diff(two / "soft/checkpoints/last.ckpt", one / "soft/checkpoints/last.ckpt") < 1e-4
    v2, v1 = by_epoch(two / "soft/version_0/metrics.csv"), by_epoch(one / "soft/version_0/metrics.csv")
    assert sorted(v2) == sorted(v1) == [0, 1]
    assert v2[0]["val/loss"] != v2[1]["val/loss"]  # training moved the model between the two validations
    for epoch in (0, 1):
        assert v2[epoch]["val/count"] == v1[epoch]["val/count"] == 32
        assert v2[epoch]["val/loss"] == pytest.approx(v1[epoch]["val/loss"], abs=1e-4)
        assert v2[epoch]["train/mkd/soft"] == pytest.approx(v1[epoch]["train/mkd/soft"], abs=1e-4)  # epoch means
        for key in ("val/auc", "val/ndcg10", "val/rmse", "val/macro_f1", "val/spearman", "val/accuracy"):
            assert v2[epoch][key] == pytest.approx(v1[epoch][key], abs=1e-3), (epoch, key)


# -- preemption --------------------------------------------------------------------------------------------------


def test_sigterm_to_one_node_saves_last_and_both_resume_like_uninterrupted(fits, caches, still_encoder, catalog):
    """Node 1's launcher gets SIGTERM while epoch 1 is under way. To make the step certain on a busy machine,
    rank 0 waits after step 7 (:class:`StepFiles`) until node 1's launcher has passed the signal on to its worker;
    the worker is then inside that step's collective, and its handler runs when the collective returns. The
    ranks agree at the end of step 7 or 8 (whichever batch end first sees the flag), save ``last.ckpt`` there and
    both stop; node 0 is not left waiting. Both nodes then run the same command with ``--ckpt_path last``."""
    _, uninterrupted, _ = fits
    tmp = uninterrupted.parent
    root = tmp / "preempted"
    args = fit_args(still_encoder, catalog, caches[1], root, 4, *NODES)
    job = Job(tmp, "preempted", [*args, "--trainer.callbacks.init_args.hold_at", str(HOLD)])
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (root / "marks" / f"rank0.step{HOLD}").exists():
            assert time.monotonic() < deadline and all(p.poll() is None for p in job.procs), job.tails()
            time.sleep(0.05)
        os.kill(job.procs[1].pid, signal.SIGTERM)  # the launcher of node 1, as `kill` or a scheduler would
        while "closing signal SIGTERM" not in job.out(1):  # torchrun: "Sending process N closing signal SIGTERM"
            assert time.monotonic() < deadline, job.tails()
            time.sleep(0.05)
        (root / "marks" / "go").touch()
        codes = job.wait(deadline)  # neither node hangs
    finally:
        job.kill()
    assert codes[0] != 0 and codes[1] != 0, job.tails()  # the job stopped; a requeue goes on
    assert "rank 1: received SIGTERM" in job.out(1), job.tails()
    for r in (0, 1):
        assert "stopped by SIGTERM (resume with --ckpt_path last)" in job.out(r), job.tails()
    last = root / "soft" / "checkpoints" / "last.ckpt"
    saved = ckpt(last)
    step = saved["global_step"]
    assert step in (HOLD, HOLD + 1) and saved["epoch"] == 1, job.tails()  # mid-epoch 1 (steps 7..12)
    assert f"SIGTERM at epoch 1, step {step}: saved {last}" in job.out(0)
    assert steps(root / "marks") == {0: list(range(1, step + 1)), 1: list(range(1, step + 1))}  # none went on

    (root / "marks").rename(root / "marks_before")
    (resumed,) = run_all(Job(tmp, "resumed", [*args, "--ckpt_path", "last"]))
    ranks_joined(resumed)
    assert f"Restoring states from the checkpoint path at {last}" in resumed.out(0), resumed.tails()
    assert "not resumable" not in resumed.out(0)
    # both nodes go on from the saved step to the end, as the uninterrupted run did
    assert steps(root / "marks") == {0: list(range(step + 1, 13)), 1: list(range(step + 1, 13))}
    final = ckpt(last)
    assert (final["global_step"], final["epoch"]) == (EPOCHS * BATCHES, EPOCHS - 1)
    # the batches that epoch had left, not its first ones again: the uninterrupted run's weights and metrics
    assert max_weight_diff(last, uninterrupted / "soft/checkpoints/last.ckpt") < 1e-6
    after = by_epoch(root / "soft/version_1/metrics.csv")
    reference = by_epoch(uninterrupted / "soft/version_0/metrics.csv")
    assert sorted(after) == [1]
    for key in ("val/loss", "val/auc", "val/ndcg10", "val/rmse", "val/macro_f1", "val/accuracy"):
        assert after[1][key] == pytest.approx(reference[1][key], abs=1e-6), key
