"""
Object ranks: "the second square from the left" decided among objects, not per pixel.

The count blocks (:mod:`.directional_counts`) give every pixel token sums over its
half-planes, and the mask is a per-pixel product: "second from the left" has to become
"exactly one counted square on my left" inside each token, and the probes of
docs/benchmarks/EXPERIMENTS.md find the misses one step along the order (the neighbour of
the target), with exact counts, with the named group counted and with the token beside
the counts alike. An ordinal is a property of one object among the others of its group.

This block works on objects. The candidates are the peaks of the last count block's
centre map (at most ``max_candidates``, read as detected: their losses train them, this
block does not). Each gets

- a membership in the named group, from its token and the pooled expression;
- its counts of members strictly left, right, above and below (compared by centre
  coordinates, so an object's own cells never split its count), as soft one-hot bins
  0..``max_rank`` (a linear read can then pick "exactly one on the left");
- a score: membership times the bins weighted by a vector the pooled expression
  predicts ("second from the left": bin 1 of "left"), plus a bias term for expressions
  that name the group alone.

Every cell then takes the score of the candidate its centre offset points at, and the
decoder adds that to the last layer's mask logits. The weight vector starts at zero, so
the untrained block changes nothing.
"""
import torch
from torch import nn

from .attention import mlp
from .directional_counts import HALF_PLANES, keep_peaks, offset_points

# Candidates ranked per image (the synthetic scenes hold up to 6 objects).
MAX_CANDIDATES = 10
# Count bins 0..MAX_RANK; larger counts fall in the last bin.
MAX_RANK = 5
# Width (in cells) of a cell's soft assignment to the candidate its offset points at.
ASSIGN_SIGMA = 0.5
# Candidates that are no peak (fewer peaks than MAX_CANDIDATES) get log(this) in the assignment.
EMPTY_PRIOR = 1e-6


def rank_counts(xs: torch.Tensor, ys: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """
    (B, K) centre columns, rows and weights -> (B, K, 4): per candidate, the weight of the
    candidates strictly left of its column, right of it, above its row and below it.
    """
    dx = xs[:, None, :] - xs[:, :, None]  # [b, i, j] = x_j - x_i
    dy = ys[:, None, :] - ys[:, :, None]
    sides = torch.stack([dx < 0, dx > 0, dy < 0, dy > 0], dim=-1).to(weight.dtype)  # (B, K, K, 4)
    return torch.einsum("bijs,bj->bis", sides, weight)


def count_bins(counts: torch.Tensor, max_rank: int) -> torch.Tensor:
    """(...) counts -> (..., max_rank + 1) triangular soft one-hot bins (integers are one-hot)."""
    levels = torch.arange(max_rank + 1, dtype=counts.dtype, device=counts.device)
    return (1 - (counts.clamp(max=max_rank)[..., None] - levels).abs()).clamp(min=0)


class ObjectRanks(nn.Module):
    """Per-cell object scores from the last decoder layer; see the module docstring."""

    def __init__(self, dim: int, max_candidates: int = MAX_CANDIDATES, max_rank: int = MAX_RANK):
        super().__init__()
        self.max_candidates = max_candidates
        self.max_rank = max_rank
        self.norm = nn.LayerNorm(dim)
        self.member = mlp(2 * dim, dim, 1)
        # Weights over (4 directions x bins) and a bias term, from the pooled expression.
        self.select = mlp(dim, dim, HALF_PLANES * (max_rank + 1) + 1)
        nn.init.zeros_(self.select[-1].weight)
        nn.init.zeros_(self.select[-1].bias)

    def forward(self, x, size, centre_logits, offsets, expression):
        """
        Args:
            x: (B, h*w, C) tokens of the ``size`` = (h, w) grid.
            centre_logits: (B, h, w) object-centre logits on that grid; offsets: (B, h, w, 2)
                each cell's (x, y) offset to its object's centre, in cells.
            expression: (B, C) the pooled K/V tokens.
        Returns:
            (B, h, w) score of the object each cell belongs to (0 where no candidate).
        """
        h, w = size
        with torch.no_grad():  # detections are read here; the centre and offset losses train them
            peaks = keep_peaks(torch.sigmoid(centre_logits)).flatten(1)
            found, idx = peaks.topk(min(self.max_candidates, h * w), dim=1)
            xs, ys = (idx % w).to(x.dtype), torch.div(idx, w, rounding_mode="floor").to(x.dtype)
            points = offset_points(offsets).flatten(1, 2)  # (B, h*w, 2)
            d2 = (points[:, :, None, 0] - xs[:, None]) ** 2 + (points[:, :, None, 1] - ys[:, None]) ** 2
            assign = torch.softmax(-d2 / (2 * ASSIGN_SIGMA**2) + torch.log(found + EMPTY_PRIOR)[:, None], dim=-1)
        tokens = self.norm(x).gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        expr = expression[:, None].expand_as(tokens)
        member = torch.sigmoid(self.member(torch.cat([tokens, expr], dim=-1)).squeeze(-1)) * found
        bins = count_bins(rank_counts(xs, ys, member), self.max_rank).flatten(2)
        features = torch.cat([bins, torch.ones_like(member)[..., None]], dim=-1)
        score = member * (features * self.select(expression)[:, None]).sum(dim=-1)  # (B, K)
        return torch.einsum("bpk,bk->bp", assign, score).unflatten(1, (h, w))
