"""
Transformer decoder whose QUERIES are the vision (pixel) features and whose KEY/VALUE set is
the visual expression E_V (or, for the baseline, the projected language features).

Layer i refines one scale of ``DECODER.IN_FEATURES`` (round robin, coarse to fine): the
flattened pixel features (+ sine position + level embedding) cross-attend to the K/V
tokens (absent cues masked), then an FFN. The change is written back to that scale and
added (upsampled) to the finer decoder scales. There is no self-attention among pixels
(quadratic in the number of pixels). Each layer predicts a mask for deep supervision:
a per-pixel dot product between the upsampled embedding of the refined scale and the
pixel decoder's mask features.
"""
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry

from .attention import AttentionBlock, FeedForward, mlp, sine_position_encoding
from .directional_counts import DirectionalCounts
from .object_ranks import CHOICE_AREAS, ObjectChoice, ObjectRanks
from .registry import get_registered

# Initial no-target probability of the no-target head.
NO_TARGET_PRIOR = 0.01
# Scale of the learned "nothing" key/value token at initialisation: small beside the
# LayerNormed K/V tokens, as for a transformer's learned embeddings.
NULL_EMBED_INIT_STD = 0.02

VIPA_TRANSFORMER_DECODER_REGISTRY = Registry("VIPA_TRANSFORMER_DECODER")
VIPA_TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry for VIPA transformer decoders, built from ``MODEL.VIPA.DECODER.NAME`` with
``(cfg, input_shape)``; ``forward(features, mask_features, kv, kv_valid)`` returns
``{"pred_masks": [...], "no_target_logit": (B,)}`` (see VIPATransformerDecoder), and in
training what the losses the config turns on read (``vipa_d2.modeling.losses.LOSS_OUTPUTS``:
e.g. "centre_logits" for ``MODEL.VIPA.LOSS.CENTRE_WEIGHT > 0``; a lacking one is named when
the losses run). A decoder with a true ``reads_words`` attribute is also passed ``words=``
(B, T, C) projected word features and ``words_valid=`` (B, T) bool by the head.
"""


def build_transformer_decoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """Build ``MODEL.VIPA.DECODER.NAME`` on the backbone's ``output_shape()``."""
    return get_registered(VIPA_TRANSFORMER_DECODER_REGISTRY, cfg.MODEL.VIPA.DECODER.NAME, "MODEL.VIPA.DECODER.NAME")(
        cfg, input_shape
    )


class PixelQueryLayer(nn.Module):
    """Cross-attention from pixel queries to the K/V tokens, then FFN."""

    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.cross_attn = AttentionBlock(dim, nheads, dropout)
        self.ffn = FeedForward(dim, dim_feedforward, dropout)

    def forward(self, x, pos, kv, kv_valid):
        x, _ = self.cross_attn(x, kv, query_pos=pos, allowed=kv_valid[:, None, :])
        return self.ffn(x)


def resize_tokens(x: torch.Tensor, size, new_size) -> torch.Tensor:
    """Bilinearly resize (B, h*w, C) tokens of an (h, w) grid to (B, H*W, C) for ``new_size`` (H, W).
    Works on a channels-last view, so no layout copies are made."""
    grid = x.unflatten(1, tuple(size)).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_size), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(1, 2)


