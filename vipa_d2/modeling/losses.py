"""
VIPA training losses.

Mask losses (BCE + Dice) are computed at the MASK-FEATURE resolution (stride of the finest
pixel decoder input, or of ``PIXEL_DECODER.MASK_REFINE_FEATURE`` when set): the padded ground truth is area-downsampled to that grid (soft
targets in [0, 1]) and batch-padding pixels are excluded via an area-downsampled validity
map. The pixel contrastive loss supervises the VEG's cue-to-token relevance on the VEG
grid, with the ground truth area-downsampled the same way.

Means over a batch's items (pixels, objects, cells, cues, candidates) are over every rank's
items (:func:`mean_over_ranks`), so training on N GPUs weighs them as one GPU does.
"""
import functools
import logging
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.utils import comm

from .sampler import differentiable_topk, num_retrieved
from .veg import global_cue_mask, word_cue_mask

logger = logging.getLogger(__name__)

# Cues whose relevance the pixel contrastive loss supervises (MODEL.VIPA.LOSS.CONTRASTIVE_CUES).
CONTRASTIVE_CUES = ("global", "all")


def area_downsample(masks: torch.Tensor, size) -> torch.Tensor:
    """(B, H, W) float masks -> (B, h, w) fraction of each cell covered."""
    return F.adaptive_avg_pool2d(masks[:, None].float(), size)[:, 0]


def token_validity(image_valid: torch.Tensor, grid) -> torch.Tensor:
    """(B, H, W) image validity -> (B, h*w) bool: the tokens of a ``grid`` = (h, w) map
    that lie mostly inside the image (the others cover batch padding), and at least the
    one an image covers most."""
    cover = area_downsample(image_valid, grid).flatten(1)
    # A strip thinner than half a token (a panorama after keep_ratio resizing) covers no
    # token mostly: with no candidate, retrieval's threshold was -inf - -inf, and NaN went
    # through E_V into every loss. Where a token is valid, the most covered one already is.
    most = cover.argmax(dim=1, keepdim=True)
    # A tensor source, not the scalar True: jit tracing (tools/model_cost.py) has no scalar form.
    return (cover >= 0.5).scatter(1, most, torch.ones_like(most, dtype=torch.bool))


