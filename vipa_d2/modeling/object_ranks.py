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

:class:`ObjectChoice` makes the same pick with its own object-level target: a
cross-entropy over the candidates against the referred object, membership trained on the
named group.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention, mlp
from .directional_counts import HALF_PLANES, keep_peaks, offset_points

# Candidates ranked per image (the synthetic scenes hold up to 6 objects).
MAX_CANDIDATES = 10
# Count bins 0..MAX_RANK; larger counts fall in the last bin.
MAX_RANK = 5
# Width (in cells) of a cell's soft assignment to the candidate its offset points at.
ASSIGN_SIGMA = 0.5
# Candidates that are no peak (fewer peaks than MAX_CANDIDATES) get log(this) in the assignment.
EMPTY_PRIOR = 1e-6
# Size "sides" of ObjectChoice's size ranks: members larger than a candidate, members smaller.
SIZE_SIDES = 2
# Where ObjectChoice's size ranks read the candidates' areas (MODEL.VIPA.DECODER.CHOICE_AREAS).
CHOICE_AREAS = ("group_gate", "regressed")
# The regressed area a candidate starts at, as a fraction of the padded input: an object
# of a few percent, so the area loss does not begin ~4 log units off (an L1 gradient that
# would push the decoder's tokens for hundreds of steps).
INITIAL_AREA_FRACTION = 1 / 64
# Factorised rank weights: the largest rank logit they can give (scale of side x bin
# probabilities; learned from here), enough to outweigh membership logits of members.
FACTORISED_SCALE = 10.0


