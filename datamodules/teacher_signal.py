"""Where a student's teacher signal comes from: a cache (offline) or a teacher in the loop (online).

Both return the same typed record, :class:`~ellm_mkd.teacher_cache.TeacherSignal`, so a student
and the distillation losses never know which one produced it. ``RelevanceDataModule(teacher=...)``
binds a source once (checks, loading) and asks it for the signals of every batch it collates.

``CachedTeacher`` (the default and the fast path) reads a cache written by
``ellm-mkd predict --config configs/teacher/cache_*.yaml``. On binding it checks the manifest
against the data module (schema version, label scheme, level names, item fields) and, when given,
against the teacher (``teacher_dir``: the ``teacher.json`` that ``fit`` writes, pinning the
weights hash and prompt template; or any manifest keys in ``expect``). Every cached row whose
example is in the data must have been made from the same query and item text (otherwise its
evidence offsets would point at other words): a difference is an error naming the examples.
Training examples without a cache row are an error, or train on hard labels only
(``missing: hard_label``).

``LiveTeacher`` (:mod:`lightning_modules.live_teacher`) runs a teacher on each batch as it is
collated: the whole readout per training step, so it is for small data and quick experiments (and
it keeps DataLoader workers at 0 or pays for a copy of the teacher per worker). Its weights never
enter a student checkpoint.

YAML::

    data:
      teacher:
        class_path: datamodules.teacher_signal.CachedTeacher
        init_args: {cache_dir: runs/demo/teacher_cache, missing: error}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from ellm_mkd.teacher_cache import TeacherCache, TeacherSignal

log = logging.getLogger(__name__)
Missing = Literal["error", "hard_label"]


class TeacherSource:
    """Base class: teacher signals for the rows of a batch (None where an example has none)."""

    missing: Missing = "error"
    #: ``signals`` is a cheap lookup (a cache), not a model run: a consumer may read every row up front
    lookup: bool = False

    def bind(self, dm: Any) -> None:
        """Check the source against the data module and get ready (called once, after ``dm.setup``)."""

    def covers(self, example_id: str) -> bool:
        """Whether the source has a signal for ``example_id`` (after :meth:`bind`)."""
        return True

    @property
    def hidden_size(self) -> int | None:
        """Width of the signals' ``hidden`` vector, or None when they carry none."""
        return None

    def signals(self, rows: list[dict[str, Any]]) -> list[TeacherSignal | None]:
        raise NotImplementedError


