"""
Test-time augmentation for referring segmentation (``TEST.AUG``, Detectron2's
``test_with_TTA``): each expression is also segmented in the horizontally flipped image,
with its left/right words swapped so that it still names the same object, and the two
foreground probabilities are averaged.

Only the flip: the model reads images at ``INPUT.IMAGE_SIZE``, so Detectron2's
``TEST.AUG.MIN_SIZES`` / ``MAX_SIZE`` (scales for detectors) have nothing to set here; a
config that changes them is refused (vipa_d2/config.py, ``UNREAD_DETECTRON2_KEYS``).
"""
import logging
from typing import Dict, List

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data.dataset_mapper import swap_left_right
from ..data.expressions import tokenize_expression
from ..modeling.meta_arch import REF_SEG_BEFORE_VETO
from ..modeling.text_encoder import build_tokenizer

__all__ = ["TTA_RESULTS_FOLDER", "TTA_SUFFIX", "VIPAWithTTA", "average_views", "check_flip"]

# What test_with_TTA appends to dataset names and the per-sample results folder (Detectron2's).
TTA_SUFFIX = "_TTA"
# The folder under OUTPUT_DIR of the test-time-augmented pass's per-sample results.
TTA_RESULTS_FOLDER = "inference" + TTA_SUFFIX

logger = logging.getLogger(__name__)

# Outputs averaged over the two views besides the probability, and whether each is a map
# to flip back.
AVERAGED = {"relevance": True, "no_target_score": False}


def check_flip(cfg) -> None:
    """Refuse ``TEST.AUG.FLIP False``: the flip is the only augmentation there is to enable."""
    if not cfg.TEST.AUG.FLIP:
        raise ValueError("TEST.AUG.ENABLED: vipa_d2's test-time augmentation is the horizontal flip; set TEST.AUG.FLIP True")


def average_views(given: Dict, flipped: Dict, no_target_threshold: float) -> Dict:
    """
    ``given`` (one expression's postprocessed outputs) with its ``AVERAGED`` outputs
    replaced by their means with the mirrored view's, whose maps are flipped back first.
    The foreground probability is the mean of the two views' before any no-target verdict,
    emptied (as the model does) when the mean no-target score is above
    ``no_target_threshold``: one verdict, on the averaged score.
    """
    merged = {k: v for k, v in given.items() if k != REF_SEG_BEFORE_VETO}
    for key, is_map in AVERAGED.items():
        other = torch.flip(flipped[key], dims=[-1]) if is_map else flipped[key]
        merged[key] = (given[key] + other) / 2
    as_given, mirrored = (view.get(REF_SEG_BEFORE_VETO, view["ref_seg"]) for view in (given, flipped))
    prob = (as_given + torch.flip(mirrored, dims=[-1])) / 2
    merged["ref_seg"] = prob
    if merged["no_target_score"] > no_target_threshold:
        merged.update(ref_seg=torch.zeros_like(prob), **{REF_SEG_BEFORE_VETO: prob})
    return merged


class VIPAWithTTA(nn.Module):
    """
    ``model`` (a VIPA, possibly DDP-wrapped) in inference, each input run as given and
    flipped. Per input: "ref_seg", "relevance" (both flipped back) and "no_target_score"
    are the means over the two views; the other outputs (the retrieved tokens) are those of
    the view as given, so the retrieval report describes the model, not the augmentation.
    The no-target verdict is taken once, on the mean score (:func:`average_views`).
    """

    def __init__(self, cfg, model: nn.Module):
        super().__init__()
        check_flip(cfg)
        if isinstance(model, DistributedDataParallel):
            model = model.module
        self.model = model
        # The wrapper's own mode is the model's: a new module is in training mode, and
        # Detectron2's inference_context restores that mode on it, so the model it wraps
        # came out of an evaluation in training mode.
        self.train(model.training)
        self.tokenizer = build_tokenizer(cfg)
        self.max_text_len = cfg.INPUT.MAX_TEXT_LEN
        logger.info("Test-time augmentation: horizontal flip with left/right words swapped")

    def flipped(self, inputs: Dict) -> Dict:
        """``inputs`` (a test-mode mapper output) for the mirrored image."""
        sentence = swap_left_right(inputs["sentence"])
        tokens = tokenize_expression(self.tokenizer, sentence, self.max_text_len)
        return {
            **inputs,
            "image": torch.flip(inputs["image"], dims=[-1]),
            "sentence": sentence,
            "input_ids": tokens["input_ids"][0],
            "attention_mask": tokens["attention_mask"][0],
        }

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        as_given = self.model(batched_inputs)
        mirrored = self.model([self.flipped(x) for x in batched_inputs])
        threshold = self.model.no_target_threshold
        return [average_views(given, flipped, threshold) for given, flipped in zip(as_given, mirrored)]
