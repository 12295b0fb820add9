"""
``VIPAPredictor``: one image + referring expressions in, masks out (like Detectron2's
``DefaultPredictor``, for referring segmentation).
"""
import logging
import math
import os
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from .data.dataset_mapper import (
    WIDE_IMAGE_MODES,
    build_referring_augmentations,
    read_image,
    swap_left_right,
    wide_mode_problem,
)
from .data.validation import expression_problem, quote
from .engine.checkpoint import WeightsError, load_weights
from .engine.devices import check_device
from .engine.test_time_augmentation import average_views, check_flip
from .modeling.meta_arch import runtime_options
from .modeling.text_encoder import build_tokenizer, tokenize

logger = logging.getLogger(__name__)

__all__ = ["VIPAPredictor", "WeightsError", "load_weights", "read_image", "validate_expressions"]

# Image channel orders the predictor accepts (3-channel uint8).
SUPPORTED_FORMATS = ("RGB", "BGR")
# How many cut expressions the predictor remembers having warned about: a web app runs for
# weeks on strangers' sentences, so the oldest are forgotten (and warned again if they return).
WARNED_CUT_KEPT = 1024


def validate_expressions(expressions: Union[str, Sequence[str]]) -> List[str]:
    """The expressions as a list; raises ValueError on a missing one or one
    :func:`vipa_d2.data.validation.expression_problem` refuses (blank, no words, not text)."""
    if isinstance(expressions, (bytes, bytearray, Mapping)) or not hasattr(expressions, "__iter__"):
        raise ValueError(f"Expected a referring expression (str) or a list of them, got {quote(expressions)}")
    texts = [expressions] if isinstance(expressions, str) else list(expressions)
    if not texts:
        raise ValueError("Expected at least one referring expression, got none")
    for i, t in enumerate(texts):
        problem = expression_problem(t)
        if problem is not None:
            raise ValueError(f"Referring expression #{i}: {problem}")
    return texts