class CachedTeacher(TeacherSource):
    """Signals from a teacher cache; see the module docstring.

    Args:
        cache_dir: the cache directory (``cache_dir`` of the TeacherCacheWriter that wrote it).
        missing: a training example without a cache row is an ``error`` (naming the first ids) or
            trains on its hard label alone (``hard_label``; counted in the log). Validation and
            test examples without a row always fall back to hard labels.
        teacher_dir: the teacher's export directory (with ``teacher.json``); pins the cache to that
            teacher's weights hash and prompt template.
        expect: further manifest keys and values the cache must have (e.g. ``{teacher: {readout: cot}}``).
        temperature: rescales every cached level distribution, ``p ∝ p^(1/T)`` (:mod:`ellm_mkd.calibration`):
            a number, or ``fit``: the T that minimises the NLL of the validation split's labels under the
            cached readouts of those pairs (the cache must cover the validation split: ``predict_split: all``
            or ``val``); the fit and the validation ECE before/after it are logged. 1.0 leaves them as cached.
        level_bias: one log-probability bias per level added after the temperature, ``p ∝ exp(log(p) / T + b)``
            (bias-corrected temperature scaling, :func:`ellm_mkd.calibration.fit_temperature_and_bias`): a list of
            K numbers (with a number as temperature), or ``fit``: fitted with the temperature on the validation
            split (with temperature: fit), or ``auto``: fitted only where they generalise across the validation
            queries (5-fold cross-validation over queries, :func:`ellm_mkd.calibration.cross_validate_bias`: kept
            if the held-out NLL with them is lower than with the temperature alone). None: no biases.
    """

    lookup = True

    def __init__(
        self,
        cache_dir: str,
        missing: Missing = "error",
        teacher_dir: str | None = None,
        expect: dict[str, Any] | None = None,
        temperature: float | Literal["fit"] = 1.0,
        level_bias: list[float] | Literal["fit", "auto"] | None = None,
    ):
        if missing not in ("error", "hard_label"):
            raise ValueError(f"missing must be 'error' or 'hard_label', got {missing!r}")
        if temperature != "fit" and not (isinstance(temperature, int | float) and temperature > 0):
            raise ValueError(f"temperature must be a number > 0 or 'fit', got {temperature!r}")
        if (level_bias in ("fit", "auto")) != (temperature == "fit") and level_bias is not None:
            raise ValueError(
                "level_bias: fit and auto are fitted with the temperature (set temperature: fit as well); "
                "a list of biases goes with a fixed temperature"
            )
        self.temperature, self.level_bias = temperature, level_bias
        self.calibration: Any = None  # the TemperatureFit of temperature: fit, after bind
        self.cache_dir, self.missing, self.teacher_dir = cache_dir, missing, teacher_dir
        self.expect = dict(expect or {})
        self._signals: dict[str, TeacherSignal] = {}
        self.manifest: dict[str, Any] = {}

    def expected_manifest(self, dm: Any) -> dict[str, Any]:
        want: dict[str, Any] = {
            "level_names": list(dm.level_names),
            "item_fields": list(dm.item_fields),
            "label_scheme": dm.scheme.describe(),
        }
        if self.teacher_dir:
            info_file = Path(self.teacher_dir) / "teacher.json"
            if not info_file.is_file():
                raise FileNotFoundError(
                    f"teacher_dir {self.teacher_dir}: no teacher.json (the directory ellm-mkd fit "
                    "writes the teacher's adapter/ and merged/ to)"
                )
            info = json.loads(info_file.read_text())
            want["teacher"] = {
                "weights_hash": info.get("weights_hash"),
                "template_fingerprint": info.get("template_fingerprint"),
            }
        for k, v in self.expect.items():
            want[k] = {**want.get(k, {}), **v} if isinstance(v, dict) and isinstance(want.get(k), dict) else v
        return want

    def bind(self, dm: Any) -> None:
        cache = TeacherCache(self.cache_dir, expect=self.expected_manifest(dm))
        self.manifest = cache.manifest
        stale, missing_train, kept = [], [], {}
        for split, ds in dm.datasets.items():
            ids = [r["example_id"] for r in ds.rows]
            found = cache.signals(ids)
            for r in ds.rows:
                sig = found.get(r["example_id"])
                if sig is None:
                    if split == "train" and not r.get("augmented"):  # augmented rows: the data module drops them
                        missing_train.append(r["example_id"])
                    continue
                if sig.query != r["query"] or sig.item_text != r["item_text"]:
                    stale.append(r["example_id"])
                    continue
                kept[r["example_id"]] = sig
        if stale:
            raise ValueError(
                f"{self.cache_dir}: {len(stale)} cached example(s) were made from another query or item text "
                f"than the data has now (first: {stale[:5]}); the data or item_fields changed since the "
                "cache was written: write the cache again with ellm-mkd predict"
            )
        if missing_train:
            n_train = len(dm.datasets["train"])
            if self.missing == "error":
                raise ValueError(
                    f"{self.cache_dir}: {len(missing_train)} of {n_train} training examples have no teacher "
                    f"signal (first: {missing_train[:5]}); write the cache over the training split "
                    "(data.predict_split: train), or set missing: hard_label to train them on labels alone"
                )
            log.info(
                "%s: %d of %d training examples have no teacher signal and train on hard labels only",
                self.cache_dir,
                len(missing_train),
                n_train,
            )
        self._signals = self._calibrated(kept, dm)
        log.info("teacher cache %s: %d examples joined", self.cache_dir, len(kept))

    def _calibrated(self, kept: dict[str, TeacherSignal], dm: Any) -> dict[str, TeacherSignal]:
        """``kept`` with every level distribution at ``temperature`` and ``level_bias`` (fitted on the validation
        split for ``fit``)."""
        import dataclasses

        import torch

        from ellm_mkd.calibration import (
            apply_temperature,
            cross_validate_bias,
            fit_temperature,
            fit_temperature_and_bias,
        )

        t, bias = self.temperature, self.level_bias
        if isinstance(bias, list) and len(bias) != len(dm.level_names):
            raise ValueError(
                f"{self.cache_dir}: level_bias has {len(bias)} values, the data has {len(dm.level_names)} levels "
                f"({', '.join(dm.level_names)})"
            )
        if t == "fit":
            val = getattr(dm, "datasets", {}).get("val")
            rows = [
                r for r in (val.rows if val is not None else []) if r["label"] is not None and r["example_id"] in kept
            ]
            if len(rows) < 20:
                raise ValueError(
                    f"{self.cache_dir}: temperature: fit needs the teacher's readout of labelled validation pairs in "
                    f"the cache, found {len(rows)} (write the cache with data.predict_split: all, or val)"
                )
            probs = torch.tensor([kept[r["example_id"]].level_probs for r in rows])
            labels = torch.tensor([r["label"] for r in rows])
            cv = None
            if bias == "auto":
                try:
                    cv = cross_validate_bias(probs, labels, [r["query"] for r in rows])
                except ValueError as e:
                    raise ValueError(
                        f"{self.cache_dir}: level_bias: auto chooses the biases on validation queries: {e}"
                    ) from None
            fit = fit_temperature_and_bias if bias == "fit" or (cv and cv["bias"]) else fit_temperature
            self.calibration = fit(probs, labels)
            self.calibration.cv = cv
            t, bias = self.calibration.temperature, self.calibration.bias
            log.info(
                "teacher cache %s: level distributions calibrated, %s", self.cache_dir, self.calibration.describe()
            )
        if t == 1.0 and bias is None:
            return kept
        ids = list(kept)
        probs = torch.tensor([kept[i].level_probs for i in ids], dtype=torch.float64)
        scaled = apply_temperature(probs, float(t), bias)
        return {i: dataclasses.replace(kept[i], level_probs=p) for i, p in zip(ids, scaled.tolist())}

    def covers(self, example_id: str) -> bool:
        return example_id in self._signals

    @property
    def hidden_size(self) -> int | None:
        return self.manifest.get("hidden_size") if any(s.hidden is not None for s in self._signals.values()) else None

    def signals(self, rows: list[dict[str, Any]]) -> list[TeacherSignal | None]:
        return [self._signals.get(r["example_id"]) for r in rows]
