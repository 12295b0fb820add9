"""
Visual Expression Generator (VEG): turns linguistic cues into a *visual expression* E_V,
L tokens living in the visual feature space, used as the decoder's key/value set.

Step 1 (visual informative token retrieval): cosine relevance between projected cues and
visual tokens F_v, differentiable top-k -> retrieved-token mask M (L x N).
Step 2 (visual context refinement): F_a (relevance-weighted mean of each cue's retrieved
tokens) -> dynamic masked cross-attention over F_v restricted to M -> self-attention among
the cues ("sharing visual contexts") -> E_V.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.utils.registry import Registry

from .attention import AttentionBlock, FeedForward, sine_position_encoding
from .sampler import check_sampler_settings, differentiable_topk, num_retrieved


def linguistic_cue_mask(attention_mask: torch.Tensor, global_cue: bool, local_cues: bool) -> torch.Tensor:
    """
    Which token positions are cues, as bool (B, T).

    The global cue is [CLS] (position 0). Local cues are the word tokens: positions
    1 .. len-2, i.e. padding AND the closing [SEP] (position len-1, guaranteed by
    ``text_encoder.tokenize`` even when truncating) are excluded: [SEP] is a sentence
    delimiter, not a word, and would duplicate the global cue's role.
    """
    if not (global_cue or local_cues):
        raise ValueError(
            "MODEL.VIPA.VEG.GLOBAL_CUE and MODEL.VIPA.VEG.LOCAL_CUES are both False: "
            "at least one kind of linguistic cue is needed"
        )
    valid = attention_mask.bool()
    lengths = valid.sum(dim=1, keepdim=True)
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None]
    cues = torch.zeros_like(valid)
    if global_cue:
        cues |= pos == 0
    if local_cues:
        cues |= (pos >= 1) & (pos <= lengths - 2)
    return cues & valid


def word_cue_mask(cue_valid: torch.Tensor) -> torch.Tensor:
    """The local (word) cues of a ``linguistic_cue_mask``: every cue but [CLS] (position 0)."""
    words = cue_valid.clone()
    words[:, 0] = False
    return words


def global_cue_mask(cue_valid: torch.Tensor) -> torch.Tensor:
    """The global cue of a ``linguistic_cue_mask``: [CLS] where it is a cue, no word."""
    return cue_valid & ~word_cue_mask(cue_valid)


def centre_word_relevance(relevance: torch.Tensor, cue_valid: torch.Tensor) -> torch.Tensor:
    """
    ``relevance`` (B, T, N) with each word row replaced by its difference from the mean word
    row of its expression, so that a word ranks the tokens it is MORE relevant to than the
    expression's words on average, not the tokens every word likes. [CLS] (row 0) keeps its
    cosine (the contrastive loss pins it to the target), and so does the word of a one-word
    expression, which has nothing to be compared with (its difference would be all zeros).
    """
    words = word_cue_mask(cue_valid)
    count = words.sum(dim=1)
    weight = words.to(relevance.dtype)[..., None]
    mean = (relevance * weight).sum(dim=1, keepdim=True) / count.clamp(min=1)[:, None, None]
    centred = words & (count >= 2)[:, None]
    return torch.where(centred[..., None], relevance - mean, relevance)


class CueSharingLayer(nn.Module):
    """Self-attention among the cue tokens (absent cues masked as keys) + FFN."""

    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = AttentionBlock(dim, nheads, dropout)
        self.ffn = FeedForward(dim, dim_feedforward, dropout)

    def forward(self, x: torch.Tensor, cue_valid: torch.Tensor) -> torch.Tensor:
        x, _ = self.self_attn(x, x, allowed=cue_valid[:, None, :])
        return self.ffn(x)


# What every VEG returns (VisualExpressionGenerator.forward) that the head, the losses,
# postprocess and the predictor read whatever the config ("relevance" may be None).
VEG_OUTPUTS = ("visual_expression", "relevance", "retrieval_mask", "attention", "grid")

VIPA_VEG_REGISTRY = Registry("VIPA_VEG")
VIPA_VEG_REGISTRY.__doc__ = """
Registry for visual expression generators, built from ``MODEL.VIPA.VEG.NAME`` with
``(cfg, visual_channels, text_dim)`` (via ``from_config``); for the loss-matched control
(``KV_SOURCE "language_relevance"``, step 1's relevance only) also with ``step1=True,
step2=False``, which a module of one's own must take. ``forward(visual, text, cue_valid,
token_valid)`` returns the dict :class:`VisualExpressionGenerator` documents.
"""


@VIPA_VEG_REGISTRY.register()
class VisualExpressionGenerator(nn.Module):
    """
    Inputs: a visual feature map (B, Cv, H, W), text features (B, T, Ct) and the cue mask
    (B, T). Output dict:
      "visual_expression": (B, T, C) E_V (rows of absent cues are meaningless),
      "valid": (B, T) bool cue validity (the key padding mask of the decoder),
      "relevance": (B, T, N) cosine relevance (None without step 1),
      "loss_relevance": the relevance the criterion's losses read: "relevance" itself, or
      in training with ``loss_text_gradient`` False the same values computed from the text
      detached (None without step 1),
      "retrieval_mask": (B, T, N) M, "attention": (B, T, N) cue->token attention map used
      for visualisation (relevance with step 1, cross-attention weights without),
      "grid": (H, W) of the token grid.
    """

    @configurable
    def __init__(
        self,
        *,
        visual_channels: int,
        text_dim: int,
        hidden_dim: int,
        nheads: int,
        step1: bool,
        step2: bool,
        ratio: float,
        sampler: str,
        temperature: float,
        gumbel_noise: float,
        share_layers: int,
        dim_feedforward: int,
        dropout: float,
        position_in_values: bool = False,
        cue_identity: bool = False,
        centre_words: bool = False,
        loss_text_gradient: bool = True,
    ):
        super().__init__()
        if not (step1 or step2):
            raise ValueError(
                "MODEL.VIPA.VEG.STEP1 and STEP2 are both False: the VEG needs at least one step "
                "(use MODEL.VIPA.KV_SOURCE 'language' for a decoder without a visual expression)"
            )
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"MODEL.VIPA.VEG.RATIO must be in (0, 1], got {ratio}")
        if share_layers < 0:
            raise ValueError(f"MODEL.VIPA.VEG.SHARE_LAYERS must be >= 0, got {share_layers}")
        if step1:  # here, not at the first forward: after the weights and the data are loaded
            check_sampler_settings(sampler, temperature, gumbel_noise)
        self.step1, self.step2 = step1, step2
        self.ratio, self.sampler, self.temperature, self.gumbel_noise = ratio, sampler, temperature, gumbel_noise
        self.position_in_values, self.cue_identity = position_in_values, cue_identity
        self.centre_words = centre_words
        self.loss_text_gradient = loss_text_gradient

        self.visual_proj = nn.Conv2d(visual_channels, hidden_dim, kernel_size=1)
        self.visual_norm = nn.LayerNorm(hidden_dim)
        self.cue_proj = nn.Linear(text_dim, hidden_dim)
        self.cue_norm = nn.LayerNorm(hidden_dim)
        if step1:
            self.aggregate_norm = nn.LayerNorm(hidden_dim)
        if step2:
            # Dynamic masked cross-attention (with step 1) / plain cross-attention (without).
            self.cross_attn = AttentionBlock(hidden_dim, nheads, dropout)
            self.cross_ffn = FeedForward(hidden_dim, dim_feedforward, dropout)
            self.share = nn.ModuleList(
                CueSharingLayer(hidden_dim, nheads, dim_feedforward, dropout) for _ in range(share_layers)
            )

    @classmethod
    def from_config(cls, cfg, visual_channels: int, text_dim: int):
        veg = cfg.MODEL.VIPA.VEG
        return {
            "visual_channels": visual_channels,
            "text_dim": text_dim,
            "hidden_dim": cfg.MODEL.VIPA.HIDDEN_DIM,
            "nheads": cfg.MODEL.VIPA.NHEADS,
            "step1": veg.STEP1,
            "step2": veg.STEP2,
            "ratio": veg.RATIO,
            "sampler": veg.SAMPLER,
            "temperature": veg.TEMPERATURE,
            "gumbel_noise": veg.GUMBEL_NOISE,
            "share_layers": veg.SHARE_LAYERS,
            "dim_feedforward": veg.DIM_FEEDFORWARD,
            "dropout": veg.DROPOUT,
            "position_in_values": veg.POSITION_IN_VALUES,
            "cue_identity": veg.CUE_IDENTITY,
            "centre_words": veg.CENTRE_WORDS,
            "loss_text_gradient": cfg.MODEL.VIPA.LOSS.RELEVANCE_TEXT_GRADIENT,
        }

    def score(self, cues: torch.Tensor, fv: torch.Tensor, cue_valid: torch.Tensor) -> torch.Tensor:
        """Cosine relevance (B, T, N) of projected cues (B, T, C) and visual tokens (B, N, C),
        word rows centred with ``centre_words``."""
        relevance = torch.einsum("btc,bnc->btn", F.normalize(cues, dim=-1), F.normalize(fv, dim=-1))
        return centre_word_relevance(relevance, cue_valid) if self.centre_words else relevance

    def retrieve(self, cues: torch.Tensor, fv: torch.Tensor, token_valid: torch.Tensor, cue_valid: torch.Tensor):
        """
        Step 1 on projected cues (B, T, C) and visual tokens (B, N, C): the relevance
        (``score``), the retrieval mask M (float, carries the sampler's gradient) and its
        support (bool, exactly N_p tokens per cue).
        """
        relevance = self.score(cues, fv, cue_valid)
        mask, support = differentiable_topk(
            relevance,
            num_retrieved(token_valid.sum(dim=1), self.ratio),
            mode=self.sampler,
            temperature=self.temperature,
            gumbel_noise=self.gumbel_noise if self.training else 0.0,
            valid=token_valid,
        )
        return relevance, mask, support

    def aggregate(self, relevance, mask, support, fv) -> torch.Tensor:
        """
        F_a: mask- and relevance-weighted mean of each cue's retrieved tokens. M enters
        multiplicatively so its straight-through gradient reaches the relevance scores.
        """
        logits = relevance / self.temperature
        row_max = logits.detach().masked_fill(~support, float("-inf")).amax(dim=-1, keepdim=True)
        weights = mask * torch.exp((logits - row_max).clamp(max=0.0))
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
        return self.aggregate_norm(torch.bmm(weights, fv))

    def refine(self, queries, fv, pos, allowed, reweight, cue_valid, need_weights: bool = False):
        """
        Step 2: cross-attention from the cue queries to F_v restricted to ``allowed`` (the
        dynamic mask M: other tokens get -inf logits), then self-attention among the cues.
        Returns E_V and the cross-attention map (if ``need_weights``).
        """
        refined, attn = self.cross_attn(
            queries, fv, memory_pos=pos, allowed=allowed, reweight=reweight, need_weights=need_weights
        )
        refined = self.cross_ffn(refined)
        for layer in self.share:
            refined = layer(refined, cue_valid)
        return refined, attn

    def forward(
        self,
        visual: torch.Tensor,
        text: torch.Tensor,
        cue_valid: torch.Tensor,
        token_valid: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        ``token_valid``: optional bool (B, H*W), False on visual tokens that lie in the
        batch padding; they are never retrieved nor attended to.
        """
        b, _, h, w = visual.shape
        fv = self.visual_norm(self.visual_proj(visual).flatten(2).transpose(1, 2))  # (B, N, C)
        cues = self.cue_norm(self.cue_proj(text))  # (B, T, C)
        if token_valid is None:
            token_valid = torch.ones(b, h * w, dtype=torch.bool, device=visual.device)
        out = {"valid": cue_valid, "grid": (h, w), "relevance": None, "loss_relevance": None}
        pos = sine_position_encoding(h, w, fv.shape[-1], fv.device, fv.dtype)[None]
        # What E_V is built from: appearance alone, or appearance + where it is.
        values = fv + pos if self.position_in_values else fv

        if self.step1:
            relevance, mask, support = self.retrieve(cues, fv, token_valid, cue_valid)
            queries = self.aggregate(relevance, mask, support, values)
            if self.cue_identity:
                queries = queries + cues
            allowed, reweight = support, mask
            loss_relevance = relevance
            if self.training and not self.loss_text_gradient:
                # The same values through the cue projection, from the text detached: the
                # losses still train the projection and the visual side, but cannot move the
                # word features that the decoder (e.g. the object choice's word pool) reads.
                loss_relevance = self.score(self.cue_norm(self.cue_proj(text.detach())), fv, cue_valid)
            out.update(relevance=relevance, loss_relevance=loss_relevance, retrieval_mask=mask, attention=relevance)
        else:
            # No retrieval: the projected cues query every (non-padding) visual token.
            queries = cues
            allowed = token_valid[:, None, :].expand(b, cues.shape[1], h * w)
            reweight = None
            out["retrieval_mask"] = allowed.to(fv.dtype)

        if not self.step2:
            out["visual_expression"] = queries
            return out
        # Keys always see the position; values too when E_V is to carry it.
        memory, memory_pos = (values, None) if self.position_in_values else (fv, pos)
        refined, attn = self.refine(
            queries, memory, memory_pos, allowed, reweight, cue_valid, need_weights=not self.step1
        )
        if not self.step1:
            out["attention"] = attn
        out["visual_expression"] = refined
        return out
