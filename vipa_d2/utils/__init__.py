"""Utilities: drawing of referring-segmentation results (``visualizer``) and crash-safe file writes."""
from .visualizer import draw_overlay, draw_prediction_and_target, draw_relevance_figure, save_image

__all__ = ["draw_overlay", "draw_prediction_and_target", "draw_relevance_figure", "save_image"]
