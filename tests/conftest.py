"""Shared fixtures: real files on disk, the bundled tokenizer, the shared real data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from ellm_mkd.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic catalog written once per session."""
    from datamodules.synth import SynthConfig, write

    out = tmp_path_factory.mktemp("synth") / "data"
    write(out, SynthConfig(seed=0, num_queries=150, items_per_query=8))
    return out


def shared_file(*parts: str) -> Path:
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is not present (shared real data is optional)")
    return p
