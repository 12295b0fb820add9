"""Pictures of referring-segmentation results: mask overlays, prediction beside target,
relevance heatmaps and the visual tokens each linguistic cue retrieved (the paper's
"visualized attention").

Every function takes an HxWx3 uint8 image in ``image_format`` (default RGB) and
returns an RGB uint8 array; :func:`save_image` writes such an array to disk.

The overlay is designed to be unmistakable and checkable: everything outside the mask is
dimmed, the mask keeps the image's own colours and is outlined inside its border by a
white and a black ring (one of them contrasts with any object colour), and the caption,
drawn with Detectron2's ``Visualizer`` (any Unicode text its font has), lives in a band at
the top whose height :func:`caption_layout` reports.
"""
import math
import os
from typing import Dict, List, Tuple

import cv2
import numpy as np
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath
from PIL import Image

from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.utils.visualizer import Visualizer

from .atomic_io import atomic_open

__all__ = [
    "caption_layout",
    "draw_caption",
    "draw_overlay",
    "draw_prediction_and_target",
    "draw_relevance",
    "draw_retrieved_tokens",
    "draw_relevance_figure",
    "save_image",
    "side_by_side",
]

# Style. Colours are RGB. The tint of retrieved visual tokens, far from the primary colours.
MASK_COLOR = (30, 144, 255)
MASK_ALPHA = 0.5
# Outside the mask the overlay keeps this share of the brightness: the mask stands out
# in its own colours, whatever they are (a tint would blend into objects of its hue).
BACKGROUND_DIM = 0.4
# The mask's outline, outermost ring first; each ring is as thick as 1/CONTOUR_FRACTION of
# the short image side (at least 1 px). White and black: one contrasts with any colour.
CONTOUR_COLORS = ((255, 255, 255), (0, 0, 0))
CONTOUR_FRACTION = 100
CAPTION_TEXT_COLOR = "white"
# The caption band darkens the image under it by this factor, for legibility.
CAPTION_BAND_DIM = 0.35
# Font height in pixels per pixel of the short image side, and its lower bound.
CAPTION_FONT_FRACTION = 1 / 24
CAPTION_MIN_FONT_PX = 8
CAPTION_MAX_LINES = 2
# Detectron2's Visualizer.draw_text font family; its default (DejaVu Sans) covers Latin,
# Greek and Cyrillic scripts.
CAPTION_FONT_FAMILY = "sans-serif"
# matplotlib sizes text in points: 72 per inch.
POINTS_PER_INCH = 72
# Unretrieved visual tokens are dimmed to this share of their brightness.
TOKEN_DIM = 0.3
# Long side, in pixels, of each tile of the relevance figure.
FIGURE_TILE_SIDE = 256
# Width in pixels of the white gap between pictures shown side by side (prediction and target).
SIDE_BY_SIDE_GAP = 4


def _to_rgb(image: np.ndarray, image_format: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"Expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}"
        )
    return np.ascontiguousarray(convert_image_to_rgb(image, image_format))


def _font_px(height: int, width: int) -> Tuple[float, int]:
    """(font size, padding) in pixels for an image of this size."""
    size = max(min(height, width) * CAPTION_FONT_FRACTION, CAPTION_MIN_FONT_PX)
    return size, max(2, int(round(size / 3)))


def _text_extent(text: str, size_px: float) -> Tuple[float, float]:
    """(width, height) in pixels of ``text`` at font size ``size_px`` (at 72 dpi a point
    is a pixel)."""
    prop = FontProperties(family=CAPTION_FONT_FAMILY, size=size_px)
    width, height, descent = TextToPath().get_text_width_height_descent(text, prop, ismath=False)
    return width, height + descent


def _text_width(text: str, size_px: float) -> float:
    return _text_extent(text, size_px)[0]


