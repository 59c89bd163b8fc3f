"""Helpers of the shipping tests (export, score, serve): tiny random students saved as real checkpoints
beside the ``config.yaml`` a fit run leaves, and exported once per test module."""

from __future__ import annotations

from pathlib import Path

import lightning
import torch
import yaml

ITEM_FIELDS = ["title", "brand", "color", "attributes"]
KINDS = ("cross_encoder", "two_tower")


def tiny_student(kind: str, encoder: str, seed: int = 0, spread: float = 20.0):
    from lightning_modules import CrossEncoderStudent, TwoTowerStudent

    torch.manual_seed(seed)
    if kind == "cross_encoder":
        model = CrossEncoderStudent(encoder=encoder, num_levels=4, max_seq_length=48, log_figures=False)
    else:
        model = TwoTowerStudent(encoder=encoder, num_levels=4, max_seq_length=48, scorer_hidden=16, log_figures=False)
    model.level_grades.copy_(torch.tensor([1.0, 1.6, 2.3, 2.9]))
    model.level_grades_set.fill_(True)
    model.level_temperature.fill_(1.3)  # a fitted temperature and level biases: every shipped form must apply them
    model.level_bias.copy_(torch.tensor([0.4, -0.1, -0.5, 0.2]))
    # random heads on a tiny encoder give near-uniform distributions: spread them, so pairs differ
    with torch.no_grad():
        for p in [*model.level_head.parameters(), *model.dim_heads.parameters()]:
            p.mul_(spread)
    return model.eval()


def write_run(root: Path, kind: str, encoder: str, data_dir: Path, spread: float = 20.0) -> Path:
    """``root/<kind>/checkpoints/best.ckpt`` and ``root/<kind>/version_0/config.yaml``, as ``ellm-mkd fit``
    leaves them; returns the checkpoint."""
    model = tiny_student(kind, encoder, spread=spread)
    run = root / kind
    (run / "checkpoints").mkdir(parents=True)
    (run / "version_0").mkdir()
    ckpt = run / "checkpoints" / "best.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            # as LightningCLI records them (ellm-mkd predict --ckpt_path reads the class path back)
            "hyper_parameters": {
                **model.hparams,
                "_class_path": f"lightning_modules.{type(model).__name__}",
                "_instantiator": "lightning.pytorch.cli.instantiate_module",
            },
            "pytorch-lightning_version": lightning.__version__,
            "epoch": 1,
            "global_step": 10,
            "callbacks": {
                "ModelCheckpoint{'monitor': 'val/ndcg10'}": {"monitor": "val/ndcg10", "best_model_score": 0.5}
            },
        },
        ckpt,
    )
    cfg = {"data": {"source": {"path": str(data_dir)}, "item_fields": ITEM_FIELDS}, "model": {"class_path": kind}}
    (run / "version_0" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return ckpt


def export_both(root: Path, encoder: str, data_dir: Path, *export_args: str) -> dict[str, tuple[Path, Path]]:
    """A checkpoint of each student under ``root/runs`` and its export under ``root/<kind>``:
    ``{kind: (checkpoint, export directory)}``."""
    from ellm_mkd.commands.main import main

    out = {}
    for kind in ("cross_encoder", "two_tower"):
        ckpt = write_run(root / "runs", kind, encoder, data_dir)
        assert main(["export", str(ckpt), "--out", str(root / kind), *export_args]) == 0
        out[kind] = (ckpt, root / kind)
    return out
