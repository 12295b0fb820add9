"""
The VIPA meta-architecture: vision encoder (+ optional early/late pixel-word fusion),
language encoder, Visual Expression Generator (VEG), pixel decoder and a transformer
decoder whose queries are the pixel features and whose key/value set is the visual
expression (or, for the baseline, the language features).

Encoding the image and decoding an expression are separate steps (``encode_image`` /
``decode``) so a predictor can run several expressions against one image. With EARLY
fusion the backbone itself depends on the expression, so ``encode_image`` only prepares
the padded image and ``decode`` re-runs the backbone for every expression: the API stays
correct, just without the saving.
"""
import logging
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from .attention import set_fused_attention
from .fusion import FUSION_MODES, VisionLanguageFusion
from .losses import VIPACriterion, area_downsample
from .pixel_decoder import build_pixel_decoder
from .text_encoder import TextEncoder
from .transformer_decoder import VIPATransformerDecoder
from .veg import VisualExpressionGenerator, linguistic_cue_mask

logger = logging.getLogger(__name__)

# "language_relevance" is the loss-matched control: language K/V, while a VEG (step 1
# only) still computes the cue-token relevance so the pixel contrastive loss supervises
# the same features as in VIPA; nothing of it reaches the decoder.
KV_SOURCES = ("visual_expression", "language", "language_relevance")


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


