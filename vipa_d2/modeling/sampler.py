"""
Differentiable top-k token selection for the VEG's step 1 (visual informative token retrieval).

The relaxation is a per-row sigmoid around a threshold placed halfway between the k-th and
the (k+1)-th largest logit, so the soft mask is > 0.5 exactly on the hard top-k and its
gradient is largest for tokens near the decision boundary.
"""
from typing import Optional, Tuple, Union

import torch

SAMPLER_MODES = ("straight_through", "soft")


def num_retrieved(num_tokens: torch.Tensor, ratio: float) -> torch.Tensor:
    """N_p = max(1, round(ratio * N)) for a LongTensor of token counts N (one per sample)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"MODEL.VIPA.VEG.RATIO must be in (0, 1], got {ratio}")
    return torch.clamp(torch.round(num_tokens.float() * ratio).long(), min=1)


# Keeps both logs finite where a uniform draw is exactly 0.
GUMBEL_EPS = 1e-10


def sample_gumbel_like(x: torch.Tensor, eps: float = GUMBEL_EPS) -> torch.Tensor:
    """
    Standard Gumbel(0, 1) noise of the shape and dtype of ``x``, drawn in float32: in half
    precision (AMP) ``eps`` rounds to 0 and one draw in 2,048 (fp16) or 256 (bf16) is 0, which
    would give that token infinite noise.
    """
    u = torch.rand_like(x, dtype=torch.float32)
    return (-torch.log(-torch.log(u + eps) + eps)).to(x.dtype)


def check_sampler_settings(mode: str, temperature: float, gumbel_noise: float = 0.0) -> None:
    """ValueError naming the key when :func:`differentiable_topk`'s settings are not usable."""
    if mode not in SAMPLER_MODES:
        raise ValueError(f"MODEL.VIPA.VEG.SAMPLER must be one of {SAMPLER_MODES}, got {mode!r}")
    if not temperature > 0:
        raise ValueError(f"MODEL.VIPA.VEG.TEMPERATURE must be > 0, got {temperature}")
    if not gumbel_noise >= 0:  # a negative scale would flip the noise's sign, not turn it off
        raise ValueError(f"MODEL.VIPA.VEG.GUMBEL_NOISE must be >= 0 (0: no noise), got {gumbel_noise}")


def differentiable_topk(
    scores: torch.Tensor,
    k: Union[int, torch.Tensor],
    *,
    mode: str = "straight_through",
    temperature: float = 0.1,
    gumbel_noise: float = 0.0,
    valid: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Select the top-k tokens of every row of ``scores`` (B, L, N) differentiably.

    Args:
        k: tokens to keep per row, an int or a LongTensor (B,) (one value per sample).
        mode: "straight_through" returns the hard 0/1 mask in the forward pass with the
            soft mask's gradient; "soft" returns the soft mask in both passes.
        temperature: logits = scores / temperature (smaller = sharper relaxation).
        gumbel_noise: scale of Gumbel noise added to the logits (callers pass 0 at inference).
        valid: optional bool (B, N); invalid tokens (e.g. padding) are never selected.

    Returns:
        mask: float (B, L, N) retrieval mask M (carries gradients to ``scores``).
        support: bool (B, L, N), exactly the k selected tokens of each row.
    """
    check_sampler_settings(mode, temperature, gumbel_noise)
    b, l, n = scores.shape
    if isinstance(k, int):
        k = torch.full((b,), k, dtype=torch.long, device=scores.device)
    k = k.to(scores.device).clamp(min=1, max=n)

    logits = scores / temperature
    if gumbel_noise > 0:
        logits = logits + gumbel_noise * sample_gumbel_like(logits)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))

    # Hard top-k by rank (not by ">= k-th value") so ties never select more than k tokens.
    order = logits.detach().argsort(dim=-1, descending=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(n, device=scores.device).expand(b, l, n)
    )
    kk = k[:, None, None]
    support = rank < kk

    sorted_logits = logits.detach().gather(-1, order)
    kth = sorted_logits.gather(-1, (kk - 1).expand(b, l, 1))
    nxt = sorted_logits.gather(-1, kk.clamp(max=n - 1).expand(b, l, 1))
    # No (k+1)-th candidate (k == N, or all others invalid): put the threshold below the k-th.
    no_next = (kk >= n) | torch.isinf(nxt)
    threshold = torch.where(no_next, kth - 1.0, (kth + nxt) / 2)
    soft = torch.sigmoid(logits - threshold)

    if mode == "soft":
        return soft, support
    hard = support.to(scores.dtype)
    # Parenthesised so the forward value is exactly the 0/1 mask (soft - soft.detach() == 0).
    return hard + (soft - soft.detach()), support
