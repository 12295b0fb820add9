"""Detectron2 ``Backbone`` over timm models (EfficientNet, MobileNet, GhostNet, Swin), run stage by stage.

Running the stages ourselves (instead of timm's ``features_only`` wrapper) lets a caller
pass a per-stage hook whose output is fed to the next stage: the optional ``stage_hook``
argument of ``forward``, through which early vision-language fusion enters the backbone.
Without it, ``forward(images)`` is Detectron2's usual backbone contract.
"""
import logging
from typing import Callable, Dict, Optional, Set

import torch
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ...errors import ConfigError
from ...utils.checkpoint_file import checkpoint_outline
from .conv_bn_fold import fold_conv_bn
from .weights import load_backbone_weights

logger = logging.getLogger(__name__)

# The meta-architecture's attribute for its backbone (Detectron2's): its weights' first name part.
BACKBONE_MODULE = "backbone"
# A stage hook maps (output name, NCHW feature) -> NCHW feature of the same shape.
StageHook = Callable[[str, torch.Tensor], torch.Tensor]


def _res_name(stride: int) -> str:
    # Detectron2 naming: res2 = stride 4, ..., res5 = stride 32.
    return f"res{int(stride).bit_length() - 1}"


def _checkpoint_holds_backbone(cfg) -> bool:
    """Whether MODEL.WEIGHTS is set and holds backbone weights. A file not in torch.save's
    format is taken to hold them (it is not looked into); a part of a model without them (a
    head, say) leaves the backbone to MODEL.TIMM.WEIGHTS."""
    if not cfg.MODEL.WEIGHTS:
        return False
    outline = checkpoint_outline(cfg.MODEL.WEIGHTS, cfg.MODEL.WEIGHTS_TRUSTED)
    return outline is None or BACKBONE_MODULE in outline.modules


def _stage_features(model: nn.Module, stages: str) -> Dict[int, dict]:
    """
    timm's feature_info of the stages in ``model.<stages>``, by stage index. Features of
    other modules are left out: GhostNet lists its stem (stride 2, below res2).
    """
    prefix = stages + "."
    return {
        int(info["module"][len(prefix):].split(".")[0]): info
        for info in model.feature_info
        if info["module"].startswith(prefix)
    }


class _Stages:
    """Split of a timm model into a stem and sequential stages, per architecture family."""

    def __init__(self, model: nn.Module, arch: str):
        self.channels_last_out = False
        # Whether a Conv2d registered right before a BatchNorm feeds it (see fold_conv_bn).
        self.conv_bn_in_order = False
        if hasattr(model, "conv_stem") and hasattr(model, "blocks"):  # EfficientNet family
            self.conv_bn_in_order = True
            # GhostNet's stem activation is a module of its own (act1); EfficientNet's and
            # MobileNet's bn1 applies it.
            act = [model.act1] if hasattr(model, "act1") else []
            self.stem = nn.Sequential(model.conv_stem, model.bn1, *act)
            self.stages = list(model.blocks)
            self.feature_info = _stage_features(model, "blocks")
        elif hasattr(model, "patch_embed") and hasattr(model, "layers"):  # Swin family
            self.stem = model.patch_embed
            self.stages = list(model.layers)
            self.feature_info = _stage_features(model, "layers")
            self.channels_last_out = True  # timm Swin stages work in NHWC
        else:
            raise ConfigError(
                f"MODEL.TIMM.ARCH={arch!r} builds a timm {type(model).__name__}, unsupported: VIPATimmBackbone "
                "supports EfficientNet-style (conv_stem/blocks: EfficientNet, MobileNet, GhostNet) and "
                "Swin-style (patch_embed/layers: Swin, SwinV2) models."
            )


def _create_model(arch: str, in_chans: int, drop_path_rate: float) -> nn.Module:
    """
    timm model ``arch`` with random weights. The drop-path rate is always passed where the
    model takes one: timm's Swin would otherwise use its own default (0.1) for a rate of 0.
    Models without stochastic depth (GhostNet) refuse the argument; at 0 they are built
    without it, above 0 the config asks for what they cannot do.
    """
    import timm

    kwargs = {}
    if arch.startswith("swin"):
        # Any input size: timm pads windows internally when the size is dynamic. Every
        # stage keeps its window and shift, as Swin's segmentation code (LAVT's) does: timm
        # would otherwise fit them to the size it builds for (224 / 384), under which the
        # last stage is one window and never shifts, also at 480, where it is 15 x 15.
        kwargs.update(dynamic_img_size=True, strict_img_size=False, always_partition=True)
    try:
        try:
            model = timm.create_model(
                arch, pretrained=False, in_chans=in_chans, drop_path_rate=drop_path_rate, **kwargs
            )
        except TypeError as e:  # raised binding the arguments, before any weight is drawn
            if "drop_path_rate" not in str(e):
                raise
            if drop_path_rate > 0:
                raise ConfigError(
                    f"MODEL.TIMM.DROP_PATH_RATE={drop_path_rate} but MODEL.TIMM.ARCH={arch!r} has no "
                    "stochastic depth (its timm class takes no drop_path_rate): set it to 0."
                ) from e
            model = timm.create_model(arch, pretrained=False, in_chans=in_chans, **kwargs)
    except RuntimeError as e:  # timm raises RuntimeError for unknown names
        raise ConfigError(f"MODEL.TIMM.ARCH={arch!r} is not a timm model: {e}") from e
    if arch.startswith("swin"):
        from .swin_windows import pad_before_shift  # timm's Swin module, imported with timm

        # Shifted windows padded before the shift: timm's order mixes opposite image edges.
        pad_before_shift(model)
    return model


