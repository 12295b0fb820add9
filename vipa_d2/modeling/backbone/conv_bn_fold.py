"""
Conv + BatchNorm folding that keeps the checkpoint layout.

While a BatchNorm uses its running statistics (inference, or ``MODEL.TIMM.FREEZE_BN``
during training) it is a per-channel affine map, so the convolution before it can apply
it through scaled weights and a bias: one pass over the activation instead of two. On
CPU that pass is a large part of a depthwise-separable backbone's time.

The folded modules hold the original parameters and buffers under the original names, so
checkpoints written with or without folding load into either; with batch statistics
(an unfrozen BatchNorm in training) they compute exactly what the originals did.
"""
from typing import Tuple

import torch
from torch import nn


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """
    Takes a BatchNorm2d's slot. When :attr:`folded`, the preceding
    :class:`FoldedConv2d` has already normalised, and only the trailing ops of timm's
    ``BatchNormAct2d`` (``drop``, ``act``) run here.
    """

    @classmethod
    def replace(cls, bn: nn.BatchNorm2d) -> "FoldedBatchNorm2d":
        # Built on the meta device (no allocation, no RNG draw), then given bn's tensors.
        new = cls(
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta"
        )
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(bn, name))
        # timm's BatchNormAct2d: dropout and activation after the normalisation.
        new.drop = getattr(bn, "drop", nn.Identity())
        new.act = getattr(bn, "act", nn.Identity())
        new.train(bn.training)
        new.fold = True
        return new

    @property
    def folded(self) -> bool:
        """True when folding is on and this layer normalises with its running statistics."""
        return self.fold and not self.training and self.running_mean is not None

    def fold_params(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) with ``bn(x) == x * scale + shift`` per channel."""
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.folded:
            x = super().forward(x)
        return self.act(self.drop(x))


class FoldedConv2d(nn.Conv2d):
    """Takes a Conv2d's slot; applies the following :class:`FoldedBatchNorm2d` when folded."""

    @classmethod
    def replace(cls, conv: nn.Conv2d, bn: FoldedBatchNorm2d) -> "FoldedConv2d":
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        new.weight = conv.weight
        if conv.bias is not None:
            new.bias = conv.bias
        # A tuple, so the BatchNorm stays registered only in its own slot (one state_dict
        # entry) while module.to(), deepcopy and DDP still reach the same object.
        new._bn = (bn,)
        new.train(conv.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self._bn[0]
        if not bn.folded:
            return super().forward(x)
        scale, shift = bn.fold_params()
        weight = self.weight * scale.reshape(-1, 1, 1, 1)
        bias = shift if self.bias is None else self.bias * scale + shift
        return self._conv_forward(x, weight, bias)


def fold_conv_bn(module: nn.Module) -> int:
    """
    In place: every ``nn.Conv2d`` directly followed, in its parent's registration order,
    by a ``BatchNorm2d`` becomes a folded pair. That order is the data flow in timm's
    EfficientNet/MobileNet blocks (conv_dw -> bn1, conv_pw -> bn2, ...), the only family
    this is applied to. Returns the number of folded pairs.
    """
    pairs = []
    for parent in module.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            # Exact Conv2d only: subclasses (timm's Conv2dSame, ...) have their own forward.
            if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d):
                if conv.out_channels == bn.num_features:
                    pairs.append((parent, conv_name, conv, bn_name, bn))
    for parent, conv_name, conv, bn_name, bn in pairs:
        folded_bn = FoldedBatchNorm2d.replace(bn)
        setattr(parent, bn_name, folded_bn)
        setattr(parent, conv_name, FoldedConv2d.replace(conv, folded_bn))
    return len(pairs)


def set_conv_bn_folding(module: nn.Module, enabled: bool) -> nn.Module:
    """Switch folding on/off in every folded pair under ``module`` (e.g. to time both)."""
    for m in module.modules():
        if isinstance(m, FoldedBatchNorm2d):
            m.fold = enabled
    return module


__all__ = ["FoldedBatchNorm2d", "FoldedConv2d", "fold_conv_bn", "set_conv_bn_folding"]
