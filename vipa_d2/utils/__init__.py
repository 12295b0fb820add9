"""
Utilities: drawing of referring-segmentation results (``visualizer``), crash-safe file
writes (``atomic_io``), checkpoint file reading (``checkpoint_file``), model cost
(``analysis``), train_net.py runs for the tools (``runs``).
"""
from .visualizer import draw_overlay, draw_prediction_and_target, draw_relevance_figure, save_image

__all__ = ["draw_overlay", "draw_prediction_and_target", "draw_relevance_figure", "save_image"]
