"""
``TEST.EVAL_RESOLUTION``: score at each image's original size, or at the model's input
size as the LAVT and ReLA evaluators do.

Detectron2 models predict at each input's ``height`` x ``width``. For "input" the test
mapper sets those to the size of the resized image the model sees (keeping the original
ones as ``original_height`` / ``original_width``), so the model predicts at that size,
and the evaluator scores against the mapper's ``gt_mask``: the target polygons moved by
the same resize and rasterised at that size (RLE targets resized nearest-neighbour).
"""

from typing import Dict, List

import torch
import torch.nn.functional as F

from .dataset_mapper import ReferringDatasetMapper

__all__ = [
    "EVAL_RESOLUTIONS",
    "InputResolutionMapper",
    "build_test_mapper",
    "check_eval_resolution",
]

EVAL_RESOLUTIONS = ("original", "input")


def check_eval_resolution(resolution: str) -> str:
    if resolution not in EVAL_RESOLUTIONS:
        raise ValueError(f"TEST.EVAL_RESOLUTION={resolution!r}: expected one of {EVAL_RESOLUTIONS}")
    return resolution


class InputResolutionMapper:
    """A test mapper whose outputs ask the model for predictions at the input resolution."""

    def __init__(self, mapper):
        self.mapper = mapper

    def check_records(self, records: List[Dict], source: str) -> None:
        """The wrapped mapper's record checks: it reads the records."""
        self.mapper.check_records(records, source)

    def __call__(self, record: Dict) -> Dict:
        out = self.mapper(record)
        out["original_height"], out["original_width"] = out["height"], out["width"]
        out["height"], out["width"] = (int(s) for s in out["image"].shape[-2:])
        if "landmark_mask" in out:
            # The breakdown compares it with predictions at this size (nearest: stays 0/1).
            landmark = out["landmark_mask"][None, None].float()
            size = (out["height"], out["width"])
            out["landmark_mask"] = F.interpolate(landmark, size=size, mode="nearest")[0, 0].to(torch.uint8)
        return out


def build_test_mapper(cfg):
    """The test-mode :class:`ReferringDatasetMapper` for ``cfg.TEST.EVAL_RESOLUTION``."""
    mapper = ReferringDatasetMapper(cfg, False)
    if check_eval_resolution(cfg.TEST.EVAL_RESOLUTION) == "input":
        return InputResolutionMapper(mapper)
    return mapper
