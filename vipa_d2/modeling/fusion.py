"""
Vision-language fusion in the encoder: pixel-word attention (LAVT PWAM / CrossVLT style).

Every pixel attends over the words of the expression; the attended language context is
multiplied element-wise with the (projected) pixel feature and added back through a
learned tanh gate. The gate's last layer starts at zero, so at initialisation the fused
feature equals the (possibly pretrained) visual feature and fusion is learned gently.

"early" fusion applies these modules inside the backbone (through the backbone's
``stage_hook`` argument: the fused stage output feeds the next stage); "late" fusion
applies them to the backbone outputs only.
"""
import inspect
import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec

from .attention import MultiHeadAttention

FUSION_MODES = ("none", "late", "early")


def check_early_fusion_backbone(backbone: nn.Module, name: str) -> None:
    """
    ValueError unless ``backbone.forward`` takes ``stage_hook`` by name, which early fusion needs
    (:class:`VIPATimmBackbone` does; Detectron2's own backbones and a plain
    ``forward(x)`` do not). Checked when the model is built: the call would otherwise fail
    at the first step. ``name``: the config's MODEL.BACKBONE.NAME, for the message.
    """
    parameters = inspect.signature(backbone.forward).parameters
    if "stage_hook" in parameters:
        return
    # A forward(x, **kwargs) is refused too: one that ignores the hook trained without fusion
    # and without a word (extension review, session 53); naming it says it is called.
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    raise ValueError(
        f"MODEL.VIPA.FUSION 'early' fuses the words into the backbone after every output stage, so the backbone "
        f"(MODEL.BACKBONE.NAME {name!r}) needs forward(x, stage_hook=None) that replaces each output stage's "
        f"feature f by stage_hook(name, f) before the next stage reads it (as VIPATimmBackbone.forward does); "
        f"{type(backbone).__name__}.forward takes no stage_hook"
        + (" by name (**kwargs may drop it; name it, and pass it on if another backbone calls it)" if takes_kwargs else "")
        + ". Add it, or set MODEL.VIPA.FUSION 'late' or 'none'"
    )


def check_fused_stages(backbone: nn.Module, fusion: "VisionLanguageFusion", called: List[str]) -> None:
    """
    ValueError unless ``backbone``'s forward passed every stage that ``fusion`` has a module
    for through ``stage_hook``, by its ``output_shape()`` name (``called``: the names it
    passed). A backbone that hooks under other names (``"stage1"``), or never calls the
    hook, otherwise trained with the words never fused into the image, and no word said
    (extension review, session 60).
    """
    unfused = [name for name in fusion.stages if name not in called]
    if unfused:
        raise ValueError(
            f"MODEL.VIPA.FUSION 'early': {type(backbone).__name__}.forward passed stage_hook the stages "
            f"{list(called)}, so the words were not fused into {unfused}. Call stage_hook(name, f) once per output "
            f"stage, name being its key in output_shape() ({list(fusion.stages)}), and feed its result to the next stage"
        )


class PixelWordAttention(nn.Module):
    """Fuses text (B, T, Ct) into a visual map (B, C, H, W); returns a map of the same shape."""

    def __init__(self, visual_dim: int, text_dim: int, nheads: int, dropout: float = 0.0):
        super().__init__()
        # Stage widths need not be multiples of NHEADS (e.g. EfficientNet's 24/40/112/320).
        heads = math.gcd(nheads, visual_dim)
        self.query_norm = nn.LayerNorm(visual_dim)
        self.word_attn = MultiHeadAttention(visual_dim, heads, dropout, kdim=text_dim, vdim=text_dim)
        self.visual_proj = nn.Linear(visual_dim, visual_dim)
        self.gate = nn.Sequential(
            nn.Linear(visual_dim, visual_dim), nn.ReLU(inplace=True), nn.Linear(visual_dim, visual_dim), nn.Tanh()
        )
        nn.init.zeros_(self.gate[2].weight)
        nn.init.zeros_(self.gate[2].bias)

    def forward(self, visual: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
        b, c, h, w = visual.shape
        x = visual.flatten(2).transpose(1, 2)  # (B, HW, C)
        context, _ = self.word_attn(self.query_norm(x), text, text, allowed=text_valid[:, None, :])
        fused = F.gelu(self.visual_proj(x)) * context
        out = x + self.gate(fused) * fused
        return out.transpose(1, 2).reshape(b, c, h, w)


class VisionLanguageFusion(nn.Module):
    """One :class:`PixelWordAttention` per backbone output stage (a ModuleDict keyed by name)."""

    @configurable
    def __init__(self, *, input_shape: Dict[str, ShapeSpec], text_dim: int, nheads: int, dropout: float):
        super().__init__()
        self.stages = nn.ModuleDict(
            {name: PixelWordAttention(spec.channels, text_dim, nheads, dropout) for name, spec in input_shape.items()}
        )

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec], text_dim: int):
        return {
            "input_shape": input_shape,
            "text_dim": text_dim,
            "nheads": cfg.MODEL.VIPA.NHEADS,
            "dropout": cfg.MODEL.VIPA.FUSION_DROPOUT,
        }

    def fuse_stage(self, name: str, feature: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor):
        """Fuse one stage; stages without a fusion module pass through unchanged."""
        if name not in self.stages:
            return feature
        return self.stages[name](feature, text, text_valid)

    def forward(self, features: Dict[str, torch.Tensor], text: torch.Tensor, text_valid: torch.Tensor):
        """Late fusion: fuse every backbone output independently."""
        return {name: self.fuse_stage(name, f, text, text_valid) for name, f in features.items()}
