"""Pictures of referring-segmentation results: mask overlays, relevance heatmaps and
the visual tokens each linguistic cue retrieved (the paper's "visualized attention").

Every function takes an HxWx3 uint8 image in ``image_format`` (default RGB) and
returns an RGB uint8 array; :func:`save_image` writes such an array to disk.

The overlay is designed to be checkable: only mask pixels are tinted, the contour is
drawn *inside* the mask, and the caption lives in a band at the top of the image
whose height :func:`caption_layout` reports, so outside that band the overlay differs
from the input exactly on the mask pixels.
"""
import math
import os
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

from detectron2.data.detection_utils import convert_image_to_rgb

__all__ = [
    "caption_layout",
    "draw_caption",
    "draw_overlay",
    "draw_relevance",
    "draw_retrieved_tokens",
    "draw_relevance_figure",
    "save_image",
]

# Style. Colours are RGB; a tint colour far from the primary colours keeps a tinted
# pixel distinguishable from the input in practice.
MASK_COLOR = (30, 144, 255)
MASK_ALPHA = 0.5
# Opaque darker shade of the tint: the contour stands out against the tinted inside.
CONTOUR_COLOR = (0, 70, 180)
# The contour is as thick as 1/CONTOUR_FRACTION of the short image side (at least 1 px).
CONTOUR_FRACTION = 200
CAPTION_TEXT_COLOR = (255, 255, 255)
# The caption band darkens the image under it by this factor, for legibility.
CAPTION_BAND_DIM = 0.35
# Font scale 1.0 at this short image side; never below CAPTION_MIN_SCALE.
CAPTION_REFERENCE_SIDE = 640
CAPTION_MIN_SCALE = 0.3
CAPTION_MAX_LINES = 2
CAPTION_FONT = cv2.FONT_HERSHEY_SIMPLEX
# Unretrieved visual tokens are dimmed to this share of their brightness.
TOKEN_DIM = 0.3
# Long side, in pixels, of each tile of the relevance figure.
FIGURE_TILE_SIDE = 256


def _to_rgb(image: np.ndarray, image_format: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"Expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}"
        )
    return np.ascontiguousarray(convert_image_to_rgb(image, image_format))


def _ascii(text: str) -> str:
    # OpenCV's Hershey fonts draw ASCII only; anything else would come out as '?'.
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in " ".join(text.split()))


def _font(height: int, width: int) -> Tuple[float, int, int]:
    """(font scale, stroke thickness, padding) for an image of this size."""
    scale = max(min(height, width) / CAPTION_REFERENCE_SIDE, CAPTION_MIN_SCALE)
    thickness = max(1, int(round(scale * 2)))
    pad = max(2, int(round(scale * 8)))
    return scale, thickness, pad


def _text_width(text: str, scale: float, thickness: int) -> int:
    return cv2.getTextSize(text, CAPTION_FONT, scale, thickness)[0][0]


def _shorten(text: str, max_width: int, scale: float, thickness: int) -> str:
    """``text`` cut to fit ``max_width`` with a trailing '...'."""
    while text and _text_width(text + "...", scale, thickness) > max_width:
        text = text[:-1]
    return text + "..."


def _wrap(text: str, max_width: int, scale: float, thickness: int) -> List[str]:
    """Greedy word wrap into at most CAPTION_MAX_LINES lines; a line that does not fit,
    or the last line when words are left over, ends in '...'."""
    lines: List[str] = []
    words = text.split(" ")
    while words and len(lines) < CAPTION_MAX_LINES:
        line = words.pop(0)
        while words and _text_width(line + " " + words[0], scale, thickness) <= max_width:
            line += " " + words.pop(0)
        if _text_width(line, scale, thickness) > max_width:
            line = _shorten(line, max_width, scale, thickness)
        lines.append(line)
    if words:
        lines[-1] = _shorten(lines[-1] + " " + " ".join(words), max_width, scale, thickness)
    return lines


def caption_layout(text: str, height: int, width: int) -> Tuple[List[str], int]:
    """
    How :func:`draw_caption` lays ``text`` out on an image of ``height`` x ``width``:
    the wrapped lines and the height in pixels of the band (at the top of the image)
    that the caption occupies. Returns ``([], 0)`` for an empty caption.
    """
    text = _ascii(text)
    if not text:
        return [], 0
    scale, thickness, pad = _font(height, width)
    lines = _wrap(text, max(1, width - 2 * pad), scale, thickness)
    (_, line_h), baseline = cv2.getTextSize("Ag", CAPTION_FONT, scale, thickness)
    band = len(lines) * (line_h + baseline + pad) + pad
    return lines, min(band, height)


