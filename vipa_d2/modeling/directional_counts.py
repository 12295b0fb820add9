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

Left to themselves the maps stay diffuse: they do not count objects
(docs/benchmarks/EXPERIMENTS.md). With ``centres`` each map is an object-centre map,
trained on the objects' box centres (:func:`vipa_d2.modeling.losses.centre_heatmaps`),
times a learned gate per map: every object gets the same mass wherever the gate is open,
so the sums count the gated objects. Which objects a gate opens on is learnt from the mask
loss alone, unless the first map's gate (``GROUP_MAP``) is told:
MODEL.VIPA.LOSS.GROUP_WEIGHT trains it to open on the objects the expression's category /
colour words name, so that map counts the candidates of "the second square from the left"
(:func:`vipa_d2.modeling.losses.group_loss`).

Counts at a pixel belong to the pixel's column and row, not to its object: the right half
of the second square sees two squares on its left (itself included), as does the left
half of the third. With ``object_centres`` each cell also predicts the offset to its
object's centre (trained on box centres, :func:`vipa_d2.modeling.losses.offset_loss`) and
reads the sums there too, so every pixel of an object gets that object's counts.

A centre map is a Gaussian per object: its mass varies with the object's place on the grid
and with how well the map is predicted, so a sum of 9 cells may be one object or two.
With ``peaks`` only each map's local maxima above :data:`PEAK_THRESHOLD` count, each with
its value (close to 1 once the centre loss has trained): the sums become object counts.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .attention import mlp

# Four half-planes per map, each summed two ways (log-cells and fraction of the total).
HALF_PLANES = 4
SUM_KINDS = 2
# The map whose gate MODEL.VIPA.LOSS.GROUP_WEIGHT supervises with the named group.
GROUP_MAP = 0
# With ``peaks``: a cell is an object's peak when no cell of its 3x3 neighbourhood is higher
# and its centre probability is above this (background local maxima are near 0).
PEAK_THRESHOLD = 0.5
PEAK_WINDOW = 3


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


def offset_points(offsets: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 2) offsets (x, y) in cells -> (B, H, W, 2): the (x, y) each cell's offset points at."""
    h, w = offsets.shape[1:3]
    ys = torch.arange(h, dtype=offsets.dtype, device=offsets.device)
    xs = torch.arange(w, dtype=offsets.dtype, device=offsets.device)
    return torch.stack([xs[None, None, :] + offsets[..., 0], ys[None, :, None] + offsets[..., 1]], dim=-1)


def sample_at_offsets(grid: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """
    (B, H, W, F) values on a grid, (B, H, W, 2) offsets (x, y) in cells -> (B, H, W, F):
    per cell, the values bilinearly read at the cell moved by its offset (clamped to the
    grid's border cells).
    """
    h, w = grid.shape[1:3]
    points = offset_points(offsets)
    # grid_sample's coordinates with align_corners=False: -1 and 1 are the grid's outer edges.
    where = torch.stack([(2 * points[..., 0] + 1) / w - 1, (2 * points[..., 1] + 1) / h - 1], dim=-1)
    out = F.grid_sample(grid.permute(0, 3, 1, 2), where, mode="bilinear", padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1)


def keep_peaks(centre: torch.Tensor) -> torch.Tensor:
    """
    (B, H, W) centre probabilities -> the same with every cell zeroed that is not a local
    maximum of its ``PEAK_WINDOW`` neighbourhood or not above ``PEAK_THRESHOLD``. The kept
    values carry the gradient; which cells are kept does not.
    """
    pooled = F.max_pool2d(centre[:, None], PEAK_WINDOW, stride=1, padding=PEAK_WINDOW // 2)[:, 0]
    keep = (centre >= pooled) & (centre > PEAK_THRESHOLD)
    return centre * keep.to(centre.dtype)


class DirectionalCounts(nn.Module):
    """Residual block on (B, h*w, C) tokens of an (h, w) grid; see the module docstring."""

    def __init__(
        self,
        dim: int,
        num_maps: int,
        hidden_dim: int,
        centres: bool = False,
        object_centres: bool = False,
        peaks: bool = False,
        group_gate_only: bool = False,
    ):
        super().__init__()
        if (object_centres or peaks) and not centres:
            raise ValueError("DirectionalCounts: object_centres and peaks work on the centre maps; they need centres")
        self.peaks = peaks
        self.group_gate_only = group_gate_only
        self.norm = nn.LayerNorm(dim)
        self.maps = nn.Linear(dim, num_maps)
        self.centre = nn.Linear(dim, 1) if centres else None
        self.offset = None
        if object_centres:
            self.offset = nn.Linear(dim, 2)
            # Starts at zero: every cell first reads its own sums.
            nn.init.zeros_(self.offset.weight)
            nn.init.zeros_(self.offset.bias)
        reads = 2 if object_centres else 1
        self.mlp = mlp(HALF_PLANES * SUM_KINDS * num_maps * reads, hidden_dim, dim)
        # Starts at zero: at initialisation the decoder computes what it did without the block.
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor, size):
        """
        (B, h*w, C) tokens of an ``size`` = (h, w) grid -> (the tokens with the counts added,
        a dict of what the criterion trains on, in (B, h, w, ...) grids: with ``centres``
        "centre_logits" (object centres) and "group_logits" (the gate of ``GROUP_MAP``; with
        ``group_gate_only`` computed from detached tokens, so a loss on it trains the gate's
        weights and nothing before them),
        with ``object_centres`` also "centre_offsets" ((x, y) in cells); empty without).
        """
        size = tuple(size)
        normed = self.norm(x)
        gate_logits = self.maps(normed).unflatten(1, size)
        maps = torch.sigmoid(gate_logits)
        aux = {}
        if self.centre is not None:
            centre_logits = self.centre(normed).squeeze(-1).unflatten(1, size)
            centre = torch.sigmoid(centre_logits)
            if self.peaks:
                centre = keep_peaks(centre)
            maps = maps * centre[..., None]
            aux["centre_logits"] = centre_logits
            if self.group_gate_only:  # same values; the group loss reaches the gate's weights only
                row = slice(GROUP_MAP, GROUP_MAP + 1)
                group = F.linear(normed.detach(), self.maps.weight[row], self.maps.bias[row])
                aux["group_logits"] = group.squeeze(-1).unflatten(1, size)
            else:
                aux["group_logits"] = gate_logits[..., GROUP_MAP]
        sums = half_plane_sums(maps)
        # At least one cell, so an empty map gives fractions of zero, not NaN.
        total = maps.sum(dim=(1, 2)).clamp(min=1.0)[:, None, None, None, :]
        features = torch.cat([torch.log1p(sums), sums / total], dim=3).flatten(3)
        if self.offset is not None:
            offsets = self.offset(normed).unflatten(1, size)
            aux["centre_offsets"] = offsets
            features = torch.cat([features, sample_at_offsets(features, offsets)], dim=-1)
        return x + self.mlp(features.flatten(1, 2)), aux
