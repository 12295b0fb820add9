"""Shape categories of the synthetic benchmark as unit polygons, and their colours."""

import math
from typing import Dict, Tuple

import numpy as np

__all__ = ["CATEGORIES", "COLOURS", "PLURALS", "shape_polygon"]

# Vertices used to approximate round outlines (circle, heart).
_ROUND_VERTICES = 48
# Inner / outer radius of the five-pointed star.
_STAR_INNER = 0.45
# Half-width of the cross arms relative to the arm length.
_CROSS_HALF_WIDTH = 0.3
# Half-width of the diamond relative to its half-height (taller than wide, so a rotated
# square never reads as a diamond).
_DIAMOND_HALF_WIDTH = 0.62


def _regular(n: int, phase: float) -> np.ndarray:
    t = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star() -> np.ndarray:
    t = -math.pi / 2 + np.arange(10) * math.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _cross() -> np.ndarray:
    a = _CROSS_HALF_WIDTH
    # The top arm's outline up to the inner corner, repeated for each arm by quarter turns
    # ((x, y) -> (-y, x) turns clockwise in image coordinates).
    quarter = np.array([(-a, -1.0), (a, -1.0), (a, -a)])
    turn = np.array([[0.0, 1.0], [-1.0, 0.0]])
    return np.concatenate([quarter @ np.linalg.matrix_power(turn, k) for k in range(4)])


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, _ROUND_VERTICES, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    return pts - (pts.max(axis=0) + pts.min(axis=0)) / 2


def _unit(pts: np.ndarray) -> np.ndarray:
    """Scale an outline to circumradius 1, so a shape of radius r stays inside its circle."""
    return pts / np.linalg.norm(pts, axis=1).max()


# Unit outlines (centred, circumradius 1; image y axis points down) and the largest
# rotation (degrees) that keeps each category recognisable.
_OUTLINES: Dict[str, Tuple[np.ndarray, float]] = {
    "circle": (_regular(_ROUND_VERTICES, 0.0), 0.0),
    "square": (_regular(4, math.pi / 4), 12.0),
    "triangle": (_regular(3, -math.pi / 2), 12.0),
    "star": (_star(), 36.0),
    "hexagon": (_regular(6, 0.0), 30.0),
    "cross": (_unit(_cross()), 12.0),
    "heart": (_unit(_heart()), 15.0),
    "diamond": (
        np.array(
            [(0, -1), (_DIAMOND_HALF_WIDTH, 0), (0, 1), (-_DIAMOND_HALF_WIDTH, 0)], dtype=np.float64
        ),
        8.0,
    ),
}

CATEGORIES: Tuple[str, ...] = tuple(_OUTLINES)
PLURALS: Dict[str, str] = {
    c: (c + "es" if c.endswith(("s", "x", "ss")) else c + "s") for c in CATEGORIES
}

# Nameable colours, BGR (OpenCV order).
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (40, 40, 215),
    "green": (60, 175, 50),
    "blue": (210, 90, 25),
    "yellow": (35, 215, 235),
    "purple": (165, 50, 140),
    "orange": (25, 135, 250),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}


def shape_polygon(
    category: str, cx: float, cy: float, radius: float, angle_frac: float
) -> np.ndarray:
    """
    Outline of ``category`` centred at (cx, cy) with circumradius ``radius``, rotated by
    ``angle_frac`` in [-1, 1] times the category's allowed rotation. Returns (K, 2) float.
    """
    unit, max_deg = _OUTLINES[category]
    a = math.radians(max_deg * angle_frac)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return unit @ rot.T * radius + np.array([cx, cy])
