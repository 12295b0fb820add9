"""Detectron2 evaluators for referring image segmentation."""
from .referring_evaluation import PRECISION_THRESHOLDS, ReferringEvaluator

__all__ = ["ReferringEvaluator", "PRECISION_THRESHOLDS"]
