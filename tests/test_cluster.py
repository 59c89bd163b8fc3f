"""The cluster path: the launchers in scripts/ and the FSDP overlay for a large teacher.

Launchers: every script is valid bash, and runs as written with ``srun``, ``torchrun``, ``scontrol`` and
``ellm-mkd`` replaced by recorders on PATH (the SLURM variables set as the script's ``#SBATCH`` lines would set
them); every ``ellm-mkd`` command line it runs is then parsed by the real parser of that command, and the
process layout it asks Lightning for matches the one the launcher starts. A stop signal makes the SLURM step
receive SIGTERM and the job requeue itself.

FSDP: Lightning refuses ``FSDPStrategy`` on a CPU (the exact error is asserted below), and torch's FSDP refuses a
CPU when it is not told its device (``device_id=None``, which Lightning passes there: "FSDP needs a non-CPU
accelerator device, but no accelerator device is detected"). :class:`CPUFSDPStrategy` is Lightning's strategy
with that one argument changed, so the shipped overlay runs in 2 real processes (torchrun, gloo) on the tiny
random Llama: wrapping, sharded forward, sharded checkpoint save and load through the Trainer.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SLURM = sorted((REPO / "scripts" / "slurm").glob("*.sbatch"))
TORCHRUN = sorted(p for p in (REPO / "scripts" / "torchrun").glob("*.sh") if p.name != "common.sh")
SCRIPTS = sorted((REPO / "scripts").rglob("*.sh")) + SLURM
FSDP_OVERLAY = REPO / "configs" / "trainer" / "fsdp_teacher.yaml"
TEACHER = REPO / "configs" / "teacher" / "smollm2_135m_lora.yaml"
LIGHTNING = ("fit", "validate", "test", "predict")

# -- the launchers ---------------------------------------------------------------------------------------------

#: recorders standing in for the cluster's commands: each call is one NUL-separated file (command name first)
RECORDER = r"""#!/bin/bash
n=$(ls "$RECORD" | wc -l)
printf '%s\0' "$(basename "$0")" "$@" > "$RECORD/$(printf %03d "$n")"
"""
STUBS = {
    # with STUB_SLEEP: a rank that runs until SIGTERM, and says that it got it
    "ellm-mkd": RECORDER + 'if [ -n "${STUB_SLEEP:-}" ]; then sleep "$STUB_SLEEP" & pid=$!\n'
    'trap \'echo TERM > "$RECORD/got-sigterm"; kill $pid; exit 1\' TERM; touch "$RECORD/ready"; wait; fi\n',
    "scontrol": RECORDER,
    # srun FLAGS... CMD...: record the flags, run the command (one task stands for all of them)
    "srun": RECORDER + 'while [[ "$1" == -* ]]; do shift; done\nexec "$@"\n',
    # torchrun FLAGS... -m ellm_mkd ARGS...: record, then run ellm-mkd ARGS
    "torchrun": RECORDER + 'while [ "$1" != "-m" ]; do shift; done\nshift 2\nexec ellm-mkd "$@"\n',
}


def sbatch_options(script: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script.read_text(), re.M))


def launch_env(tmp: Path, **extra: str) -> dict[str, str]:
    bin_dir, record = tmp / "bin", tmp / "record"
    bin_dir.mkdir(exist_ok=True)
    record.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "VIRTUAL_ENV"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        RECORD=str(record),
        VENV="",  # the recorders, not an activated environment's ellm-mkd
        DATA=str(tmp / "pairs.parquet"),
        MODEL=str(tmp / "Qwen2.5-7B-Instruct"),
        ANNOTATIONS=str(tmp / "annotations"),
        TEACHER_RUN=str(tmp / "teacher"),
        CACHE=str(tmp / "cache"),
        STUDENT_RUN=str(tmp / "students" / "cross_encoder"),
        SHIP=str(tmp / "ship"),
    )
    return {**env, **extra}


def slurm_env(script: Path, tmp: Path, **extra: str) -> dict[str, str]:
    """What sbatch and srun set for the allocation the script's #SBATCH lines ask for."""
    opt = sbatch_options(script)
    return launch_env(
        tmp,
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME=opt["job-name"],
        SLURM_JOB_NUM_NODES=opt["nodes"],
        SLURM_NTASKS_PER_NODE=opt["ntasks-per-node"],
        SLURM_CPUS_PER_TASK=opt["cpus-per-task"],
        **extra,
    )


