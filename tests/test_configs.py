"""Every YAML under configs/ (recursively) loads through the real parser of the command it is for."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if p.parent.name != "mkd")
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
    else:
        from ellm_mkd.commands.lightning_cli import cli_main

        cli = cli_main(["--config", str(path)], run=False)
        assert cli.model is not None and cli.datamodule is not None, kind


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
