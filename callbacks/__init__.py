"""Callbacks: multi-dimensional distillation (the blended loss) and the teacher cache writer."""

from .mkd import MKDistillation, Schedule
from .teacher_cache_writer import TeacherCacheWriter

__all__ = ["MKDistillation", "Schedule", "TeacherCacheWriter"]