def recorded(tmp: Path) -> list[list[str]]:
    return [f.read_bytes().decode().split("\0")[:-1] for f in sorted((tmp / "record").glob("[0-9]*"))]


def parse_ellm_mkd(args: list[str], capsys) -> dict:
    """Parse ``ellm-mkd ARGS`` with the real parser of its command; the parsed (for a Lightning command: the
    composed) config."""
    cmd, rest = args[0], args[1:]
    if cmd in LIGHTNING:
        from ellm_mkd.commands.lightning_cli import cli_main

        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            cli_main([cmd, *rest, "--print_config"])
        assert done.value.code in (0, None), args
        return yaml.safe_load(capsys.readouterr().out)
    if cmd == "annotate":
        from ellm_mkd.commands.annotate import _parser
    elif cmd == "export":
        from ellm_mkd.commands.export import _parser
    else:
        raise AssertionError(f"a launcher runs ellm-mkd {cmd}, which this test does not know how to parse")
    return _parser().parse_args(rest).as_dict()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_is_valid_bash(script: Path):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_stage_has_a_slurm_and_a_torchrun_launcher():
    stages = {"annotate", "teacher_fit", "teacher_cache", "student_fit"}
    assert {p.stem for p in SLURM} == stages and {p.stem for p in TORCHRUN} == stages
    for script in SLURM:  # requeue on preemption, a stop signal to the batch shell before the time limit
        opt = sbatch_options(script)
        assert "--requeue" in script.read_text().split() and opt["signal"].startswith("B:USR1@"), script.name
        assert opt["ntasks-per-node"] == opt["gpus-per-node"], script.name  # one process per GPU


def check_layout(composed: dict, nodes: int, per_node: int, strategy: str) -> None:
    trainer = composed["trainer"]
    assert (int(trainer["num_nodes"]), int(trainer["devices"])) == (nodes, per_node)  # "8" on a command line
    got = trainer["strategy"]
    assert (got["class_path"].rsplit(".", 1)[-1] if isinstance(got, dict) else got) == strategy


