"""A teacher in the loop: :class:`LiveTeacher` runs a :class:`~lightning_modules.TeacherLM` on every
batch as the data module collates it, returning the same :class:`~ellm_mkd.teacher_cache.TeacherSignal`
records as a teacher cache (:class:`datamodules.teacher_signal.CachedTeacher`).

YAML::

    data:
      teacher:
        class_path: lightning_modules.live_teacher.LiveTeacher
        init_args: {checkpoint: runs/teacher/last.ckpt, readout: direct}
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from datamodules.teacher_signal import TeacherSource
from ellm_mkd.teacher_cache import TeacherSignal, signals_from_prediction

from .teacher import TeacherLM


class LiveTeacher(TeacherSource):
    """A teacher run on every batch as it is collated (online); see the module docstring.

    Args:
        model: base model of the teacher (bundled name, local directory or hub id).
        checkpoint: a teacher Lightning checkpoint (``ellm-mkd fit`` on a teacher config); overrides
            ``model`` and ``adapter`` with what the checkpoint holds.
        adapter: a LoRA adapter directory (``<export_dir>/adapter``).
        readout: ``direct`` (one forward pass) or ``cot`` (generate the chain, then read).
        max_new_tokens: generation budget of a chain in ``cot``.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        checkpoint: str | None = None,
        adapter: str | None = None,
        readout: Literal["direct", "cot"] = "direct",
        max_new_tokens: int = 128,
    ):
        self.model, self.checkpoint, self.adapter = model, checkpoint, adapter
        self.readout, self.max_new_tokens = readout, max_new_tokens
        self.missing = "error"
        self.teacher: Any = None

    def bind(self, dm: Any) -> None:
        if self.checkpoint:
            teacher = TeacherLM.load_from_checkpoint(self.checkpoint, map_location="cpu", log_figures=False)
        else:
            teacher = TeacherLM(
                model=self.model,
                adapter=self.adapter,
                num_levels=dm.num_levels,
                relevant_level=dm.relevant_level,
                log_figures=False,
            )
        teacher.connect_levels(dm, "predict")
        teacher.use_readout(self.readout, self.max_new_tokens)
        self.teacher = teacher.eval().requires_grad_(False)

    @torch.no_grad()
    def signals(self, rows: list[dict[str, Any]]) -> list[TeacherSignal | None]:
        if self.teacher is None:
            raise RuntimeError("LiveTeacher.bind(datamodule) must run before signals()")
        batch = {
            "example_id": [r["example_id"] for r in rows],
            "query": [r["query"] for r in rows],
            "item_text": [r["item_text"] for r in rows],
        }
        return list(signals_from_prediction(self.teacher.predict_step(batch, 0)))
