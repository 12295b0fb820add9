"""
The VIPA meta-architecture: vision encoder (+ optional early/late pixel-word fusion),
language encoder and a head (:mod:`vipa_d2.modeling.head`: Visual Expression Generator,
pixel decoder and a transformer decoder whose queries are the pixel features and whose
key/value set is the visual expression or, for the baseline, the language features).

Encoding the image and decoding an expression are separate steps (``encode_image`` /
``decode``) so a predictor can run several expressions against one image. With EARLY
fusion the backbone itself depends on the expression, so ``encode_image`` only prepares
the padded image and ``decode`` re-runs the backbone for every expression: the API stays
correct, just without the saving.
"""
import logging
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from .attention import set_fused_attention
from .backbone.conv_bn_fold import set_conv_bn_folding
from .fusion import FUSION_MODES, VisionLanguageFusion, check_early_fusion_backbone, check_fused_stages
from .head import build_vipa_head
from .losses import VIPACriterion
from .registry import get_registered
from .text_encoder import TextEncoder

logger = logging.getLogger(__name__)

# Top-level modules that version 1 state dicts (before the head existed) held; they now
# live under ``head.`` (see VIPA._load_from_state_dict).
_MOVED_TO_HEAD = ("veg", "language_proj", "pixel_decoder", "transformer_decoder")


def no_target_threshold(cfg) -> float:
    """The no-target score above which a mask is emptied: MODEL.VIPA.NO_TARGET_THRESHOLD, or
    never (inf) when LOSS.NO_TARGET_WEIGHT is 0, whose head is left untrained (the paper's
    RefCOCO setting) and would veto masks at random."""
    vipa = cfg.MODEL.VIPA
    return vipa.NO_TARGET_THRESHOLD if vipa.LOSS.NO_TARGET_WEIGHT > 0 else math.inf


def trim_text_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """
    Drop the padding columns no expression of the batch uses. Padding is masked everywhere
    downstream, so the outputs do not change; the text encoder, fusion, VEG and decoder
    then cost what the batch's longest expression needs instead of INPUT.MAX_TEXT_LEN.
    """
    used_columns = attention_mask.any(dim=0).nonzero()
    if used_columns.numel() == 0:
        return input_ids, attention_mask
    end = int(used_columns.max()) + 1  # trailing columns no expression uses are dropped
    return input_ids[:, :end], attention_mask[:, :end]


def run_backbone(backbone: nn.Module, fusion: Optional[nn.Module], pixels: torch.Tensor, text=None, text_valid=None):
    """The backbone; given the text, with early fusion after every output stage.

    A plain function of the modules (not a bound method): compiled once, it serves any
    model, torch.compile's guards telling one model's modules from another's (a copy's).
    """
    if text is None:
        return backbone(pixels)
    fused = []

    def fuse(name, feature):
        fused.append(name)
        return fusion.fuse_stage(name, feature, text, text_valid)

    features = backbone(pixels, stage_hook=fuse)
    check_fused_stages(backbone, fusion, fused)
    return features


def runtime_options(cfg) -> Dict[str, bool]:
    """The config's keyword arguments for :meth:`VIPA.set_runtime_options`."""
    return {
        "channels_last": cfg.MODEL.CHANNELS_LAST,
        "compile_backbone": cfg.TEST.COMPILE_BACKBONE,
        "compile_backend": cfg.TEST.COMPILE_BACKEND,
    }


def require_inputs(batched_inputs: List[Dict], keys: List[str], needed_by: str) -> None:
    """A clear error when some input lacks one of ``keys`` that ``needed_by`` trains on."""
    missing = sorted({k for x in batched_inputs for k in keys if k not in x})
    if missing:
        raise ValueError(
            f"{needed_by} needs training inputs with {keys}; missing {missing} "
            "(see vipa_d2.data.ReferringDatasetMapper, built from the same config)"
        )


