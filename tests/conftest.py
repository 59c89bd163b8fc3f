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


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory, minilm_tokenizer) -> str:
    """A randomly initialised 2-layer BERT (hidden 32) saved as a local HF directory, with MiniLM's tokenizer."""
    from helpers import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), minilm_tokenizer)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from ellm_mkd.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_tokenizer) -> str:
    """A randomly initialised 2-layer Llama (hidden 32) with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_llama")
    tok = smollm2_tokenizer
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
