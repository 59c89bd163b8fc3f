"""Where an exported student came from: the run's data settings, data and teacher fingerprints, metrics;
and the sample pairs the export's parity check runs on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

#: (query, item fields): short and long, matching and not, truncated past any token budget
SAMPLE_PAIRS: list[tuple[str, dict[str, str]]] = [
    ("cordless drill", {"title": "Voltara 20V Cordless Drill Driver Kit", "brand": "Voltara", "color": "blue"}),
    ("red paint", {"title": "Interior Flat Paint, 1 gal", "color": "white", "brand": "Behr"}),
    ("vx-2041 battery", {"title": "VX-2041 Lithium Battery Pack 4Ah", "brand": "Voltara"}),
    ("garden hose 50 ft", {"title": "Flexible Garden Hose", "attributes": "length: 50 ft; material: rubber"}),
    ("x", {"title": "y"}),
    ("moen kitchen faucet with sprayer brushed nickel", {"title": "Moen Arbor Pull-Down Faucet", "brand": "Moen"}),
    ("ceiling fan", {"title": "Outdoor Wall Lantern", "description": "Aluminium lantern for porches. " * 40}),
    ("wood screws #8 2 in", {"title": "#8 x 2 in. Phillips Flat Head Wood Screw (100-Pack)", "bullets": "zinc"}),
    ("LED bulb 60w", {"title": "60-Watt Equivalent A19 LED Light Bulb Soft White (4-Pack)"}),
    ("étagère en bois", {"title": "Étagère murale en chêne", "brand": "Bois&Co"}),
    ("shower head", {"title": "Shower Head", "brand": "Delta", "color": "chrome", "attributes": "flow: 1.75 gpm"}),
    ("lawn mower blade 21 inch", {"title": "21 in. Replacement Blade for Push Mowers", "bullets": "fits most"}),
]


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def find_run_config(ckpt: Path) -> Path | None:
    """The ``config.yaml`` LightningCLI saved for the run a checkpoint belongs to: in the logger's newest
    ``version_N`` beside ``checkpoints/`` (or the checkpoint's own folder)."""
    here = ckpt.resolve().parent
    candidates = [here / "config.yaml"]
    if here.name == "checkpoints":
        versions = sorted(here.parent.glob("version_*/config.yaml"), key=lambda p: p.stat().st_mtime, reverse=True)
        candidates += versions + [here.parent / "config.yaml"]
    return next((c for c in candidates if c.is_file()), None)


def _data_fingerprint(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_file():
        return {"path": path, "sha256": sha256_file(p)}
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".parquet")
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
        return {"path": path, "sha256": h.hexdigest(), "files": [f.name for f in files]}
    return {"path": path, "sha256": None, "note": "not found at export time"}


def training_context(ckpt: Path, train_config: str | None, num_levels: int) -> dict[str, Any]:
    """Item fields, level names and provenance of the run that wrote ``ckpt`` (defaults with warnings
    when its config cannot be found)."""
    from datamodules.data_source import DataSource
    from datamodules.text import DEFAULT_ITEM_FIELDS, check_item_fields

    warnings: list[str] = []
    path = Path(train_config) if train_config else find_run_config(ckpt)
    if train_config and not path.is_file():
        raise FileNotFoundError(2, "train config not found", str(path))
    if path is None:
        warnings.append(
            f"no config.yaml found beside {ckpt}: using the default item fields {list(DEFAULT_ITEM_FIELDS)} and "
            "level names level0..; pass --train_config (the YAML the student was fit with) to record the real ones"
        )
        return {
            "item_fields": list(DEFAULT_ITEM_FIELDS),
            "level_names": [f"level{i}" for i in range(num_levels)],
            "provenance": {"train_config": None},
            "warnings": warnings,
        }
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    data = cfg.get("data") or {}
    item_fields = list(check_item_fields(data.get("item_fields") or DEFAULT_ITEM_FIELDS))
    source_cfg = data.get("source") or {}
    level_names = [f"level{i}" for i in range(num_levels)]
    provenance: dict[str, Any] = {"train_config": str(path)}
    if source_cfg.get("path"):
        source = DataSource(**source_cfg)
        scheme = source.resolved_scheme()
        if scheme.num_levels == num_levels:
            level_names = list(scheme.level_names)
        else:
            warnings.append(f"{path}: its label scheme has {scheme.num_levels} levels, the student {num_levels}")
        provenance["label_scheme"] = scheme.describe()
        provenance["data"] = _data_fingerprint(source.path)
    teacher = data.get("teacher") or {}
    cache_dir = (teacher.get("init_args") or {}).get("cache_dir") if isinstance(teacher, dict) else None
    if cache_dir:
        manifest = Path(cache_dir) / "manifest.json"
        if manifest.is_file():
            m = json.loads(manifest.read_text(encoding="utf-8"))
            provenance["teacher"] = {"cache_dir": cache_dir, **(m.get("teacher") or {})}
        else:
            provenance["teacher"] = {"cache_dir": cache_dir, "note": "cache not found at export time"}
    else:
        provenance["teacher"] = None  # trained on the labels alone
    return {"item_fields": item_fields, "level_names": level_names, "provenance": provenance, "warnings": warnings}


def checkpoint_metrics(ckpt: Path) -> dict[str, Any]:
    """The monitored metric and its best value, as the checkpoint's ModelCheckpoint recorded them."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    out: dict[str, Any] = {"epoch": state.get("epoch"), "global_step": state.get("global_step")}
    for key, cb in (state.get("callbacks") or {}).items():
        if str(key).startswith("ModelCheckpoint") and isinstance(cb, dict) and cb.get("monitor"):
            score = cb.get("best_model_score")
            out[cb["monitor"]] = float(score) if score is not None else None
    return out
