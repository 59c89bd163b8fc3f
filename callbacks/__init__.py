"""Callbacks: the teacher cache writer (and, later, MKDistillation)."""

from .teacher_cache_writer import TeacherCacheWriter

__all__ = ["TeacherCacheWriter"]