def _shorten(text: str, max_width: int, size_px: float, keep: str = "") -> str:
    """The longest start of ``text`` that fits ``max_width`` followed by '...' and ``keep``,
    for a ``text`` + ``keep`` that does not fit (:func:`_fitted`): nor does all of it cut."""
    # Bisection over the cut: one measurement per character made captions of a long
    # expression take seconds to minutes (the web demo takes any text).
    fits, cut = 0, len(text)
    while cut - fits > 1:
        middle = (fits + cut) // 2
        if _text_width(text[:middle] + "..." + keep, size_px) <= max_width:
            fits = middle
        else:
            cut = middle
    return text[:fits] + "..." + keep


def _fitted(text: str, max_width: int, size_px: float, keep: str = "") -> str:
    """``text`` and ``keep`` when they fit ``max_width``, else :func:`_shorten`'s cut."""
    if _text_width(text + keep, size_px) <= max_width:
        return text + keep
    return _shorten(text, max_width, size_px, keep)


def _wrap(text: str, max_width: int, size_px: float, suffix: str = "") -> List[str]:
    """Greedy word wrap into at most CAPTION_MAX_LINES lines; a line that does not fit,
    or the last line when words are left over, ends in '...'. ``suffix`` (a score) ends
    the last line, after the '...' when the text is cut."""
    lines: List[str] = []
    words = text.split(" ")
    while words and len(lines) < CAPTION_MAX_LINES - 1:
        line = words.pop(0)
        while words and _text_width(line + " " + words[0], size_px) <= max_width:
            line += " " + words.pop(0)
        lines.append(_fitted(line, max_width, size_px))
    if words:  # the last line: all that is left
        lines.append(_fitted(" ".join(words), max_width, size_px, keep=suffix))
    elif suffix and _text_width(lines[-1] + suffix, size_px) <= max_width:
        lines[-1] += suffix
    elif suffix:
        lines.append(_fitted(suffix.strip(), max_width, size_px))
    return lines


def _line_height(size_px: float) -> int:
    # An accented capital and a descender: the tallest a line of text gets.
    return int(math.ceil(_text_extent("Ág", size_px)[1]))


def caption_layout(text: str, height: int, width: int, suffix: str = "") -> Tuple[List[str], int]:
    """
    How :func:`draw_caption` lays ``text`` (then ``suffix``, kept when the text is cut) out
    on an image of ``height`` x ``width``: the wrapped lines and the height in pixels of the
    band (at the top of the image) that the caption occupies. Returns ``([], 0)`` for an
    empty caption.
    """
    text = " ".join(text.split())
    if not text:
        return [], 0
    size, pad = _font_px(height, width)
    lines = _wrap(text, max(1, width - 2 * pad), size, suffix)
    band = len(lines) * (_line_height(size) + pad) + pad
    return lines, min(band, height)


def draw_caption(image: np.ndarray, text: str, image_format: str = "RGB", suffix: str = "") -> np.ndarray:
    """
    ``image`` with ``text`` and ``suffix`` written in a darkened band across its top (RGB
    out), by Detectron2's ``Visualizer.draw_text``: Unicode text is drawn as such.
    """
    out = _to_rgb(image, image_format).copy()
    h, w = out.shape[:2]
    lines, band = caption_layout(text, h, w, suffix)
    if not lines:
        return out
    size, pad = _font_px(h, w)
    dimmed = (out[:band].astype(np.float32) * CAPTION_BAND_DIM).round().astype(np.uint8)
    visualizer = Visualizer(dimmed, scale=1.0)
    # draw_text sizes its font in points, which the figure renders at its dpi.
    points = size * POINTS_PER_INCH / visualizer.output.dpi
    y = pad
    for line in lines:
        # Escaped dollar signs: matplotlib would read text between two of them as a
        # formula ("the $5 bill left of the $10 bill" lost its signs and spaces).
        visualizer.draw_text(
            line.replace("$", r"\$"), (pad, y), font_size=points, color=CAPTION_TEXT_COLOR,
            horizontal_alignment="left",
        )
        y += _line_height(size) + pad
    out[:band] = visualizer.output.get_image()
    return out


