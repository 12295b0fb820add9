"""
Attention building blocks shared by the fusion, VEG and decoder modules.

Attention is written with explicit matmuls where (1) an extra multiplicative weight (the
VEG's retrieved-token mask) reweights the probabilities and carries gradients, or (2)
attention maps are returned for visualisation. Everywhere else it goes through
``scaled_dot_product_attention`` (``fused``; VIPA.set_speedups turns it off): the same values
without materialising the masked logits, which dominate pixel-word attention (thousands
of pixels, a few words, 3-dimensional heads). tools/model_cost.py counts both paths.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def allow_at_least_one_key(allowed: torch.Tensor) -> torch.Tensor:
    """
    ``allowed``: bool (..., Lq, Lk), True = the query may attend to the key.
    A row with no allowed key would give NaN after the -inf softmax; such rows only occur for
    queries whose output is discarded downstream (e.g. an absent cue), so they are opened up.
    """
    return allowed | ~allowed.any(dim=-1, keepdim=True)


class MultiHeadAttention(nn.Module):
    """
    Multi-head attention on (B, L, C) tensors.

    ``allowed`` (B, Lq, Lk) or (B, 1, Lk) bool: keys a query may attend to; the others get
    -inf logits, so they cannot influence the output at all.
    ``reweight`` (B, Lq, Lk) float in [0, 1] (optional): multiplied into the probabilities,
    which are then renormalised; with a 0/1 straight-through mask this leaves the forward
    value unchanged but lets gradients reach whatever produced the mask.
    """

    def __init__(
        self,
        dim: int,
        nheads: int,
        dropout: float = 0.0,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
    ):
        super().__init__()
        if dim % nheads != 0:
            raise ValueError(f"Attention width {dim} is not divisible by the number of heads {nheads}")
        self.nheads = nheads
        self.head_dim = dim // nheads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kdim or dim, dim)
        self.v_proj = nn.Linear(vdim or dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.fused = True  # see the module docstring; set_fused_attention() switches it

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.nheads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        allowed: Optional[torch.Tensor] = None,
        reweight: Optional[torch.Tensor] = None,
        need_weights: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        q = self._split(self.q_proj(query))
        k = self._split(self.k_proj(key))
        v = self._split(self.v_proj(value))
        if allowed is not None:
            allowed = allow_at_least_one_key(allowed)[:, None]  # broadcast over heads
        probs = None
        if self.fused and reweight is None and not need_weights:
            dropout_p = self.dropout.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        else:
            logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            probs = logits.softmax(dim=-1)
            if reweight is not None:
                probs = probs * reweight[:, None]
                probs = probs / probs.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(probs.dtype).tiny)
            out = torch.matmul(self.dropout(probs), v)
        b, _, lq, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, -1))
        return out, (probs.mean(dim=1) if need_weights else None)


def set_fused_attention(module: nn.Module, enabled: bool) -> nn.Module:
    """Route every :class:`MultiHeadAttention` under ``module`` through SDPA where possible."""
    for m in module.modules():
        if isinstance(m, MultiHeadAttention):
            m.fused = bool(enabled)
    return module


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> ReLU -> Linear (heads and kernels; no residual or norm, unlike FeedForward)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class FeedForward(nn.Module):
    """Two-layer MLP block with residual and post-LayerNorm (transformer FFN)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class AttentionBlock(nn.Module):
    """
    Attention + residual + post-LayerNorm. Positional encodings are added to queries/keys
    only (not to the values or the residual), as in DETR/Mask2Former.
    """

    def __init__(self, dim: int, nheads: int, dropout: float = 0.0, kdim: Optional[int] = None):
        super().__init__()
        self.attn = MultiHeadAttention(dim, nheads, dropout, kdim=kdim, vdim=kdim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        query_pos: Optional[torch.Tensor] = None,
        memory_pos: Optional[torch.Tensor] = None,
        allowed: Optional[torch.Tensor] = None,
        reweight: Optional[torch.Tensor] = None,
        need_weights: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        q = x if query_pos is None else x + query_pos
        k = memory if memory_pos is None else memory + memory_pos
        out, weights = self.attn(q, k, memory, allowed, reweight, need_weights)
        return self.norm(x + self.dropout(out)), weights


def sine_position_encoding(
    height: int, width: int, dim: int, device=None, dtype=torch.float32, temperature: float = 10000.0
) -> torch.Tensor:
    """
    2-D sine/cosine positional encoding (DETR style, normalised coordinates) as a
    (height * width, dim) tensor in row-major token order; half the channels encode y.
    """
    if dim % 4 != 0:
        raise ValueError(f"Sine positional encoding needs a width divisible by 4, got {dim}")
    npf = dim // 2
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    freq = temperature ** (2 * (torch.arange(npf // 2, device=device, dtype=torch.float32)) / npf)
    py = ys[:, None] / freq  # (H, npf/2)
    px = xs[:, None] / freq
    py = torch.cat([py.sin(), py.cos()], dim=1)  # (H, npf)
    px = torch.cat([px.sin(), px.cos()], dim=1)
    pos = torch.cat(
        [py[:, None, :].expand(height, width, npf), px[None, :, :].expand(height, width, npf)], dim=2
    )
    return pos.reshape(height * width, dim).to(dtype)