class VIPAPredictor:
    """
    Build the model from ``cfg``, load ``cfg.MODEL.WEIGHTS`` (empty: random weights, with
    a warning), switch to eval mode, and predict with the test-mode resize of
    :class:`vipa_d2.data.ReferringDatasetMapper`.

    ``predictor(image, expressions, image_format=None)``: ``image`` is a path, a PIL image
    (any mode), or an HxWx3 uint8 array in ``image_format``: "RGB" or "BGR" (what
    ``cv2.imread`` gives, and Detectron2's ``DefaultPredictor`` takes); None means
    ``cfg.INPUT.FORMAT``, "RGB" in every vipa_d2 config. ``expressions`` a str (returns one
    dict) or a list of str (returns a list of dicts, in order). Each dict holds, at the
    image's original size (a file's after its EXIF rotation):

    - ``mask``: bool HxW, ``prob > MODEL.VIPA.MASK_THRESHOLD``;
    - ``prob``: float32 HxW foreground probability (zeros when the model judged the
      expression no-target);
    - ``confidence``: float, the mean probability inside the mask; 0.0 for an empty mask;
    - ``relevance``: float32 HxW relevance map: the mean of the cues' relevance rows over
      the visual tokens (in [-1, 1]: it may be negative). With ``VEG.CENTRE_WORDS`` the word
      rows are centred on their mean and cancel in it: for two words or more the map is the
      [CLS] cue's cosine over 1 + the number of words (``retrieved`` has each word's own tokens);
    - ``no_target_score``: float, probability that the expression refers to nothing;
    - ``retrieved``: list, one entry per linguistic cue (the [CLS] global cue, then the
      word pieces): ``{"word": str, "position": int (token index), "tokens": bool
      (h, w) grid of the visual tokens the cue retrieved, "extent": (rows, columns) of
      tokens the image spans}``. The grid is the VEG token grid cropped to the image: its
      last row/column may reach past the image edge by part of a token, so ``extent`` may
      be fractional (``vipa_d2.utils.visualizer.token_cells`` maps it onto the image's
      pixels); empty when nothing is retrieved (the language key/value
      baseline, ``VEG.STEP1 False``). The loss-matched control retrieves without decoding
      from it; its sets are shown.

    The image is encoded once for all expressions; with ``MODEL.VIPA.FUSION "early"``
    the backbone depends on the expression, so it runs once per expression, batched.

    With ``TEST.AUG.ENABLED`` (test-time augmentation, as ``train_net.py`` evaluates it)
    each expression is also segmented in the mirrored image with its left/right words
    swapped, at twice the cost: ``prob``, ``relevance`` and ``no_target_score`` are the
    two views' means (``mask`` and ``confidence`` follow from that ``prob``), and
    ``retrieved`` is the image as given's.
    """

    def __init__(self, cfg):
        if not isinstance(cfg, CfgNode):
            raise TypeError(f"VIPAPredictor takes a config (vipa_d2.get_vipa_cfg(config_file, opts)), got "
                            f"{quote(cfg)}")
        self.cfg = cfg.clone()
        self.test_time_flip = cfg.TEST.AUG.ENABLED
        if self.test_time_flip:
            check_flip(cfg)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in SUPPORTED_FORMATS:
            raise ValueError(f"INPUT.FORMAT={self.input_format!r}: VIPAPredictor supports {SUPPORTED_FORMATS}")
        check_device(cfg.MODEL.DEVICE)
        self.model = build_model(self.cfg).set_runtime_options(**runtime_options(self.cfg))
        self.model.eval()
        load_weights(self.model, cfg.MODEL.WEIGHTS, trusted=cfg.MODEL.WEIGHTS_TRUSTED)
        self.augmentations = T.AugmentationList(build_referring_augmentations(cfg, is_train=False))
        self.tokenizer = build_tokenizer(cfg)
        self.max_text_len = cfg.INPUT.MAX_TEXT_LEN
        self._warned_cut = OrderedDict()  # expressions already said to be cut, oldest first
        self.mask_threshold = cfg.MODEL.VIPA.MASK_THRESHOLD
        self.batch_size = cfg.TEST.IMS_PER_BATCH

    def _check_image(self, image, image_format: Optional[str]) -> np.ndarray:
        """``image`` as an HxWx3 uint8 array in the model's INPUT.FORMAT."""
        if isinstance(image, (str, os.PathLike)):
            return read_image(os.fspath(image), self.input_format)
        if isinstance(image, Image.Image):  # grey, RGBA, palette: what its mode says, as for files
            if image.mode in WIDE_IMAGE_MODES:  # as for files: converted, 16 bits saturate, floats go black
                raise ValueError(f"Expected an image file or array, got a PIL image of {wide_mode_problem(image.mode)}")
            image, image_format = np.asarray(image.convert("RGB")), "RGB"
        given = image_format or self.input_format
        if given not in SUPPORTED_FORMATS:
            raise ValueError(f"image_format={image_format!r}: expected one of {SUPPORTED_FORMATS}")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise ValueError(
                f"Expected an image path, a PIL image or an HxWx3 uint8 array in {given} (H, W > 0), "
                f"got shape {image.shape} dtype {image.dtype}"
            )
        return image if given == self.input_format else np.ascontiguousarray(image[:, :, ::-1])

    def cut_expressions(self, texts: List[str]) -> Dict[int, int]:
        """{index: token count} of the expressions longer than INPUT.MAX_TEXT_LEN tokens
        ([CLS] and [SEP] included): the model reads only their beginning."""
        # Not truncated, to count: verbose=False keeps the tokenizer from warning that the
        # model would index past its positions (tokenize() cuts before the model reads).
        lengths = [len(ids) for ids in self.tokenizer(texts, verbose=False)["input_ids"]]
        return {i: n for i, n in enumerate(lengths) if n > self.max_text_len}

    def _warn_cut(self, texts: List[str]) -> None:
        # Once per expression: a folder segmented for one long --text warned for every image.
        cut = {i: n for i, n in self.cut_expressions(texts).items() if texts[i] not in self._warned_cut}
        for text in texts:  # a text seen again is the newest: kept, not said again
            if text in self._warned_cut:
                self._warned_cut.move_to_end(text)
        self._warned_cut.update((texts[i], None) for i in cut)
        while len(self._warned_cut) > WARNED_CUT_KEPT:
            self._warned_cut.popitem(last=False)
        if cut:
            logger.warning(
                f"Expressions {', '.join(f'#{i} ({n} tokens)' for i, n in cut.items())} are longer than "
                f"INPUT.MAX_TEXT_LEN={self.max_text_len} tokens ([CLS] and [SEP] included): the model reads "
                "only their beginning (said once per expression)"
            )

    @torch.no_grad()
    def __call__(self, image, expressions, image_format: Optional[str] = None):
        single = isinstance(expressions, str)
        texts = validate_expressions(expressions)
        original = self._check_image(image, image_format)
        height, width = original.shape[:2]

        aug_input = T.AugInput(original)
        self.augmentations(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        self._warn_cut(texts)
        raw, retrieved = self._predict(tensor, texts, (height, width))
        if self.test_time_flip:
            mirrored, _ = self._predict(
                torch.flip(tensor, dims=[-1]), [swap_left_right(t) for t in texts], (height, width), retrieve=False
            )
            threshold = self.model.no_target_threshold
            raw = [average_views(given, flipped, threshold) for given, flipped in zip(raw, mirrored)]

        results = []
        for i, r in enumerate(raw):
            prob = r["ref_seg"].float().cpu().numpy()
            mask = prob > self.mask_threshold
            results.append(
                {
                    "mask": mask,
                    "prob": prob,
                    "confidence": float(prob[mask].mean()) if mask.any() else 0.0,
                    "relevance": r["relevance"].float().cpu().numpy(),
                    "no_target_score": float(r["no_target_score"]),
                    "retrieved": retrieved[i],
                }
            )
        return results[0] if single else results

    def _predict(
        self, tensor: torch.Tensor, texts: List[str], output_size, retrieve: bool = True
    ) -> Tuple[List[Dict], Optional[List[List[Dict]]]]:
        """The model's postprocessed outputs and (``retrieve``) retrieved tokens for
        ``texts`` on one resized CHW image, at ``output_size``."""
        images = self.model.preprocess_image([{"image": tensor}])
        encoded = self.model.encode_image(images)  # once for every expression
        raw, retrieved = [], []
        # TEST.IMS_PER_BATCH expressions at a time, as the evaluation batches samples: each one
        # decodes its own copy of the image features (of the whole backbone's, with early
        # fusion), and hundreds at once ran out of memory. Each batch's maps go to the CPU.
        for start in range(0, len(texts), self.batch_size):
            tokens = tokenize(self.tokenizer, texts[start : start + self.batch_size], self.max_text_len)
            input_ids = tokens["input_ids"].to(self.model.device)
            attention_mask = tokens["attention_mask"].to(self.model.device)
            outputs = self.model.decode(encoded, input_ids, attention_mask)
            # The retrieved tokens are read on the token grid below, not as full-size maps.
            sizes = [output_size] * len(input_ids)
            raw += [{k: v.cpu() if torch.is_tensor(v) else v for k, v in r.items()}
                    for r in self.model.postprocess(outputs, images, sizes, retrieved=False)]
            if retrieve:
                retrieved += self._retrieved_tokens(outputs, images, tokens["input_ids"])
        return raw, retrieved if retrieve else None

    def _retrieved_tokens(self, outputs: Dict, images, input_ids: torch.Tensor) -> List[List[Dict]]:
        """Per expression, per valid cue: which visual tokens of the image it retrieved."""
        veg = outputs.get("veg")
        n = input_ids.shape[0]
        # Without VEG step 1 nothing was retrieved: the mask then allows every token.
        if veg is None or veg.get("relevance") is None:
            return [[] for _ in range(n)]
        gh, gw = veg["grid"]
        ph, pw = images.tensor.shape[-2:]
        ih, iw = images.image_sizes[0]
        # Tokens covering the image (the rest lie on the batch padding).
        extent = (ih * gh / ph, iw * gw / pw)
        vh, vw = math.ceil(extent[0]), math.ceil(extent[1])
        # The soft relaxation is > 0.5 exactly on the retrieved (top-k) tokens.
        grids = (veg["retrieval_mask"] > 0.5).view(n, -1, gh, gw)[:, :, :vh, :vw].cpu().numpy()
        cue_valid = outputs["cue_valid"].cpu()
        out = []
        for i in range(n):
            positions = cue_valid[i].nonzero().flatten().tolist()
            words = self.tokenizer.convert_ids_to_tokens(input_ids[i, positions].tolist())
            out.append(
                [{"word": w, "position": p, "tokens": grids[i, p], "extent": extent} for w, p in zip(words, positions)]
            )
        return out