def _contour_rings(mask: np.ndarray) -> List[np.ndarray]:
    """The mask's border as len(CONTOUR_COLORS) nested rings inside it, outermost first."""
    h, w = mask.shape
    thickness = max(1, int(round(min(h, w) / CONTOUR_FRACTION)))
    kernel = np.ones((2 * thickness + 1, 2 * thickness + 1), np.uint8)
    rings, current = [], mask
    for _ in CONTOUR_COLORS:
        # Zero border: a mask touching the image edge gets a contour along that edge too.
        inner = cv2.erode(
            current.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0
        ).astype(bool)
        rings.append(current & ~inner)
        current = inner
    return rings


def draw_overlay(
    image: np.ndarray,
    result: Dict,
    text: str,
    image_format: str = "RGB",
    dim: float = BACKGROUND_DIM,
) -> np.ndarray:
    """
    The predicted mask over the image, at the image's size (RGB uint8 out).

    Args:
        image: HxWx3 uint8 image in ``image_format``.
        result: one :class:`vipa_d2.VIPAPredictor` result; uses ``result["mask"]`` (bool HxW)
            and, in the caption, ``result["confidence"]`` when present.
        text: the expression, drawn as the caption.

    Pixels outside the mask keep ``dim`` of their brightness; mask pixels are unchanged
    except for the white-then-black outline inside the mask's border; the caption band at
    the top is drawn over all of it.
    """
    rgb = _to_rgb(image, image_format)
    mask = np.asarray(result["mask"]).astype(bool)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"Mask shape {mask.shape} does not match image shape {rgb.shape[:2]}")
    out = rgb.copy()
    out[~mask] = (rgb[~mask].astype(np.float32) * dim).round().astype(np.uint8)
    for ring, color in zip(_contour_rings(mask), CONTOUR_COLORS):
        out[ring] = color
    # The score after the text, which a long expression's '...' must not cut off.
    score = f" ({float(result['confidence']):.2f})" if "confidence" in result else ""
    return draw_caption(out, text, suffix=score)


def draw_prediction_and_target(
    image: np.ndarray, result: Dict, target: np.ndarray, text: str, image_format: str = "RGB"
) -> np.ndarray:
    """
    The predicted mask (left, captioned with ``text`` and the confidence) beside the
    target mask ``target`` (bool HxW, right, captioned "target"), drawn alike by
    :func:`draw_overlay` with a white gap between: for evaluation pictures.
    """
    left = draw_overlay(image, result, f"prediction: {text}", image_format)
    right = draw_overlay(image, {"mask": target}, "target", image_format)
    return side_by_side([left, right])


def side_by_side(pictures: List[np.ndarray]) -> np.ndarray:
    """RGB uint8 pictures of one height, left to right, a white gap between each two."""
    heights = {p.shape[0] for p in pictures}
    if len(heights) != 1:
        raise ValueError(f"side_by_side needs pictures of one height, got heights {sorted(heights)}")
    gap = np.full((heights.pop(), SIDE_BY_SIDE_GAP, 3), 255, dtype=np.uint8)
    row = [pictures[0]]
    for picture in pictures[1:]:
        row += [gap, picture]
    return np.concatenate(row, axis=1)


