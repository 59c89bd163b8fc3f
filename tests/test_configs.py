"""Every YAML under configs/ (recursively) loads through the real parser of the command it is for."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if p.parent.name not in ("mkd", "trainer", "overlays", "large"))
#: 7B-class teacher configs (configs/teacher/large): no such weights here, so the parser checks them without building
#: the model; each composed with the trainer overlay it is meant for
LARGE_TEACHER = sorted((ROOT / "teacher" / "large").glob("*.yaml"))
#: teacher overlays (configs/teacher/overlays): composed after a teacher config
TEACHER_OVERLAYS = sorted((ROOT / "teacher" / "overlays").glob("*.yaml"))
#: trainer overlays (configs/trainer): the hardware, composed after any stage config
TRAINER_OVERLAYS = sorted((ROOT / "trainer").glob("*.yaml"))
STAGE_CONFIGS = [
    ROOT / "students" / "two_tower.yaml",
    ROOT / "teacher" / "smollm2_135m_lora.yaml",
    ROOT / "teacher" / "cache_smollm2_direct.yaml",
]
#: overlays (configs/mkd): each one goes after a student config; tested on top of both students
OVERLAYS = sorted((ROOT / "mkd").glob("*.yaml"))
STUDENT_CONFIGS = [ROOT / "students" / "cross_encoder.yaml", ROOT / "students" / "two_tower.yaml"]


def test_there_are_configs():
    assert CONFIGS and OVERLAYS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_parses(path: Path):
    kind = path.relative_to(path.parents[1]).parts[0] if path.parent.name in ("data", "synth") else "lightning"
    if path.parent.name == "data":
        from ellm_mkd.commands.data import _check_parser

        parser = _check_parser()
        cfg = parser.parse_args(["--config", str(path), "some/file.csv"])
        parser.instantiate(cfg)
    elif path.parent.name == "annotate":
        from ellm_mkd.commands.annotate import _parser

        parser = _parser()
        cfg = parser.parse_args(["--config", str(path)])
        assert cfg.out and cfg.annotator in ("rules", "llm")
        if cfg.annotator == "llm":
            assert cfg.llm.backend.class_path.startswith("ellm_mkd.backends.")
    elif path.parent.name == "synth":
        from ellm_mkd.commands.data import _synth_parser

        parser = _synth_parser()
        cfg = parser.parse_args(["--config", str(path), "--out", "x"])
        parser.instantiate(cfg)
    elif path.name == "cache_served.yaml":  # ellm-mkd cache serve-teacher: not a Lightning config
        from ellm_mkd.commands.cache import serve_teacher_parser

        parser = serve_teacher_parser()
        cfg = parser.parse_args(["--config", str(path)])
        init = parser.instantiate(cfg)
        assert cfg.cache_dir and init.teacher.readout in ("direct", "cot")
        init.teacher.close()
    else:
        from ellm_mkd.commands.lightning_cli import cli_main

        cli = cli_main(["--config", str(path)], run=False)
        assert cli.model is not None and cli.datamodule is not None, kind
        # no stage config repeats the hardware: ellm-mkd's defaults apply until an overlay changes them
        hw = {k: cli.config["trainer"][k] for k in ("accelerator", "devices", "precision")}
        assert hw["accelerator"] == "auto" and hw["devices"] == 1
        assert hw["precision"] in ("bf16-mixed", "32-true")  # 32-true where this CPU has no native bf16
        assert "accelerator" not in yaml.safe_load(path.read_text())["trainer"], path


@pytest.mark.parametrize("student", STUDENT_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_mkd_overlay_parses_on_each_student(overlay: Path, student: Path):
    from callbacks import MKDistillation
    from ellm_mkd.commands.lightning_cli import cli_main

    cli = cli_main(["--config", str(student), "--config", str(overlay)], run=False)
    mkd = [c for c in cli.trainer.callbacks if isinstance(c, MKDistillation)]
    assert len(mkd) == 1 and mkd[0].enabled == (overlay.stem != "baseline")
    assert cli.trainer.logger.name == overlay.stem  # each ablation row logs (and checkpoints) apart
    assert (cli.datamodule.teacher is None) == (overlay.stem == "baseline")
    assert (cli.datamodule.augment is not None) == overlay.stem.endswith("augment")


def assert_subset(want, got, where: str = "trainer") -> None:
    """Every value ``want`` sets is in ``got``; a class given as ``class_path``/``init_args`` is compared by its
    class and the arguments ``want`` sets (the parser fills in the others; a dataclass prints as its fields)."""
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        if "class_path" in want and "class_path" in got:
            assert got["class_path"] == want["class_path"], where
        if "class_path" in want:
            want, got = want.get("init_args", {}), got.get("init_args", got)
        for key, value in want.items():
            assert key in got, f"{where}.{key}"
            assert_subset(value, got[key], f"{where}.{key}")
    elif isinstance(want, list) and where.endswith("_policy"):  # a set of classes: printed in any order
        assert sorted(got) == sorted(want), where
    else:
        assert got == want, where


@pytest.mark.parametrize("stage", STAGE_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("overlay", TRAINER_OVERLAYS, ids=lambda p: p.stem)
def test_trainer_overlay_composes_with_stage_configs(overlay: Path, stage: Path, capsys):
    """An overlay sets the hardware and nothing else: the composed config has the overlay's trainer keys and
    the stage config's own (epochs, callbacks, logger)."""
    from ellm_mkd.commands.lightning_cli import cli_main

    with pytest.raises(SystemExit) as done:
        cli_main(["--config", str(stage), "--config", str(overlay), "--print_config"], run=False)
    assert done.value.code in (0, None)
    composed = yaml.safe_load(capsys.readouterr().out)["trainer"]
    want = yaml.safe_load(overlay.read_text())["trainer"]
    assert_subset(want, composed)
    own = yaml.safe_load(stage.read_text())["trainer"]
    assert composed["default_root_dir"] == own["default_root_dir"] and composed["callbacks"]
    if overlay.stem in ("cpu", "ddp"):  # the ones this machine can build a Trainer for
        from lightning.pytorch.strategies import DDPStrategy

        cli = cli_main(["--config", str(stage), "--config", str(overlay), "--trainer.accelerator", "cpu"], run=False)
        assert isinstance(cli.trainer.strategy, DDPStrategy) == (overlay.stem == "ddp")
        assert cli.trainer.num_devices == want["devices"]