def mean_over_ranks(total: torch.Tensor, count) -> torch.Tensor:
    """
    ``total``, this rank's loss summed over ``count`` items (int or tensor), as a mean that
    weighs every item of every rank alike once DDP averages the ranks' gradients: divided by
    max(1, the ranks' summed count) / world size. Each rank dividing by its own count would
    weigh an item on a rank with few of them more than one on a busy rank, so N GPUs would
    not train as one does. On one process: ``total / max(1, count)``. Every rank must call
    it for every loss it computes (it is a collective), early returns included.
    """
    world = comm.get_world_size()
    if world == 1:
        return total / (count.clamp(min=1) if torch.is_tensor(count) else max(1, count))
    count = torch.as_tensor(count, dtype=torch.float32, device=total.device).detach().clone()
    torch.distributed.all_reduce(count)
    return total / (count.clamp(min=1.0) / world)


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean BCE over all (weighted) pixels of the batch (of every rank's)."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return mean_over_ranks((loss * weights).sum(), weights.sum())


# Spread of an object's centre on a grid, in cells: one cell keeps two objects a few cells
# apart distinct on the finest decoder grid, and gives every object the same mass.
CENTRE_SIGMA_CELLS = 1.0


def _centre_gaussians(boxes: torch.Tensor, grid, input_hw) -> torch.Tensor:
    """(K, 4) XYXY ``boxes`` in input pixels -> (K, h, w): per object, a Gaussian (peak 1,
    std ``CENTRE_SIGMA_CELLS``) at its box centre on an (h, w) ``grid`` covering the padded
    input of size ``input_hw``."""
    h, w = grid
    b = boxes.float()
    ys = torch.arange(h, dtype=torch.float32, device=b.device)
    xs = torch.arange(w, dtype=torch.float32, device=b.device)
    # Centres in cell units: cell j covers [j, j + 1) * stride, its centre is j + 0.5.
    cx = (b[:, 0] + b[:, 2]) / 2 * (w / input_hw[1]) - 0.5
    cy = (b[:, 1] + b[:, 3]) / 2 * (h / input_hw[0]) - 0.5
    d2 = (ys[None, :, None] - cy[:, None, None]) ** 2 + (xs[None, None, :] - cx[:, None, None]) ** 2
    return torch.exp(-d2 / (2 * CENTRE_SIGMA_CELLS**2))


def centre_heatmaps(boxes: List[torch.Tensor], grid, input_hw) -> torch.Tensor:
    """
    (B, h, w) targets of the object-centre maps on an (h, w) ``grid`` covering the padded
    input of size ``input_hw``: per cell, the largest of the image's object Gaussians
    (:func:`_centre_gaussians`). ``boxes``: per image, (K, 4) XYXY boxes in input pixels
    (K may be 0).
    """
    out = []
    for b in boxes:
        gauss = _centre_gaussians(b, grid, input_hw)
        out.append(gauss.amax(dim=0) if len(b) else gauss.new_zeros(tuple(grid)))
    return torch.stack(out)


def centre_loss(logits: torch.Tensor, boxes: List[torch.Tensor], input_hw) -> torch.Tensor:
    """BCE of (B, h, w) centre logits against :func:`centre_heatmaps`, summed, per object."""
    target = centre_heatmaps(boxes, logits.shape[-2:], input_hw).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    return mean_over_ranks(loss, sum(len(b) for b in boxes))


def group_loss(
    logits: torch.Tensor, boxes: List[torch.Tensor], in_group: List[torch.Tensor], input_hw
) -> torch.Tensor:
    """
    BCE of (B, h, w) gate logits against group membership, at the objects' centres: per
    object, the BCE of every cell against "in the group" (1) or not (0), weighted by the
    object's centre Gaussian normalised to sum 1, then the mean over the batch's objects.
    The gate only counts where the centre map is open, so only centres are supervised.
    ``in_group``: per image, (K,) bool for its (K, 4) XYXY ``boxes``.
    """
    total, count = logits.sum() * 0.0, 0
    for lg, b, member in zip(logits, boxes, in_group):
        if not len(b):
            continue
        weights = _centre_gaussians(b, lg.shape, input_hw).to(lg.dtype)
        weights = weights / weights.flatten(1).sum(-1).clamp(min=1e-12)[:, None, None]
        target = member.to(lg.dtype)[:, None, None].expand_as(weights)
        bce = F.binary_cross_entropy_with_logits(lg[None].expand_as(weights), target, reduction="none")
        total = total + (bce * weights).sum()
        count += len(b)
    return mean_over_ranks(total, count)


def offset_loss(offsets: torch.Tensor, boxes: List[torch.Tensor], input_hw) -> torch.Tensor:
    """
    L1 of (B, h, w, 2) offsets (x, y, in cells) against each cell's offset to the centre of
    the smallest of its image's object ``boxes`` (per image (K, 4) XYXY, input pixels) that
    holds the cell's centre, averaged over those cells; cells in no box are not trained.
    """
    h, w = offsets.shape[1:3]
    ys = torch.arange(h, dtype=torch.float32, device=offsets.device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=offsets.device) + 0.5
    total, cells = offsets.sum() * 0.0, 0
    for off, b in zip(offsets, boxes):
        if not len(b):
            continue
        # Boxes and their centres in cell units (cell j spans [j, j + 1), centre j + 0.5).
        scale = b.new_tensor([w / input_hw[1], h / input_hw[0]] * 2)
        cb = b.float() * scale
        inside = (
            (xs[None, None, :] >= cb[:, 0, None, None])
            & (xs[None, None, :] < cb[:, 2, None, None])
            & (ys[None, :, None] >= cb[:, 1, None, None])
            & (ys[None, :, None] < cb[:, 3, None, None])
        )  # (K, h, w)
        area = (cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1])
        owner = torch.where(inside, area[:, None, None], float("inf")).argmin(0)
        held = inside.any(0)
        if not bool(held.any()):
            continue
        centre = (cb[:, :2] + cb[:, 2:]) / 2  # (K, 2) x, y
        target = torch.stack([centre[owner, 0] - xs[None, :], centre[owner, 1] - ys[:, None]], dim=-1)
        total = total + (off[held] - target[held].to(off.dtype)).abs().sum()
        cells += int(held.sum())
    return mean_over_ranks(total, cells)


