"""What :class:`ReferringEvaluator` scores against, and what it keeps of each sample."""

import os
from typing import Dict

import torch

from vipa_d2.data.eval_resolution import check_eval_resolution
from vipa_d2.data.masks import annotations_to_mask, mask_to_rle

__all__ = ["target_mask", "sample_details"]


def target_mask(inp: Dict, resolution: str, sample_name: str) -> torch.Tensor:
    """
    The bool (height, width) target of one input: at the ORIGINAL resolution its
    ``annotations`` rasterised at ``height`` x ``width``; at the INPUT resolution the
    mapper's ``gt_mask`` (see :mod:`vipa_d2.data.eval_resolution`).
    """
    height, width = int(inp["height"]), int(inp["width"])
    if check_eval_resolution(resolution) == "input":
        if "gt_mask" not in inp:
            raise KeyError(
                f"ReferringEvaluator: input {sample_name} has no 'gt_mask' to score at the input resolution"
            )
        gt = torch.as_tensor(inp["gt_mask"])
        if tuple(gt.shape) != (height, width):
            raise ValueError(
                f"ReferringEvaluator: 'gt_mask' of {sample_name} has shape {tuple(gt.shape)}, "
                f"but the input asks for ({height}, {width}); scoring at the input resolution "
                "needs the test mapper of vipa_d2.data.eval_resolution.build_test_mapper"
            )
        return gt.bool()
    if "annotations" not in inp:
        raise KeyError(
            f"ReferringEvaluator: input {sample_name} has no 'annotations'; the test "
            "mapper must keep the original annotations to score at the original size."
        )
    return torch.from_numpy(annotations_to_mask(inp["annotations"], height, width)).bool()


def sample_details(
    inp: Dict, pred: torch.Tensor, pred_no_target: bool, gt_empty: bool, save_rle: bool
) -> Dict:
    """
    Per-sample fields for error analysis and ReLA's metrics: the image file, the
    sentence, whether the record is a no-target one, whether the model said no-target,
    and (``save_rle``) the scored binary prediction as COCO RLE.
    """
    sentence = inp.get("sentence")
    if isinstance(sentence, dict):  # a dataset record rather than a mapped input
        sentence = sentence.get("raw")
    file_name = inp.get("file_name")
    details = {
        # A loader's pathlib.Path (the record checks accept it) as JSON can hold it.
        "file_name": os.fspath(file_name) if isinstance(file_name, os.PathLike) else file_name,
        "sentence": sentence,
        # The record's flag where there is one: a target whose mask happens to be empty
        # is still a target sample for ReLA's metrics.
        "no_target": bool(inp.get("empty", gt_empty)),
        "pred_no_target": bool(pred_no_target),
    }
    if save_rle:
        details["prediction"] = mask_to_rle(pred.cpu().numpy())
    return details
