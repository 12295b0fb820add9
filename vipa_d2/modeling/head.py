"""
VIPA's head: everything after the (language-fused) vision encoder. It turns the backbone
features and the text features into mask logits through the key/value set of the decoder:
the Visual Expression Generator's visual expression (VIPA), the projected words (the
vanilla language baseline) or both (the loss-matched control). The pixel decoder and the
transformer decoder are built by registered name, so either can be swapped from a config.
"""
import logging
from typing import Dict, Optional

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry

from .losses import token_validity
from .pixel_decoder import build_pixel_decoder
from .registry import backbone_outputs, get_registered
from .transformer_decoder import build_transformer_decoder
from .veg import VEG_OUTPUTS, VIPA_VEG_REGISTRY, linguistic_cue_mask

logger = logging.getLogger(__name__)

VIPA_HEAD_REGISTRY = Registry("VIPA_HEAD")
VIPA_HEAD_REGISTRY.__doc__ = """
Registry for VIPA heads, built from ``MODEL.VIPA.HEAD_NAME`` with
``(cfg, input_shape, text_dim)``; ``forward(features, text, attention_mask, image_valid)``
returns the outputs :class:`vipa_d2.modeling.VIPA` and its criterion read (see VIPAHead;
``meta_arch.HEAD_OUTPUTS`` at least). An attribute ``kv_source`` (one of KV_SOURCES) says
what the decoder reads; without it the VEG's retrieved tokens are reported as read.
"""

# "language_relevance" is the loss-matched control: language K/V, while a VEG (step 1
# only) still computes the cue-token relevance so the pixel contrastive loss supervises
# the same features as in VIPA; nothing of it reaches the decoder.
KV_SOURCES = ("visual_expression", "language", "language_relevance")
# Which K/V source needs (a VEG, a language projection).
_KV_PARTS = {"visual_expression": (True, False), "language": (False, True), "language_relevance": (True, True)}


def word_projection(text_dim: int, hidden_dim: int) -> nn.Module:
    """Text features -> the decoder's width: the language baseline's K/V, or the words a decoder reads."""
    return nn.Sequential(nn.Linear(text_dim, hidden_dim), nn.LayerNorm(hidden_dim))


def decoder_reads_words(transformer_decoder: nn.Module) -> bool:
    """Whether a decoder asks for the projected words (an optional attribute: registered
    third-party decoders without it keep the plain interface)."""
    return getattr(transformer_decoder, "reads_words", False)


def build_vipa_head(cfg, input_shape: Dict[str, ShapeSpec], text_dim: int) -> nn.Module:
    """Build ``MODEL.VIPA.HEAD_NAME`` on the backbone's ``output_shape()`` and the text width."""
    return get_registered(VIPA_HEAD_REGISTRY, cfg.MODEL.VIPA.HEAD_NAME, "MODEL.VIPA.HEAD_NAME")(cfg, input_shape, text_dim)