@pytest.mark.parametrize("script", SLURM, ids=lambda p: p.name)
def test_slurm_script_runs_commands_the_parser_accepts(script: Path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    r = subprocess.run(["bash", str(script)], env=slurm_env(script, tmp_path), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    calls = recorded(tmp_path)
    assert calls and all(c[0] in ("srun", "ellm-mkd") for c in calls), calls
    opt = sbatch_options(script)
    nodes, per_node = int(opt["nodes"]), int(opt["ntasks-per-node"])
    runs = [c[1:] for c in calls if c[0] == "ellm-mkd"]
    assert len(runs) == sum(c[0] == "srun" for c in calls)  # every ellm-mkd runs under srun
    for args in runs:
        composed = parse_ellm_mkd(args, capsys)
        assert str(tmp_path) in " ".join(args)  # the stage reads and writes where it was told
        if args[0] == "export":
            assert composed["out"] == str(tmp_path / "ship")
            continue
        assert composed["data"]["source"]["path"] == str(tmp_path / "pairs.parquet")
        assert composed["data"]["item_fields"] == ["title", "brand", "color", "description"]  # the same at every stage
        if args[0] == "annotate":
            assert composed["out"] == str(tmp_path / "annotations")
            continue
        strategy = "FSDPStrategy" if script.stem == "teacher_fit" else "ddp"
        check_layout(composed, nodes, per_node, strategy)
        if args[0] == "fit":
            assert composed["ckpt_path"] == "last"  # a requeued job goes on from its last checkpoint
    if script.stem == "teacher_cache":
        (cache,) = [c for c in runs if c[0] == "predict"]
        composed = parse_ellm_mkd(cache, capsys)
        (writer,) = composed["trainer"]["callbacks"]
        assert writer["init_args"]["cache_dir"] == str(tmp_path / "cache")
        assert composed["model"]["init_args"]["adapter"] == str(tmp_path / "teacher" / "teacher" / "adapter")
    if script.stem == "student_fit":  # fit, then the export of the checkpoint that fit selects
        assert [a[0] for a in runs] == ["fit", "export"]
        assert runs[1][1] == str(tmp_path / "students" / "cross_encoder" / "full" / "checkpoints" / "best.ckpt")
        fit = parse_ellm_mkd(runs[0], capsys)
        assert fit["data"]["teacher"]["init_args"]["cache_dir"] == str(tmp_path / "cache")


def test_slurm_student_baseline_reads_no_cache(tmp_path, monkeypatch, capsys):
    """MKD=baseline (labels alone): the fit has no teacher section, so the template passes no cache."""
    monkeypatch.chdir(REPO)
    script = REPO / "scripts" / "slurm" / "student_fit.sbatch"
    env = slurm_env(script, tmp_path, MKD="baseline", STUDENT="two_tower")
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fit = next(c[1:] for c in recorded(tmp_path) if c[:2] == ["ellm-mkd", "fit"])
    composed = parse_ellm_mkd(fit, capsys)
    assert composed["data"]["teacher"] is None and composed["distill"]["enabled"] is False
    assert composed["model"]["class_path"] == "lightning_modules.TwoTowerStudent"


@pytest.mark.parametrize("script", TORCHRUN, ids=lambda p: p.name)
def test_torchrun_script_runs_commands_the_parser_accepts(script: Path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    env = launch_env(tmp_path, NNODES="2", NODE_RANK="0", NPROC_PER_NODE="4", MASTER_ADDR="10.1.2.3")
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    calls = recorded(tmp_path)
    for i, call in enumerate(calls):
        if call[0] == "torchrun":
            flags = dict(zip(call[1::2], call[2::2]))
            assert flags["--nnodes"] == "2" and flags["--node_rank"] == "0" and flags["--nproc_per_node"] == "4"
            assert flags["--master_addr"] == "10.1.2.3"
            assert call[call.index("-m") + 1] == "ellm_mkd" and calls[i + 1][0] == "ellm-mkd"
            composed = parse_ellm_mkd(calls[i + 1][1:], capsys)
            check_layout(composed, 2, 4, "FSDPStrategy" if script.stem == "teacher_fit" else "ddp")
        elif call[0] == "ellm-mkd" and (i == 0 or calls[i - 1][0] != "torchrun"):
            assert call[1] in ("annotate", "export")  # one process: no launcher
            parse_ellm_mkd(call[1:], capsys)
    assert any(c[0] == "ellm-mkd" for c in calls)


def test_slurm_stop_signal_checkpoints_and_requeues(tmp_path):
    """SLURM's signal before the time limit (USR1 to the batch shell): every rank gets SIGTERM (what makes
    callbacks.CheckpointOnPreemption write last.ckpt), the shell waits for the step, then requeues the job."""
    script = REPO / "scripts" / "slurm" / "teacher_fit.sbatch"
    env = slurm_env(script, tmp_path, STUB_SLEEP="60")
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "start_new_session": True}
    proc = subprocess.Popen(["bash", str(script)], env=env, **pipes)
    deadline = time.monotonic() + 20
    while not (tmp_path / "record" / "ready").exists() and time.monotonic() < deadline:  # the rank is running
        time.sleep(0.05)
    time.sleep(0.1)  # and the batch shell waits for it
    proc.send_signal(signal.SIGUSR1)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert (tmp_path / "record" / "got-sigterm").is_file(), err
    assert recorded(tmp_path)[-1] == ["scontrol", "requeue", "4242"]


# -- FSDP --------------------------------------------------------------------------------------------------------

try:
    from lightning.pytorch.strategies import FSDPStrategy
except ImportError:  # pragma: no cover - torch without torch.distributed
    FSDPStrategy = object


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with torch's FSDP told that its device is the CPU (Lightning passes
    ``device_id=None`` there, which torch refuses); every other part (process group, wrapping, activation
    checkpointing, precision, sharded checkpoints) is Lightning's own. Its type is not ``FSDPStrategy``, which is
    what lets it past Lightning's GPU-only check."""

    def _setup_model(self, model):
        import torch
        from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


def teacher_args(tiny_llama: str, data: str, ann: str, root: str) -> list[str]:
    return [
        "--config",
        str(TEACHER),
        "--config",
        str(FSDP_OVERLAY),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.num_nodes",
        "1",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.default_root_dir",
        root,
        "--model.init_args.model",
        tiny_llama,
        "--model.init_args.log_figures",
        "false",
        "--data.source.path",
        data,
        "--data.annotations",
        ann,
        "--data.item_fields",
        "[title,brand]",
        "--data.eval_batch_size",
        "8",
    ]


def test_fsdp_overlay_builds_lightnings_strategy(capsys):
    """The overlay as a user composes it, through the real parser: Lightning's FSDPStrategy with one FSDP unit per
    decoder layer, those layers checkpointed, bf16 weights with fp32 gradient reduction and buffers, sharded
    checkpoints, 2 machines x 8 GPUs; the 7B configs compose with it."""
    from ellm_mkd.commands.lightning_cli import cli_main

    large = REPO / "configs" / "teacher" / "large"
    lora, full = large / "qwen2_5_7b_lora.yaml", large / "qwen2_5_7b_full.yaml"
    for configs in ([TEACHER], [lora], [lora, full]):
        with pytest.raises(SystemExit):
            cli_main(["fit", *[f"--config={c}" for c in configs], f"--config={FSDP_OVERLAY}", "--print_config"])
        composed = yaml.safe_load(capsys.readouterr().out)
        trainer, strategy = composed["trainer"], composed["trainer"]["strategy"]
        assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
        assert (trainer["accelerator"], trainer["num_nodes"], trainer["devices"]) == ("gpu", 2, 8)
        init = strategy["init_args"]
        assert "transformers.models.llama.modeling_llama.LlamaDecoderLayer" in init["auto_wrap_policy"]
        assert "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer" in init["auto_wrap_policy"]
        assert sorted(init["activation_checkpointing_policy"]) == sorted(init["auto_wrap_policy"])
        assert init["mixed_precision"]["param_dtype"] == "torch.bfloat16"
        assert init["mixed_precision"]["buffer_dtype"] == init["mixed_precision"]["reduce_dtype"] == "torch.float32"
        assert init["state_dict_type"] == "sharded" and init["sharding_strategy"] == "FULL_SHARD"
        model = composed["model"]["init_args"]
        assert model["gradient_checkpointing"] is False or configs == [TEACHER]
        if configs[0] != TEACHER:  # under FSDP the base weights load in fp32: one dtype per FSDP unit
            assert model["weights_dtype"] == "float32"
            assert model["use_lora"] is (len(configs) == 1)


def test_lightning_refuses_fsdp_on_a_cpu(tiny_llama, synth_dir, tmp_path):
    from ellm_mkd.commands.lightning_cli import cli_main

    args = teacher_args(tiny_llama, str(synth_dir), str(tmp_path), str(tmp_path / "run"))
    with pytest.raises(ValueError, match=re.escape("The strategy `fsdp` requires a GPU accelerator")):
        cli_main(args, run=False)


def fsdp_worker(tiny_llama: str, data: str, ann: str, out: str) -> None:
    """One rank of the 2-process run (under torchrun, gloo): for the full fine-tuning and the LoRA teacher, build
    the teacher through the CLI with the shipped overlay, validate, and save a sharded checkpoint through the
    Trainer; for full fine-tuning also load it into a fresh model whose weights were moved and validate again.
    Writes what this rank saw to ``out/rank<r>.json``."""
    import torch
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.fsdp import FullyShardedDataParallel

    from ellm_mkd.commands.lightning_cli import cli_main
    from ellm_mkd.models import load_causal_lm
    from ellm_mkd.teacher_cache import weights_fingerprint

    report: dict = {}
    started = time.monotonic()
    for variant in ("full", "lora"):
        root = str(Path(out) / variant)
        args = teacher_args(tiny_llama, data, ann, root) + [
            "--trainer.strategy.class_path",
            f"{__name__}.CPUFSDPStrategy",
            "--model.init_args.use_lora",
            "true" if variant == "lora" else "false",
            "--model.init_args.export_dir",
            str(Path(root) / "teacher"),
        ]

        cli = cli_main(args, run=False)
        torch.manual_seed(1)
        with torch.no_grad():  # LoRA's B starts at zero: give the adapter an effect to save
            for n, p in cli.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        trainer, model = cli.trainer, cli.model
        total = sum(p.numel() for p in model.parameters())  # before FSDP splits them
        before = weights_fingerprint(model.model)
        first = trainer.validate(model, datamodule=cli.datamodule, verbose=False)[0]
        wrapped = trainer.strategy.model
        inner = [m.module for m in wrapped.modules() if isinstance(m, FullyShardedDataParallel)]
        units = [type(getattr(m, "_checkpoint_wrapped_module", m)).__name__ for m in inner]
        checkpointed = [
            type(m._checkpoint_wrapped_module).__name__ for m in wrapped.modules() if isinstance(m, CheckpointWrapper)
        ]
        local = sum(p.numel() for p in model.parameters())
        ckpt = Path(root) / "sharded.ckpt"
        trainer.save_checkpoint(ckpt)
        saved = sorted(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
        # the end of fit: the best (here: the saved) checkpoint's weights come back into weights that moved, and
        # every rank's shards are gathered to rank 0 for the export (adapter/, merged/, teacher.json)
        trainer.checkpoint_callback.best_model_path = str(ckpt)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        model.on_fit_end()
        exported = {}
        if trainer.global_rank == 0:
            teacher = Path(root) / "teacher"
            exported["hash"] = json.loads((teacher / "teacher.json").read_text())["weights_hash"] == before
            if variant == "lora":
                from peft import PeftModel

                reloaded = PeftModel.from_pretrained(load_causal_lm(tiny_llama), teacher / "adapter")
            else:
                reloaded = load_causal_lm(str(teacher / "merged"))
            exported["reloaded"] = weights_fingerprint(reloaded) == before
            exported["files"] = sorted(p.name for p in teacher.iterdir())
        again = None
        if variant == "full":
            fresh = cli_main(args, run=False)  # a new process's model: different weights until the checkpoint loads
            with torch.no_grad():
                for p in fresh.model.parameters():
                    p.add_(0.5)
            again = fresh.trainer.validate(fresh.model, datamodule=fresh.datamodule, ckpt_path=ckpt, verbose=False)[0]
        report[variant] = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__mro__[1].__name__,
            "units": units,
            "checkpointed": checkpointed,
            "param_dtype": str(wrapped.mixed_precision.param_dtype),
            "buffer_dtype": str(wrapped.mixed_precision.buffer_dtype),
            "local_params": local,
            "total_params": total,
            "ckpt_files": sorted(p.name for p in ckpt.iterdir()),
            "ckpt_keys": [k for k in saved if not k.startswith("optimizer")],
            "seconds": round(time.monotonic() - started, 1),
            "first": first,
            "again": again,
            "exported": exported,
            "val_batches": trainer.num_val_batches,
        }
    rank = int(os.environ["RANK"])
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report, default=str))