def choice_loss(log_prob: torch.Tensor, points: torch.Tensor, found: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """
    Cross-entropy of (B, K) log-probabilities over candidates against the candidates whose
    centre (``points``: (B, K, 2) (x, y) fractions of the padded input) lies on the (B, H, W)
    target mask ``gt``; ``found`` (B, K) bool marks the slots holding a candidate. Several
    such candidates share the target (-log of their summed probability); images with none
    (no target, or the detector missed it) are left out.
    """
    h, w = gt.shape[-2:]
    cols = (points[..., 0] * w).long().clamp(0, w - 1)
    rows = (points[..., 1] * h).long().clamp(0, h - 1)
    on = (gt[torch.arange(len(gt), device=gt.device)[:, None], rows, cols] > 0.5) & found
    has = on.any(dim=1)
    if not has.any():  # zero that keeps the graph (DDP) while contributing nothing
        return mean_over_ranks(log_prob.sum() * 0.0, 0)
    # Only images with a positive: a row of -inf alone would give NaN gradients.
    per_image = -torch.logsumexp(log_prob[has].masked_fill(~on[has], float("-inf")), dim=1)
    return mean_over_ranks(per_image.sum(), has.sum())


def _boxes_of_points(points: torch.Tensor, boxes: torch.Tensor):
    """
    (K, 2) (x, y) points and (N, 4) XYXY boxes, both in input pixels -> (K,) the box each
    point falls in (the one with the nearest centre where boxes overlap) and (K,) bool,
    whether it falls in any.
    """
    b = boxes.to(points.dtype)
    inside = (points[:, None, 0] >= b[None, :, 0]) & (points[:, None, 0] < b[None, :, 2])
    inside &= (points[:, None, 1] >= b[None, :, 1]) & (points[:, None, 1] < b[None, :, 3])
    d2 = ((points[:, None] - (b[None, :, :2] + b[None, :, 2:]) / 2) ** 2).sum(dim=-1)
    return d2.masked_fill(~inside, float("inf")).argmin(dim=1), inside.any(dim=1)


def _per_candidate_box_loss(values, points, found, boxes, targets, input_hw, loss_fn) -> torch.Tensor:
    """
    ``loss_fn(values, targets)`` summed over the candidates of each image whose centre
    (``points``: (B, K, 2) (x, y) fractions of the padded input of size ``input_hw``;
    ``found`` (B, K) bool marks real candidates) falls in one of its object ``boxes`` (per
    image (N, 4) XYXY in input pixels), each against ``targets`` (per image (N,)) of that
    box, averaged over them; candidates in no box are not trained.
    """
    total, count = values.sum() * 0.0, 0
    scale = points.new_tensor([input_hw[1], input_hw[0]])
    for v, pt, held, b, t in zip(values, points, found, boxes, targets):
        if len(b) == 0:
            continue
        box, inside = _boxes_of_points(pt * scale, b)
        trained = held & inside
        if trained.any():
            total = total + loss_fn(v[trained], t.to(v.dtype)[box][trained])
            count += int(trained.sum())
    return mean_over_ranks(total, count)


def member_loss(logits, points, found, boxes: List[torch.Tensor], in_group: List[torch.Tensor], input_hw):
    """
    BCE of (B, K) membership logits of candidates centred at ``points`` against
    ``in_group`` (per image, (N,) bool) of the object box each centre falls in
    (:func:`_per_candidate_box_loss`).
    """
    bce = functools.partial(F.binary_cross_entropy_with_logits, reduction="sum")
    return _per_candidate_box_loss(logits, points, found, boxes, in_group, input_hw, bce)


def area_loss(log_areas, points, found, boxes: List[torch.Tensor], areas: List[torch.Tensor], input_hw):
    """
    L1 of (B, K) predicted log areas (fractions of the padded input of size ``input_hw``)
    of candidates centred at ``points`` against the log of ``areas`` (per image, (N,) in
    input pixels) of the object box each centre falls in (:func:`_per_candidate_box_loss`).
    """
    # At least one pixel: an object the augmentation shrank to nothing has no log area.
    log_fraction = [torch.log(a.clamp(min=1.0) / (input_hw[0] * input_hw[1])) for a in areas]
    l1 = functools.partial(F.l1_loss, reduction="sum")
    return _per_candidate_box_loss(log_areas, points, found, boxes, log_fraction, input_hw, l1)


# The criterion's weights whose losses train on the objects' boxes (training inputs'
# ``object_boxes``), with their config keys.
BOX_LOSS_KEYS = {
    "centre_weight": "MODEL.VIPA.LOSS.CENTRE_WEIGHT",
    "group_weight": "MODEL.VIPA.LOSS.GROUP_WEIGHT",
    "offset_weight": "MODEL.VIPA.LOSS.OFFSET_WEIGHT",
    "choice_weight": "MODEL.VIPA.LOSS.CHOICE_WEIGHT",
    "area_weight": "MODEL.VIPA.LOSS.AREA_WEIGHT",
}
# Those that also train on the named group (training inputs' ``object_in_group``).
GROUP_LOSS_KEYS = {name: BOX_LOSS_KEYS[name] for name in ("group_weight", "choice_weight")}
# Those that also train on the objects' areas (training inputs' ``object_areas``).
AREA_LOSS_KEYS = {name: BOX_LOSS_KEYS[name] for name in ("area_weight",)}

# What each of those losses reads from the head's outputs (beyond the masks and the
# no-target logit every head returns).
CHOICE_OUTPUTS = ("choice_logits", "member_logits", "choice_points", "choice_found")
LOSS_OUTPUTS = {
    "centre_weight": ("centre_logits",),
    "group_weight": ("group_logits",),
    "offset_weight": ("centre_offsets",),
    "choice_weight": CHOICE_OUTPUTS,
    "area_weight": CHOICE_OUTPUTS + ("choice_log_areas",),
}


def _regresses_areas(dec) -> bool:
    """Whether a config's DECODER builds the object choice's area regression."""
    return dec.OBJECT_CHOICE and dec.CHOICE_SIZE_RANKS and dec.CHOICE_AREAS == "regressed"


# The DECODER switch that builds what each of them reads: without it the loss is off,
# whatever its weight (a decoder of one's own that returns those outputs sets it too).
# {weight: (whether a config's DECODER has the switch on, the switch as said to the user)}.
LOSS_SWITCHES = {
    "centre_weight": (lambda dec: dec.COUNT_CENTRES, "MODEL.VIPA.DECODER.COUNT_CENTRES True"),
    "offset_weight": (lambda dec: dec.COUNT_AT_OBJECT_CENTRES, "MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES True"),
    "choice_weight": (lambda dec: dec.OBJECT_CHOICE, "MODEL.VIPA.DECODER.OBJECT_CHOICE True"),
    "area_weight": (
        _regresses_areas,
        "MODEL.VIPA.DECODER.OBJECT_CHOICE and CHOICE_SIZE_RANKS True, CHOICE_AREAS 'regressed'",
    ),
}


def _own_outputs(name: str) -> List[str]:
    """The outputs of LOSS_OUTPUTS[name] that no other of those losses reads."""
    return [k for k in LOSS_OUTPUTS[name] if not any(k in keys for other, keys in LOSS_OUTPUTS.items() if other != name)]


def box_losses(weights: Dict, keys: Dict = BOX_LOSS_KEYS) -> List[str]:
    """"KEY > 0" for each loss of ``keys`` that ``weights`` (the criterion's arguments)
    turn on."""
    return [f"{key} > 0" for name, key in keys.items() if weights.get(name, 0.0) > 0]


def object_box_losses(cfg) -> List[str]:
    """:func:`box_losses` of the criterion a config builds."""
    return box_losses(VIPACriterion.from_config(cfg))


def object_group_losses(cfg) -> List[str]:
    """The losses of the criterion a config builds that train on ``object_in_group``."""
    return box_losses(VIPACriterion.from_config(cfg), GROUP_LOSS_KEYS)


def object_area_losses(cfg) -> List[str]:
    """The losses of the criterion a config builds that train on ``object_areas``."""
    return box_losses(VIPACriterion.from_config(cfg), AREA_LOSS_KEYS)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, smooth: float = 1.0):
    """Per-sample soft Dice loss (smoothed so an empty target asks for an empty prediction), batch mean."""
    probs = logits.sigmoid() * weights
    targets = targets * weights
    inter = (probs * targets).flatten(1).sum(-1)
    denom = probs.flatten(1).sum(-1) + targets.flatten(1).sum(-1)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def pixel_contrastive_loss(
    relevance: torch.Tensor,
    cue_valid: torch.Tensor,
    token_target: torch.Tensor,
    token_valid: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """
    Multi-positive InfoNCE over each valid cue's relevance row (B, T, N).

    Positives: tokens whose cell is >= half target (at least the most covered cell when the
    target is tiny); negatives: tokens with no target pixel at all (partially covered border
    cells are ignored). Every positive is contrasted with all negatives:
    -log(exp(r_p / t) / (exp(r_p / t) + sum_n exp(r_n / t))), averaged over positives, cues and
    samples. Samples with an empty target or without any negative are skipped.
    """
    frac = token_target * token_valid
    positive = frac >= 0.5
    best = frac.amax(dim=1, keepdim=True)
    positive |= (frac == best) & (best > 0) & ~positive.any(dim=1, keepdim=True)
    negative = (frac == 0) & token_valid
    usable = positive.any(dim=1) & negative.any(dim=1)  # (B,)
    if not bool(usable.any()):
        return mean_over_ranks(relevance.sum() * 0.0, 0)

    logits = relevance / temperature  # (B, T, N)
    neg_lse = logits.masked_fill(~negative[:, None, :], float("-inf")).logsumexp(dim=-1, keepdim=True)
    per_token = F.softplus(neg_lse - logits)  # -log(e^p / (e^p + sum_neg))
    pos = positive[:, None, :].to(logits.dtype)
    per_cue = (per_token * pos).sum(-1) / pos.sum(-1).clamp(min=1.0)  # (B, T)
    cue_w = (cue_valid & usable[:, None]).to(logits.dtype)
    return mean_over_ranks((per_cue * cue_w).sum(), cue_w.sum())


def cue_overlap_loss(
    relevance: torch.Tensor, cue_rows: torch.Tensor, token_valid: torch.Tensor, ratio: float, temperature: float
) -> torch.Tensor:
    """
    Mean pairwise soft Jaccard of the retrieved token sets of the ``cue_rows`` (B, T) cues.

    Each set is the step-1 sampler's soft top-k of a relevance row (B, T, N) (k = the VEG's
    N_p, no noise), so on hard rows the value is the Jaccard index the evaluator reports.
    Averaged over the pairs of a sample, then over samples with at least one pair.
    """
    soft, _ = differentiable_topk(
        relevance, num_retrieved(token_valid.sum(dim=1), ratio), mode="soft", temperature=temperature,
        valid=token_valid,
    )
    inter = torch.bmm(soft, soft.transpose(1, 2))  # (B, T, T)
    area = soft.sum(dim=-1)
    union = area[:, :, None] + area[:, None, :] - inter
    jaccard = inter / union.clamp(min=torch.finfo(union.dtype).tiny)
    t = relevance.shape[1]
    upper = torch.ones(t, t, dtype=torch.bool, device=relevance.device).triu(diagonal=1)
    pairs = (cue_rows[:, :, None] & cue_rows[:, None, :] & upper).to(jaccard.dtype)
    num_pairs = pairs.sum(dim=(1, 2))
    per_sample = (jaccard * pairs).sum(dim=(1, 2)) / num_pairs.clamp(min=1.0)
    has_pairs = (num_pairs > 0).to(jaccard.dtype)
    return mean_over_ranks((per_sample * has_pairs).sum(), has_pairs.sum())


class VIPACriterion(nn.Module):
    """Computes the named, weighted losses from the model's raw outputs."""

    @configurable
    def __init__(
        self,
        *,
        bce_weight: float,
        dice_weight: float,
        contrastive_weight: float,
        contrastive_temperature: float,
        deep_supervision: bool,
        no_target_weight: float,
        contrastive_cues: str = "all",
        landmark_weight: float = 0.0,
        cue_overlap_weight: float = 0.0,
        retrieval_ratio: Optional[float] = None,
        retrieval_temperature: Optional[float] = None,
        centre_weight: float = 0.0,
        group_weight: float = 0.0,
        offset_weight: float = 0.0,
        choice_weight: float = 0.0,
        area_weight: float = 0.0,
        switched_off: Sequence[str] = (),
    ):
        """``switched_off``: weights (of LOSS_SWITCHES) set in the config whose losses its
        DECODER switch turned off (0 here): said if the head returns what they would read."""
        super().__init__()
        if contrastive_temperature <= 0:
            raise ValueError(f"MODEL.VIPA.LOSS.CONTRASTIVE_TEMPERATURE must be > 0, got {contrastive_temperature}")
        if contrastive_cues not in CONTRASTIVE_CUES:
            raise ValueError(
                f"MODEL.VIPA.LOSS.CONTRASTIVE_CUES must be one of {CONTRASTIVE_CUES}, got {contrastive_cues!r}"
            )
        if cue_overlap_weight > 0 and (retrieval_ratio is None or retrieval_temperature is None):
            raise ValueError(
                "cue_overlap_weight > 0 compares the sets step 1 retrieves: it needs the VEG's "
                "retrieval_ratio and retrieval_temperature (MODEL.VIPA.VEG.RATIO / TEMPERATURE)"
            )
        self.contrastive_cues = contrastive_cues
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.contrastive_weight = contrastive_weight
        self.contrastive_temperature = contrastive_temperature
        self.deep_supervision = deep_supervision
        self.no_target_weight = no_target_weight
        self.landmark_weight = landmark_weight
        self.cue_overlap_weight = cue_overlap_weight
        self.retrieval_ratio, self.retrieval_temperature = retrieval_ratio, retrieval_temperature
        self.centre_weight = centre_weight
        self.group_weight = group_weight
        self.offset_weight = offset_weight
        self.choice_weight = choice_weight
        self.area_weight = area_weight
        self.switched_off = tuple(switched_off)
        self._said_switched_off = False
        weights = dict(
            centre_weight=centre_weight,
            group_weight=group_weight,
            offset_weight=offset_weight,
            choice_weight=choice_weight,
            area_weight=area_weight,
        )
        self.box_losses = box_losses(weights)
        self.group_losses = box_losses(weights, GROUP_LOSS_KEYS)
        self.area_losses = box_losses(weights, AREA_LOSS_KEYS)

    def read_outputs(self) -> Dict[str, tuple]:
        """{config key of a weight turned on: the head outputs its loss reads} (LOSS_OUTPUTS)."""
        return {BOX_LOSS_KEYS[weight]: keys for weight, keys in LOSS_OUTPUTS.items() if getattr(self, weight) > 0}

    def check_outputs(self, outputs: Dict, head: str) -> None:
        """ValueError naming what the losses turned on need and ``head``'s ``outputs`` lack:
        a registered head or decoder returns only what its config asks of it, and the
        losses would otherwise fail on a bare KeyError at the first step."""
        lacking = {key: [k for k in keys if k not in outputs] for key, keys in self.read_outputs().items()}
        lacking = {key: missing for key, missing in lacking.items() if missing}
        if lacking:
            listed = "; ".join(f"{key} > 0 reads {missing}" for key, missing in lacking.items())
            raise ValueError(
                f"The outputs of {head} lack what the losses read: {listed}. Return them from the head "
                "(or its transformer decoder: MODEL.VIPA.HEAD_NAME, MODEL.VIPA.DECODER.NAME), or set those weights to 0"
            )
        # A decoder of one's own returning centre maps with the stock decoder's switch off
        # trained them with no loss, unsaid (extension review, session 60). Said once per
        # criterion; only outputs no other loss reads (the choice's are the area loss's too).
        if self._said_switched_off:
            return
        unread = {name: [k for k in _own_outputs(name) if k in outputs] for name in self.switched_off}
        unread = {name: keys for name, keys in unread.items() if keys}
        if unread:
            self._said_switched_off = True
            logger.warning(
                f"The outputs of {head} hold "
                + "; ".join(f"{keys}, which {BOX_LOSS_KEYS[name]} would train with {LOSS_SWITCHES[name][1]}"
                            for name, keys in unread.items())
                + ": those losses are off (turn the switches on to train them)"
            )

    @classmethod
    def from_config(cls, cfg):
        loss = cfg.MODEL.VIPA.LOSS
        dec = cfg.MODEL.VIPA.DECODER
        # The losses that train what a DECODER switch builds: (weight, switch on).
        weights = {"centre_weight": loss.CENTRE_WEIGHT, "offset_weight": loss.OFFSET_WEIGHT,
                   "choice_weight": loss.CHOICE_WEIGHT, "area_weight": loss.AREA_WEIGHT}
        switched = {name: (weights[name], bool(on(dec))) for name, (on, _) in LOSS_SWITCHES.items()}
        if loss.GROUP_WEIGHT > 0 and not dec.COUNT_CENTRES:
            raise ValueError(
                "MODEL.VIPA.LOSS.GROUP_WEIGHT > 0 supervises the gates of the object-centre count maps; "
                "it needs MODEL.VIPA.DECODER.COUNT_CENTRES True (and COUNT_MAPS > 0)"
            )
        if loss.GROUP_GATE_ONLY and loss.GROUP_WEIGHT <= 0:
            raise ValueError(
                "MODEL.VIPA.LOSS.GROUP_GATE_ONLY True limits what the group loss trains, but there is none: "
                f"MODEL.VIPA.LOSS.GROUP_WEIGHT is {loss.GROUP_WEIGHT}; set it > 0 or the key False"
            )
        veg = cfg.MODEL.VIPA.VEG
        if loss.CONTRASTIVE_CUES == "global" and not veg.GLOBAL_CUE:
            raise ValueError(
                'MODEL.VIPA.LOSS.CONTRASTIVE_CUES "global" supervises the [CLS] cue, but '
                'MODEL.VIPA.VEG.GLOBAL_CUE is False; set CONTRASTIVE_CUES "all" (with VEG.CENTRE_WORDS False) '
                "for local cues only"
            )
        centred = veg.CENTRE_WORDS and veg.LOCAL_CUES and veg.STEP1  # word rows that step 1 centres
        if loss.CONTRASTIVE_CUES == "all" and centred and loss.CONTRASTIVE_WEIGHT > 0:
            # Centred word rows sum to zero at every token: pulling each to the target pulls
            # the others away, and the loss's optimum is every word row flat.
            raise ValueError(
                'MODEL.VIPA.LOSS.CONTRASTIVE_CUES "all" pulls every word cue\'s relevance to the target, but '
                "MODEL.VIPA.VEG.CENTRE_WORDS True centres an expression's word rows on their mean, so they sum to "
                'zero at every token and cannot all be pulled to it; set CENTRE_WORDS False with "all", or '
                'CONTRASTIVE_CUES "global"'
            )
        if loss.CUE_OVERLAP_WEIGHT > 0 and not cfg.MODEL.VIPA.VEG.STEP1:
            raise ValueError(
                "MODEL.VIPA.LOSS.CUE_OVERLAP_WEIGHT > 0 keeps the cues' retrieved sets apart, but "
                "MODEL.VIPA.VEG.STEP1 is False: there is no retrieval; set the weight 0 or STEP1 True"
            )
        return {
            "bce_weight": loss.BCE_WEIGHT,
            "dice_weight": loss.DICE_WEIGHT,
            "contrastive_weight": loss.CONTRASTIVE_WEIGHT,
            "contrastive_temperature": loss.CONTRASTIVE_TEMPERATURE,
            "deep_supervision": loss.DEEP_SUPERVISION,
            "no_target_weight": loss.NO_TARGET_WEIGHT,
            "contrastive_cues": loss.CONTRASTIVE_CUES,
            "landmark_weight": loss.LANDMARK_WEIGHT,
            "cue_overlap_weight": loss.CUE_OVERLAP_WEIGHT,
            # The sets the overlap loss compares are those step 1 retrieves.
            "retrieval_ratio": cfg.MODEL.VIPA.VEG.RATIO,
            "retrieval_temperature": cfg.MODEL.VIPA.VEG.TEMPERATURE,
            "group_weight": loss.GROUP_WEIGHT,
            **{name: weight if on else 0.0 for name, (weight, on) in switched.items()},
            "switched_off": tuple(name for name, (weight, on) in switched.items() if weight > 0 and not on),
        }

    def mask_losses(self, logits: torch.Tensor, gt: torch.Tensor, image_valid: torch.Tensor, suffix: str = ""):
        size = logits.shape[-2:]
        target = area_downsample(gt, size)
        weights = area_downsample(image_valid, size)
        return {
            f"loss_bce{suffix}": self.bce_weight * sigmoid_bce_loss(logits, target, weights),
            f"loss_dice{suffix}": self.dice_weight * dice_loss(logits, target, weights),
        }

    def forward(
        self,
        pred_masks: List[torch.Tensor],
        no_target_logit: torch.Tensor,
        gt_masks: torch.Tensor,
        image_valid: torch.Tensor,
        empty: torch.Tensor,
        relevance: Optional[torch.Tensor] = None,
        relevance_grid=None,
        cue_valid: Optional[torch.Tensor] = None,
        token_valid: Optional[torch.Tensor] = None,
        landmark_masks: Optional[torch.Tensor] = None,
        landmark_tokens: Optional[torch.Tensor] = None,
        centre_logits: Optional[List[torch.Tensor]] = None,
        object_boxes: Optional[List[torch.Tensor]] = None,
        group_logits: Optional[List[torch.Tensor]] = None,
        object_in_group: Optional[List[torch.Tensor]] = None,
        centre_offsets: Optional[List[torch.Tensor]] = None,
        choice_logits: Optional[torch.Tensor] = None,
        member_logits: Optional[torch.Tensor] = None,
        choice_points: Optional[torch.Tensor] = None,
        choice_found: Optional[torch.Tensor] = None,
        choice_log_areas: Optional[torch.Tensor] = None,
        object_areas: Optional[List[torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            pred_masks: per decoder layer (B, Hm, Wm) logits, last = final prediction.
            gt_masks, image_valid: (B, H, W) at the padded input resolution (0/1).
            empty: (B,) bool, the expression refers to nothing.
            relevance: (B, T, N) VEG relevance on a ``relevance_grid`` = (h, w) grid, or None.
            token_valid: (B, N) bool, the tokens of that grid inside the image, as the VEG
                used them (derived from ``image_valid`` when not given).
            landmark_masks, landmark_tokens: (B, H, W) and (B, T_max) bool, each expression's
                landmark and the text positions of its phrase (all zero without one); read
                when ``landmark_weight`` > 0 and there is relevance.
            centre_logits, object_boxes: per decoder layer (B, h, w) object-centre logits,
                and per image (K, 4) XYXY boxes of all its objects in input pixels; read
                when ``centre_weight`` > 0.
            group_logits, object_in_group: per decoder layer (B, h, w) logits of the gate
                supervised with the named group, and per image (K,) bool, which of its
                ``object_boxes`` the expression's category / colour words name; read when
                ``group_weight`` > 0.
            centre_offsets: per decoder layer (B, h, w, 2) offsets (x, y, in cells) from each
                cell to its object's centre; read, with ``object_boxes``, when
                ``offset_weight`` > 0.
            choice_logits, member_logits, choice_points, choice_found: the object choice's
                (B, K) log-probabilities and membership logits of its candidates, their
                centres ((B, K, 2) (x, y) fractions of the padded input) and which slots
                hold one (:class:`vipa_d2.modeling.object_ranks.ObjectChoice`); read, with
                ``object_boxes`` and ``object_in_group``, when ``choice_weight`` > 0.
            choice_log_areas, object_areas: the choice's (B, K) predicted log areas, and per
                image (K,) the areas of ``object_boxes``' objects in input pixels; read, with
                ``choice_points`` and ``choice_found``, when ``area_weight`` > 0.
        """
        gt = gt_masks.float()
        losses = self.mask_losses(pred_masks[-1], gt, image_valid)
        if self.deep_supervision:
            for i, logits in enumerate(pred_masks[:-1]):
                losses.update(self.mask_losses(logits, gt, image_valid, suffix=f"_{i}"))
        if relevance is not None and token_valid is None:
            token_valid = token_validity(image_valid, relevance_grid)
        if relevance is not None and self.contrastive_weight > 0:
            token_target = area_downsample(gt, relevance_grid).flatten(1)
            supervised = cue_valid
            if self.contrastive_cues == "global":
                supervised = global_cue_mask(cue_valid)  # only the [CLS] row names the target
            landmark_rows = None
            if self.landmark_weight > 0:
                # The text may be trimmed to the batch's longest expression (relevance's T).
                landmark_rows = landmark_tokens[:, : relevance.shape[1]].bool() & cue_valid
                supervised = supervised & ~landmark_rows  # a landmark word is not told to find the target
            losses["loss_contrastive"] = self.contrastive_weight * pixel_contrastive_loss(
                relevance, supervised, token_target, token_valid, self.contrastive_temperature
            )
            if landmark_rows is not None:
                landmark_target = area_downsample(landmark_masks.float(), relevance_grid).flatten(1)
                losses["loss_landmark"] = self.landmark_weight * pixel_contrastive_loss(
                    relevance, landmark_rows, landmark_target, token_valid, self.contrastive_temperature
                )
        if relevance is not None and self.cue_overlap_weight > 0:
            losses["loss_cue_overlap"] = self.cue_overlap_weight * cue_overlap_loss(
                relevance, word_cue_mask(cue_valid), token_valid, self.retrieval_ratio, self.retrieval_temperature
            )
        if self.centre_weight > 0:
            for i, logits in enumerate(centre_logits):
                losses[f"loss_centre_{i}"] = self.centre_weight * centre_loss(logits, object_boxes, gt.shape[-2:])
        if self.group_weight > 0:
            for i, logits in enumerate(group_logits):
                losses[f"loss_group_{i}"] = self.group_weight * group_loss(
                    logits, object_boxes, object_in_group, gt.shape[-2:]
                )
        if self.offset_weight > 0:
            for i, offsets in enumerate(centre_offsets):
                losses[f"loss_offset_{i}"] = self.offset_weight * offset_loss(offsets, object_boxes, gt.shape[-2:])
        if self.choice_weight > 0:
            losses["loss_choice"] = self.choice_weight * choice_loss(choice_logits, choice_points, choice_found, gt)
            losses["loss_choice_member"] = self.choice_weight * member_loss(
                member_logits, choice_points, choice_found, object_boxes, object_in_group, gt.shape[-2:]
            )
        if self.area_weight > 0:
            losses["loss_choice_area"] = self.area_weight * area_loss(
                choice_log_areas, choice_points, choice_found, object_boxes, object_areas, gt.shape[-2:]
            )
        # Always trained (target 0 on non-generalized data), and kept even at weight 0 so the
        # no-target head never becomes an unused parameter under DDP.
        losses["loss_no_target"] = self.no_target_weight * F.binary_cross_entropy_with_logits(
            no_target_logit, empty.to(no_target_logit.dtype)
        )
        return losses
