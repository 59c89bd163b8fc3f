"""Lightning modules: the ELLM-rele teacher and the two students."""

from .base import RelevanceStudent, StudentOutput
from .cross_encoder import CrossEncoderStudent
from .teacher import TeacherLM
from .two_tower import TwoTowerStudent

__all__ = ["RelevanceStudent", "StudentOutput", "CrossEncoderStudent", "TwoTowerStudent", "TeacherLM"]