def test_there_are_trainer_overlays():
    assert {p.stem for p in TRAINER_OVERLAYS} >= {"cpu", "gpu", "ddp", "multinode", "fsdp_teacher"}


@pytest.mark.parametrize("path", LARGE_TEACHER, ids=lambda p: p.stem)
def test_large_teacher_config_parses_with_its_overlay(path: Path, capsys):
    """Parsed by the real CLI parser (``--print_config`` stops before any class is built: there are no 7B weights
    here): the full fine-tuning file goes after the LoRA one, the fits go with the FSDP overlay, the cache with
    the multi-node DDP one; every key the files set reaches the composed config."""
    from ellm_mkd.commands.lightning_cli import cli_main

    stage = yaml.safe_load(path.read_text())
    configs = [path] if "class_path" in stage.get("model", {}) else [path.parent / "qwen2_5_7b_lora.yaml", path]
    cache = stage.get("model", {}).get("init_args", {}).get("adapter") is not None
    overlay = ROOT / "trainer" / ("multinode.yaml" if cache else "fsdp_teacher.yaml")
    cmd = "predict" if cache else "fit"
    with pytest.raises(SystemExit) as done:
        cli_main([cmd, *[f"--config={c}" for c in configs], f"--config={overlay}", "--print_config"])
    assert done.value.code in (0, None)
    composed = yaml.safe_load(capsys.readouterr().out)
    assert "accelerator" not in stage.get("trainer", {})  # the hardware comes from the overlay
    for section in ("model", "data"):  # what this file sets (the last one composed) is what the run gets
        assert_subset(stage.get(section, {}), composed[section], section)
    assert_subset(yaml.safe_load(overlay.read_text())["trainer"], composed["trainer"])
    assert composed["model"]["class_path"] == "lightning_modules.TeacherLM"


@pytest.mark.parametrize("overlay", TEACHER_OVERLAYS, ids=lambda p: p.stem)
def test_teacher_overlay_composes_with_the_teacher_config(overlay: Path):
    from ellm_mkd.commands.lightning_cli import cli_main

    base = ROOT / "teacher" / "smollm2_135m_lora.yaml"
    cli = cli_main(["--config", str(base), "--config", str(overlay)], run=False)
    own = yaml.safe_load(overlay.read_text())["model"]["init_args"]
    for key, value in own.items():
        assert cli.model.hparams[key] == value, key
    if own.get("use_lora") is False:  # full fine-tuning: every weight trains, no adapter
        assert all(p.requires_grad for p in cli.model.parameters())
        assert not any("lora_" in n for n, _ in cli.model.named_parameters())