@VIPA_HEAD_REGISTRY.register()
class VIPAHead(nn.Module):
    @configurable
    def __init__(
        self,
        *,
        kv_source: str,
        veg: Optional[nn.Module],
        veg_in_feature: str,
        language_proj: Optional[nn.Module],
        pixel_decoder: nn.Module,
        transformer_decoder: nn.Module,
        global_cue: bool,
        local_cues: bool,
    ):
        """
        ``kv_source`` (one of KV_SOURCES) decides which modules are needed: ``veg`` for
        "visual_expression", ``language_proj`` for "language", both for "language_relevance".
        A transformer decoder whose ``reads_words`` is True also gets the projected words,
        so it needs ``language_proj`` whatever the source.
        ``global_cue`` / ``local_cues``: which text positions are cues (and decoder keys).
        """
        super().__init__()
        if kv_source not in _KV_PARTS:
            raise ValueError(f"kv_source must be one of {KV_SOURCES}, got {kv_source!r}")
        self.decoder_reads_words = decoder_reads_words(transformer_decoder)
        needs_veg, needs_language = _KV_PARTS[kv_source]
        needs_language = needs_language or self.decoder_reads_words
        if (needs_veg, needs_language) != (veg is not None, language_proj is not None):
            raise ValueError(
                f"kv_source {kv_source!r} with a decoder that reads words={self.decoder_reads_words} needs "
                f"veg={needs_veg} and language_proj={needs_language} (the decoder's key/value source)"
            )
        self.kv_source = kv_source
        self.veg = veg
        self.veg_in_feature = veg_in_feature
        self.language_proj = language_proj
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.global_cue, self.local_cues = global_cue, local_cues
        logger.info("VIPAHead: key/value=%s, cues: global=%s local=%s", kv_source, global_cue, local_cues)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec], text_dim: int):
        vipa = cfg.MODEL.VIPA
        if vipa.KV_SOURCE not in KV_SOURCES:
            raise ValueError(f"MODEL.VIPA.KV_SOURCE must be one of {KV_SOURCES}, got {vipa.KV_SOURCE!r}")
        # Fail on a bad cue choice before building anything heavy.
        linguistic_cue_mask(torch.ones(1, 3, dtype=torch.long), vipa.VEG.GLOBAL_CUE, vipa.VEG.LOCAL_CUES)
        needs_veg, needs_language = _KV_PARTS[vipa.KV_SOURCE]
        veg = language_proj = None
        if needs_veg:
            if vipa.VEG.IN_FEATURE not in input_shape:
                raise ValueError(
                    f"MODEL.VIPA.VEG.IN_FEATURE={vipa.VEG.IN_FEATURE!r} is not a backbone output "
                    f"({backbone_outputs(cfg, input_shape)})"
                )
            # The control needs only step 1's relevance; step 2 would be unused parameters.
            control = {"step1": True, "step2": False} if needs_language else {}
            veg_class = get_registered(VIPA_VEG_REGISTRY, vipa.VEG.NAME, "MODEL.VIPA.VEG.NAME")
            veg = veg_class(cfg, input_shape[vipa.VEG.IN_FEATURE].channels, text_dim, **control)
        if needs_language:
            # The "vanilla language expression" baseline: projected word features as K/V.
            language_proj = word_projection(text_dim, vipa.HIDDEN_DIM)
        pixel_decoder = build_pixel_decoder(cfg, input_shape)
        transformer_decoder = build_transformer_decoder(cfg, input_shape)
        if language_proj is None and decoder_reads_words(transformer_decoder):
            # The words a decoder reads (e.g. DECODER.CHOICE_FROM_WORDS). Built last, so every
            # other module draws the same initial weights as without it.
            language_proj = word_projection(text_dim, vipa.HIDDEN_DIM)
        return {
            "kv_source": vipa.KV_SOURCE,
            "veg": veg,
            "veg_in_feature": vipa.VEG.IN_FEATURE,
            "language_proj": language_proj,
            "pixel_decoder": pixel_decoder,
            "transformer_decoder": transformer_decoder,
            "global_cue": vipa.VEG.GLOBAL_CUE,
            "local_cues": vipa.VEG.LOCAL_CUES,
        }

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        text: torch.Tensor,
        attention_mask: torch.Tensor,
        image_valid: torch.Tensor,
    ) -> Dict:
        """
        Args:
            features: backbone features {name: (B, C, H, W)} (fused with the text if asked).
            text: (B, T, Ct) text features; attention_mask: (B, T) of the tokens.
            image_valid: (B, H, W) float, 1 inside each image, 0 on the batch padding.
        Returns:
            "pred_masks" (per-layer logits at the mask-feature resolution),
            "no_target_logit", "veg" (VEG outputs, with the "token_valid" the criterion
            reuses, or None) and "cue_valid" (B, T) bool.
        """
        cue_valid = linguistic_cue_mask(attention_mask, self.global_cue, self.local_cues)
        veg_out = None
        if self.veg is not None:
            visual = features[self.veg_in_feature]
            token_valid = token_validity(image_valid, visual.shape[-2:])
            veg_out = self.veg(visual, text, cue_valid, token_valid)
            missing = [key for key in VEG_OUTPUTS if key not in veg_out]
            if missing:  # a registered VEG of one's own: said before a bare KeyError in the losses
                raise ValueError(
                    f"The outputs of {type(self.veg).__name__} lack {missing}: a VIPA VEG returns {list(VEG_OUTPUTS)} "
                    "(see VisualExpressionGenerator.forward; MODEL.VIPA.VEG.NAME)"
                )
            veg_out["token_valid"] = token_valid
        words = None if self.language_proj is None else self.language_proj(text)
        kv = veg_out["visual_expression"] if self.kv_source == "visual_expression" else words
        mask_features, multi_scale = self.pixel_decoder(features)
        extra = {"words": words, "words_valid": attention_mask.bool()} if self.decoder_reads_words else {}
        out = self.transformer_decoder(multi_scale, mask_features, kv, cue_valid, **extra)
        out.update(veg=veg_out, cue_valid=cue_valid)
        return out
