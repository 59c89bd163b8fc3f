"""Callbacks: multi-dimensional distillation (the blended loss), the teacher cache writer and a
throughput timer."""

from .mkd import MKDistillation, Schedule
from .teacher_cache_writer import TeacherCacheWriter
from .timer import ThroughputTimer

__all__ = ["MKDistillation", "Schedule", "TeacherCacheWriter", "ThroughputTimer"]
