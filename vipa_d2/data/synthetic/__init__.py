"""
Synthetic referring benchmark (refsynth / grefsynth): shapes on textured backgrounds
with expressions that need category, colour, size, position, ordinals and relations.
The CLI is ``datasets/prepare_synthetic.py``; everything else lives here.
"""

from .config import SPLITS, SynthConfig
from .grammar import EXPRESSION_TYPES, Expression, Program, evaluate
from .scene import Scene, SceneObject, heldout_combos, sample_scene
from .shapes import CATEGORIES, COLOURS
from .writer import (
    GREFSYNTH,
    REFSYNTH,
    assign_splits,
    benchmark_settings,
    format_stats,
    generate_image,
    regenerate_image,
    finished_benchmark,
    requested_settings,
    settings_differences,
    write_benchmark,
)

__all__ = [
    "SPLITS",
    "SynthConfig",
    "EXPRESSION_TYPES",
    "Expression",
    "Program",
    "evaluate",
    "Scene",
    "SceneObject",
    "heldout_combos",
    "sample_scene",
    "CATEGORIES",
    "COLOURS",
    "REFSYNTH",
    "GREFSYNTH",
    "assign_splits",
    "benchmark_settings",
    "format_stats",
    "generate_image",
    "regenerate_image",
    "finished_benchmark",
    "requested_settings",
    "settings_differences",
    "write_benchmark",
]
