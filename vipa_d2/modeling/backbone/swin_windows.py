"""Swin's shifted windows as its segmentation code (and LAVT's) computes them: the map padded
to whole windows first, then shifted.

timm (1.0.31) shifts first and pads after, while its shift mask takes the shifted-in strip to
end the padded map. Unless the padding is 0 or window - shift, tokens of opposite image edges
then share a window unmasked: Swin-B's last stage at 480 (15 tokens, padded to 24, shift 6),
every stage of Swin-T at 480 (120, 60, 30, 15 tokens; window 7, shift 3).
"""
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse


class PadThenShiftSwinBlock(SwinTransformerBlock):
    """timm's Swin block whose window attention pads before the cyclic shift."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, channels = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, (ww - width % ww) % ww, 0, (wh - height % wh) % wh))
        shift = tuple(self.shift_size)
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        padded_h, padded_w = x.shape[1:3]
        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        # The mask over the padded map: the shifted-in strips are its last rows / columns.
        windows = self.attn(windows, mask=self.get_attn_mask(x))
        x = window_reverse(windows.view(-1, wh, ww, channels), self.window_size, padded_h, padded_w)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :height, :width, :].contiguous()


def pad_before_shift(model: torch.nn.Module) -> None:
    """Turn every timm Swin (v1) block of ``model`` into a :class:`PadThenShiftSwinBlock`
    (same parameters and buffers)."""
    for block in model.modules():
        if type(block) is SwinTransformerBlock:
            block.__class__ = PadThenShiftSwinBlock
