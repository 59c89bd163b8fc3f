"""Callbacks: multi-dimensional distillation (the blended loss), the teacher cache writer, a
throughput timer, progress as plain log lines and a checkpoint when a run is preempted."""

from .mkd import MKDistillation, Schedule
from .preemption import CheckpointOnPreemption
from .progress import LogProgress
from .teacher_cache_writer import TeacherCacheWriter
from .timer import ThroughputTimer

__all__ = [
    "CheckpointOnPreemption",
    "LogProgress",
    "MKDistillation",
    "Schedule",
    "TeacherCacheWriter",
    "ThroughputTimer",
]
