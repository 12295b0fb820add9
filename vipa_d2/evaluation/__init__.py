"""Detectron2 evaluators for referring image segmentation."""
from .referring_evaluation import PRECISION_THRESHOLDS, ReferringEvaluator, results_file_name
from .results_csv import print_csv_format

__all__ = ["ReferringEvaluator", "PRECISION_THRESHOLDS", "print_csv_format", "results_file_name"]