def _weigh_sides(sides: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, K, K, S) bools [b, i, j, s] "j lies on side s of i" and (B, K) weights -> (B, K, S) sums."""
    return torch.einsum("bijs,bj->bis", sides.to(weight.dtype), weight)


def rank_counts(xs: torch.Tensor, ys: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """
    (B, K) centre columns, rows and weights -> (B, K, 4): per candidate, the weight of the
    candidates strictly left of its column, right of it, above its row and below it.
    """
    dx = xs[:, None, :] - xs[:, :, None]  # [b, i, j] = x_j - x_i
    dy = ys[:, None, :] - ys[:, :, None]
    return _weigh_sides(torch.stack([dx < 0, dx > 0, dy < 0, dy > 0], dim=-1), weight)


def size_counts(areas: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """
    (B, K) areas and weights -> (B, K, 2): per candidate, the weight of the candidates with
    a larger area and of those with a smaller one ("the biggest": none larger).
    """
    da = areas[:, None, :] - areas[:, :, None]  # [b, i, j] = area_j - area_i
    return _weigh_sides(torch.stack([da > 0, da < 0], dim=-1), weight)


def count_bins(counts: torch.Tensor, max_rank: int) -> torch.Tensor:
    """(...) counts -> (..., max_rank + 1) triangular soft one-hot bins (integers are one-hot)."""
    levels = torch.arange(max_rank + 1, dtype=counts.dtype, device=counts.device)
    return (1 - (counts.clamp(max=max_rank)[..., None] - levels).abs()).clamp(min=0)


def detect_candidates(centre_logits: torch.Tensor, offsets: torch.Tensor, max_candidates: int):
    """
    The candidates of a (B, h, w) centre-logit grid and each cell's soft assignment to them,
    all without gradient (the centre and offset losses train the detections).

    Returns:
        idx (B, K) flat cells of the (at most ``max_candidates``) highest peaks; found (B, K)
        their centre probabilities (0: fewer peaks than K, the slot is empty); xs, ys (B, K)
        their columns and rows; assign (B, h*w, K): per cell, a softmax over the candidates
        by squared distance to where its offset points (width ``ASSIGN_SIGMA``), empty slots
        held back by log(``EMPTY_PRIOR``).
    """
    h, w = centre_logits.shape[-2:]
    with torch.no_grad():
        peaks = keep_peaks(torch.sigmoid(centre_logits)).flatten(1)
        found, idx = peaks.topk(min(max_candidates, h * w), dim=1)
        dtype = centre_logits.dtype
        xs, ys = (idx % w).to(dtype), torch.div(idx, w, rounding_mode="floor").to(dtype)
        points = offset_points(offsets).flatten(1, 2)  # (B, h*w, 2)
        d2 = (points[:, :, None, 0] - xs[:, None]) ** 2 + (points[:, :, None, 1] - ys[:, None]) ** 2
        assign = torch.softmax(-d2 / (2 * ASSIGN_SIGMA**2) + torch.log(found + EMPTY_PRIOR)[:, None], dim=-1)
    return idx, found, xs, ys, assign


class _ObjectBlock(nn.Module):
    """What the object blocks share: their candidates, membership logits and rank bins."""

    def __init__(self, dim: int, max_candidates: int, max_rank: int, select_dim: int):
        super().__init__()
        self.max_candidates = max_candidates
        self.max_rank = max_rank
        self.norm = nn.LayerNorm(dim)
        self.member = mlp(2 * dim, dim, 1)
        # The rank weights (``select_dim`` outputs, read by each block) from the pooled
        # expression; zero at the start.
        self.select = mlp(dim, dim, select_dim)
        nn.init.zeros_(self.select[-1].weight)
        nn.init.zeros_(self.select[-1].bias)

    def candidates(self, x, centre_logits, offsets, expression):
        """:func:`detect_candidates` (less idx), the candidates' (B, K, C) normalised tokens
        and their (B, K) membership logits."""
        idx, found, xs, ys, assign = detect_candidates(centre_logits, offsets, self.max_candidates)
        tokens = self.norm(x).gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        expr = expression[:, None].expand_as(tokens)
        return found, xs, ys, assign, tokens, self.member(torch.cat([tokens, expr], dim=-1)).squeeze(-1)

    def rank_bins(self, xs, ys, member, areas=None):
        """
        (B, K, sides * (max_rank + 1)): each candidate's binned counts of members per side,
        with (B, K) ``areas`` also of the members larger and smaller than it.
        """
        counts = rank_counts(xs, ys, member)
        if areas is not None:
            counts = torch.cat([counts, size_counts(areas, member)], dim=-1)
        return count_bins(counts, self.max_rank).flatten(2)


class ObjectRanks(_ObjectBlock):
    """Per-cell object scores from the last decoder layer; see the module docstring."""

    def __init__(self, dim: int, max_candidates: int = MAX_CANDIDATES, max_rank: int = MAX_RANK):
        # Weights over (4 directions x bins) and a bias term.
        super().__init__(dim, max_candidates, max_rank, HALF_PLANES * (max_rank + 1) + 1)

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
        found, xs, ys, assign, _, member_logits = self.candidates(x, centre_logits, offsets, expression)
        member = torch.sigmoid(member_logits) * found
        bins = self.rank_bins(xs, ys, member)
        features = torch.cat([bins, torch.ones_like(member)[..., None]], dim=-1)
        score = member * (features * self.select(expression)[:, None]).sum(dim=-1)  # (B, K)
        return torch.einsum("bpk,bk->bp", assign, score).unflatten(1, tuple(size))


class ObjectChoice(_ObjectBlock):
    """
    The referred object chosen among the last decoder layer's detected objects, with its
    own object-level target (``ObjectRanks`` learnt its pick through the mask loss alone
    and hurt). Per candidate (:func:`detect_candidates`):

    - a group-membership logit from its token and the pooled expression (the criterion
      trains it on the named group, ``object_in_group``);
    - its counts of members left / right / above / below as bins, as in ``ObjectRanks``,
      and with ``size_ranks`` its counts of larger and of smaller members. ``areas`` says
      where the areas come from: "group_gate", the group gate summed over the cells
      assigned to the candidate, or "regressed", an MLP of its token predicting its log
      area (the criterion trains it on the annotated areas; the ranks read it detached,
      like the candidates);
    - a choice logit: log sigmoid(membership) (the referred object is a member) plus the
      bins weighted by rank weights (uniform over the bins at the start, so the untrained
      block chooses among members uniformly). Empty slots get log(EMPTY_PRIOR). The
      weights come from the pooled expression, or with ``from_words`` from the words,
      pooled by attention from a learned query. With ``factorised`` they are a learned
      scale times P(side) x P(bin), two softmaxes, instead of one free weight per (side,
      bin): "left" learnt from "the leftmost X" (bin 0) then serves "the second X from the
      left" (bin 1), which the free weights have to learn again from the rarer ordinals
      (docs/benchmarks/EXPERIMENTS.md, session 16). With ``factor_queries`` the words are
      pooled twice, by one learned query per factor, P(side) read from the first pool and
      P(bin) from the second: with one pool, "third" could take all the attention and leave
      the side out (EXPERIMENTS.md, session 20). With ``factor_pools`` each query also has
      an attention of its own: with one shared attention the keys are shaped by what the
      bin query needs (the number words loud), and a side query that drifts onto "third"
      leaves P(side) uniform there, where P(bin) gets no signal (EXPERIMENTS.md, session 36).

    The criterion trains the choice as a cross-entropy over the candidates against the ones
    whose centre lies on the target mask. Every cell then takes the log-probability of the
    candidate its offset points at, times a learned gain (starting at 1: added to a logit, a
    log-probability keeps the chosen object's cells as they are and lowers the others'),
    and the decoder adds that to the final mask logits. With ``hard_at_test`` inference
    uses the most probable candidate alone (log(EMPTY_PRIOR) for the others; opt-in).
    """

    def __init__(
        self,
        dim: int,
        nheads: int = 1,
        from_words: bool = False,
        size_ranks: bool = False,
        factorised: bool = False,
        dropout: float = 0.0,
        max_candidates: int = MAX_CANDIDATES,
        max_rank: int = MAX_RANK,
        hard_at_test: bool = False,
        areas: str = "group_gate",
        factor_queries: bool = False,
        factor_pools: bool = False,
    ):
        if areas not in CHOICE_AREAS:
            raise ValueError(f"MODEL.VIPA.DECODER.CHOICE_AREAS must be one of {CHOICE_AREAS}, got {areas!r}")
        if factor_queries and not (from_words and factorised):
            raise ValueError(
                "MODEL.VIPA.DECODER.CHOICE_FACTOR_QUERIES pools the words once per factor of the factorised rank "
                "weights; it needs CHOICE_FROM_WORDS and CHOICE_FACTORISED True"
            )
        if factor_pools and not factor_queries:
            raise ValueError(
                "MODEL.VIPA.DECODER.CHOICE_FACTOR_POOLS gives each factor's query an attention of its own; it needs "
                "CHOICE_FACTOR_QUERIES True"
            )
        sides = HALF_PLANES + (SIZE_SIDES if size_ranks else 0)
        super().__init__(dim, max_candidates, max_rank, sides + max_rank + 1 if factorised else sides * (max_rank + 1))
        self.sides = sides
        self.size_ranks = size_ranks
        # Built only where the ranks read it, so every parameter gets a gradient (DDP).
        self.area = None
        if size_ranks and areas == "regressed":
            self.area = mlp(dim, dim, 1)
            nn.init.constant_(self.area[-1].bias, math.log(INITIAL_AREA_FRACTION))
        self.factor_scale = nn.Parameter(torch.tensor(FACTORISED_SCALE)) if factorised else None
        self.gain = nn.Parameter(torch.ones(()))
        self.hard_at_test = hard_at_test
        self.word_pool = self.word_query_embed = self.bin_pool = None
        if from_words:
            # "embed" in the name: no weight decay (vipa_d2.engine.optimizer.embedding_parameters).
            # With factor_queries one query per factor: the side's pool and the bin's.
            queries = 2 if factor_queries else 1
            self.word_query_embed = nn.Parameter(torch.randn(1, queries, dim) * dim**-0.5)
            # The decoder's attention dropout (DECODER.DROPOUT) applies to this attention too.
            self.word_pool = MultiHeadAttention(dim, nheads, dropout)
            if factor_pools:  # the bin's own attention; word_pool then serves the side alone
                self.bin_pool = MultiHeadAttention(dim, nheads, dropout)

    @property
    def reads_words(self) -> bool:
        return self.word_pool is not None

    def select_vector(self, expression, words, words_valid):
        """(B, sides * bins) rank weights from the pooled expression or the pooled words."""
        if self.word_pool is not None:
            if words is None:
                raise ValueError("ObjectChoice with from_words needs the words (B, T, C) and their (B, T) validity")
            query = self.word_query_embed.expand(words.shape[0], -1, -1)
            allowed = words_valid[:, None, :]
            if self.bin_pool is None:
                pooled = self.word_pool(query, words, words, allowed=allowed)[0]  # (B, queries, C)
            else:
                by_side = self.word_pool(query[:, :1], words, words, allowed=allowed)[0]
                pooled = torch.cat([by_side, self.bin_pool(query[:, 1:], words, words, allowed=allowed)[0]], dim=1)
            if pooled.shape[1] == 2:  # factor queries: each factor read from its own pool
                side = self.select(pooled[:, 0])[:, : self.sides]
                rank = self.select(pooled[:, 1])[:, self.sides :]
                return self._factorised(side, rank)
            expression = pooled.squeeze(1)
        raw = self.select(expression)
        if self.factor_scale is None:
            return raw
        return self._factorised(*raw.split([self.sides, self.max_rank + 1], dim=-1))

    def _factorised(self, side, rank):
        """(B, sides) and (B, bins) scores -> (B, sides * bins) the learned scale x P(side) x P(bin)."""
        weights = side.softmax(dim=-1)[:, :, None] * rank.softmax(dim=-1)[:, None, :]
        return self.factor_scale * weights.flatten(1)

    def forward(self, x, size, centre_logits, offsets, expression, group_logits=None, words=None, words_valid=None):
        """
        Args: as :meth:`ObjectRanks.forward`, and
            group_logits: (B, h, w) the group gate's logits (needed with ``size_ranks``).
            words: (B, T, C) projected word features, words_valid: (B, T) bool (needed with
                ``from_words``).
        Returns:
            (B, h, w) the gain times the log-probability that the object each cell belongs
            to is the referred one, and a dict for the criterion: "choice_logits" (B, K)
            log-probabilities over the candidates, "member_logits" (B, K), "choice_points"
            (B, K, 2) the candidates' centres as (x, y) fractions of the grid (of the padded
            input) and "choice_found" (B, K) bool, the slots that hold a candidate; with
            regressed areas also "choice_log_areas" (B, K), each candidate's predicted log
            area as a fraction of the padded input.
        """
        h, w = size
        found, xs, ys, assign, tokens, member_logits = self.candidates(x, centre_logits, offsets, expression)
        held = found > 0
        member = torch.sigmoid(member_logits) * held
        areas, extra = None, {}
        if self.area is not None:
            extra["choice_log_areas"] = self.area(tokens).squeeze(-1)
            areas = extra["choice_log_areas"].detach()  # the area loss trains it, not the choice
        elif self.size_ranks:
            if group_logits is None:
                raise ValueError("ObjectChoice with size_ranks needs the group gate's logits (B, h, w)")
            with torch.no_grad():  # like the candidates: read as detected
                areas = torch.einsum("bpk,bp->bk", assign, torch.sigmoid(group_logits).flatten(1))
        bins = self.rank_bins(xs, ys, member, areas)
        rank = (bins * self.select_vector(expression, words, words_valid)[:, None]).sum(dim=-1)
        logits = F.logsigmoid(member_logits) + rank + torch.log(held.to(rank.dtype) + EMPTY_PRIOR)
        log_prob = torch.log_softmax(logits, dim=-1)
        mark = log_prob
        if self.hard_at_test and not self.training:
            # A learned gain near 1 lowers a runner-up at p = 0.3 by only ~1.3 logits, so an
            # unsure choice leaves both objects in the mask: keep the most probable one only.
            picked = F.one_hot(log_prob.argmax(dim=-1), log_prob.shape[-1]).to(log_prob.dtype)
            mark = torch.log(picked + EMPTY_PRIOR)
        cells = self.gain * torch.einsum("bpk,bk->bp", assign, mark).unflatten(1, (h, w))
        points = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], dim=-1)
        return cells, {
            "choice_logits": log_prob,
            "member_logits": member_logits,
            "choice_points": points,
            "choice_found": held,
            **extra,
        }