# The key under which postprocess keeps the probability of a mask its no-target verdict
# emptied.
REF_SEG_BEFORE_VETO = "ref_seg_before_veto"
# What every head returns (VIPAHead.forward), read by the losses and by postprocess whatever
# the config; a head may add more (the optional losses' outputs, named by the criterion).
HEAD_OUTPUTS = ("pred_masks", "no_target_logit", "veg", "cue_valid")


@META_ARCH_REGISTRY.register()
class VIPA(nn.Module):
    # State-dict layout version: 2 keeps VEG, language projection and both decoders under
    # ``head.``; version 1 checkpoints held them at the top level and are renamed on loading.
    _version = 2

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        text_encoder: nn.Module,
        fusion: Optional[VisionLanguageFusion],
        fusion_mode: str,
        head: nn.Module,
        criterion: VIPACriterion,
        pixel_mean,
        pixel_std,
        no_target_threshold: float,
        pad_size: int = 0,
    ):
        """
        ``fusion`` is None iff ``fusion_mode`` is "none". ``pad_size`` > 0 pads every batch
        to ``pad_size`` x ``pad_size`` (then to the backbone's size divisibility), so that a
        sample's result does not depend on the other images in its batch; 0 pads to the
        batch's largest image. The value-preserving speed-ups are
        on (:meth:`set_speedups` turns them off for debugging); layout and compilation are
        runtime options (:meth:`set_runtime_options`), NCHW and eager after construction.
        """
        super().__init__()
        if fusion_mode not in FUSION_MODES:
            raise ValueError(f"MODEL.VIPA.FUSION must be one of {FUSION_MODES}, got {fusion_mode!r}")
        if (fusion is None) != (fusion_mode == "none"):
            raise ValueError(f"Fusion mode {fusion_mode!r} and the fusion module do not match")
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.fusion = fusion
        self.fusion_mode = fusion_mode
        self.head = head
        self.criterion = criterion
        self.no_target_threshold = no_target_threshold
        self.pad_size = pad_size
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.trim_text_padding = True
        self.channels_last = False
        self._compiled_backbone = None  # set_runtime_options(compile_backbone=True)
        self.compile_backend = "inductor"  # torch.compile's default; set_runtime_options(compile_backend=...)
        logger.info("VIPA: fusion=%s, head=%s", fusion_mode, type(head).__name__)

    @classmethod
    def from_config(cls, cfg):
        vipa = cfg.MODEL.VIPA
        if vipa.FUSION not in FUSION_MODES:
            raise ValueError(f"MODEL.VIPA.FUSION must be one of {FUSION_MODES}, got {vipa.FUSION!r}")
        get_registered(BACKBONE_REGISTRY, cfg.MODEL.BACKBONE.NAME, "MODEL.BACKBONE.NAME")
        backbone = build_backbone(cfg)
        if vipa.FUSION == "early":
            check_early_fusion_backbone(backbone, cfg.MODEL.BACKBONE.NAME)
        shapes = backbone.output_shape()
        text_encoder = TextEncoder(cfg)
        text_dim = text_encoder.hidden_size
        fusion = None if vipa.FUSION == "none" else VisionLanguageFusion(cfg, shapes, text_dim)
        return {
            "backbone": backbone,
            "text_encoder": text_encoder,
            "fusion": fusion,
            "fusion_mode": vipa.FUSION,
            "head": build_vipa_head(cfg, shapes, text_dim),
            "criterion": VIPACriterion(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "no_target_threshold": no_target_threshold(cfg),
            # keep_ratio images differ in shape (their long side is IMAGE_SIZE): padding each
            # to the square keeps test batches, the predictor and any GPU count alike.
            "pad_size": cfg.INPUT.IMAGE_SIZE if cfg.INPUT.RESIZE_MODE == "keep_ratio" else 0,
        }

    def upgrade_state_dict(self, state_dict, prefix: str = ""):
        """Rename, in place, a version-1 state dict's head modules (``veg.`` ...) into
        ``head.``; keys already in the current layout stay. Returns ``state_dict``. Also
        used by checkpointers that compare keys before loading (StrictCheckpointer), which
        cannot tell a file's version: so a module of that name that this model itself has
        at its top (a subclass's own ``language_proj``) keeps its keys."""
        moved = [name for name in _MOVED_TO_HEAD if name not in self._modules]
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix) :]
            if rest.split(".", 1)[0] in moved:
                state_dict[prefix + "head." + rest] = state_dict.pop(key)
        return state_dict

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # Version 1 (or no version recorded): rename the head's modules into ``head.``.
        # Children read the renamed keys, as they load after this module.
        if local_metadata.get("version", 1) < 2:
            self.upgrade_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    # ------------------------------------------------------------ switches
    def set_speedups(
        self,
        *,
        trim_text_padding: Optional[bool] = None,
        fused_attention: Optional[bool] = None,
        fold_bn: Optional[bool] = None,
    ) -> "VIPA":
        """
        Turn the value-preserving speed-ups on or off (None leaves one as it is); all are on
        after construction, and turning them off changes no output beyond float rounding.
        For debugging and timing: ``trim_text_padding`` cuts each batch's text to its
        longest expression (off: fixed shapes, e.g. for tracing); ``fused_attention`` runs
        attention without maps through scaled_dot_product_attention; ``fold_bn`` applies
        each BatchNorm with running statistics inside the convolution before it.
        """
        if trim_text_padding is not None:
            self.trim_text_padding = bool(trim_text_padding)
        if fused_attention is not None:
            set_fused_attention(self, fused_attention)
        if fold_bn is not None:
            set_conv_bn_folding(self, fold_bn)
        return self

    def set_runtime_options(
        self,
        *,
        channels_last: Optional[bool] = None,
        compile_backbone: Optional[bool] = None,
        compile_backend: Optional[str] = None,
    ) -> "VIPA":
        """
        How the built model runs (None leaves an option as it is; :func:`runtime_options`
        reads them from a config: ``MODEL.CHANNELS_LAST``, ``TEST.COMPILE_BACKBONE``,
        ``TEST.COMPILE_BACKEND``).

        ``channels_last``: keep 4-D weights and the image batch in NHWC (True) or NCHW
        (False) memory layout; only the layout changes, not the values, and loading a
        checkpoint later keeps it. ``compile_backbone``: torch.compile the backbone (with
        the early fusion it calls) for inference; training stays eager. Compiled code
        specialises on the weights' layout, so the layout is set before compiling.
        ``compile_backend``: the torch.compile backend it compiles with (a name
        ``torch._dynamo.list_backends`` knows; an unknown one is refused here).
        """
        if channels_last is not None and bool(channels_last) != self.channels_last:
            if self._compiled_backbone is not None:
                raise ValueError(
                    "set_runtime_options: change channels_last before compile_backbone (the "
                    "compiled backbone specialises on the weights' layout)"
                )
            self.channels_last = bool(channels_last)
            self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if compile_backend is not None and compile_backend != self.compile_backend:
            known = torch._dynamo.list_backends(exclude_tags=())  # the debugging ones too
            if compile_backend not in known:
                raise ValueError(
                    f"set_runtime_options: compile_backend (TEST.COMPILE_BACKEND) {compile_backend!r} is not a "
                    f"torch.compile backend; expected one of {known}"
                )
            self.compile_backend = compile_backend
            if compile_backbone is None and self._compiled_backbone is not None:
                compile_backbone = True  # recompile with the new backend
        if compile_backbone is not None:
            # The text enters as an argument, so the compiled code reads every call's
            # expressions; a function is not a submodule, so state_dict keys stay the same.
            self._compiled_backbone = (
                torch.compile(run_backbone, backend=self.compile_backend) if compile_backbone else None
            )
        return self

    def _backbone(self, pixels: torch.Tensor, text=None, text_valid=None) -> Dict[str, torch.Tensor]:
        """:func:`run_backbone`, compiled for inference when ``compile_backbone`` is set."""
        run = run_backbone if self.training or self._compiled_backbone is None else self._compiled_backbone
        return run(self.backbone, self.fusion, pixels, text, text_valid)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def size_divisibility(self) -> int:
        return self.backbone.size_divisibility

    # ------------------------------------------------------------------ inputs
    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalize and pad the mapper's uint8 "image" tensors into an ImageList."""
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = self._pad(images)
        if self.channels_last:
            images.tensor = images.tensor.contiguous(memory_format=torch.channels_last)
        return images

    def preprocess_text(self, batched_inputs: List[Dict]):
        """Stack the mapper's "input_ids" / "attention_mask" into (B, T) tensors."""
        ids = torch.stack([x["input_ids"] for x in batched_inputs]).to(self.device)
        mask = torch.stack([x["attention_mask"] for x in batched_inputs]).to(self.device)
        return ids, mask

    @staticmethod
    def image_valid_mask(images: ImageList) -> torch.Tensor:
        """(B, H, W) float, 1 inside each image, 0 on the batch padding."""
        b, _, h, w = images.tensor.shape
        valid = images.tensor.new_zeros(b, h, w)
        for i, (ih, iw) in enumerate(images.image_sizes):
            valid[i, :ih, :iw] = 1.0
        return valid

    # ---------------------------------------------------------------- encoders
    def encode_image(self, images: ImageList) -> Dict:
        """
        Backbone features of the (normalized, padded) images, reusable across expressions.
        Under early fusion the features depend on the expression, so only the images are
        kept ("features" is None) and :meth:`decode` runs the backbone.
        """
        features = None if self.fusion_mode == "early" else self._backbone(images.tensor)
        return {"images": images, "features": features}

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, attention_mask)

    def _vision_language_features(self, encoded: Dict, text: torch.Tensor, text_valid: torch.Tensor):
        """Backbone features (fused with the language per FUSION), batch-aligned with ``text``."""
        n = text.shape[0]
        if self.fusion_mode == "early":
            pixels = encoded["images"].tensor
            pixels = pixels.expand(n, *pixels.shape[1:]) if pixels.shape[0] != n else pixels
            return self._backbone(pixels, text, text_valid)
        features = encoded["features"]
        if next(iter(features.values())).shape[0] != n:
            features = {k: v.expand(n, *v.shape[1:]) for k, v in features.items()}
        if self.fusion_mode == "late":
            features = self.fusion(features, text, text_valid)
        return features

    # ----------------------------------------------------------------- decoder
    def decode(self, encoded: Dict, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Dict:
        """
        Run everything after the image encoder for a batch of expressions.

        ``encoded`` (from :meth:`encode_image`) holds B images and the text B expressions,
        or one image and any number of expressions (the image is broadcast).
        Returns the raw outputs: "pred_masks" (per-layer logits at the mask-feature
        resolution), "no_target_logit", "veg" (VEG outputs, with "token_valid", or None), "cue_valid",
        "image_valid" (B, H, W).
        """
        images = encoded["images"]
        n_img, n_txt = images.tensor.shape[0], input_ids.shape[0]
        if n_img not in (1, n_txt):
            raise ValueError(f"decode() got {n_img} images for {n_txt} expressions; expected 1 or {n_txt} images")
        if self.trim_text_padding:
            input_ids, attention_mask = trim_text_padding(input_ids, attention_mask)
        text = self.encode_text(input_ids, attention_mask)
        features = self._vision_language_features(encoded, text, attention_mask.bool())
        image_valid = self.image_valid_mask(images)
        if n_img != n_txt:
            image_valid = image_valid.expand(n_txt, *image_valid.shape[1:])
        out = self.head(features, text, attention_mask, image_valid)
        missing = [key for key in HEAD_OUTPUTS if key not in out]
        if missing:  # a registered head (or its decoder) of one's own: said before a bare KeyError
            raise ValueError(
                f"The outputs of {type(self.head).__name__} lack {missing}: a VIPA head returns {list(HEAD_OUTPUTS)} "
                "(see VIPAHead.forward; MODEL.VIPA.HEAD_NAME, MODEL.VIPA.DECODER.NAME)"
            )
        out["image_valid"] = image_valid
        return out

    def batch_masks(self, batched_inputs: List[Dict], key: str) -> torch.Tensor:
        """(B, H, W): the inputs' ``key`` masks, padded like the image batch."""
        return self._pad([x[key].to(self.device) for x in batched_inputs]).tensor

    def _pad(self, tensors: List[torch.Tensor]) -> ImageList:
        """``tensors`` (..., H, W) batched with zero padding at the bottom and right."""
        if self.pad_size:
            largest = max(max(t.shape[-2:]) for t in tensors)
            if largest > self.pad_size:
                raise ValueError(
                    f"An input of {largest} pixels exceeds the padded size {self.pad_size} "
                    "(INPUT.IMAGE_SIZE, INPUT.RESIZE_MODE 'keep_ratio'): resize inputs with the mapper's augmentations"
                )
            constraints = {"square_size": self.pad_size}
        else:
            constraints = None
        return ImageList.from_tensors(tensors, self.size_divisibility, padding_constraints=constraints)

    def losses(self, outputs: Dict, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        require_inputs(batched_inputs, ["gt_mask"], "Training")
        self.criterion.check_outputs(outputs, type(self.head).__name__)
        gt = self.batch_masks(batched_inputs, "gt_mask")
        empty = torch.tensor([bool(x.get("empty", False)) for x in batched_inputs], device=self.device)
        veg = outputs["veg"]
        has_relevance = veg is not None and veg["relevance"] is not None
        # The VEG's copy for the losses (RELEVANCE_TEXT_GRADIENT); a registered head whose
        # VEG outputs lack it has its losses read the relevance itself.
        loss_relevance = veg.get("loss_relevance", veg["relevance"]) if has_relevance else None
        landmark = {}
        if self.criterion.landmark_weight > 0:
            require_inputs(batched_inputs, ["landmark_mask", "landmark_tokens"], "MODEL.VIPA.LOSS.LANDMARK_WEIGHT > 0")
            landmark = {
                "landmark_masks": self.batch_masks(batched_inputs, "landmark_mask"),
                "landmark_tokens": torch.stack([x["landmark_tokens"] for x in batched_inputs]).to(self.device),
            }
        centres = {}
        c = self.criterion
        if c.box_losses:
            require_inputs(batched_inputs, ["object_boxes"], " and ".join(c.box_losses))
            centres["object_boxes"] = [x["object_boxes"].to(self.device) for x in batched_inputs]
        if c.group_losses:
            require_inputs(batched_inputs, ["object_in_group"], " and ".join(c.group_losses))
            centres["object_in_group"] = [x["object_in_group"].to(self.device) for x in batched_inputs]
        if c.area_losses:
            require_inputs(batched_inputs, ["object_areas"], " and ".join(c.area_losses))
            centres["object_areas"] = [x["object_areas"].to(self.device) for x in batched_inputs]
        # The head outputs those losses read (check_outputs has found them all there).
        centres.update((key, outputs[key]) for keys in c.read_outputs().values() for key in keys)
        return self.criterion(
            outputs["pred_masks"],
            outputs["no_target_logit"],
            gt,
            outputs["image_valid"],
            empty,
            relevance=loss_relevance,
            relevance_grid=veg["grid"] if has_relevance else None,
            cue_valid=outputs["cue_valid"],
            token_valid=veg["token_valid"] if has_relevance else None,
            **landmark,
            **centres,
        )

    def postprocess(self, outputs: Dict, images: ImageList, output_sizes: List, retrieved: bool = True) -> List[Dict]:
        """
        Per expression: "ref_seg" (height, width) foreground probability, "relevance"
        (height, width) map of the cues' retrieval relevance (mean over valid cues; zeros
        for the language-K/V baseline, which retrieves nothing) and "no_target_score".
        When VEG step 1 feeds the decoder, also "retrieved", bool (T, height, width): the
        visual tokens each text position retrieved, and "cue_valid", bool (T,): which
        positions are cues (T: the possibly trimmed text length).
        ``output_sizes``: (height, width) per expression. Masks of expressions judged
        no-target (score > :func:`no_target_threshold`; never with LOSS.NO_TARGET_WEIGHT 0)
        are emptied; their probability before that is kept as "ref_seg_before_veto" (ReLA
        scores a wrong no-target verdict's union with it, and test-time augmentation
        averages it before deciding again). ``retrieved`` False leaves "retrieved" out: a
        float map per text position at the output size (a GB for a phone photo), which the
        evaluator reads and the predictor, on the token grid, does not.
        """
        padded = images.tensor.shape[-2:]
        logits = F.interpolate(outputs["pred_masks"][-1][:, None], size=padded, mode="bilinear", align_corners=False)
        scores = outputs["no_target_logit"].sigmoid()
        veg = outputs["veg"]
        relevance = None
        if veg is not None:
            w = outputs["cue_valid"].to(veg["attention"].dtype)[..., None]
            relevance = (veg["attention"] * w).sum(1) / w.sum(1).clamp(min=1.0)
            relevance = relevance.view(-1, 1, *veg["grid"])
            relevance = F.interpolate(relevance, size=padded, mode="bilinear", align_corners=False)
        retrieved_maps = None
        # Only when step 1 ran and its visual expression is the decoder's K/V: with language
        # K/V nothing the decoder reads was retrieved.
        # A head of one's own without "kv_source" is taken to feed the decoder its VEG's output.
        reads_veg = getattr(self.head, "kv_source", "visual_expression") == "visual_expression"
        if retrieved and veg is not None and veg["relevance"] is not None and reads_veg:
            # The support of M on the token grid, each token a block of the padded image.
            support = (veg["retrieval_mask"] > 0.5).to(logits.dtype)
            support = support.view(*support.shape[:2], *veg["grid"])
            retrieved_maps = F.interpolate(support, size=padded, mode="nearest")
        results = []
        for i, (height, width) in enumerate(output_sizes):
            image_size = images.image_sizes[i if len(images.image_sizes) > 1 else 0]
            prob = sem_seg_postprocess(logits[i], image_size, height, width)[0].sigmoid()
            before_veto = {}
            if scores[i] > self.no_target_threshold:
                prob, before_veto = torch.zeros_like(prob), {REF_SEG_BEFORE_VETO: prob}
            rel = (
                sem_seg_postprocess(relevance[i], image_size, height, width)[0]
                if relevance is not None
                else prob.new_zeros(height, width)
            )
            results.append({"ref_seg": prob, "relevance": rel, "no_target_score": scores[i], **before_veto})
            if retrieved_maps is not None:
                # Resized like ref_seg, then thresholded back to a set.
                kept = sem_seg_postprocess(retrieved_maps[i], image_size, height, width) > 0.5
                results[-1].update(retrieved=kept, cue_valid=outputs["cue_valid"][i])
        return results

    # ----------------------------------------------------------------- forward
    def forward(self, batched_inputs: List[Dict]):
        """
        Training: dict of weighted losses. Inference: one dict per input with "ref_seg",
        "relevance" (both at the input's original "height" x "width") and "no_target_score".
        """
        images = self.preprocess_image(batched_inputs)
        input_ids, attention_mask = self.preprocess_text(batched_inputs)
        outputs = self.decode(self.encode_image(images), input_ids, attention_mask)
        if self.training:
            return self.losses(outputs, batched_inputs)
        sizes = [
            (x.get("height", images.image_sizes[i][0]), x.get("width", images.image_sizes[i][1]))
            for i, x in enumerate(batched_inputs)
        ]
        return self.postprocess(outputs, images, sizes)