@pytest.fixture(scope="module")
def fsdp_run(tiny_llama, synth_dir, tmp_path_factory) -> list[dict]:
    """The 2-process run of :func:`fsdp_worker` (torchrun, gloo), once for the tests below; each rank's report."""
    from ellm_mkd.commands.annotate import annotate_main

    tmp = tmp_path_factory.mktemp("fsdp")
    ann = tmp / "ann"
    argv = ["--data.source.path", str(synth_dir), "--data.item_fields", "[title,brand]", "--out", str(ann)]
    assert annotate_main([*argv, "--progress", "false"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    cmd += ["fsdp-worker", tiny_llama, str(synth_dir), str(ann), str(tmp)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the 2-process FSDP run did not finish in 300 s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-5000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp_two_processes_wrap_shard_and_validate(fsdp_run):
    """Both ranks ran Lightning's FSDP: every decoder layer is its own FSDP unit and is checkpointed, the weights
    are split between the ranks, computed in bf16 with fp32 buffers, and validation covered the split."""
    for variant in ("full", "lora"):
        r0, r1 = (run[variant] for run in fsdp_run)
        assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
        assert r0["strategy"] == "FSDPStrategy"
        assert r0["units"].count("LlamaDecoderLayer") == 2 and r0["checkpointed"] == ["LlamaDecoderLayer"] * 2
        assert (r0["param_dtype"], r0["buffer_dtype"]) == ("torch.bfloat16", "torch.float32")
        # each rank holds about half of the weights (FSDP pads a unit to a multiple of the world size)
        assert r0["local_params"] < r0["total_params"] and r1["local_params"] < r0["total_params"]
        assert r0["local_params"] + r1["local_params"] == pytest.approx(r0["total_params"], abs=64)
        assert r0["first"]["val/count"] == r1["first"]["val/count"] == 2 * 2 * 8  # 2 ranks x 2 batches x 8 pairs
        assert r0["first"]["val/auc"] == r1["first"]["val/auc"]  # the metrics were reduced over both ranks


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp_sharded_checkpoint_round_trip_full_fine_tuning(fsdp_run):
    """A sharded checkpoint (one .distcp file per rank) saved through the Trainer restores every weight: a fresh
    model whose weights were moved validates exactly as the saved one did."""
    r0, r1 = (run["full"] for run in fsdp_run)
    assert any(k.endswith("embed_tokens.weight") for k in r0["ckpt_keys"])  # the weights, by their plain names
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= set(r0["ckpt_files"])
    for r in (r0, r1):
        for key in ("val/auc", "val/rmse", "val/loss"):
            if key in r["first"]:
                assert r["again"][key] == pytest.approx(r["first"][key], abs=1e-6), key


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp_sharded_checkpoint_of_a_lora_teacher_holds_the_adapter(fsdp_run):
    """The adapter is in the sharded checkpoint (by the state dict's names, not FSDP's wrapped ones) beside the
    base weights the sharded loader expects."""
    keys = fsdp_run[0]["lora"]["ckpt_keys"]
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys), keys
    assert any(k.endswith("embed_tokens.weight") for k in keys), keys


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("variant", ["full", "lora"])
def test_fsdp_fit_end_restores_the_best_and_exports_gathered_weights(fsdp_run, variant):
    """What fit does at its end under FSDP, on both ranks: the best (sharded) checkpoint's weights replace weights
    that had moved on every rank, and rank 0 writes the export from every rank's shards: teacher.json's weights
    hash is that of the unwrapped model before FSDP wrapped it (so both ranks' shards came back to the saved
    values), and the written adapter (on its base) or merged model, loaded by peft/transformers alone, has those
    weights."""
    r0, r1 = (run[variant] for run in fsdp_run)
    assert r0["exported"]["hash"] is True and r0["exported"]["reloaded"] is True
    assert {"teacher.json", "merged"} <= set(r0["exported"]["files"])
    assert ("adapter" in r0["exported"]["files"]) is (variant == "lora")
    assert r1["exported"] == {}  # the other rank sent its shards and wrote nothing


if __name__ == "__main__" and sys.argv[1:2] == ["fsdp-worker"]:
    fsdp_worker(*sys.argv[2:6])
elif __name__ == "__main__":
    print(shlex.join(["usage:", sys.argv[0], "fsdp-worker", "TINY_LLAMA", "DATA", "ANNOTATIONS", "OUT"]))