@META_ARCH_REGISTRY.register()
class VIPA(nn.Module):
    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        text_encoder: nn.Module,
        fusion: Optional[VisionLanguageFusion],
        fusion_mode: str,
        kv_source: str = "",
        veg: Optional[VisualExpressionGenerator],
        veg_in_feature: str,
        language_proj: Optional[nn.Module],
        pixel_decoder: nn.Module,
        transformer_decoder: VIPATransformerDecoder,
        criterion: VIPACriterion,
        global_cue: bool,
        local_cues: bool,
        pixel_mean,
        pixel_std,
        no_target_threshold: float,
        channels_last: bool = False,
        trim_text_padding: bool = True,
        fused_attention: bool = True,
        compile_backbone: bool = False,
    ):
        """
        ``kv_source`` (one of KV_SOURCES; "" infers it from the modules given) decides which
        modules are needed: ``veg`` for "visual_expression", ``language_proj`` for
        "language", both for "language_relevance". ``fusion`` is None iff ``fusion_mode``
        is "none".
        """
        super().__init__()
        if fusion_mode not in FUSION_MODES:
            raise ValueError(f"MODEL.VIPA.FUSION must be one of {FUSION_MODES}, got {fusion_mode!r}")
        if (fusion is None) != (fusion_mode == "none"):
            raise ValueError(f"Fusion mode {fusion_mode!r} and the fusion module do not match")
        if not kv_source:
            kv_source = "visual_expression" if language_proj is None else "language"
        needs = {"visual_expression": (True, False), "language": (False, True), "language_relevance": (True, True)}
        if kv_source not in needs:
            raise ValueError(f"kv_source must be one of {KV_SOURCES}, got {kv_source!r}")
        if needs[kv_source] != (veg is not None, language_proj is not None):
            raise ValueError(
                f"kv_source {kv_source!r} needs veg={needs[kv_source][0]} and language_proj="
                f"{needs[kv_source][1]} (the decoder's key/value source)"
            )
        self.kv_source = kv_source
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.fusion = fusion
        self.fusion_mode = fusion_mode
        self.veg = veg
        self.veg_in_feature = veg_in_feature
        self.language_proj = language_proj
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.criterion = criterion
        self.global_cue, self.local_cues = global_cue, local_cues
        self.no_target_threshold = no_target_threshold
        self.trim_text_padding = trim_text_padding
        self.compile_backbone = compile_backbone
        self._compiled_backbone = None  # built on the first inference call (see _backbone)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.set_channels_last(channels_last)
        set_fused_attention(self, fused_attention)
        logger.info(
            "VIPA: fusion=%s, key/value=%s, cues: global=%s local=%s",
            fusion_mode, kv_source, global_cue, local_cues,
        )

    @classmethod
    def from_config(cls, cfg):
        vipa = cfg.MODEL.VIPA
        if vipa.KV_SOURCE not in KV_SOURCES:
            raise ValueError(f"MODEL.VIPA.KV_SOURCE must be one of {KV_SOURCES}, got {vipa.KV_SOURCE!r}")
        if vipa.FUSION not in FUSION_MODES:
            raise ValueError(f"MODEL.VIPA.FUSION must be one of {FUSION_MODES}, got {vipa.FUSION!r}")
        # Fail on a bad cue choice before building anything heavy.
        linguistic_cue_mask(torch.ones(1, 3, dtype=torch.long), vipa.VEG.GLOBAL_CUE, vipa.VEG.LOCAL_CUES)

        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        text_encoder = TextEncoder(cfg)
        text_dim = text_encoder.hidden_size
        fusion = None if vipa.FUSION == "none" else VisionLanguageFusion(cfg, shapes, text_dim)
        veg = language_proj = None
        if vipa.KV_SOURCE in ("visual_expression", "language_relevance"):
            if vipa.VEG.IN_FEATURE not in shapes:
                raise ValueError(
                    f"MODEL.VIPA.VEG.IN_FEATURE={vipa.VEG.IN_FEATURE!r} is not a backbone output "
                    f"(available: {sorted(shapes)}; see MODEL.TIMM.OUT_FEATURES)"
                )
            # The control needs only step 1's relevance; step 2 would be unused parameters.
            control = {"step1": True, "step2": False} if vipa.KV_SOURCE == "language_relevance" else {}
            veg = VisualExpressionGenerator(cfg, shapes[vipa.VEG.IN_FEATURE].channels, text_dim, **control)
        if vipa.KV_SOURCE in ("language", "language_relevance"):
            # The "vanilla language expression" baseline: projected word features as K/V.
            language_proj = nn.Sequential(nn.Linear(text_dim, vipa.HIDDEN_DIM), nn.LayerNorm(vipa.HIDDEN_DIM))
        return {
            "backbone": backbone,
            "text_encoder": text_encoder,
            "fusion": fusion,
            "fusion_mode": vipa.FUSION,
            "kv_source": vipa.KV_SOURCE,
            "veg": veg,
            "veg_in_feature": vipa.VEG.IN_FEATURE,
            "language_proj": language_proj,
            "pixel_decoder": build_pixel_decoder(cfg, shapes),
            "transformer_decoder": VIPATransformerDecoder(cfg, shapes),
            "criterion": VIPACriterion(cfg),
            "global_cue": vipa.VEG.GLOBAL_CUE,
            "local_cues": vipa.VEG.LOCAL_CUES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "no_target_threshold": vipa.NO_TARGET_THRESHOLD,
            "channels_last": vipa.CHANNELS_LAST,
            "trim_text_padding": vipa.TRIM_TEXT_PADDING,
            "fused_attention": vipa.FUSED_ATTENTION,
            "compile_backbone": vipa.COMPILE_BACKBONE,
        }

    def set_channels_last(self, enabled: bool) -> "VIPA":
        """
        Keep 4-D weights and the image batch in NHWC (True) or NCHW (False) memory layout.
        Only the layout changes, not the values; loading a checkpoint later keeps the layout.
        """
        self.channels_last = bool(enabled)
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self._compiled_backbone = None  # compiled code specialises on the weights' layout
        return self

    def __getstate__(self):
        # Compiled code is bound to this instance's backbone: a copy (copy.deepcopy, pickle)
        # compiles its own on its first inference call instead of running the original's.
        state = self.__dict__.copy()
        state["_compiled_backbone"] = None
        return state

    def _run_backbone(self, pixels: torch.Tensor, text=None, text_valid=None) -> Dict[str, torch.Tensor]:
        """The backbone; given the text, with early fusion after every output stage."""
        if text is None:
            return self.backbone(pixels)

        def fuse(name, feature):
            return self.fusion.fuse_stage(name, feature, text, text_valid)

        return self.backbone(pixels, stage_hook=fuse)

    def _backbone(self, pixels: torch.Tensor, text=None, text_valid=None) -> Dict[str, torch.Tensor]:
        """:meth:`_run_backbone`, compiled for inference when MODEL.VIPA.COMPILE_BACKBONE is set."""
        if self.training or not self.compile_backbone:
            return self._run_backbone(pixels, text, text_valid)
        if self._compiled_backbone is None:
            # The text enters as an argument, so the compiled code reads every call's
            # expressions (a closure over module state would be frozen at the first call).
            # A plain function is not a registered submodule: state_dict keys stay the same.
            self._compiled_backbone = torch.compile(self._run_backbone)
        return self._compiled_backbone(pixels, text, text_valid)

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
        images = ImageList.from_tensors(images, self.size_divisibility)
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
        resolution), "no_target_logit", "veg" (VEG outputs or None), "cue_valid",
        "image_valid" (B, H, W).
        """
        images = encoded["images"]
        n_img, n_txt = images.tensor.shape[0], input_ids.shape[0]
        if n_img not in (1, n_txt):
            raise ValueError(f"decode() got {n_img} images for {n_txt} expressions; expected 1 or {n_txt} images")
        if self.trim_text_padding:
            input_ids, attention_mask = trim_text_padding(input_ids, attention_mask)
        text = self.encode_text(input_ids, attention_mask)
        text_valid = attention_mask.bool()
        cue_valid = linguistic_cue_mask(attention_mask, self.global_cue, self.local_cues)
        features = self._vision_language_features(encoded, text, text_valid)

        image_valid = self.image_valid_mask(images)
        if n_img != n_txt:
            image_valid = image_valid.expand(n_txt, *image_valid.shape[1:])
        veg_out = None
        if self.veg is not None:
            visual = features[self.veg_in_feature]
            token_valid = area_downsample(image_valid, visual.shape[-2:]).flatten(1) >= 0.5
            veg_out = self.veg(visual, text, cue_valid, token_valid)
        if self.language_proj is None:
            kv = veg_out["visual_expression"]
        else:
            kv = self.language_proj(text)
        mask_features, multi_scale = self.pixel_decoder(features)
        out = self.transformer_decoder(multi_scale, mask_features, kv, cue_valid)
        out.update(veg=veg_out, cue_valid=cue_valid, image_valid=image_valid)
        return out

    def losses(self, outputs: Dict, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        if any("gt_mask" not in x for x in batched_inputs):
            raise ValueError("Training inputs need a 'gt_mask' (see vipa_d2.data.ReferringDatasetMapper)")
        gt = ImageList.from_tensors(
            [x["gt_mask"].to(self.device) for x in batched_inputs], self.size_divisibility
        ).tensor
        empty = torch.tensor([bool(x.get("empty", False)) for x in batched_inputs], device=self.device)
        veg = outputs["veg"]
        has_relevance = veg is not None and veg["relevance"] is not None
        return self.criterion(
            outputs["pred_masks"],
            outputs["no_target_logit"],
            gt,
            outputs["image_valid"],
            empty,
            relevance=veg["relevance"] if has_relevance else None,
            relevance_grid=veg["grid"] if has_relevance else None,
            cue_valid=outputs["cue_valid"],
        )

    def postprocess(self, outputs: Dict, images: ImageList, output_sizes: List) -> List[Dict]:
        """
        Per expression: "ref_seg" (height, width) foreground probability, "relevance"
        (height, width) map of the cues' retrieval relevance (mean over valid cues; zeros
        for the language-K/V baseline, which retrieves nothing) and "no_target_score".
        When VEG step 1 feeds the decoder, also "retrieved", bool (T, height, width): the
        visual tokens each text position retrieved, and "cue_valid", bool (T,): which
        positions are cues (T: the possibly trimmed text length).
        ``output_sizes``: (height, width) per expression. Masks of expressions judged
        no-target (score > NO_TARGET_THRESHOLD) are emptied.
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
        retrieved = None
        # Only when step 1 ran and its visual expression is the decoder's K/V: with language
        # K/V nothing the decoder reads was retrieved.
        if veg is not None and veg["relevance"] is not None and self.language_proj is None:
            # The support of M on the token grid, each token a block of the padded image.
            support = (veg["retrieval_mask"] > 0.5).to(logits.dtype)
            support = support.view(*support.shape[:2], *veg["grid"])
            retrieved = F.interpolate(support, size=padded, mode="nearest")
        results = []
        for i, (height, width) in enumerate(output_sizes):
            image_size = images.image_sizes[i if len(images.image_sizes) > 1 else 0]
            prob = sem_seg_postprocess(logits[i], image_size, height, width)[0].sigmoid()
            if scores[i] > self.no_target_threshold:
                prob = torch.zeros_like(prob)
            rel = (
                sem_seg_postprocess(relevance[i], image_size, height, width)[0]
                if relevance is not None
                else prob.new_zeros(height, width)
            )
            results.append({"ref_seg": prob, "relevance": rel, "no_target_score": scores[i]})
            if retrieved is not None:
                # Resized like ref_seg, then thresholded back to a set.
                kept = sem_seg_postprocess(retrieved[i], image_size, height, width) > 0.5
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
