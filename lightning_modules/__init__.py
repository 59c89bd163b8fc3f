"""Lightning modules: the students (and, in later stages, the teacher)."""

from .base import RelevanceStudent, StudentOutput
from .cross_encoder import CrossEncoderStudent
from .two_tower import TwoTowerStudent

__all__ = ["RelevanceStudent", "StudentOutput", "CrossEncoderStudent", "TwoTowerStudent"]
