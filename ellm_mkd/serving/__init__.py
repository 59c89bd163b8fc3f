"""Shipped students: the model card (``model.json``), the scoring runtime (ONNX or PyTorch graphs) and the
two-tower item vector index. Used by ``ellm-mkd export``, ``score``, ``serve`` and ``bench serve``."""

from .card import CARD_FILE, ModelCard
from .scorer import OnnxRunner, PairScores, Scorer, TorchRunner

__all__ = ["CARD_FILE", "ModelCard", "OnnxRunner", "PairScores", "Scorer", "TorchRunner"]
