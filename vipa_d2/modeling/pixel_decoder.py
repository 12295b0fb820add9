"""
Multi-scale pixel decoder: FPN-style lateral 1x1 convs, top-down nearest upsampling and
3x3 output convs (plain convolutions, no deformable attention / custom CUDA ops), plus a
1x1 projection of the finest level to the per-pixel mask embedding. Optionally, coordinate
channels on every lateral input and transformer encoder layers (pixel self-attention) on
the coarsest level give the features absolute position and image-wide context.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import fvcore.nn.weight_init as weight_init
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.utils.registry import Registry

from .attention import AttentionBlock, FeedForward, sine_position_encoding
from .registry import backbone_outputs, get_registered

VIPA_PIXEL_DECODER_REGISTRY = Registry("VIPA_PIXEL_DECODER")
VIPA_PIXEL_DECODER_REGISTRY.__doc__ = """
Registry for VIPA pixel decoders: ``__init__(cfg, input_shape)`` (via ``from_config``),
``forward(features) -> (mask_features, {name: (B, HIDDEN_DIM, H, W)})``.
"""


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """Build ``MODEL.VIPA.PIXEL_DECODER.NAME`` on the backbone's ``output_shape()``."""
    name = cfg.MODEL.VIPA.PIXEL_DECODER.NAME
    wanted = list(cfg.MODEL.VIPA.PIXEL_DECODER.IN_FEATURES) + [cfg.MODEL.VIPA.PIXEL_DECODER.MASK_REFINE_FEATURE]
    missing = [f for f in wanted if f and f not in input_shape]
    if missing:
        raise ValueError(
            f"MODEL.VIPA.PIXEL_DECODER.IN_FEATURES / MASK_REFINE_FEATURE name {missing}, which the backbone does not "
            f"output ({backbone_outputs(cfg, input_shape)})"
        )
    return get_registered(VIPA_PIXEL_DECODER_REGISTRY, name, "MODEL.VIPA.PIXEL_DECODER.NAME")(cfg, input_shape)


