"""
Directional counts: how much of something lies left of, right of, above and below a pixel.

Positions ("the leftmost circle"), ordinals ("the second circle from the top") and
relations ("the shape left of the red star") compare objects along an axis. Attention
averages (softmax), so a pixel query cannot count how many circles lie above it. This
block hands it the sums: from the decoder's pixel tokens (which have attended to the
expression, so the maps can depend on it) it predicts G maps in [0, 1], sums each over
the four open half-planes of every pixel (all cells strictly left of its column, right
of it, above its row, below it) and adds an MLP of the sums back to the tokens.

A map that gives each object of the named group the same mass turns its half-plane sums
into object counts, so the sums are given twice: as log(1 + cells), absolute (counts),
and as a fraction of the map's total, relative (independent of the group's size).

Left to themselves the maps stay diffuse (they do not count objects, BENCHMARKS.md). With
``centres`` each map is an object-centre map, trained on the objects' box centres
(:func:`vipa_d2.modeling.losses.centre_heatmaps`), times a learned gate per map: every
object gets the same mass wherever the gate is open, so the sums count the gated objects.
Which objects a gate opens on is learnt from the mask loss alone, unless the first map's
gate (``GROUP_MAP``) is told: MODEL.VIPA.LOSS.GROUP_WEIGHT trains it to open on the objects
the expression's category / colour words name, so that map counts the candidates of "the
second square from the left" (:func:`vipa_d2.modeling.losses.group_loss`).
"""
import torch
from torch import nn

from .attention import mlp

# Four half-planes per map, each summed two ways (log-cells and fraction of the total).
HALF_PLANES = 4
SUM_KINDS = 2
# The map whose gate MODEL.VIPA.LOSS.GROUP_WEIGHT supervises with the named group.
GROUP_MAP = 0


def half_plane_sums(maps: torch.Tensor) -> torch.Tensor:
    """
    (B, H, W, G) maps -> (B, H, W, 4, G): per cell, the sum of each map over the cells
    strictly left of its column, strictly right of it, strictly above its row and
    strictly below it (in that order).
    """
    h, w = maps.shape[1:3]
    cols = maps.sum(dim=1)  # (B, W, G)
    rows = maps.sum(dim=2)  # (B, H, G)
    col_cum, row_cum = cols.cumsum(dim=1), rows.cumsum(dim=1)
    # Differences of cumulative sums can dip below zero by rounding; counts cannot.
    left = col_cum - cols
    right = (col_cum[:, -1:] - col_cum).clamp(min=0.0)
    above = row_cum - rows
    below = (row_cum[:, -1:] - row_cum).clamp(min=0.0)
    b, g = maps.shape[0], maps.shape[-1]
    return torch.stack(
        [
            left[:, None].expand(b, h, w, g),
            right[:, None].expand(b, h, w, g),
            above[:, :, None].expand(b, h, w, g),
            below[:, :, None].expand(b, h, w, g),
        ],
        dim=3,
    )


class DirectionalCounts(nn.Module):
    """Residual block on (B, h*w, C) tokens of an (h, w) grid; see the module docstring."""

    def __init__(self, dim: int, num_maps: int, hidden_dim: int, centres: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.maps = nn.Linear(dim, num_maps)
        self.centre = nn.Linear(dim, 1) if centres else None
        self.mlp = mlp(HALF_PLANES * SUM_KINDS * num_maps, hidden_dim, dim)
        # Starts at zero: at initialisation the decoder computes what it did without the block.
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor, size):
        """
        (B, h*w, C) tokens of an ``size`` = (h, w) grid -> (the tokens with the counts added,
        the (B, h, w) object-centre logits and the (B, h, w) gate logits of ``GROUP_MAP``;
        both None without ``centres``).
        """
        normed = self.norm(x)
        gate_logits = self.maps(normed)
        maps = torch.sigmoid(gate_logits)
        centre_logits = group_logits = None
        if self.centre is not None:
            centre_logits = self.centre(normed)
            maps = maps * torch.sigmoid(centre_logits)
            centre_logits = centre_logits.squeeze(-1).unflatten(1, tuple(size))
            group_logits = gate_logits[..., GROUP_MAP].unflatten(1, tuple(size))
        maps = maps.unflatten(1, tuple(size))
        sums = half_plane_sums(maps)
        # At least one cell, so an empty map gives fractions of zero, not NaN.
        total = maps.sum(dim=(1, 2)).clamp(min=1.0)[:, None, None, None, :]
        features = torch.cat([torch.log1p(sums), sums / total], dim=3)
        return x + self.mlp(features.flatten(3).flatten(1, 2)), centre_logits, group_logits