@VIPA_TRANSFORMER_DECODER_REGISTRY.register()
class VIPATransformerDecoder(nn.Module):
    @configurable
    def __init__(
        self,
        *,
        in_strides: Dict[str, int],
        hidden_dim: int,
        mask_dim: int,
        nheads: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
        null_kv: bool = False,
        kv_kernel: bool = False,
        count_maps: int = 0,
        count_centres: bool = False,
        count_at_object_centres: bool = False,
        count_peaks: bool = False,
        group_gate_only: bool = False,
        object_ranks: bool = False,
        object_choice: bool = False,
        choice_from_words: bool = False,
        choice_size_ranks: bool = False,
        choice_factorised: bool = False,
        choice_hard_at_test: bool = False,
        choice_areas: str = "group_gate",
        choice_factor_queries: bool = False,
        choice_factor_pools: bool = False,
    ):
        """
        Args:
            in_strides: {scale name: stride} of the pixel decoder outputs refined here.
            num_layers: decoder layers, one scale each, cycling coarse to fine.
            null_kv: append a learned "nothing" token to the K/V set.
            kv_kernel: add a mask term from a kernel of the pooled K/V tokens.
            count_maps: maps per layer of a :class:`DirectionalCounts` block after each
                layer (0: none).
            count_centres: the count maps are object-centre maps times gates; the
                centre logits and the first map's gate logits are returned for the
                criterion (needs ``count_maps`` > 0).
            count_at_object_centres: each cell also reads the counts at its object's
                centre, through a predicted offset returned for the criterion (needs
                ``count_centres``).
            count_peaks: only the centre maps' local maxima count, so the sums count
                objects, not Gaussian mass (needs ``count_centres``).
            group_gate_only: the returned group logits come from detached tokens, so the
                group loss trains only the gate (LOSS.GROUP_GATE_ONLY).
            object_ranks: an :class:`ObjectRanks` block ranks the last layer's detected
                objects along each axis and adds its per-object score to the final mask
                (needs ``count_at_object_centres``: the centres and offsets it reads).
            object_choice: an :class:`ObjectChoice` block chooses the referred object among
                the last layer's detected objects (trained by the criterion's choice loss on
                the returned candidates) and adds its log-probability to the final mask
                (needs ``count_at_object_centres``; not with ``object_ranks``).
            choice_from_words: the choice's rank weights come from the words, which
                ``forward`` then needs (``reads_words`` is True; needs ``object_choice``).
            choice_size_ranks: the choice also ranks candidates by area (needs ``object_choice``).
            choice_factorised: the choice's rank weights are P(side) x P(bin) (needs ``object_choice``).
            choice_hard_at_test: in inference, the mask keeps only the most probable candidate's
                cells (needs ``object_choice``).
            choice_areas: where the size ranks read the candidates' areas, "group_gate" or
                "regressed" (:class:`ObjectChoice`; "regressed" needs ``choice_size_ranks``).
            choice_factor_queries: the choice pools the words once per factor of its
                factorised rank weights (needs ``choice_from_words`` and ``choice_factorised``).
            choice_factor_pools: each factor's query pools the words with attention of its own
                (needs ``choice_factor_queries``).
        """
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MODEL.VIPA.DECODER.NUM_LAYERS must be >= 1, got {num_layers}")
        # Coarse to fine regardless of the order given.
        self.in_features: List[str] = sorted(in_strides, key=lambda k: -in_strides[k])
        self.strides = dict(in_strides)
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            PixelQueryLayer(hidden_dim, nheads, dim_feedforward, dropout) for _ in range(num_layers)
        )
        if count_centres and count_maps < 1:
            raise ValueError("MODEL.VIPA.DECODER.COUNT_CENTRES needs MODEL.VIPA.DECODER.COUNT_MAPS > 0 (the maps it gates)")
        if count_at_object_centres and not count_centres:
            raise ValueError(
                "MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES needs MODEL.VIPA.DECODER.COUNT_CENTRES True (the object "
                "centres it reads the counts at)"
            )
        if count_peaks and not count_centres:
            raise ValueError(
                "MODEL.VIPA.DECODER.COUNT_PEAKS needs MODEL.VIPA.DECODER.COUNT_CENTRES True (the centre maps whose "
                "peaks it counts)"
            )
        if object_ranks and not count_at_object_centres:
            raise ValueError(
                "MODEL.VIPA.DECODER.OBJECT_RANKS needs MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES True (the object "
                "centres and offsets it ranks and assigns cells by)"
            )
        if object_choice and not count_at_object_centres:
            raise ValueError(
                "MODEL.VIPA.DECODER.OBJECT_CHOICE needs MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES True (the object "
                "centres and offsets it chooses among and assigns cells by)"
            )
        if object_choice and object_ranks:
            raise ValueError(
                "MODEL.VIPA.DECODER.OBJECT_CHOICE and OBJECT_RANKS both score the final mask by object; set one of them"
            )
        choice_keys = (
            ("CHOICE_FROM_WORDS", choice_from_words),
            ("CHOICE_SIZE_RANKS", choice_size_ranks),
            ("CHOICE_FACTORISED", choice_factorised),
            ("CHOICE_HARD_AT_TEST", choice_hard_at_test),
            ("CHOICE_FACTOR_QUERIES", choice_factor_queries),
            ("CHOICE_FACTOR_POOLS", choice_factor_pools),
        )
        for name, on in choice_keys:
            if on and not object_choice:
                raise ValueError(
                    f"MODEL.VIPA.DECODER.{name} needs MODEL.VIPA.DECODER.OBJECT_CHOICE True (the choice it changes)"
                )
        if choice_areas not in CHOICE_AREAS:
            raise ValueError(f"MODEL.VIPA.DECODER.CHOICE_AREAS must be one of {CHOICE_AREAS}, got {choice_areas!r}")
        if choice_areas == "regressed" and not choice_size_ranks:
            raise ValueError(
                'MODEL.VIPA.DECODER.CHOICE_AREAS "regressed" needs MODEL.VIPA.DECODER.CHOICE_SIZE_RANKS True (the '
                "size ranks that read the areas)"
            )
        self.object_ranks = ObjectRanks(hidden_dim) if object_ranks else None
        self.object_choice = None
        if object_choice:
            self.object_choice = ObjectChoice(
                hidden_dim, nheads, choice_from_words, choice_size_ranks, choice_factorised, dropout=dropout,
                hard_at_test=choice_hard_at_test, areas=choice_areas, factor_queries=choice_factor_queries,
                factor_pools=choice_factor_pools,
            )
        # The head passes the projected words to ``forward`` only when this is True.
        self.reads_words = self.object_choice is not None and self.object_choice.reads_words
        self.counts = None
        if count_maps > 0:
            self.counts = nn.ModuleList(
                DirectionalCounts(
                    hidden_dim, count_maps, hidden_dim, count_centres, count_at_object_centres, count_peaks, group_gate_only
                )
                for _ in range(num_layers)
            )
        self.level_embed = nn.Embedding(len(self.in_features), hidden_dim)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.mask_dim = mask_dim
        self.mask_embed = mlp(hidden_dim, hidden_dim, mask_dim)
        # Pooled refined pixels + pooled K/V tokens -> "the expression refers to nothing".
        self.no_target_head = mlp(2 * hidden_dim, hidden_dim, 1)
        # "embed" in the name: no weight decay (vipa_d2.engine.optimizer.embedding_parameters).
        self.null_embed = nn.Parameter(torch.randn(1, 1, hidden_dim) * NULL_EMBED_INIT_STD) if null_kv else None
        self.kv_kernel = None
        if kv_kernel:
            self.kv_kernel = mlp(hidden_dim, hidden_dim, mask_dim)
            # Starts at zero: the untrained kernel would add noise of the masks' own scale.
            nn.init.zeros_(self.kv_kernel[-1].weight)
            nn.init.zeros_(self.kv_kernel[-1].bias)
        # Start from a low no-target probability (most expressions have a target), so an
        # untrained head does not empty masks at inference (RetinaNet-style prior init).
        nn.init.constant_(self.no_target_head[-1].bias, -math.log((1 - NO_TARGET_PRIOR) / NO_TARGET_PRIOR))

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        names = cfg.MODEL.VIPA.DECODER.IN_FEATURES
        available = cfg.MODEL.VIPA.PIXEL_DECODER.IN_FEATURES
        missing = [n for n in names if n not in available or n not in input_shape]
        if not names or missing:
            raise ValueError(
                f"MODEL.VIPA.DECODER.IN_FEATURES={list(names)} must be a non-empty subset of "
                f"MODEL.VIPA.PIXEL_DECODER.IN_FEATURES={list(available)} (offending: {missing})"
            )
        dec = cfg.MODEL.VIPA.DECODER
        return {
            "in_strides": {n: input_shape[n].stride for n in names},
            "hidden_dim": cfg.MODEL.VIPA.HIDDEN_DIM,
            "mask_dim": cfg.MODEL.VIPA.PIXEL_DECODER.MASK_DIM,
            "nheads": cfg.MODEL.VIPA.NHEADS,
            "num_layers": dec.NUM_LAYERS,
            "dim_feedforward": dec.DIM_FEEDFORWARD,
            "dropout": dec.DROPOUT,
            "null_kv": dec.NULL_KV,
            "kv_kernel": dec.KV_KERNEL,
            "count_maps": dec.COUNT_MAPS,
            "count_centres": dec.COUNT_CENTRES,
            "count_at_object_centres": dec.COUNT_AT_OBJECT_CENTRES,
            "count_peaks": dec.COUNT_PEAKS,
            "group_gate_only": cfg.MODEL.VIPA.LOSS.GROUP_GATE_ONLY,
            "object_ranks": dec.OBJECT_RANKS,
            "object_choice": dec.OBJECT_CHOICE,
            "choice_from_words": dec.CHOICE_FROM_WORDS,
            "choice_size_ranks": dec.CHOICE_SIZE_RANKS,
            "choice_factorised": dec.CHOICE_FACTORISED,
            "choice_hard_at_test": dec.CHOICE_HARD_AT_TEST,
            "choice_areas": dec.CHOICE_AREAS,
            "choice_factor_queries": dec.CHOICE_FACTOR_QUERIES,
            "choice_factor_pools": dec.CHOICE_FACTOR_POOLS,
        }

    def check_pixel_decoder_outputs(self, features: Dict[str, torch.Tensor], mask_features: torch.Tensor) -> None:
        """ValueError when the pixel decoder's outputs do not fit this decoder: a registered
        pixel decoder would otherwise meet a bare KeyError or an einsum size error here."""
        width = self.level_embed.embedding_dim  # the levels are tokens of the decoder's width
        missing = [n for n in self.in_features if n not in features]
        misshaped = {n: tuple(features[n].shape) for n in self.in_features
                     if n in features and (features[n].dim() != 4 or features[n].shape[1] != width)}
        channels = mask_features.shape[1] if mask_features.dim() == 4 else None
        if missing or misshaped or channels != self.mask_dim:
            problems = ([f"of which {missing} are missing"] if missing else []) + (
                [f"of which {misshaped} are not (B, {width}, H, W)"] if misshaped else [])
            raise ValueError(
                f"The pixel decoder (MODEL.VIPA.PIXEL_DECODER.NAME) returned mask features of shape "
                f"{tuple(mask_features.shape)} and levels {sorted(features)}; the transformer decoder reads "
                f"(B, {self.mask_dim}, H, W) mask features (MODEL.VIPA.PIXEL_DECODER.MASK_DIM) and the levels "
                f"{self.in_features} (MODEL.VIPA.DECODER.IN_FEATURES) as (B, {width}, H, W) "
                f"(MODEL.VIPA.HIDDEN_DIM)" + "".join(", " + p for p in problems)
            )

    def predict_mask(self, x: torch.Tensor, size, mask_features: torch.Tensor) -> torch.Tensor:
        """
        (B, h*w, C) refined tokens -> (B, Hm, Wm) logits: per pixel, the dot product of the
        pixel's mask feature with the upsampled embedding of the refined scale.
        ``mask_features`` is channels-last (B, Hm, Wm, D).
        """
        emb = self.mask_embed(self.decoder_norm(x))
        emb = resize_tokens(emb, size, mask_features.shape[1:3]).unflatten(1, mask_features.shape[1:3])
        return (emb * mask_features).sum(dim=-1)

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        mask_features: torch.Tensor,
        kv: torch.Tensor,
        kv_valid: torch.Tensor,
        words: Optional[torch.Tensor] = None,
        words_valid: Optional[torch.Tensor] = None,
    ) -> Dict[str, object]:
        """
        Args:
            features: pixel decoder outputs {name: (B, C, H, W)} (at least ``in_features``).
            mask_features: (B, MASK_DIM, Hm, Wm).
            kv: (B, L, C) key/value tokens; kv_valid: (B, L) bool, False = absent/padding.
            words: (B, T, C) projected word features and words_valid (B, T) bool, read only
                when ``reads_words``.
        Returns:
            {"pred_masks": [(B, Hm, Wm) logits per layer (in eval mode only the last)],
             "no_target_logit": (B,)}, and in training with ``count_centres``
            "centre_logits": [(B, h, w) object-centre logits per layer, on its grid] and
            "group_logits": [(B, h, w) logits of the gate LOSS.GROUP_WEIGHT supervises, ditto],
            with ``count_at_object_centres`` also "centre_offsets": [(B, h, w, 2) per layer];
            with ``object_choice`` also its candidates' "choice_logits", "member_logits",
            "choice_points" and "choice_found" (and "choice_log_areas" with regressed
            areas; :meth:`ObjectChoice.forward`).
        """
        self.check_pixel_decoder_outputs(features, mask_features)
        # Work on (B, HW, C) tokens throughout: one layout change per scale, not per layer.
        sizes = {n: tuple(features[n].shape[-2:]) for n in self.in_features}
        tokens = {n: features[n].flatten(2).transpose(1, 2).contiguous() for n in self.in_features}
        mask_features = mask_features.permute(0, 2, 3, 1).contiguous()
        pos = {}
        for lvl, n in enumerate(self.in_features):
            c = tokens[n].shape[-1]
            level = self.level_embed.weight[lvl][None, None]
            pos[n] = sine_position_encoding(*sizes[n], c, kv.device, kv.dtype)[None] + level
        valid = kv_valid.to(kv.dtype)[..., None]
        kv_pooled = (kv * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)
        # The expression's direct say in every layer's mask (0 without KV_KERNEL).
        direct = 0.0
        if self.kv_kernel is not None:
            direct = torch.einsum("bhwd,bd->bhw", mask_features, self.kv_kernel(kv_pooled))
        attn_kv, attn_valid = kv, kv_valid
        if self.null_embed is not None:
            attn_kv = torch.cat([kv, self.null_embed.expand(kv.shape[0], 1, -1)], dim=1)
            attn_valid = torch.cat([kv_valid, kv_valid.new_ones(kv.shape[0], 1)], dim=1)

        pred_masks, count_outputs = [], {}
        x = None
        for i, layer in enumerate(self.layers):
            lvl = i % len(self.in_features)
            name = self.in_features[lvl]
            old = tokens[name]
            x = layer(old, pos[name], attn_kv, attn_valid)
            if self.counts is not None:
                x, aux = self.counts[i](x, sizes[name])
                if self.training:  # only the criterion reads them
                    for key, value in aux.items():
                        count_outputs.setdefault(key, []).append(value)
            tokens[name] = x
            for finer in self.in_features[lvl + 1 :]:
                tokens[finer] = tokens[finer] + resize_tokens(x - old, sizes[name], sizes[finer])
            # Intermediate masks only serve deep supervision: skip them at inference.
            if self.training or i == self.num_layers - 1:
                mask = self.predict_mask(x, sizes[name], mask_features) + direct
                # The object blocks are built only with the count blocks, so ``aux`` holds this layer's centres.
                score, last = None, i == self.num_layers - 1
                if self.object_ranks is not None and last:
                    score = self.object_ranks(x, sizes[name], aux["centre_logits"], aux["centre_offsets"], kv_pooled)
                if self.object_choice is not None and last:
                    score, choice = self.object_choice(
                        x, sizes[name], aux["centre_logits"], aux["centre_offsets"], kv_pooled,
                        aux["group_logits"], words, words_valid,
                    )
                    if self.training:
                        count_outputs.update(choice)
                if score is not None:
                    mask = mask + F.interpolate(score[:, None], size=mask.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
                pred_masks.append(mask)

        no_target = self.no_target_head(torch.cat([self.decoder_norm(x).mean(dim=1), kv_pooled], dim=-1))
        return {"pred_masks": pred_masks, "no_target_logit": no_target.squeeze(-1), **count_outputs}