def draw_caption(image: np.ndarray, text: str, image_format: str = "RGB") -> np.ndarray:
    """``image`` with ``text`` written in a darkened band across its top (RGB out)."""
    out = _to_rgb(image, image_format).copy()
    h, w = out.shape[:2]
    lines, band = caption_layout(text, h, w)
    if not lines:
        return out
    scale, thickness, pad = _font(h, w)
    out[:band] = (out[:band].astype(np.float32) * CAPTION_BAND_DIM).round().astype(np.uint8)
    (_, line_h), baseline = cv2.getTextSize("Ag", CAPTION_FONT, scale, thickness)
    y = pad
    for line in lines:
        y += line_h
        cv2.putText(
            out, line, (pad, y), CAPTION_FONT, scale, CAPTION_TEXT_COLOR, thickness, cv2.LINE_AA
        )
        y += baseline + pad
    # putText may antialias a pixel or two past the band; keep the band the only change.
    out[band:] = _to_rgb(image, image_format)[band:]
    return out


def _inner_contour(mask: np.ndarray) -> np.ndarray:
    """Mask pixels within ``thickness`` px of the mask's border (a subset of the mask)."""
    h, w = mask.shape
    thickness = max(1, int(round(min(h, w) / CONTOUR_FRACTION)))
    kernel = np.ones((2 * thickness + 1, 2 * thickness + 1), np.uint8)
    # Zero border: a mask touching the image edge gets a contour along that edge too.
    inner = cv2.erode(
        mask.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0
    ).astype(bool)
    return mask & ~inner


def draw_overlay(
    image: np.ndarray,
    result: Dict,
    text: str,
    image_format: str = "RGB",
    color: Sequence[int] = MASK_COLOR,
    contour_color: Sequence[int] = CONTOUR_COLOR,
    alpha: float = MASK_ALPHA,
) -> np.ndarray:
    """
    The predicted mask over the image, at the image's size (RGB uint8 out).

    Args:
        image: HxWx3 uint8 image in ``image_format``.
        result: one :class:`vipa_d2.VIPAPredictor` result; uses ``result["mask"]`` (bool HxW)
            and, in the caption, ``result["confidence"]`` when present.
        text: the expression, drawn as the caption.

    Mask pixels are blended with ``color``; the contour is drawn inside the mask in
    ``contour_color``; nothing outside the mask changes except the caption band at the top.
    """
    rgb = _to_rgb(image, image_format)
    mask = np.asarray(result["mask"]).astype(bool)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"Mask shape {mask.shape} does not match image shape {rgb.shape[:2]}")
    out = rgb.astype(np.float32)
    col = np.asarray(color, dtype=np.float32)
    out[mask] = out[mask] * (1.0 - alpha) + col * alpha
    out[_inner_contour(mask)] = np.asarray(contour_color, dtype=np.float32)
    out = out.round().astype(np.uint8)
    caption = text
    if "confidence" in result:
        caption = f"{text} ({float(result['confidence']):.2f})"
    return draw_caption(out, caption)


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


def draw_retrieved_tokens(
    image: np.ndarray, word: str, tokens: np.ndarray, image_format: str = "RGB"
) -> np.ndarray:
    """
    Which visual tokens one linguistic cue retrieved: ``tokens`` is a bool grid
    (h_tokens, w_tokens) covering the image; retrieved cells keep their brightness and
    are tinted, the others are dimmed. ``word`` is the caption.
    """
    rgb = _to_rgb(image, image_format)
    h, w = rgb.shape[:2]
    grid = np.asarray(tokens).astype(np.uint8)
    if grid.ndim != 2:
        raise ValueError(f"Expected a 2-D token grid, got shape {grid.shape}")
    cells = cv2.resize(grid, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
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
        tiles.append(draw_retrieved_tokens(small, cue["word"], cue["tokens"]))
    cols = int(math.ceil(math.sqrt(len(tiles))))
    rows = int(math.ceil(len(tiles) / cols))
    figure = np.zeros((rows * sh, cols * sw, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        figure[r * sh : (r + 1) * sh, c * sw : (c + 1) * sw] = tile
    return figure


def save_image(path: str, rgb: np.ndarray) -> None:
    """Write an RGB uint8 array (format from the file extension); creates the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(path)
