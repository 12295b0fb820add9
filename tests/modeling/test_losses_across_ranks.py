"""Losses on two ranks weigh every item (pixel, object, cell, candidate, cue) as one process
does: DDP averages the ranks' gradients, so each rank must divide by the ranks' summed count
(``mean_over_ranks``), not by its own."""
import datetime

import torch
import torch.nn.functional as F

from detectron2.utils import comm

from vipa_d2.engine import launch_ranks, leave_process_group
from vipa_d2.modeling.losses import (
    area_loss,
    centre_loss,
    choice_loss,
    cue_overlap_loss,
    group_loss,
    member_loss,
    offset_loss,
    pixel_contrastive_loss,
    sigmoid_bce_loss,
)

RANKS = 2
SIZE = (64, 64)  # padded input, pixels
GRID = 8
# Objects per image: the first rank's two images hold 2 in all, the second rank's 10, so a
# per-rank mean weighs an object of the first rank 5 times more than one of the second.
OBJECTS = (1, 1, 5, 5)
CANDIDATES = 5
CUES, TOKENS = 6, GRID * GRID


def loss_cases():
    """name -> (leaf input, loss of a slice of the batch of 4); the same on every call."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    boxes = []
    for n in OBJECTS:
        corner = rand(n, 2) * 40
        boxes.append(torch.cat([corner, corner + 8 + rand(n, 2) * 16], dim=1))
    in_group = [torch.arange(len(b)) % 2 == 0 for b in boxes]
    areas = [(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) for b in boxes]
    # Candidates at the objects' centres (fractions of the input), empty slots after them.
    points = rand(len(OBJECTS), CANDIDATES, 2)
    found = torch.zeros(len(OBJECTS), CANDIDATES, dtype=torch.bool)
    for i, b in enumerate(boxes):
        points[i, : len(b)] = (b[:, :2] + b[:, 2:]) / 2 / torch.tensor(SIZE[::-1])
        found[i, : len(b)] = True
    # The target is each image's first object, except in image 1 (none: no positive there).
    gt = torch.zeros(len(OBJECTS), *SIZE)
    for i, b in enumerate(boxes):
        if i != 1:
            x0, y0, x1, y1 = b[0].long().tolist()
            gt[i, y0:y1, x0:x1] = 1
    # Images 2 and 3 are padded on their right half: fewer valid pixels on the second rank.
    valid = torch.ones(len(OBJECTS), GRID, GRID)
    valid[2:, :, GRID // 2 :] = 0
    token_target = F.adaptive_avg_pool2d(gt[:, None], GRID).flatten(1)
    # No target on the first rank: its choice and contrastive losses take their early
    # return, which must still join the collective (or the ranks would hang).
    gt_late = gt.clone()
    gt_late[:2] = 0
    token_target_late = F.adaptive_avg_pool2d(gt_late[:, None], GRID).flatten(1)
    token_valid = torch.ones(len(OBJECTS), TOKENS, dtype=torch.bool)
    # Cues per image 1, 2, 6, 6: unequal counts of supervised cues and of cue pairs.
    cue_valid = torch.arange(CUES)[None] < torch.tensor([1, 2, CUES, CUES])[:, None]

    logits = lambda *shape: (torch.randn(*shape, generator=g)).requires_grad_()  # noqa: E731
    mask_targets = (rand(len(OBJECTS), GRID, GRID) > 0.5).float()
    return {
        "bce": (logits(4, GRID, GRID), lambda x, s: sigmoid_bce_loss(x[s], mask_targets[s], valid[s])),
        "centre": (logits(4, GRID, GRID), lambda x, s: centre_loss(x[s], boxes[s], SIZE)),
        "group": (logits(4, GRID, GRID), lambda x, s: group_loss(x[s], boxes[s], in_group[s], SIZE)),
        "offset": (logits(4, GRID, GRID, 2), lambda x, s: offset_loss(x[s], boxes[s], SIZE)),
        "choice": (
            logits(4, CANDIDATES),
            lambda x, s: choice_loss(x[s].masked_fill(~found[s], -1e4).log_softmax(-1), points[s], found[s], gt[s]),
        ),
        "choice, none on a rank": (
            logits(4, CANDIDATES),
            lambda x, s: choice_loss(x[s].masked_fill(~found[s], -1e4).log_softmax(-1), points[s], found[s], gt_late[s]),
        ),
        "member": (
            logits(4, CANDIDATES),
            lambda x, s: member_loss(x[s], points[s], found[s], boxes[s], in_group[s], SIZE),
        ),
        "area": (logits(4, CANDIDATES), lambda x, s: area_loss(x[s], points[s], found[s], boxes[s], areas[s], SIZE)),
        "contrastive": (
            logits(4, CUES, TOKENS),
            lambda x, s: pixel_contrastive_loss(x[s], cue_valid[s], token_target[s], token_valid[s], 0.1),
        ),
        "contrastive, none on a rank": (
            logits(4, CUES, TOKENS),
            lambda x, s: pixel_contrastive_loss(x[s], cue_valid[s], token_target_late[s], token_valid[s], 0.1),
        ),
        "cue_overlap": (
            logits(4, CUES, TOKENS),
            lambda x, s: cue_overlap_loss(x[s], cue_valid[s], token_valid[s], ratio=0.3, temperature=0.5),
        ),
    }


def losses_and_grads(batch: slice):
    """name -> (loss, gradient with respect to the whole batch's input) on ``batch``."""
    out = {}
    for name, (x, loss_of) in loss_cases().items():
        loss = loss_of(x, batch)
        (grad,) = torch.autograd.grad(loss, x)
        out[name] = (loss.detach(), grad)
    return out


def averaged_on_ranks(path: str):
    """On each launched rank: its half of the batch; the losses and gradients averaged over
    the ranks as DDP averages gradients; rank 0 saves them to ``path``."""
    half = len(OBJECTS) // RANKS
    rank = comm.get_rank()
    results = losses_and_grads(slice(rank * half, (rank + 1) * half))
    for loss, grad in results.values():
        for t in (loss, grad):
            torch.distributed.all_reduce(t)
            t /= RANKS
    if rank == 0:
        torch.save(results, path)
    # Without it a rank can abort at exit while gloo's threads still run (SIGABRT, seen in
    # CI at 6cb88ea; see leave_process_group).
    leave_process_group()


def test_losses_on_two_ranks_weigh_every_item_as_one_process(tmp_path):
    path = str(tmp_path / "ranks.pth")
    # A rank that skipped the collective would leave the other waiting: fail, do not hang.
    launch_ranks(averaged_on_ranks, RANKS, dist_url="auto", args=(path,), device="cpu",
                 timeout=datetime.timedelta(seconds=60))
    on_ranks = torch.load(path, weights_only=True)
    one_process = losses_and_grads(slice(None))
    assert set(on_ranks) == set(one_process)
    for name, (loss, grad) in one_process.items():
        assert grad.abs().sum() > 0, name  # each case trains something
        torch.testing.assert_close(on_ranks[name][0], loss, msg=f"{name}: loss")
        torch.testing.assert_close(on_ranks[name][1], grad, msg=f"{name}: gradient")