@VIPA_PIXEL_DECODER_REGISTRY.register()
class VIPAFPNPixelDecoder(nn.Module):
    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        conv_dim: int,
        mask_dim: int,
        norm: str,
        transformer_layers: int = 0,
        transformer_feature: str = "",
        nheads: int = 8,
        dim_feedforward: int = 1024,
        coordinates: bool = False,
        refine_feature: str = "",
        refine_shape: Optional[ShapeSpec] = None,
    ):
        """
        Args:
            input_shape: the used backbone features (any order; sorted fine to coarse here).
            conv_dim: width of every output level (= MODEL.VIPA.HIDDEN_DIM).
            mask_dim: channels of the mask features at the finest input stride.
            norm: Detectron2 norm name for the convs ("" for none).
            transformer_layers: self-attention encoder layers on one level.
            transformer_feature: that level, after its top-down sum ("" = the coarsest).
            nheads, dim_feedforward: of those layers.
            coordinates: append (x, y) in [-1, 1] to every lateral conv's input.
            refine_feature, refine_shape: a finer backbone feature (and its shape) whose 1x1
                projection is added to the upsampled mask features ("" for none).
        """
        super().__init__()
        items = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features: List[str] = [k for k, _ in items]
        self.strides = {k: v.stride for k, v in items}
        use_bias = norm == ""
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        self.coordinates = coordinates
        extra = 2 if coordinates else 0
        for _, spec in items:
            lateral = Conv2d(spec.channels + extra, conv_dim, 1, bias=use_bias, norm=get_norm(norm, conv_dim))
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
        self.refine_feature = refine_feature
        self.refine_lateral = None
        if refine_feature:
            if refine_shape is None or refine_shape.stride >= self.mask_stride:
                raise ValueError(
                    f"MODEL.VIPA.PIXEL_DECODER.MASK_REFINE_FEATURE={refine_feature!r} must be a backbone "
                    f"feature finer than the mask features (stride {self.mask_stride}), got {refine_shape}"
                )
            # No norm (MASK_DIM need not suit GroupNorm), and zero at the start: the raw
            # backbone feature's scale would swamp the masks; the detail is learned on top.
            self.refine_lateral = Conv2d(refine_shape.channels, mask_dim, 1)
            nn.init.zeros_(self.refine_lateral.weight)
            nn.init.zeros_(self.refine_lateral.bias)
            self.mask_stride = refine_shape.stride
        self.transformer_feature = transformer_feature or self.in_features[-1]
        if self.transformer_feature not in self.in_features:
            raise ValueError(
                f"MODEL.VIPA.PIXEL_DECODER.TRANSFORMER_FEATURE={transformer_feature!r} is not one of "
                f"MODEL.VIPA.PIXEL_DECODER.IN_FEATURES {self.in_features}"
            )
        self.encoder = nn.ModuleList(
            nn.ModuleList([AttentionBlock(conv_dim, nheads), FeedForward(conv_dim, dim_feedforward)])
            for _ in range(transformer_layers)
        )

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        names = cfg.MODEL.VIPA.PIXEL_DECODER.IN_FEATURES
        refine = cfg.MODEL.VIPA.PIXEL_DECODER.MASK_REFINE_FEATURE
        return {
            "input_shape": {k: input_shape[k] for k in names},
            "conv_dim": cfg.MODEL.VIPA.HIDDEN_DIM,
            "mask_dim": cfg.MODEL.VIPA.PIXEL_DECODER.MASK_DIM,
            "norm": cfg.MODEL.VIPA.PIXEL_DECODER.NORM,
            "transformer_layers": cfg.MODEL.VIPA.PIXEL_DECODER.TRANSFORMER_LAYERS,
            "transformer_feature": cfg.MODEL.VIPA.PIXEL_DECODER.TRANSFORMER_FEATURE,
            "nheads": cfg.MODEL.VIPA.NHEADS,
            "dim_feedforward": cfg.MODEL.VIPA.DECODER.DIM_FEEDFORWARD,
            "coordinates": cfg.MODEL.VIPA.PIXEL_DECODER.COORDINATES,
            "refine_feature": refine,
            "refine_shape": input_shape.get(refine) if refine else None,
        }

    @staticmethod
    def _with_coordinates(x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # (2, H, W): x then y
        return torch.cat([x, grid[None].expand(b, -1, -1, -1)], dim=1)

    def _encode(self, y: torch.Tensor) -> torch.Tensor:
        """Pixel self-attention (sine positions on queries and keys) over one level."""
        b, c, h, w = y.shape
        tokens = y.flatten(2).transpose(1, 2)
        pos = sine_position_encoding(h, w, c, y.device, y.dtype)[None]
        for attn, ffn in self.encoder:
            tokens = ffn(attn(tokens, tokens, query_pos=pos, memory_pos=pos)[0])
        return tokens.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        outputs: Dict[str, torch.Tensor] = {}
        top_down = None
        # Coarse to fine.
        for idx in range(len(self.in_features) - 1, -1, -1):
            name = self.in_features[idx]
            x = features[name]
            y = self.lateral_convs[idx](self._with_coordinates(x) if self.coordinates else x)
            if top_down is not None:
                y = y + F.interpolate(top_down, size=y.shape[-2:], mode="nearest")
            if name == self.transformer_feature and len(self.encoder):
                y = self._encode(y)
            top_down = self.output_convs[idx](y)
            outputs[name] = top_down
        mask_features = self.mask_features(top_down)
        if self.refine_lateral is not None:
            # Object boundaries at the finer stride: the coarse mask features, upsampled, plus
            # a cheap projection of the finer backbone feature (no wide convs at that size).
            fine = features[self.refine_feature]
            mask_features = F.interpolate(
                mask_features, size=fine.shape[-2:], mode="bilinear", align_corners=False
            ) + self.refine_lateral(fine)
        return mask_features, outputs
