"""Sample and render one synthetic scene: textured background, shapes drawn in z-order."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..masks import polygon_area
from .config import SynthConfig
from .shapes import CATEGORIES, COLOURS, shape_polygon

__all__ = ["SceneObject", "Scene", "heldout_combos", "sample_scene", "sample_size", "pick"]

# cv2 drawing with sub-pixel vertices: coordinates are scaled by 2**_SHIFT.
_SHIFT = 4


@dataclass
class SceneObject:
    category: str
    colour: str
    cx: float
    cy: float
    radius: float
    area: float  # full (unoccluded) shape area in px^2, used for size comparisons
    polygon: np.ndarray  # (K, 2) outline in pixel coordinates
    visible_frac: float = 1.0


@dataclass
class Scene:
    height: int
    width: int
    objects: List[SceneObject]  # in z-order (later objects occlude earlier ones)
    image: np.ndarray  # (H, W, 3) uint8 BGR
    instance_map: np.ndarray  # (H, W) uint8: 0 background, k + 1 the visible part of object k


def pick(rng: np.random.Generator, seq: Sequence):
    """A uniformly random element of ``seq`` (keeps Python types, unlike rng.choice)."""
    return seq[int(rng.integers(len(seq)))]


def heldout_combos(seed: int) -> Dict[str, str]:
    """
    The colour-category combinations reserved for testB: one colour per category, a
    seeded permutation, so every colour and every category still occurs in training.
    """
    rng = np.random.default_rng([seed, len(CATEGORIES)])
    colours = list(COLOURS)
    order = rng.permutation(len(colours))
    return {cat: colours[order[i % len(colours)]] for i, cat in enumerate(CATEGORIES)}


def _sample_attributes(cfg: SynthConfig, rng, n: int, heldout: Dict[str, str], use_heldout: bool):
    cats = list(CATEGORIES)
    if rng.random() < cfg.distractor_prob:
        main = pick(rng, cats)
        k = int(rng.integers(2, min(3, n) + 1))
        chosen = [main] * k + [pick(rng, cats) for _ in range(n - k)]
    else:
        chosen = [cats[i] for i in rng.permutation(len(cats))[:n]]
    order = rng.permutation(n)
    chosen = [chosen[i] for i in order]
    forced = set()
    if use_heldout:
        forced.add(int(rng.integers(n)))
        forced |= {i for i in range(n) if rng.random() < cfg.heldout_object_prob}
    colours: List[str] = []
    for i, cat in enumerate(chosen):
        if i in forced:
            colours.append(heldout[cat])
            continue
        allowed = [c for c in COLOURS if c != heldout[cat]]
        used = {colours[j] for j in range(i) if chosen[j] == cat}
        if used and rng.random() >= cfg.same_colour_prob:
            allowed = [c for c in allowed if c not in used] or allowed
        colours.append(pick(rng, allowed))
    return list(zip(chosen, colours))


def _place(cfg: SynthConfig, rng, attrs, height: int, width: int) -> Optional[List[SceneObject]]:
    short = min(height, width)
    objs: List[SceneObject] = []
    for cat, col in attrs:
        for _ in range(cfg.max_placement_tries):
            r = rng.uniform(*cfg.radius_range) * short
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            if all(
                np.hypot(cx - o.cx, cy - o.cy) >= (1.0 - cfg.max_overlap) * (r + o.radius)
                for o in objs
            ):
                break
        else:
            return None
        poly = shape_polygon(cat, cx, cy, r, rng.uniform(-1.0, 1.0))
        objs.append(SceneObject(cat, col, cx, cy, r, polygon_area(poly.reshape(-1)), poly))
    return objs


def _background(cfg: SynthConfig, rng, height: int, width: int) -> np.ndarray:
    level = rng.uniform(*cfg.background_level)
    tint = rng.uniform(-cfg.background_tint, cfg.background_tint, size=3)
    gh, gw = (int(rng.integers(cfg.texture_cells[0], cfg.texture_cells[1] + 1)) for _ in range(2))
    # Mostly luminance texture with a weak colour component, so the background never
    # takes on a nameable object colour.
    coarse = rng.normal(0.0, cfg.texture_amplitude, size=(gh, gw, 1)) + rng.normal(
        0.0, cfg.texture_amplitude * cfg.texture_chroma, size=(gh, gw, 3)
    )
    coarse = coarse.astype(np.float32)
    texture = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    img = np.clip(texture + (level + tint).astype(np.float32), 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(cfg.clutter_lines[0], cfg.clutter_lines[1] + 1))):
        p0 = (int(rng.integers(width)), int(rng.integers(height)))
        p1 = (int(rng.integers(width)), int(rng.integers(height)))
        grey = float(np.clip(level + rng.normal(0.0, cfg.texture_amplitude), 0, 255))
        cv2.line(img, p0, p1, (grey, grey, grey), int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def _outline(o: SceneObject):
    return [np.round(o.polygon * (1 << _SHIFT)).astype(np.int32)]


def _instance_map(objs: List[SceneObject], height: int, width: int) -> np.ndarray:
    """Object ids drawn in z-order (visible parts only); sets each object's visible_frac."""
    ids = np.zeros((height, width), np.uint8)
    alone = np.zeros((height, width), np.uint8)
    full_px = []
    for k, o in enumerate(objs):
        cv2.fillPoly(ids, _outline(o), k + 1, lineType=cv2.LINE_8, shift=_SHIFT)
        alone[:] = 0
        cv2.fillPoly(alone, _outline(o), 1, lineType=cv2.LINE_8, shift=_SHIFT)
        full_px.append(max(int(cv2.countNonZero(alone)), 1))
    visible = np.bincount(ids.ravel(), minlength=len(objs) + 1)[1:]
    for o, vis, full in zip(objs, visible, full_px):
        o.visible_frac = float(vis) / full
    return ids


