"""GGUF -> safetensors conversion of :mod:`ellm_mkd.models`: a GGUF file is dequantised once by
transformers into ``<cache root>/converted/<name>-<fingerprint>`` and reused afterwards.

Conversion is atomic and multi-process safe: it is written into a temporary directory beside the
target under a file lock and renamed into place at the end (see :func:`_ensure_converted`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Bump when the conversion output changes in a way that should invalidate old caches (2: the tokenizer is checked,
#: so a cache written by a transformers that rebuilt a tokenizer without its merges is converted again).
CONVERTER_VERSION = 2
#: a sentence every subword vocabulary cuts into far fewer pieces than it has letters
_TOKENIZER_PROBE = "Cordless drills and garden hoses are sold in the same store."
#: Marker written into a converted directory just before it is renamed into place.
MANIFEST_NAME = "ellm_mkd_conversion.json"
_FINGERPRINT_CHUNK = 1 << 20  # 1 MiB read from each end of a GGUF for its cheap fingerprint
_LOCK_TIMEOUT_S = float(os.environ.get("ELLM_MKD_LOCK_TIMEOUT", 3600))


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
        _check_tokenizer(tokenizer, gguf_path)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32, **kwargs)
    model.eval()
    return model, tokenizer


def _check_tokenizer(tokenizer, gguf_path: Path) -> None:
    """Stop a conversion whose tokenizer cuts text into single letters. A GGUF may list its vocabulary without the
    BPE merges (Gemma 3's does); a transformers that does not rebuild them makes a tokenizer that still loads and
    runs, and a model fed one token per letter is then fine-tuned on noise (every loss falls, nothing is learned)."""
    n_tokens = len(tokenizer(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])
    n_letters = sum(not c.isspace() for c in _TOKENIZER_PROBE)
    if n_tokens * 2 > n_letters:
        raise RuntimeError(
            f"{gguf_path}: transformers {_transformers_version()} rebuilt this GGUF's tokenizer without its merges "
            f"(a {n_letters}-letter test sentence became {n_tokens} tokens, about one per letter), so a model would "
            "read text letter by letter; upgrade transformers (conversions are tested with 5.25) or give the model "
            "as a Hugging Face directory"
        )


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
        logger.info("Converted GGUF %s -> %s in %.1f s", gguf_path, target, time.perf_counter() - t0)
        return target
    finally:
        lock.release()