@BACKBONE_REGISTRY.register()
class VIPATimmBackbone(Backbone):
    """
    timm EfficientNet / Swin as a Detectron2 backbone. Outputs ``res2..res5``
    (NCHW) restricted to ``MODEL.TIMM.OUT_FEATURES``.
    """

    def __init__(self, cfg, input_shape: ShapeSpec):
        super().__init__()
        arch = cfg.MODEL.TIMM.ARCH
        model = _create_model(arch, input_shape.channels, cfg.MODEL.TIMM.DROP_PATH_RATE)
        if _checkpoint_holds_backbone(cfg):
            # Fetching pretrained weights only to overwrite them would need the network
            # (MODEL.TIMM.WEIGHTS "timm") for nothing.
            logger.info("Backbone %s: built from its config, weights to come from MODEL.WEIGHTS", arch)
        else:
            load_backbone_weights(model, cfg.MODEL.TIMM.WEIGHTS, arch)

        split = _Stages(model, arch)
        self.stem = split.stem
        self.stages = nn.ModuleList(split.stages)
        self._nhwc = split.channels_last_out
        self._stage_names: Dict[int, str] = {}
        # Level (res2..res5) of every stage with a feature output, requested or not.
        self._stage_levels = {idx: _res_name(info["reduction"]) for idx, info in split.feature_info.items()}
        self._out_feature_strides, self._out_feature_channels = {}, {}
        for idx, info in split.feature_info.items():
            name = _res_name(info["reduction"])
            if name in cfg.MODEL.TIMM.OUT_FEATURES:
                self._stage_names[idx] = name
                self._out_feature_strides[name] = info["reduction"]
                self._out_feature_channels[name] = info["num_chs"]
        missing = set(cfg.MODEL.TIMM.OUT_FEATURES) - set(self._stage_names.values())
        if missing:
            raise ConfigError(
                f"MODEL.TIMM.OUT_FEATURES asks for {sorted(missing)}, but {arch} provides "
                f"{sorted(_res_name(i['reduction']) for i in split.feature_info.values())}"
            )
        self._out_features = [n for n in cfg.MODEL.TIMM.OUT_FEATURES]
        # Stages after the last requested output are not run (and hold no parameters).
        last = max(self._stage_names)
        del self.stages[last + 1 :]
        # What timm keeps out of weight decay (Swin's relative position bias tables, SwinV2's
        # logit scales and bias MLPs), under their names here (stages.* for timm's layers.*).
        timm_names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
        kept_out = {id(p) for n, p in model.named_parameters() if n in timm_names}
        self._no_weight_decay = {n for n, p in self.named_parameters() if id(p) in kept_out}
        # Always: same values up to float rounding, one pass over the activation less while
        # BatchNorm uses running statistics; set_conv_bn_folding turns it off for debugging.
        if split.conv_bn_in_order:
            folded = fold_conv_bn(self)
            logger.info(f"{arch}: {folded} Conv2d+BatchNorm pairs fold while BatchNorm uses running stats")
        # After folding: the frozen BatchNorms are the modules now in the BatchNorm slots.
        self._freeze(cfg.MODEL.BACKBONE.FREEZE_AT, cfg.MODEL.TIMM.FREEZE_BN)

    def _freeze(self, freeze_at: int, freeze_bn: bool) -> None:
        """
        Detectron2's FREEZE_AT semantics: 1 freezes the stem, k >= 2 also the stages up to
        the one producing res{k}; as in Detectron2 (whose frozen stages hold
        FrozenBatchNorm2d) their BatchNorms are fixed too. ``freeze_bn`` fixes every
        BatchNorm. Fixed BatchNorms use their running statistics and keep them (see
        :meth:`train`).
        """
        frozen = [self.stem] if freeze_at >= 1 else []
        for idx, stage in enumerate(self.stages):
            # A stage belongs to the level of the first feature output at or after it.
            level = min(i for i in self._stage_levels if i >= idx)
            if int(self._stage_levels[level][len("res"):]) <= freeze_at:
                frozen.append(stage)
        for module in frozen:
            module.requires_grad_(False)
        fixed_scope = [self] if freeze_bn else frozen
        self._frozen_bn = [
            m for scope in fixed_scope for m in scope.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        for m in self._frozen_bn:
            m.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen_bn:  # frozen BatchNorms always use their running statistics
            m.train(False)
        return self

    def no_weight_decay(self) -> Set[str]:
        """Names of the parameters timm's model keeps out of weight decay (timm's convention;
        vipa_d2's optimizer gives them SOLVER.WEIGHT_DECAY_EMBED)."""
        return set(self._no_weight_decay)

    @property
    def size_divisibility(self) -> int:
        return max(self._out_feature_strides.values())

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }

    def forward(self, x: torch.Tensor, stage_hook: Optional[StageHook] = None) -> Dict[str, torch.Tensor]:
        """
        ``stage_hook`` (optional): every output stage's feature ``f`` (NCHW) is replaced by
        ``stage_hook(name, f)`` before it is returned *and* before the next stage consumes
        it. Used for early vision-language fusion (language reaches it by closure). It is an
        argument, not module state, so torch.compile traces the closure's tensors as inputs.
        """
        outputs = {}
        x = self.stem(x)
        for idx, stage in enumerate(self.stages):
            x = stage(x)
            name = self._stage_names.get(idx)
            if name is None:
                continue
            feat = x.permute(0, 3, 1, 2) if self._nhwc else x
            if stage_hook is not None:
                feat = stage_hook(name, feat)
                x = feat.permute(0, 2, 3, 1) if self._nhwc else feat
            outputs[name] = feat.contiguous() if self._nhwc else feat
        return outputs