def _draw(cfg: SynthConfig, rng, objs: List[SceneObject], height: int, width: int) -> np.ndarray:
    img = _background(cfg, rng, height, width)
    for o in objs:
        base = np.asarray(COLOURS[o.colour], np.float64)
        # Mostly a brightness shift, so black / white stay neutral and hues stay nameable.
        shift = rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1)
        tint = rng.integers(-cfg.colour_tint_jitter, cfg.colour_tint_jitter + 1, size=3)
        colour = np.clip(base + shift + tint, 0, 255)
        cv2.fillPoly(
            img, _outline(o), tuple(float(c) for c in colour), lineType=cv2.LINE_AA, shift=_SHIFT
        )
    # Sensor-like noise, shared by the channels (a third of the random draws of RGB noise).
    noisy = rng.standard_normal(img.shape[:2] + (1,), dtype=np.float32) * np.float32(
        cfg.pixel_noise
    )
    noisy = noisy + img
    return np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)


def sample_size(cfg: SynthConfig, rng) -> Tuple[int, int]:
    """(height, width) with the long side cfg.image_size and a random aspect / orientation."""
    long = cfg.image_size
    short = int(round(long * rng.uniform(cfg.min_aspect, 1.0)))
    return (long, short) if rng.random() < 0.5 else (short, long)


def sample_scene(
    cfg: SynthConfig, rng: np.random.Generator, heldout: Dict[str, str], use_heldout: bool
) -> Scene:
    """
    Sample a scene whose objects avoid the held-out colour-category combinations
    (``use_heldout=False``) or include at least one of them (``use_heldout=True``, testB).
    Layouts are resampled until every object keeps ``cfg.min_visible`` of its pixels.
    """
    height, width = sample_size(cfg, rng)
    for _ in range(cfg.max_layout_tries):
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        objs = _place(
            cfg, rng, _sample_attributes(cfg, rng, n, heldout, use_heldout), height, width
        )
        if objs is None:
            continue
        ids = _instance_map(objs, height, width)
        if min(o.visible_frac for o in objs) >= cfg.min_visible:
            return Scene(height, width, objs, _draw(cfg, rng, objs, height, width), ids)
    raise RuntimeError(
        f"No layout of {cfg.min_objects}-{cfg.max_objects} objects met the placement / visibility "
        f"rules in {cfg.max_layout_tries} tries on a {width}x{height} image; lower radius_range or max_objects"
    )
