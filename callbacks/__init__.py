"""Callbacks: multi-dimensional distillation (the blended loss), the teacher cache writer, a
throughput timer, progress as plain log lines, a checkpoint when a run is preempted and the scores file of a
student's predict run."""

from .mkd import MKDistillation, Schedule
from .preemption import CheckpointOnPreemption
from .progress import LogProgress
from .score_writer import StudentScoreWriter
from .teacher_cache_writer import TeacherCacheWriter
from .timer import ThroughputTimer

__all__ = [
    "CheckpointOnPreemption",
    "LogProgress",
    "MKDistillation",
    "Schedule",
    "StudentScoreWriter",
    "TeacherCacheWriter",
    "ThroughputTimer",
]
