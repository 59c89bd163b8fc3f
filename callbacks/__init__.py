"""Callbacks: multi-dimensional distillation (the blended loss), the teacher cache writer, a
throughput timer and progress as plain log lines."""

from .mkd import MKDistillation, Schedule
from .progress import LogProgress
from .teacher_cache_writer import TeacherCacheWriter
from .timer import ThroughputTimer

__all__ = ["LogProgress", "MKDistillation", "Schedule", "TeacherCacheWriter", "ThroughputTimer"]
