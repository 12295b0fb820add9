"""Every knob of the synthetic referring benchmark, in one frozen (picklable) dataclass."""

from dataclasses import dataclass
from typing import Tuple

__all__ = ["SynthConfig", "SPLITS"]

SPLITS = ("train", "val", "testA", "testB")


@dataclass(frozen=True)
class SynthConfig:
    # Long image side in pixels; the short side is long * aspect, aspect in [min_aspect, 1],
    # and portrait / landscape are equally likely.
    image_size: int = 256
    min_aspect: float = 0.6
    # Objects per image (inclusive bounds).
    min_objects: int = 3
    max_objects: int = 6
    # Circumradius of a shape as a fraction of the short image side.
    radius_range: Tuple[float, float] = (0.09, 0.2)
    # Share of images drawn with 2-3 objects of one category (same-category distractors);
    # the others start from distinct categories.
    distractor_prob: float = 0.85
    # Chance that a repeated-category object may also repeat a colour of its category.
    same_colour_prob: float = 0.3
    # Two shapes' centres are at least (1 - max_overlap) * (r1 + r2) apart.
    max_overlap: float = 0.45
    # Every object keeps at least this share of its pixels visible after occlusion.
    min_visible: float = 0.55
    # Gap (fraction of the image side) that makes "left of" / "on the left" / ordinals clear.
    position_margin: float = 0.1
    # Area ratio between the extreme object and the next one for "bigger" / "smallest".
    size_ratio: float = 1.5
    # Expressions per referred object (inclusive bounds; the minimum must be >= 2).
    expressions_per_target: Tuple[int, int] = (2, 3)
    # How often each expression type is chosen when several describe a target: category
    # only is down-weighted because it does not need colour / space / comparison.
    type_weights: Tuple[Tuple[str, float], ...] = (
        ("category", 0.4),
        ("colour", 1.0),
        ("size", 1.0),
        ("position", 1.0),
        ("ordinal", 1.2),
        ("relation", 1.5),
    )
    # Generalized variant: multi-target and no-target refs per image, sentences per ref.
    multi_target_refs: int = 2
    no_target_refs: int = 1
    generalized_sentences: int = 2
    # Chance that a no-target expression names a present category in an absent colour
    # (a hard negative) rather than an absent colour or category.
    hard_negative_prob: float = 0.6
    # In testB images, the chance that each object (beyond the first) takes its
    # category's held-out colour.
    heldout_object_prob: float = 0.35
    # Split shares (every split gets at least one image).
    split_fractions: Tuple[Tuple[str, float], ...] = (
        ("train", 0.7),
        ("val", 0.1),
        ("testA", 0.1),
        ("testB", 0.1),
    )
    # Background: grey level range, tint amplitude, texture cells per side, amplitude and
    # colour share of the texture, pixel noise std and number of clutter lines.
    background_level: Tuple[int, int] = (70, 170)
    background_tint: float = 25.0
    texture_cells: Tuple[int, int] = (3, 10)
    texture_amplitude: float = 30.0
    texture_chroma: float = 0.25
    pixel_noise: float = 8.0
    clutter_lines: Tuple[int, int] = (0, 4)
    # Jitter of an object's colour: a brightness shift and a small per-channel tint.
    colour_jitter: int = 18
    colour_tint_jitter: int = 6
    jpeg_quality: int = 92
    # Attempts at a layout meeting the placement and visibility rules before giving up.
    max_layout_tries: int = 200
    max_placement_tries: int = 60

    def __post_init__(self):
        if self.image_size < 64:
            raise ValueError(f"image_size={self.image_size}: expected >= 64 pixels")
        if not 0 < self.min_aspect <= 1:
            raise ValueError(f"min_aspect={self.min_aspect}: expected in (0, 1]")
        if not 2 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"objects per image {self.min_objects}..{self.max_objects}: expected 2 <= min <= max"
            )
        if self.expressions_per_target[0] < 2:
            raise ValueError(
                "expressions_per_target: at least 2 expressions per target are required"
            )
        if tuple(s for s, _ in self.split_fractions) != SPLITS:
            raise ValueError(f"split_fractions must list the splits {SPLITS} in order")
