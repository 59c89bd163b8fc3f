"""``model.json``: what an exported student is and how to feed it, read by ``score``, ``serve`` and users.

Written by ``ellm-mkd export`` beside the ONNX graphs and the tokenizer. Fields:

``format``/``format_version``   ``ellm-mkd-student`` / 1
``kind``               ``cross_encoder`` or ``two_tower``
``levels``             ``[{"name", "grade"}]`` in level order; the expected grade is ``sum_k p_k * grade_k``
``relevant_level``     first level counted as relevant (AUC)
``dimensions``, ``verdicts``   the chain-of-thought dimensions and their verdict names (the explanation)
``item_fields``, ``item_rendering``   how an item's fields become its text (``datamodules.text``)
``max_seq_length``, ``inputs``       the token budget and the graphs' token inputs
``graphs``             ``{name: {"fp32": file, "int8": file?, "inputs": [...], "outputs": [...]}}``
``tokenizer``          folder of the tokenizer files
``sentence_transformers``   folder loadable by ``sentence_transformers.CrossEncoder`` (or null + ``why``)
``training``           checkpoint, data and teacher fingerprints
``metrics``            the checkpoint's monitored metric and any metrics given at export
``parity``             ONNX vs PyTorch on a sample, per precision (measured at export)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "ellm-mkd-student"
FORMAT_VERSION = 1
CARD_FILE = "model.json"
KINDS = ("cross_encoder", "two_tower")


@dataclass
class ModelCard:
    kind: str
    level_names: list[str]
    level_grades: list[float]
    relevant_level: int
    dimensions: list[str]
    verdicts: list[str]
    item_fields: list[str]
    max_seq_length: int
    inputs: list[str]
    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)
    item_rendering: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = "tokenizer"
    sentence_transformers: dict[str, Any] = field(default_factory=dict)
    encoder: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.level_names) != len(self.level_grades):
            raise ValueError(f"{len(self.level_names)} level names but {len(self.level_grades)} grades")

    @property
    def num_levels(self) -> int:
        return len(self.level_names)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["levels"] = [{"name": n, "grade": g} for n, g in zip(d.pop("level_names"), d.pop("level_grades"))]
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **d}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CARD_FILE
        path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ModelCard:
        path = Path(directory) / CARD_FILE
        if not path.is_file():
            raise FileNotFoundError(2, f"no {CARD_FILE} (not a directory written by ellm-mkd export)", str(path))
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if d.get("format") != FORMAT:
            raise ValueError(f"{path}: format is {d.get('format')!r}, expected {FORMAT!r}")
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {d['format_version']} is newer than this ellm-mkd reads")
        levels = d.pop("levels")
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(level_names=[lv["name"] for lv in levels], level_grades=[lv["grade"] for lv in levels], **d)