def _normalize(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    lo, hi = float(values.min()), float(values.max())
    if not math.isfinite(lo) or not math.isfinite(hi) or hi - lo <= 0:
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


def draw_relevance(
    image: np.ndarray,
    relevance: np.ndarray,
    text: str = "",
    image_format: str = "RGB",
    alpha: float = MASK_ALPHA,
) -> np.ndarray:
    """The relevance map (min-max normalised, jet colours) blended over the image."""
    rgb = _to_rgb(image, image_format)
    relevance = np.asarray(relevance)
    if relevance.shape != rgb.shape[:2]:
        raise ValueError(
            f"Relevance shape {relevance.shape} does not match image shape {rgb.shape[:2]}"
        )
    heat = (_normalize(relevance) * 255).round().astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    out = rgb.astype(np.float32) * (1.0 - alpha) + heat.astype(np.float32) * alpha
    return draw_caption(out.round().astype(np.uint8), text)


def token_cells(tokens: np.ndarray, height: int, width: int, extent=None) -> np.ndarray:
    """
    (height, width) bool: the image pixels that the set cells of a bool token grid
    (h_tokens, w_tokens) cover. ``extent`` (rows, columns) is how many token rows and
    columns the image spans: the predictor's grid may reach past the image edge by part of
    a token (``retrieved`` entries give it). Without it the grid is stretched over the image.
    """
    grid = np.asarray(tokens).astype(bool)
    if grid.ndim != 2:
        raise ValueError(f"Expected a 2-D token grid, got shape {grid.shape}")
    extent = grid.shape if extent is None else extent
    # Each pixel's cell as cv2's INTER_NEAREST picks it, floor(x * scale), over the extent.
    rows, cols = (
        np.minimum(np.floor(np.arange(n) * (1.0 / (n / float(e)))).astype(int), g - 1)
        for n, e, g in zip((height, width), extent, grid.shape)
    )
    return grid[np.ix_(rows, cols)]


def draw_retrieved_tokens(
    image: np.ndarray, word: str, tokens: np.ndarray, image_format: str = "RGB", extent=None
) -> np.ndarray:
    """
    Which visual tokens one linguistic cue retrieved: ``tokens`` is a bool grid
    (h_tokens, w_tokens) over the image (``extent``: see :func:`token_cells`); retrieved
    cells keep their brightness and are tinted, the others are dimmed. ``word`` is the
    caption.
    """
    rgb = _to_rgb(image, image_format)
    cells = token_cells(tokens, *rgb.shape[:2], extent)
    out = rgb.astype(np.float32)
    out[~cells] *= TOKEN_DIM
    col = np.asarray(MASK_COLOR, dtype=np.float32)
    out[cells] = out[cells] * (1.0 - MASK_ALPHA / 2) + col * (MASK_ALPHA / 2)
    return draw_caption(out.round().astype(np.uint8), word)


def _fit(image: np.ndarray, side: int) -> np.ndarray:
    h, w = image.shape[:2]
    s = side / max(h, w)
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def draw_relevance_figure(
    image: np.ndarray,
    result: Dict,
    text: str,
    image_format: str = "RGB",
    tile_side: int = FIGURE_TILE_SIDE,
) -> np.ndarray:
    """
    A grid of tiles: the relevance heatmap (captioned with the expression), then one
    tile per linguistic cue showing the visual tokens it retrieved (from
    ``result["retrieved"]``, a list of ``{"word": str, "tokens": bool grid}``, when the
    model exposes it). Tiles have long side ``tile_side``.
    """
    rgb = _to_rgb(image, image_format)
    small = _fit(rgb, tile_side)
    sh, sw = small.shape[:2]
    relevance = cv2.resize(
        np.asarray(result["relevance"], dtype=np.float32), (sw, sh), interpolation=cv2.INTER_LINEAR
    )
    tiles = [draw_relevance(small, relevance, f"relevance: {text}")]
    for cue in result.get("retrieved") or []:
        tiles.append(draw_retrieved_tokens(small, cue["word"], cue["tokens"], extent=cue.get("extent")))
    cols = int(math.ceil(math.sqrt(len(tiles))))
    rows = int(math.ceil(len(tiles) / cols))
    figure = np.zeros((rows * sh, cols * sw, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        figure[r * sh : (r + 1) * sh, c * sw : (c + 1) * sw] = tile
    return figure


def save_image(path: str, rgb: np.ndarray) -> None:
    """Write an RGB (HxWx3) or grey (HxW) uint8 array (format from the file extension);
    creates the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    picture = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    extension = os.path.splitext(path)[1].lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None:
        raise ValueError(f"{path}: unknown picture file extension {extension!r}")
    # Written beside it, then renamed: a run stopped mid-write (or a mode the format cannot
    # take) leaves the file as it was, not a truncated picture under its name.
    with atomic_open(path, "wb") as f:
        picture.save(f, format=image_format)
