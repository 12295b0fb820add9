"""
Multi-scale pixel decoder: FPN-style lateral 1x1 convs, top-down nearest upsampling and
3x3 output convs (plain convolutions, no deformable attention / custom CUDA ops), plus a
1x1 projection of the finest level to the per-pixel mask embedding.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import fvcore.nn.weight_init as weight_init
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.utils.registry import Registry

VIPA_PIXEL_DECODER_REGISTRY = Registry("VIPA_PIXEL_DECODER")
VIPA_PIXEL_DECODER_REGISTRY.__doc__ = """
Registry for VIPA pixel decoders: ``__init__(cfg, input_shape)`` (via ``from_config``),
``forward(features) -> (mask_features, {name: (B, HIDDEN_DIM, H, W)})``.
"""


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """Build ``MODEL.VIPA.PIXEL_DECODER.NAME`` on the backbone's ``output_shape()``."""
    name = cfg.MODEL.VIPA.PIXEL_DECODER.NAME
    missing = [f for f in cfg.MODEL.VIPA.PIXEL_DECODER.IN_FEATURES if f not in input_shape]
    if missing:
        raise ValueError(
            f"MODEL.VIPA.PIXEL_DECODER.IN_FEATURES has {missing}, which the backbone does not "
            f"output (it outputs {sorted(input_shape)}; see MODEL.TIMM.OUT_FEATURES)"
        )
    return VIPA_PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)


@VIPA_PIXEL_DECODER_REGISTRY.register()
class VIPAFPNPixelDecoder(nn.Module):
    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, conv_dim: int, mask_dim: int, norm: str):
        """
        Args:
            input_shape: the used backbone features (any order; sorted fine to coarse here).
            conv_dim: width of every output level (= MODEL.VIPA.HIDDEN_DIM).
            mask_dim: channels of the mask features at the finest input stride.
            norm: Detectron2 norm name for the convs ("" for none).
        """
        super().__init__()
        items = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features: List[str] = [k for k, _ in items]
        self.strides = {k: v.stride for k, v in items}
        use_bias = norm == ""
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for _, spec in items:
            lateral = Conv2d(spec.channels, conv_dim, 1, bias=use_bias, norm=get_norm(norm, conv_dim))
            output = Conv2d(
                conv_dim, conv_dim, 3, padding=1, bias=use_bias, norm=get_norm(norm, conv_dim), activation=F.relu
            )
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)
        self.mask_features = Conv2d(conv_dim, mask_dim, 1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.mask_stride = items[0][1].stride

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        names = cfg.MODEL.VIPA.PIXEL_DECODER.IN_FEATURES
        return {
            "input_shape": {k: input_shape[k] for k in names},
            "conv_dim": cfg.MODEL.VIPA.HIDDEN_DIM,
            "mask_dim": cfg.MODEL.VIPA.PIXEL_DECODER.MASK_DIM,
            "norm": cfg.MODEL.VIPA.PIXEL_DECODER.NORM,
        }

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        outputs: Dict[str, torch.Tensor] = {}
        top_down = None
        # Coarse to fine.
        for idx in range(len(self.in_features) - 1, -1, -1):
            name = self.in_features[idx]
            y = self.lateral_convs[idx](features[name])
            if top_down is not None:
                y = y + F.interpolate(top_down, size=y.shape[-2:], mode="nearest")
            top_down = self.output_convs[idx](y)
            outputs[name] = top_down
        return self.mask_features(top_down), outputs
