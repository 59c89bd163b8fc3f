"""Label schemes: raw labels of a dataset -> ordered relevance levels ``0..K-1``.

Every scheme turns one raw label into ``(level, grade, gain)``:

* ``level`` — the class a model predicts (0 is least relevant);
* ``grade`` — the number RMSE is measured against (the raw mean for graded data, the level otherwise);
* ``gain``  — the gain nDCG uses.

A raw label that does not fit raises :class:`LabelError` with a message saying what was expected;
the reader turns it into a row problem naming file, line and column.

Schemes (``scheme:`` in config, by name or as ``{name: ..., <options>}``):

``esci``     Amazon ESCI: letters ``E/S/C/I`` or words ``Exact/Substitute/Complement/Irrelevant``
             (any case); levels I=0 < C=1 < S=2 < E=3, gains 0 / 0.01 / 0.1 / 1 (the ESCI paper's).
``graded``   a mean of human grades in ``[low, high]`` (Home Depot: 1..3). ``cut_points`` split the
             range into levels (level = number of cut points <= grade); the raw grade is kept for
             RMSE; gain = (grade - low) / (high - low).
``ordinal``  integers ``low..high`` (CrowdFlower: 1..4); level = value - low; gain linear.
``binary``   0/1, true/false, yes/no, relevant/irrelevant.
``levels``   labels that already are levels ``0..K-1`` (the project's own example files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class LabelError(ValueError):
    """A raw label that the scheme cannot map; the message says what was expected."""


def _as_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise LabelError(f"expected a number, got boolean {raw!r}")
    if isinstance(raw, (int, float)):
        v = float(raw)
    else:
        s = str(raw).strip()
        if not s:
            raise LabelError("label is empty")
        try:
            v = float(s)
        except ValueError:
            raise LabelError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise LabelError(f"expected a finite number, got {raw!r}")
    return v


@dataclass
class LabelScheme:
    """Base class. Subclasses set ``name`` and implement :meth:`parse`."""

    name: str = "levels"
    num_levels: int = 2
    level_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_levels < 2:
            raise ValueError(f"a label scheme needs at least 2 levels, got {self.num_levels}")
        if not self.level_names:
            self.level_names = _default_names(self.num_levels)
        self.level_names = tuple(self.level_names)
        if len(self.level_names) != self.num_levels:
            raise ValueError(f"level_names has {len(self.level_names)} names for {self.num_levels} levels")
        if len(set(self.level_names)) != self.num_levels:
            raise ValueError(f"level_names must be distinct: {self.level_names}")

    def parse(self, raw: Any) -> tuple[int, float, float]:
        raise NotImplementedError

    def gains(self) -> tuple[float, ...]:
        """Gain of each level (for data that has only levels)."""
        return tuple(i / (self.num_levels - 1) for i in range(self.num_levels))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "num_levels": self.num_levels, "level_names": list(self.level_names)}


def _default_names(k: int) -> tuple[str, ...]:
    return {
        2: ("irrelevant", "relevant"),
        3: ("irrelevant", "partial", "relevant"),
        4: ("irrelevant", "complement", "substitute", "exact"),
    }.get(k, tuple(f"level{i}" for i in range(k)))


@dataclass
class LevelScheme(LabelScheme):
    """Labels that already are integer levels ``0..num_levels-1``."""

    name: str = "levels"
    num_levels: int = 4
    level_gains: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.level_gains and len(self.level_gains) != self.num_levels:
            raise ValueError(f"level_gains has {len(self.level_gains)} values for {self.num_levels} levels")

    def gains(self) -> tuple[float, ...]:
        return tuple(self.level_gains) if self.level_gains else super().gains()

    def parse(self, raw: Any) -> tuple[int, float, float]:
        v = _as_float(raw)
        if v != int(v) or not 0 <= v < self.num_levels:
            raise LabelError(f"expected an integer level in 0..{self.num_levels - 1}, got {raw!r}")
        lv = int(v)
        return lv, float(lv), self.gains()[lv]


ESCI_LETTERS = {"i": 0, "c": 1, "s": 2, "e": 3}
ESCI_WORDS = {"irrelevant": 0, "complement": 1, "substitute": 2, "exact": 3}
ESCI_GAINS = (0.0, 0.01, 0.1, 1.0)


@dataclass
class EsciScheme(LevelScheme):
    """ESCI letters or words -> I=0 < C=1 < S=2 < E=3 with the ESCI gains."""

    name: str = "esci"
    num_levels: int = 4
    level_names: tuple[str, ...] = ("irrelevant", "complement", "substitute", "exact")
    level_gains: tuple[float, ...] = ESCI_GAINS

    def parse(self, raw: Any) -> tuple[int, float, float]:
        s = str(raw).strip().casefold() if raw is not None else ""
        lv = ESCI_LETTERS.get(s, ESCI_WORDS.get(s))
        if lv is None:
            raise LabelError(f"expected an ESCI label (E/S/C/I or Exact/Substitute/Complement/Irrelevant), got {raw!r}")
        return lv, float(lv), self.level_gains[lv]


@dataclass
class GradedScheme(LabelScheme):
    """Mean of human grades in ``[low, high]``; ``cut_points`` make levels, the grade is kept."""

    name: str = "graded"
    low: float = 1.0
    high: float = 3.0
    cut_points: tuple[float, ...] = (2.0, 2.5)
    num_levels: int = 0  # derived from cut_points

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"graded scheme needs low < high, got {self.low}, {self.high}")
        cps = tuple(float(c) for c in self.cut_points)
        if list(cps) != sorted(set(cps)) or any(not self.low < c <= self.high for c in cps):
            raise ValueError(f"cut_points must increase strictly within ({self.low}, {self.high}]: {self.cut_points}")
        self.cut_points = cps
        self.num_levels = len(cps) + 1
        super().__post_init__()

    def parse(self, raw: Any) -> tuple[int, float, float]:
        v = _as_float(raw)
        if not self.low <= v <= self.high:
            raise LabelError(f"expected a grade in [{self.low:g}, {self.high:g}], got {raw!r}")
        lv = sum(1 for c in self.cut_points if v >= c)
        return lv, v, (v - self.low) / (self.high - self.low)

    def gains(self) -> tuple[float, ...]:
        edges = (self.low, *self.cut_points, self.high)
        return tuple(((a + b) / 2 - self.low) / (self.high - self.low) for a, b in zip(edges, edges[1:]))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "low": self.low, "high": self.high, "cut_points": list(self.cut_points)}


@dataclass
class OrdinalScheme(LabelScheme):
    """Integer ratings ``low..high`` (CrowdFlower 1..4): level = value - low."""

    name: str = "ordinal"
    low: int = 1
    high: int = 4
    num_levels: int = 0  # derived

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"ordinal scheme needs low < high, got {self.low}, {self.high}")
        self.num_levels = self.high - self.low + 1
        super().__post_init__()

    def parse(self, raw: Any) -> tuple[int, float, float]:
        v = _as_float(raw)
        if v != int(v) or not self.low <= v <= self.high:
            raise LabelError(f"expected an integer rating in {self.low}..{self.high}, got {raw!r}")
        return int(v) - self.low, v, (v - self.low) / (self.high - self.low)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "low": self.low, "high": self.high}


_BINARY_TRUE = {"1", "1.0", "true", "yes", "y", "relevant", "pos", "positive"}
_BINARY_FALSE = {"0", "0.0", "false", "no", "n", "irrelevant", "neg", "negative"}


@dataclass
class BinaryScheme(LabelScheme):
    """0/1, true/false, yes/no, relevant/irrelevant."""

    name: str = "binary"
    num_levels: int = 2

    def parse(self, raw: Any) -> tuple[int, float, float]:
        s = str(raw).strip().casefold() if raw is not None else ""
        if s in _BINARY_TRUE:
            return 1, 1.0, 1.0
        if s in _BINARY_FALSE:
            return 0, 0.0, 0.0
        raise LabelError(f"expected a binary label (0/1, true/false, yes/no, relevant/irrelevant), got {raw!r}")


SCHEMES: dict[str, type[LabelScheme]] = {
    "esci": EsciScheme,
    "graded": GradedScheme,
    "ordinal": OrdinalScheme,
    "binary": BinaryScheme,
    "levels": LevelScheme,
}


def make_scheme(spec: str | dict[str, Any] | LabelScheme) -> LabelScheme:
    """Build a scheme from a name (``"esci"``), a dict (``{"name": "graded", "cut_points": [2, 2.5]}``)
    or return a scheme instance unchanged."""
    if isinstance(spec, LabelScheme):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in SCHEMES:
        raise ValueError(f"unknown label scheme {name!r}; choose one of {sorted(SCHEMES)}")
    cls = SCHEMES[name]
    allowed = {f for f in cls.__dataclass_fields__ if f != "name"}
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"label scheme {name!r} has no option(s) {sorted(unknown)}; options: {sorted(allowed)}")
    for k in ("cut_points", "level_names", "level_gains"):
        if k in spec and spec[k] is not None:
            spec[k] = tuple(spec[k])
    return cls(**spec)
