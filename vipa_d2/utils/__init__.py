"""
Utilities: drawing of referring-segmentation results (``visualizer``), crash-safe file
writes (``atomic_io``), model cost (``analysis``), train_net.py runs for the tools (``runs``).
"""
from .visualizer import draw_overlay, draw_relevance_figure, save_image

__all__ = ["draw_overlay", "draw_relevance_figure", "save_image"]
