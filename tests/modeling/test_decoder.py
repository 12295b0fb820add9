"""Pixel decoder, transformer decoder (pixel queries, visual-expression K/V) and losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec

from common import make_cfg
from vipa_d2.modeling import build_pixel_decoder
from vipa_d2.modeling.losses import (
    CENTRE_SIGMA_CELLS,
    VIPACriterion,
    area_loss,
    centre_heatmaps,
    centre_loss,
    choice_loss,
    cue_overlap_loss,
    group_loss,
    member_loss,
    dice_loss,
    offset_loss,
    pixel_contrastive_loss,
    sigmoid_bce_loss,
)
from vipa_d2.modeling.directional_counts import HALF_PLANES, half_plane_sums, keep_peaks, sample_at_offsets
from vipa_d2.modeling.object_ranks import MAX_RANK, ObjectChoice, ObjectRanks, count_bins, rank_counts, size_counts
from vipa_d2.modeling.transformer_decoder import VIPATransformerDecoder

SHAPES = {
    "res2": ShapeSpec(channels=8, stride=4),
    "res3": ShapeSpec(channels=16, stride=8),
    "res4": ShapeSpec(channels=24, stride=16),
    "res5": ShapeSpec(channels=32, stride=32),
}


# Narrow heads: a 32-wide model with 16-channel mask features and 3 decoder layers.
SMALL = [
    "MODEL.VIPA.HIDDEN_DIM", 32,
    "MODEL.VIPA.NHEADS", 4,
    "MODEL.VIPA.PIXEL_DECODER.MASK_DIM", 16,
    "MODEL.VIPA.DECODER.NUM_LAYERS", 3,
    "MODEL.VIPA.DECODER.DIM_FEEDFORWARD", 64,
]


def features(b=2, size=64):
    return {k: torch.randn(b, s.channels, size // s.stride, size // s.stride) for k, s in SHAPES.items()}


def test_pixel_decoder_scales_and_mask_features():
    dec = build_pixel_decoder(make_cfg(*SMALL), SHAPES)
    mask_features, multi = dec(features())
    assert mask_features.shape == (2, 16, 16, 16)  # stride 4, MASK_DIM
    assert {k: tuple(v.shape) for k, v in multi.items()} == {
        "res2": (2, 32, 16, 16), "res3": (2, 32, 8, 8), "res4": (2, 32, 4, 4), "res5": (2, 32, 2, 2)
    }
    # Stride-8 mask features when res2 is left out.
    dec = build_pixel_decoder(make_cfg(*SMALL, **{"MODEL.VIPA.PIXEL_DECODER.IN_FEATURES": ["res3", "res4", "res5"]}), SHAPES)
    assert dec(features())[0].shape == (2, 16, 8, 8)
    # Top-down path: the coarsest input influences the finest output.
    f = features()
    base = dec(f)[0]
    f["res5"] = f["res5"] + 1.0
    assert not torch.allclose(dec(f)[0], base)


def test_pixel_decoder_config_errors():
    # The backbone is named by its key, whichever it is: the hint to MODEL.TIMM.OUT_FEATURES
    # read as if every backbone were timm's (extension review, session 55).
    with pytest.raises(ValueError, match=r"PIXEL_DECODER.IN_FEATURES .* \['res1'\].*\(MODEL.BACKBONE.NAME='\w+' outputs "
                                         r"\['res2', 'res3', 'res4', 'res5'\], set by MODEL.RESNETS.OUT_FEATURES\)"):
        build_pixel_decoder(make_cfg(*SMALL, **{"MODEL.VIPA.PIXEL_DECODER.IN_FEATURES": ["res1", "res3"]}), SHAPES)
    with pytest.raises(ValueError, match="MODEL.VIPA.PIXEL_DECODER.NAME 'NoSuchDecoder' is not in the"):
        build_pixel_decoder(make_cfg(*SMALL, **{"MODEL.VIPA.PIXEL_DECODER.NAME": "NoSuchDecoder"}), SHAPES)
    with pytest.raises(ValueError, match="DECODER.IN_FEATURES"):
        VIPATransformerDecoder(make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.IN_FEATURES": ["res5", "res1"]}), SHAPES)


def decoder_inputs(b=2, t=6):
    pix = build_pixel_decoder(make_cfg(*SMALL), SHAPES).eval()
    with torch.no_grad():
        mask_features, multi = pix(features(b))
    kv = torch.randn(b, t, 32)
    kv_valid = torch.ones(b, t, dtype=torch.bool)
    kv_valid[0, 4:] = False
    return multi, mask_features, kv, kv_valid


def test_transformer_decoder_outputs_and_key_padding():
    dec = VIPATransformerDecoder(make_cfg(*SMALL), SHAPES)
    assert dec.in_features == ["res5", "res4", "res3"]
    multi, mf, kv, valid = decoder_inputs()
    dec.train()
    out = dec(multi, mf, kv, valid)
    assert len(out["pred_masks"]) == 3 and all(m.shape == (2, 16, 16) for m in out["pred_masks"])
    assert out["no_target_logit"].shape == (2,)
    dec.eval()
    out = dec(multi, mf, kv, valid)
    assert len(out["pred_masks"]) == 1  # inference: only the final mask
    # Masked (invalid) K/V tokens cannot change anything; a valid one does.
    kv2 = kv.clone()
    kv2[0, 4:] = torch.randn(2, 32) * 10
    out2 = dec(multi, mf, kv2, valid)
    assert torch.allclose(out["pred_masks"][-1], out2["pred_masks"][-1], atol=1e-5)
    assert torch.allclose(out["no_target_logit"], out2["no_target_logit"], atol=1e-5)
    kv2[0, 1] += 3.0
    out3 = dec(multi, mf, kv2, valid)
    assert not torch.allclose(out["pred_masks"][-1][0], out3["pred_masks"][-1][0], atol=1e-4)
    assert torch.allclose(out["pred_masks"][-1][1], out3["pred_masks"][-1][1], atol=1e-5)  # other sample


def test_transformer_decoder_propagates_coarse_refinement_to_finer_scales():
    # Layer 0 refines res5 only; layer 1 refines res4. Layer 1's mask depends on layer 0's
    # parameters only through the write-back/propagation to the finer scale.
    dec = VIPATransformerDecoder(make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.NUM_LAYERS": 2}), SHAPES).train()
    multi, mf, kv, valid = decoder_inputs()
    out = dec(multi, mf, kv, valid)
    out["pred_masks"][1].sum().backward()
    assert dec.layers[0].cross_attn.attn.q_proj.weight.grad.abs().sum() > 0


def test_mask_losses():
    gt = torch.zeros(1, 8, 8)
    gt[0, 2:6, 2:6] = 1
    w = torch.ones(1, 8, 8)
    good, bad = (gt * 2 - 1) * 10, (1 - gt * 2) * 10
    assert sigmoid_bce_loss(good, gt, w) < 1e-3 < sigmoid_bce_loss(bad, gt, w)
    assert dice_loss(good, gt, w) < 1e-3 and dice_loss(bad, gt, w) > 0.9
    # An empty target is satisfied by an empty prediction.
    assert dice_loss(torch.full((1, 8, 8), -10.0), torch.zeros(1, 8, 8), w) < 1e-2
    assert dice_loss(torch.full((1, 8, 8), 10.0), torch.zeros(1, 8, 8), w) > 0.9
    # Padding (weight 0) does not count.
    w_pad = w.clone()
    w_pad[0, :, 7] = 0
    bad_in_pad = good.clone()
    bad_in_pad[0, :, 7] = 10.0
    assert torch.allclose(sigmoid_bce_loss(bad_in_pad, gt, w_pad), sigmoid_bce_loss(good, gt, w_pad))
    assert torch.allclose(dice_loss(bad_in_pad, gt, w_pad), dice_loss(good, gt, w_pad))


def _softplus(x):
    return math.log1p(math.exp(x))


def test_mask_losses_equal_their_hand_computed_values():
    # Two samples that differ, padding where the target and the logits are not 0: the BCE's
    # denominator is the valid pixels, Dice is a batch mean of per-sample values over the
    # valid pixels of prediction and target alike (test review, session 53).
    logits = torch.tensor([[[2.0, -1.0, 3.0]], [[0.5, 1.5, -2.0]]])
    gt = torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]])
    w = torch.tensor([[[1.0, 1.0, 0.0]], [[1.0, 1.0, 1.0]]])
    valid = [(b, j) for b in range(2) for j in range(3) if w[b, 0, j]]
    bce = sum(_softplus(-logits[b, 0, j].item()) if gt[b, 0, j] else _softplus(logits[b, 0, j].item())
              for b, j in valid) / len(valid)
    assert sigmoid_bce_loss(logits, gt, w).item() == pytest.approx(bce, rel=1e-6)
    dice = []
    for b in range(2):
        p = [torch.sigmoid(logits[b, 0, j]).item() for j in range(3) if w[b, 0, j]]
        t = [gt[b, 0, j].item() for j in range(3) if w[b, 0, j]]
        dice.append(1 - (2 * sum(x * y for x, y in zip(p, t)) + 1) / (sum(p) + sum(t) + 1))
    assert dice_loss(logits, gt, w).item() == pytest.approx(sum(dice) / 2, rel=1e-6)


def test_pixel_contrastive_loss_equals_its_hand_computed_value():
    # Sample 0: cells covered 1.0 / 0.6 (positives), 0.3 (a border cell: ignored), 0 (two
    # negatives). Sample 1: a tiny target, 0.4 at most: that cell is the positive. Each
    # positive against all negatives, averaged over positives, then over cues.
    t = 0.5
    target = torch.tensor([[1.0, 0.6, 0.3, 0.0, 0.0], [0.4, 0.1, 0.0, 0.0, 0.0]])
    rel = torch.tensor([[[2.0, 0.5, 9.0, 1.0, -1.0]], [[0.2, 9.0, 0.7, -0.3, 0.1]]])
    token_valid = torch.ones(2, 5, dtype=torch.bool)
    token_valid[1, 4] = False  # not a negative either

    def term(r, p, negatives):
        return -math.log(math.exp(r[p] / t) / (math.exp(r[p] / t) + sum(math.exp(r[n] / t) for n in negatives)))

    r0, r1 = rel[0, 0].tolist(), rel[1, 0].tolist()
    expected = ((term(r0, 0, [3, 4]) + term(r0, 1, [3, 4])) / 2 + term(r1, 0, [2, 3])) / 2
    loss = pixel_contrastive_loss(rel, torch.ones(2, 1, dtype=torch.bool), target, token_valid, t)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pixel_contrastive_loss():
    target = torch.zeros(2, 10)
    target[:, :3] = 1.0
    target[1] = 0.0  # sample 1: no target -> skipped
    token_valid = torch.ones(2, 10, dtype=torch.bool)
    cue_valid = torch.ones(2, 4, dtype=torch.bool)
    aligned = torch.full((2, 4, 10), -1.0)
    aligned[:, :, :3] = 1.0
    loss_good = pixel_contrastive_loss(aligned, cue_valid, target, token_valid, 0.1)
    loss_bad = pixel_contrastive_loss(-aligned, cue_valid, target, token_valid, 0.1)
    assert loss_good < 1e-3 and loss_bad > 10
    # The no-target sample's relevance does not matter.
    other = aligned.clone()
    other[1] = torch.randn(4, 10)
    assert torch.allclose(pixel_contrastive_loss(other, cue_valid, target, token_valid, 0.1), loss_good)
    # Invalid cues do not count.
    cue_valid2 = cue_valid.clone()
    cue_valid2[0, 3] = False
    mixed = aligned.clone()
    mixed[0, 3] = -aligned[0, 3]
    assert torch.allclose(pixel_contrastive_loss(mixed, cue_valid2, target, token_valid, 0.1), loss_good)
    # All samples empty: zero loss, still differentiable.
    rel = torch.randn(2, 4, 10, requires_grad=True)
    loss = pixel_contrastive_loss(rel, cue_valid, torch.zeros(2, 10), token_valid, 0.1)
    assert loss.item() == 0.0
    loss.backward()


def test_criterion_names_and_weights():
    cfg = make_cfg(*SMALL, **{"MODEL.VIPA.LOSS.BCE_WEIGHT": 3.0})
    crit = VIPACriterion(cfg)
    preds = [torch.randn(2, 8, 8) for _ in range(3)]
    gt = torch.zeros(2, 32, 32)
    gt[0, 8:20, 8:20] = 1
    valid = torch.ones(2, 32, 32)
    empty = torch.tensor([False, True])
    rel = torch.randn(2, 5, 16)
    losses = crit(preds, torch.zeros(2), gt, valid, empty, rel, (4, 4), torch.ones(2, 5, dtype=torch.bool))
    assert set(losses) == {
        "loss_bce", "loss_dice", "loss_bce_0", "loss_dice_0", "loss_bce_1", "loss_dice_1",
        "loss_contrastive", "loss_no_target",
    }
    assert all(torch.isfinite(v) for v in losses.values())
    target = torch.nn.functional.adaptive_avg_pool2d(gt[:, None], (8, 8))[:, 0]
    assert torch.allclose(losses["loss_bce"], 3.0 * sigmoid_bce_loss(preds[-1], target, torch.ones(2, 8, 8)))
    crit = VIPACriterion(make_cfg(*SMALL, **{"MODEL.VIPA.LOSS.DEEP_SUPERVISION": False}))
    losses = crit(preds, torch.zeros(2), gt, valid, empty)  # no relevance: no contrastive loss
    assert set(losses) == {"loss_bce", "loss_dice", "loss_no_target"}
    # The no-target head learns to say "empty" for the empty sample (1) and not for the other.
    logit = torch.tensor([2.0, -1.0])
    expected = (_softplus(2.0) + _softplus(1.0)) / 2  # -log(1 - sigmoid(2)), -log(sigmoid(-1))
    assert crit(preds, logit, gt, valid, empty)["loss_no_target"].item() == pytest.approx(expected, rel=1e-6)


def test_pixel_decoder_coordinates_and_self_attention_see_the_whole_image():
    # No GroupNorm: its statistics would mix the whole map even without self-attention.
    opts = {"MODEL.VIPA.PIXEL_DECODER.IN_FEATURES": ["res3", "res4", "res5"], "MODEL.VIPA.PIXEL_DECODER.NORM": ""}
    plain = build_pixel_decoder(make_cfg(*SMALL, **opts), SHAPES).eval()
    assert plain.lateral_convs[0].weight.shape[1] == SHAPES["res3"].channels and len(plain.encoder) == 0
    opts.update({"MODEL.VIPA.PIXEL_DECODER.COORDINATES": True, "MODEL.VIPA.PIXEL_DECODER.TRANSFORMER_LAYERS": 2})
    dec = build_pixel_decoder(make_cfg(*SMALL, **opts), SHAPES).eval()
    assert dec.lateral_convs[0].weight.shape[1] == SHAPES["res3"].channels + 2 and len(dec.encoder) == 2
    # Coordinates: identical features at two places give different outputs.
    f = {k: torch.ones(1, s.channels, 128 // s.stride, 128 // s.stride) for k, s in SHAPES.items()}
    with torch.no_grad():
        out = dec(f)[1]["res5"][0]
        assert not torch.allclose(out[:, 0, 0], out[:, -1, -1], atol=1e-4)
        # Self-attention: a change in one corner of the coarsest level reaches the opposite
        # corner, which the 1x1 lateral and 3x3 output convs alone cannot do at 4x4.
        g = features(1, 128)
        base = dec(g)[1]["res5"][0, :, -1, -1]
        g["res5"][0, :, 0, 0] += 5.0
        assert not torch.allclose(dec(g)[1]["res5"][0, :, -1, -1], base, atol=1e-4)
        base_plain = plain(g)[1]["res5"][0, :, -1, -1]
        g["res5"][0, :, 0, 0] -= 5.0
        assert torch.allclose(plain(g)[1]["res5"][0, :, -1, -1], base_plain)


def test_pixel_self_attention_runs_on_the_configured_level():
    opts = {
        "MODEL.VIPA.PIXEL_DECODER.IN_FEATURES": ["res3", "res4", "res5"],
        "MODEL.VIPA.PIXEL_DECODER.NORM": "",
        "MODEL.VIPA.PIXEL_DECODER.TRANSFORMER_LAYERS": 1,
        "MODEL.VIPA.PIXEL_DECODER.TRANSFORMER_FEATURE": "res4",
    }
    dec = build_pixel_decoder(make_cfg(*SMALL, **opts), SHAPES).eval()
    g = features(1, 128)
    with torch.no_grad():
        base = dec(g)[1]["res4"][0, :, -1, -1]
        g["res4"][0, :, 0, 0] += 5.0
        # Stride 16 is 8x8 here: only self-attention carries one corner to the other.
        assert not torch.allclose(dec(g)[1]["res4"][0, :, -1, -1], base, atol=1e-4)
    opts["MODEL.VIPA.PIXEL_DECODER.TRANSFORMER_FEATURE"] = "res2"
    with pytest.raises(ValueError, match="TRANSFORMER_FEATURE='res2'.*IN_FEATURES"):
        build_pixel_decoder(make_cfg(*SMALL, **opts), SHAPES)


def test_null_kv_and_kv_kernel():
    dec = VIPATransformerDecoder(
        make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.NULL_KV": True, "MODEL.VIPA.DECODER.KV_KERNEL": True}), SHAPES
    ).eval()
    plain = VIPATransformerDecoder(make_cfg(*SMALL), SHAPES).eval()
    assert dec.null_embed.shape == (1, 1, 32) and plain.null_embed is None and plain.kv_kernel is None
    multi, mf, kv, valid = decoder_inputs()
    with torch.no_grad():
        out = dec(multi, mf, kv, valid)["pred_masks"][-1]
        # Invalid K/V tokens stay invisible with the null token appended.
        kv2 = kv.clone()
        kv2[0, 4:] = 10.0
        torch.testing.assert_close(dec(multi, mf, kv2, valid)["pred_masks"][-1], out)
        # The null token takes part: changing it changes the masks.
        dec.null_embed.add_(1.0)
        assert not torch.allclose(dec(multi, mf, kv, valid)["pred_masks"][-1], out, atol=1e-4)
        dec.null_embed.sub_(1.0)
        # The kernel starts at zero (no say before training); once trained, its term is the
        # pooled-K/V kernel dotted with the mask features.
        dec.kv_kernel = None
        torch.testing.assert_close(dec(multi, mf, kv, valid)["pred_masks"][-1], out)
        dec = VIPATransformerDecoder(
            make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.NULL_KV": True, "MODEL.VIPA.DECODER.KV_KERNEL": True}), SHAPES
        ).eval()
        torch.nn.init.normal_(dec.kv_kernel[-1].weight)
        out = dec(multi, mf, kv, valid)["pred_masks"][-1]
        kernel = dec.kv_kernel((kv * valid[..., None]).sum(1) / valid.sum(1, keepdim=True))
        direct = torch.einsum("bdhw,bd->bhw", mf, kernel)
        dec.kv_kernel = None
        torch.testing.assert_close(dec(multi, mf, kv, valid)["pred_masks"][-1] + direct, out)


def test_mask_refinement_feature_gives_finer_masks():
    opts = {"MODEL.VIPA.PIXEL_DECODER.IN_FEATURES": ["res3", "res4", "res5"]}
    coarse = build_pixel_decoder(make_cfg(*SMALL, **opts), SHAPES)
    fine = build_pixel_decoder(make_cfg(*SMALL, **opts, **{"MODEL.VIPA.PIXEL_DECODER.MASK_REFINE_FEATURE": "res2"}), SHAPES)
    f = features()
    assert coarse(f)[0].shape == (2, 16, 8, 8) and coarse.mask_stride == 8
    assert fine(f)[0].shape == (2, 16, 16, 16) and fine.mask_stride == 4
    # At the start the finer masks are the coarse ones upsampled (the projection is zero) ...
    fine.load_state_dict(coarse.state_dict(), strict=False)
    up = torch.nn.functional.interpolate(coarse(f)[0], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(fine(f)[0], up)
    # ... and res2 reaches them through what the projection learns.
    fine(f)[0].square().sum().backward()
    assert fine.refine_lateral.weight.grad.abs().sum() > 0
    torch.nn.init.normal_(fine.refine_lateral.weight)
    base = fine(f)[0]
    f["res2"] = f["res2"] + 1.0
    assert not torch.allclose(fine(f)[0], base)
    with pytest.raises(ValueError, match="MASK_REFINE_FEATURE"):
        build_pixel_decoder(make_cfg(*SMALL, **{"MODEL.VIPA.PIXEL_DECODER.MASK_REFINE_FEATURE": "res1"}), SHAPES)
    with pytest.raises(ValueError, match="finer than the mask features"):
        build_pixel_decoder(make_cfg(*SMALL, **opts, **{"MODEL.VIPA.PIXEL_DECODER.MASK_REFINE_FEATURE": "res4"}), SHAPES)


def test_contrastive_loss_on_the_global_cue_only():
    gt = torch.zeros(1, 16, 16)
    gt[0, :8, :8] = 1
    valid = torch.ones(1, 16, 16)
    rel = torch.randn(1, 4, 16, requires_grad=True)
    cues = torch.ones(1, 4, dtype=torch.bool)
    crit = VIPACriterion(make_cfg(*SMALL, **{"MODEL.VIPA.LOSS.CONTRASTIVE_CUES": "global"}))
    loss = crit([torch.randn(1, 4, 4)], torch.zeros(1), gt, valid, torch.tensor([False]), rel, (4, 4), cues)
    loss["loss_contrastive"].backward()
    assert rel.grad[0, 0].abs().sum() > 0 and (rel.grad[0, 1:] == 0).all()
    # Same value as the loss over a cue mask holding [CLS] alone.
    only_cls = torch.zeros_like(cues)
    only_cls[0, 0] = True
    target = torch.nn.functional.adaptive_avg_pool2d(gt[:, None], (4, 4))[:, 0].flatten(1)
    expected = 0.5 * pixel_contrastive_loss(rel, only_cls, target, torch.ones(1, 16, dtype=torch.bool), 0.1)
    torch.testing.assert_close(loss["loss_contrastive"], expected)
    with pytest.raises(ValueError, match="CONTRASTIVE_CUES"):
        VIPACriterion(make_cfg(*SMALL, **{"MODEL.VIPA.LOSS.CONTRASTIVE_CUES": "words"}))
    with pytest.raises(ValueError, match="GLOBAL_CUE"):
        VIPACriterion(make_cfg(*SMALL, **{"MODEL.VIPA.LOSS.CONTRASTIVE_CUES": "global", "MODEL.VIPA.VEG.GLOBAL_CUE": False}))
    # Centred word rows sum to zero at every token: a loss pulling each to the target is
    # refused (the local-cues ablation inherited the pair from Base-VIPA; model review, session 57).
    words = {"MODEL.VIPA.LOSS.CONTRASTIVE_CUES": "all", "MODEL.VIPA.VEG.CENTRE_WORDS": True}
    with pytest.raises(ValueError, match=r"CENTRE_WORDS True centres .* cannot all be pulled to it"):
        VIPACriterion(make_cfg(*SMALL, **words))
    VIPACriterion(make_cfg(*SMALL, **words, **{"MODEL.VIPA.LOSS.CONTRASTIVE_WEIGHT": 0.0}))  # no such loss
    VIPACriterion(make_cfg(*SMALL, **{**words, "MODEL.VIPA.VEG.CENTRE_WORDS": False}))


def test_landmark_loss_supervises_the_landmark_words_only():
    gt, landmark = torch.zeros(1, 16, 16), torch.zeros(1, 16, 16)
    gt[0, :8, :8] = 1
    landmark[0, 8:, 8:] = 1
    valid = torch.ones(1, 16, 16)
    cues = torch.ones(1, 4, dtype=torch.bool)
    words = torch.tensor([[False, False, True, True, False]])  # T_max 5: relevance was trimmed to 4
    crit = VIPACriterion(make_cfg(*SMALL, **{"MODEL.VIPA.LOSS.LANDMARK_WEIGHT": 2.0}))
    rel = torch.randn(1, 4, 16, requires_grad=True)
    loss = crit([torch.randn(1, 4, 4)], torch.zeros(1), gt, valid, torch.tensor([False]), rel, (4, 4), cues,
                landmark_masks=landmark, landmark_tokens=words)
    loss["loss_landmark"].backward()
    assert (rel.grad[0, :2] == 0).all() and rel.grad[0, 2:].abs().sum() > 0
    # The target loss leaves the landmark words alone ("all" cues otherwise).
    rel.grad = None
    loss["loss_contrastive"].backward()
    assert (rel.grad[0, 2:] == 0).all() and rel.grad[0, :2].abs().sum() > 0
    # Relevance on the landmark scores better than relevance on the target.
    def landmark_loss(rows):
        return crit([torch.randn(1, 4, 4)], torch.zeros(1), gt, valid, torch.tensor([False]), rows, (4, 4), cues,
                    landmark_masks=landmark, landmark_tokens=words)["loss_landmark"]
    on = lambda m: torch.nn.functional.adaptive_avg_pool2d(m[:, None], (4, 4))[:, 0].flatten(1)[:, None].repeat(1, 4, 1)  # noqa: E731
    assert landmark_loss(5 * on(landmark)) < landmark_loss(5 * on(gt))
    # Off by default: no landmark loss, no inputs needed.
    assert "loss_landmark" not in VIPACriterion(make_cfg(*SMALL))(
        [torch.randn(1, 4, 4)], torch.zeros(1), gt, valid, torch.tensor([False]), rel, (4, 4), cues)


def test_cue_overlap_loss_is_the_jaccard_of_the_retrieved_sets():
    """On well-separated rows the soft sets are the hard top-k: same sets give 1, disjoint 0,
    half-shared 1/3; invalid cues and samples without a pair do not count."""
    valid = torch.ones(1, 8, dtype=torch.bool)
    rows = torch.full((1, 4, 8), -1.0)
    rows[0, 0, :2] = rows[0, 1, :2] = 1.0  # the same two tokens
    rows[0, 2, 2:4] = 1.0  # two others
    rows[0, 3, 1:3] = 1.0  # one of each
    def overlap(rel, cues, tokens=valid):
        return cue_overlap_loss(rel, cues, tokens, ratio=0.2, temperature=0.01)  # k = 2 of 8, 1 of 7
    pick = lambda *i: torch.tensor([[k in i for k in range(4)]])
    torch.testing.assert_close(overlap(rows, pick(0, 1)), torch.tensor(1.0))
    torch.testing.assert_close(overlap(rows, pick(0, 2)), torch.tensor(0.0))
    torch.testing.assert_close(overlap(rows, pick(0, 3)), torch.tensor(1 / 3))
    torch.testing.assert_close(overlap(rows, pick(0, 1, 2)), torch.tensor(1 / 3))  # pairs 1, 0, 0
    # A second sample with a single cue has no pair: the mean stays the first sample's.
    two = torch.cat([rows, torch.randn(1, 4, 8)])
    torch.testing.assert_close(overlap(two, torch.cat([pick(0, 1), pick(2)])), torch.tensor(1.0))
    # Tokens outside the image are never part of a set (k counts the valid ones only).
    inside = valid.clone()
    inside[0, 1] = False
    torch.testing.assert_close(overlap(rows, pick(0, 3), inside), torch.tensor(0.0))  # {0} and {2}
    # The gradient pulls shared tokens down in one of the rows.
    rel = rows.clone().requires_grad_(True)
    cue_overlap_loss(rel, pick(0, 3), valid, ratio=0.2, temperature=0.5).backward()
    assert rel.grad[0, 0, 1] > 0 and rel.grad[0, 3, 1] > 0 and (rel.grad[0, 1:3] == 0).all()


def test_cue_overlap_loss_leaves_the_global_cue_out():
    gt = torch.zeros(1, 16, 16)
    gt[0, :8, :8] = 1
    valid = torch.ones(1, 16, 16)
    cues = torch.tensor([[True, True, True, False]])
    crit = VIPACriterion(make_cfg(*SMALL, **{"MODEL.VIPA.LOSS.CUE_OVERLAP_WEIGHT": 2.0}))
    rel = torch.randn(1, 4, 16, requires_grad=True)
    loss = crit([torch.randn(1, 4, 4)], torch.zeros(1), gt, valid, torch.tensor([False]), rel, (4, 4), cues)
    expected = 2.0 * cue_overlap_loss(rel, torch.tensor([[False, True, True, False]]), torch.ones(1, 16, dtype=torch.bool),
                                      ratio=0.3, temperature=0.1)  # the VEG's RATIO and TEMPERATURE
    torch.testing.assert_close(loss["loss_cue_overlap"], expected)
    assert "loss_cue_overlap" not in VIPACriterion(make_cfg(*SMALL))(
        [torch.randn(1, 4, 4)], torch.zeros(1), gt, valid, torch.tensor([False]), rel, (4, 4), cues)
    with pytest.raises(ValueError, match="retrieval_ratio and retrieval_temperature"):
        VIPACriterion(bce_weight=1.0, dice_weight=1.0, contrastive_weight=0.0, contrastive_temperature=0.1,
                      deep_supervision=False, no_target_weight=1.0, cue_overlap_weight=1.0)
    with pytest.raises(ValueError, match="CUE_OVERLAP_WEIGHT.*STEP1"):
        VIPACriterion(make_cfg(*SMALL, **{"MODEL.VIPA.LOSS.CUE_OVERLAP_WEIGHT": 1.0, "MODEL.VIPA.VEG.STEP1": False}))


def test_half_plane_sums_count_cells_strictly_on_each_side():
    # Two one-cell "objects" on a 3x4 grid: (row 0, col 1) and (row 2, col 3).
    maps = torch.zeros(1, 3, 4, 1)
    maps[0, 0, 1, 0] = maps[0, 2, 3, 0] = 1.0
    sums = half_plane_sums(maps)[0, ..., 0]  # (3, 4, 4): left, right, above, below
    assert sums[1, 2].tolist() == [1.0, 1.0, 1.0, 1.0]  # centre cell: one object each way
    assert sums[0, 1].tolist() == [0.0, 1.0, 0.0, 1.0]  # an object does not count itself
    assert sums[2, 0].tolist() == [0.0, 2.0, 1.0, 0.0]
    assert sums[0, 3].tolist() == [1.0, 0.0, 0.0, 1.0]  # its own column is not "left"


def test_directional_counts_start_as_identity_and_learn():
    cfg = make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.COUNT_MAPS": 4})
    torch.manual_seed(0)
    dec = VIPATransformerDecoder(cfg, SHAPES).train()
    assert dec.counts is not None and len(dec.counts) == 3
    torch.manual_seed(0)
    plain = VIPATransformerDecoder(make_cfg(*SMALL), SHAPES).train()
    assert plain.counts is None
    plain.load_state_dict({k: v for k, v in dec.state_dict().items() if not k.startswith("counts.")})
    multi, mf, kv, valid = decoder_inputs()
    out = dec(multi, mf, kv, valid)["pred_masks"]
    for a, b in zip(out, plain(multi, mf, kv, valid)["pred_masks"]):
        torch.testing.assert_close(a, b)  # zero-started block: nothing changes before training
    out[-1].sum().backward()
    assert dec.counts[-1].mlp[-1].weight.grad.abs().sum() > 0
    # Once trained, a pixel's token depends on what lies in its half-planes.
    torch.nn.init.normal_(dec.counts[0].mlp[-1].weight)
    x = torch.randn(2, 12, 32)
    y, aux = dec.counts[0](x, (3, 4))
    assert aux == {}  # no centre maps unless asked
    x2 = x.clone()
    x2[:, 11] = torch.randn(2, 32) * 5  # the bottom-right cell changes; the top-left token sees it
    assert not torch.allclose(dec.counts[0](x2, (3, 4))[0][:, 0], y[:, 0], atol=1e-5)


def test_centre_heatmaps_peak_at_box_centres():
    # A 64 x 32 input on an (8, 4) grid: cells of 8 x 8 pixels.
    boxes = [torch.tensor([[16.0, 8.0, 32.0, 24.0], [0.0, 48.0, 16.0, 64.0]]), torch.zeros(0, 4)]
    heat = centre_heatmaps(boxes, (8, 4), (64, 32))
    assert heat.shape == (2, 8, 4) and not heat[1].any()  # an image without objects: all zero
    # First box: centre (24, 16) px = cell coordinates (x 2.5, y 1.5), between four cells.
    expected = math.exp(-0.5 / (2 * CENTRE_SIGMA_CELLS**2))
    for r, c in ((1, 2), (1, 3), (2, 2), (2, 3)):
        assert heat[0, r, c].item() == pytest.approx(expected)
    # Second box: centre (8, 56) px = cell (x 0.5, y 6.5): again four equal cells.
    assert heat[0, 6, 0].item() == pytest.approx(expected) and heat[0, 7, 1].item() == pytest.approx(expected)
    assert heat[0].max().item() == pytest.approx(expected) and heat.min().item() >= 0


def test_count_centres_gate_the_maps_and_are_trained():
    with pytest.raises(ValueError, match="COUNT_CENTRES needs MODEL.VIPA.DECODER.COUNT_MAPS > 0"):
        VIPATransformerDecoder(make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.COUNT_CENTRES": True}), SHAPES)
    cfg = make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.COUNT_MAPS": 4, "MODEL.VIPA.DECODER.COUNT_CENTRES": True})
    torch.manual_seed(0)
    dec = VIPATransformerDecoder(cfg, SHAPES).train()
    multi, mf, kv, valid = decoder_inputs()
    out = dec(multi, mf, kv, valid)
    grids = [tuple(multi[dec.in_features[i % len(dec.in_features)]].shape[-2:]) for i in range(3)]
    assert [tuple(c.shape[-2:]) for c in out["centre_logits"]] == grids
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.zeros(0, 4)]
    sum(centre_loss(c, boxes, (32, 32)) for c in out["centre_logits"]).backward()
    assert all(block.centre.weight.grad.abs().sum() > 0 for block in dec.counts)
    assert "centre_logits" not in dec.eval()(multi, mf, kv, valid)  # inference needs no centre maps
    # A closed centre map counts nothing, whatever the gates: the sums vanish.
    block = dec.counts[0]
    torch.nn.init.normal_(block.mlp[-1].weight)
    torch.nn.init.constant_(block.centre.bias, -1e4)
    torch.nn.init.zeros_(block.centre.weight)
    x = torch.randn(2, 12, 32)
    x2 = x.clone()
    x2[:, 11] = torch.randn(2, 32) * 5
    torch.testing.assert_close(block(x2, (3, 4))[0][:, 0], block(x, (3, 4))[0][:, 0])


def test_group_loss_reads_the_gate_at_each_objects_centre():
    # A 64 x 32 input on an (8, 4) grid; the first box is centred on cell (row 2, col 1)
    # exactly, the second on cell (row 6, col 2).
    boxes = [torch.tensor([[8.0, 16.0, 16.0, 24.0], [16.0, 48.0, 24.0, 56.0]]), torch.zeros(0, 4)]
    in_group = [torch.tensor([True, False]), torch.zeros(0, dtype=torch.bool)]
    right = torch.zeros(2, 8, 4)
    right[0] = -20.0
    right[0, :5] = 20.0  # open on the first object's side of the image, closed on the second's
    loss = group_loss(right, boxes, in_group, (64, 32)).item()
    assert loss < 1.0  # only the tails of the centre Gaussians reach the wrong side
    # Each object's weights sum to 1 and every cell costs 0 or 20 either way, so the
    # gate with the membership swapped costs the rest of 20; no objects, no loss.
    swapped = group_loss(right, boxes, [torch.tensor([False, True]), in_group[1]], (64, 32)).item()
    assert loss + swapped == pytest.approx(20.0, rel=1e-4)
    assert group_loss(right, [torch.zeros(0, 4)] * 2, [in_group[1]] * 2, (64, 32)).item() == 0
    # The cells at a centre weigh most: closing the gate there costs far more than far away.
    at_centre, far = right.clone(), right.clone()
    at_centre[0, 2, 1] = -20.0
    far[0, 0, 3] = -20.0
    assert group_loss(at_centre, boxes, in_group, (64, 32)).item() - loss > 1.0
    assert group_loss(far, boxes, in_group, (64, 32)).item() - loss < 0.1


def test_group_loss_per_layer_and_needs_the_centre_maps():
    with pytest.raises(ValueError, match="GROUP_WEIGHT > 0 supervises the gates.*COUNT_CENTRES True"):
        VIPACriterion(make_cfg(*SMALL, **{"MODEL.VIPA.LOSS.GROUP_WEIGHT": 1.0}))
    cfg = make_cfg(*SMALL, **{
        "MODEL.VIPA.DECODER.COUNT_MAPS": 4, "MODEL.VIPA.DECODER.COUNT_CENTRES": True, "MODEL.VIPA.LOSS.GROUP_WEIGHT": 1.0,
    })
    torch.manual_seed(0)
    dec = VIPATransformerDecoder(cfg, SHAPES).train()
    multi, mf, kv, valid = decoder_inputs()
    out = dec(multi, mf, kv, valid)
    assert [g.shape for g in out["group_logits"]] == [c.shape for c in out["centre_logits"]]
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0], [16.0, 16.0, 32.0, 32.0]]), torch.zeros(0, 4)]
    in_group = [torch.tensor([True, False]), torch.zeros(0, dtype=torch.bool)]
    sum(group_loss(g, boxes, in_group, (32, 32)) for g in out["group_logits"]).backward()
    # Only the supervised map's gate gets gradient from it.
    for block in dec.counts:
        grad = block.maps.weight.grad.abs().sum(dim=1)
        assert grad[0] > 0 and not grad[1:].any()
    assert "group_logits" not in dec.eval()(multi, mf, kv, valid)


def test_group_gate_only_trains_the_gate_and_nothing_before_it():
    """LOSS.GROUP_GATE_ONLY: the same group logits, but their loss reaches only the gate's
    weights, never the tokens (nor the layers that made them); it needs a group loss."""
    with pytest.raises(ValueError, match="GROUP_GATE_ONLY True limits what the group loss trains.*GROUP_WEIGHT is 0.0"):
        VIPACriterion(make_cfg(*SMALL, **{"MODEL.VIPA.LOSS.GROUP_GATE_ONLY": True}))
    keys = {"MODEL.VIPA.DECODER.COUNT_MAPS": 4, "MODEL.VIPA.DECODER.COUNT_CENTRES": True}
    multi, mf, kv, valid = decoder_inputs()
    kv.requires_grad_(True)
    logits, grads = {}, {}
    for gate_only in (False, True):
        torch.manual_seed(0)
        dec = VIPATransformerDecoder(make_cfg(*SMALL, **keys, **{"MODEL.VIPA.LOSS.GROUP_GATE_ONLY": gate_only}), SHAPES).train()
        kv.grad = None
        out = dec(multi, mf, kv, valid)
        sum(g.sum() for g in out["group_logits"]).backward()
        logits[gate_only] = [g.detach() for g in out["group_logits"]]
        grads[gate_only] = (kv.grad, dec.counts[-1].maps.weight.grad[0], dec.layers[0].ffn.linear1.weight.grad)
    for a, b in zip(logits[False], logits[True]):
        torch.testing.assert_close(a, b)
    assert grads[False][0].abs().sum() > 0 and grads[False][2].abs().sum() > 0
    assert grads[True][0] is None and grads[True][2] is None  # the tokens get nothing
    assert grads[True][1].abs().sum() > 0


def test_sample_at_offsets_reads_the_cell_moved_to():
    grid = torch.arange(12.0).view(1, 3, 4, 1)  # value = 4 * row + column
    offsets = torch.zeros(1, 3, 4, 2)
    torch.testing.assert_close(sample_at_offsets(grid, offsets), grid)
    offsets[0, 0, 0] = torch.tensor([2.0, 1.0])  # cell (0, 0) reads cell (1, 2)
    offsets[0, 2, 3] = torch.tensor([-0.5, 0.0])  # halfway between (2, 2) and (2, 3)
    offsets[0, 1, 1] = torch.tensor([9.0, -9.0])  # off the grid: the border cell (0, 3)
    out = sample_at_offsets(grid, offsets)[0, ..., 0]
    assert out[0, 0].item() == pytest.approx(6.0)
    assert out[2, 3].item() == pytest.approx(10.5)
    assert out[1, 1].item() == pytest.approx(3.0)


def test_offset_loss_points_each_cell_in_a_box_at_its_centre():
    # A 32 x 32 input on a (4, 4) grid: cells of 8 x 8 pixels. A large box holds a small one;
    # the cells of the small one belong to it.
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 16.0], [16.0, 0.0, 32.0, 8.0]]), torch.zeros(0, 4)]
    target = torch.zeros(2, 4, 4, 2)
    for r in range(2):
        for c in range(4):
            target[0, r, c] = torch.tensor([2.0 - (c + 0.5), 1.0 - (r + 0.5)])  # large box: centre (2, 1)
    for c in (2, 3):
        target[0, 0, c] = torch.tensor([3.0 - (c + 0.5), 0.5 - 0.5])  # small box: centre (3, 0.5)
    assert offset_loss(target, boxes, (32, 32)).item() == pytest.approx(0.0, abs=1e-6)
    # Cells outside every box (rows 2-3, and the whole second image) are not trained.
    off = target.clone()
    off[0, 2:] = 100.0
    off[1] = 100.0
    assert offset_loss(off, boxes, (32, 32)).item() == pytest.approx(0.0, abs=1e-6)
    # The mean over the 8 held cells: one cell off by (1, 1) costs 2 / 8.
    off[0, 1, 1] += 1.0
    assert offset_loss(off, boxes, (32, 32)).item() == pytest.approx(0.25)
    assert offset_loss(off, [torch.zeros(0, 4)] * 2, (32, 32)).item() == 0


def test_counts_at_object_centres_are_the_same_on_all_of_an_objects_cells():
    with pytest.raises(ValueError, match="COUNT_AT_OBJECT_CENTRES needs MODEL.VIPA.DECODER.COUNT_CENTRES True"):
        VIPATransformerDecoder(
            make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.COUNT_MAPS": 4, "MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES": True}),
            SHAPES,
        )
    cfg = make_cfg(*SMALL, **{
        "MODEL.VIPA.DECODER.COUNT_MAPS": 4, "MODEL.VIPA.DECODER.COUNT_CENTRES": True,
        "MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES": True,
    })
    torch.manual_seed(0)
    dec = VIPATransformerDecoder(cfg, SHAPES).train()
    multi, mf, kv, valid = decoder_inputs()
    out = dec(multi, mf, kv, valid)
    assert [tuple(o.shape) for o in out["centre_offsets"]] == [(*c.shape, 2) for c in out["centre_logits"]]
    boxes = [torch.tensor([[0.0, 0.0, 24.0, 24.0]]), torch.zeros(0, 4)]  # holds a cell centre of every grid
    sum(offset_loss(o, boxes, (32, 32)) for o in out["centre_offsets"]).backward()
    assert all(block.offset.weight.grad.abs().sum() > 0 for block in dec.counts)
    assert "centre_offsets" not in dec.eval()(multi, mf, kv, valid)
    # What a cell reads at its object's centre does not depend on which of the object's
    # cells it is: with the own-cell half of the features switched off, two cells whose
    # offsets point at the same centre get the same change.
    block = dec.counts[0]
    torch.nn.init.normal_(block.mlp[0].weight)
    torch.nn.init.normal_(block.mlp[-1].weight)
    own = block.mlp[0].weight.shape[1] // 2
    with torch.no_grad():
        block.mlp[0].weight[:, :own] = 0.0
    x = torch.randn(1, 12, 32)
    offsets = torch.zeros(1, 3, 4, 2)
    offsets[0, 1, 1] = torch.tensor([1.0, 0.0])  # cells (1, 1) and (1, 3) both read (1, 2)
    offsets[0, 1, 3] = torch.tensor([-1.0, 0.0])
    block.offset.forward = lambda normed: offsets.flatten(1, 2)
    y, aux = block(x, (3, 4))
    change = (y - x).view(3, 4, -1)
    torch.testing.assert_close(change[1, 1], change[1, 2])
    torch.testing.assert_close(change[1, 3], change[1, 2])
    assert not torch.allclose(change[1, 0], change[1, 2])


def test_keep_peaks_keeps_one_cell_per_object_above_the_threshold():
    # Two objects' Gaussians (one centred between cells), a background bump below the threshold.
    h, w = 12, 16
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    centre = torch.maximum(torch.exp(-((ys - 3) ** 2 + (xs - 3) ** 2) / 2), torch.exp(-((ys - 8) ** 2 + (xs - 10.4) ** 2) / 2))
    centre[11, 15] = 0.3
    peaks = keep_peaks(centre[None])[0]
    assert peaks.nonzero().tolist() == [[3, 3], [8, 10]]
    torch.testing.assert_close(peaks[3, 3], centre[3, 3])
    # The sums then count objects: one peak left of the second object's column, one above its row.
    sums = half_plane_sums(peaks[None, ..., None])[0, 8, 10, :, 0]
    assert sums[0] == pytest.approx(1.0, abs=0.01) and sums[2] == pytest.approx(1.0, abs=0.01)
    assert sums[1] == 0 and sums[3] == 0
    # The kept values carry the gradient; the cells left out get none.
    c = centre[None].clone().requires_grad_()
    keep_peaks(c).sum().backward()
    assert c.grad[0, 3, 3] == 1 and c.grad[0, 3, 4] == 0


def test_count_peaks_need_the_centre_maps_and_count_only_peaks():
    with pytest.raises(ValueError, match="COUNT_PEAKS needs MODEL.VIPA.DECODER.COUNT_CENTRES True"):
        VIPATransformerDecoder(
            make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.COUNT_MAPS": 4, "MODEL.VIPA.DECODER.COUNT_PEAKS": True}), SHAPES
        )
    cfg = make_cfg(*SMALL, **{
        "MODEL.VIPA.DECODER.COUNT_MAPS": 4, "MODEL.VIPA.DECODER.COUNT_CENTRES": True,
        "MODEL.VIPA.DECODER.COUNT_PEAKS": True,
    })
    torch.manual_seed(0)
    dec = VIPATransformerDecoder(cfg, SHAPES).train()
    assert all(block.peaks for block in dec.counts)
    block = dec.counts[0]
    torch.nn.init.normal_(block.mlp[-1].weight)
    torch.nn.init.zeros_(block.maps.weight)
    torch.nn.init.constant_(block.maps.bias, 1e4)  # every gate open
    x = torch.randn(1, 12, 32)
    # A centre map with one peak at cell (1, 2) and a lower plateau beside it: only the peak
    # counts, so raising the neighbour (still below the peak) changes nothing.
    logits = torch.full((1, 3, 4), -1e4)
    logits[0, 1, 2], logits[0, 1, 1] = 3.0, 1.0
    block.centre.forward = lambda normed: logits.flatten(1)[..., None]
    before, _ = block(x, (3, 4))
    logits[0, 1, 1] = 2.0
    after, _ = block(x, (3, 4))
    torch.testing.assert_close(after, before)
    logits[0, 1, 1] = 4.0  # now the neighbour is the peak: the counts move
    assert not torch.allclose(block(x, (3, 4))[0], before)


def test_rank_counts_and_bins_count_the_weighted_candidates_on_each_side():
    xs, ys = torch.tensor([[1.0, 4.0, 6.0, 4.0]]), torch.tensor([[1.0, 0.0, 2.0, 2.0]])
    weight = torch.tensor([[1.0, 1.0, 0.5, 0.0]])
    counts = rank_counts(xs, ys, weight)[0]
    # Candidate 1 (column 4): one member left (column 1); right: 0.5 (column 6); the
    # weightless candidate 3 in its own column counts on neither side.
    assert counts.tolist() == [[0.0, 1.5, 1.0, 0.5], [1.0, 0.5, 0.0, 1.5], [2.0, 0.0, 2.0, 0.0], [1.0, 0.5, 2.0, 0.0]]
    bins = count_bins(torch.tensor([0.0, 1.5, 9.0]), 3)
    assert bins.tolist() == [[1, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 1]]


def three_objects_in_a_row():
    """Centre logits and offsets of a 3x8 grid with objects centred at row 1, columns 1, 4
    and 6; columns 3 and 5 belong to the middle object (offsets point at column 4)."""
    logits = torch.full((1, 3, 8), -10.0)
    logits[0, 1, [1, 4, 6]] = 20.0
    offsets = torch.zeros(1, 3, 8, 2)
    offsets[0, :, 3, 0], offsets[0, :, 5, 0] = 1.0, -1.0
    offsets[0, 0, 4, 1], offsets[0, 2, 4, 1] = 1.0, -1.0
    return logits, offsets



def object_block_decoder(key: str) -> VIPATransformerDecoder:
    """A training-mode decoder with the count blocks at object centres and the object block ``key``."""
    cfg = make_cfg(*SMALL, **{
        "MODEL.VIPA.DECODER.COUNT_MAPS": 4, "MODEL.VIPA.DECODER.COUNT_CENTRES": True,
        "MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES": True, f"MODEL.VIPA.DECODER.{key}": True,
    })
    torch.manual_seed(0)
    return VIPATransformerDecoder(cfg, SHAPES).train()

def test_object_ranks_score_the_picked_object_on_all_its_cells():
    with pytest.raises(ValueError, match="OBJECT_RANKS needs MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES True"):
        VIPATransformerDecoder(
            make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.COUNT_MAPS": 4, "MODEL.VIPA.DECODER.COUNT_CENTRES": True,
                                "MODEL.VIPA.DECODER.OBJECT_RANKS": True}),
            SHAPES,
        )
    torch.manual_seed(0)
    ranks = ObjectRanks(32)
    x, expression = torch.randn(1, 24, 32), torch.randn(1, 32)
    logits, offsets = three_objects_in_a_row()
    # Untrained, the block adds nothing.
    assert ranks(x, (3, 8), logits, offsets, expression).abs().max() == 0
    # Every candidate a member; the expression picks "exactly one member on the left".
    torch.nn.init.constant_(ranks.member[-1].bias, 20.0)
    torch.nn.init.zeros_(ranks.member[-1].weight)
    with torch.no_grad():
        ranks.select[-1].bias[1] = 1.0  # direction "left" (0), bin 1
    score = ranks(x, (3, 8), logits, offsets, expression)[0]
    middle = score[:, 3:6]
    torch.testing.assert_close(middle, torch.ones_like(middle), atol=1e-3, rtol=0)
    assert score[:, [0, 1, 7]].abs().max() < 1e-3  # the leftmost object and cells far from the middle one
    # The score trains the block's weights; the detections it reads get no gradient from it.
    logits.requires_grad_()
    ranks(x, (3, 8), logits, offsets, expression).sum().backward()
    assert ranks.select[-1].bias.grad.abs().sum() > 0 and logits.grad is None


def test_object_ranks_add_to_the_final_mask_only():
    dec = object_block_decoder("OBJECT_RANKS")
    multi, mf, kv, valid = decoder_inputs()
    before = dec(multi, mf, kv, valid)["pred_masks"]
    torch.nn.init.normal_(dec.object_ranks.select[-1].weight)
    after = dec(multi, mf, kv, valid)["pred_masks"]
    for early, early_after in zip(before[:-1], after[:-1]):
        torch.testing.assert_close(early_after, early)
    assert not torch.allclose(after[-1], before[-1])
    after[-1].sum().backward()
    assert dec.object_ranks.member[0].weight.grad.abs().sum() > 0


def test_object_choice_gives_the_chosen_objects_cells_its_log_probability():
    with pytest.raises(ValueError, match="OBJECT_CHOICE needs MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES True"):
        VIPATransformerDecoder(
            make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.COUNT_MAPS": 4, "MODEL.VIPA.DECODER.COUNT_CENTRES": True,
                                "MODEL.VIPA.DECODER.OBJECT_CHOICE": True}),
            SHAPES,
        )
    with pytest.raises(ValueError, match="OBJECT_CHOICE and OBJECT_RANKS both score"):
        VIPATransformerDecoder(
            make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.COUNT_MAPS": 4, "MODEL.VIPA.DECODER.COUNT_CENTRES": True,
                                "MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES": True,
                                "MODEL.VIPA.DECODER.OBJECT_CHOICE": True, "MODEL.VIPA.DECODER.OBJECT_RANKS": True}),
            SHAPES,
        )
    torch.manual_seed(0)
    choice = ObjectChoice(32)
    x, expression = torch.randn(1, 24, 32), torch.randn(1, 32)
    logits, offsets = three_objects_in_a_row()
    # Every candidate a member: untrained, the three objects are equally likely.
    torch.nn.init.constant_(choice.member[-1].bias, 20.0)
    torch.nn.init.zeros_(choice.member[-1].weight)
    cells, out = choice(x, (3, 8), logits, offsets, expression)
    assert out["choice_found"].tolist() == [[True] * 3 + [False] * 7]
    torch.testing.assert_close(out["choice_logits"][0, :3].exp(), torch.full((3,), 1 / 3), atol=1e-4, rtol=0)
    # Centres as fractions of the grid: (column + 0.5) / 8, (row + 0.5) / 3 (in any slot order).
    points = out["choice_points"][0, :3]
    torch.testing.assert_close(points[points[:, 0].argsort()], torch.tensor([[1.5 / 8, 0.5], [4.5 / 8, 0.5], [6.5 / 8, 0.5]]))
    # The expression picks "exactly one member on the left": the middle object.
    with torch.no_grad():
        choice.select[-1].bias[1] = 30.0  # direction "left" (0), bin 1
    cells, out = choice(x, (3, 8), logits, offsets, expression)
    cells = cells[0]
    # Log-probability ~0 on all of the middle object's cells (the soft assignment leaks
    # exp(-8) of a cell two columns from another centre, at -30 each).
    assert cells[:, 3:6].abs().max() < 0.02
    assert cells[:, [0, 1, 2, 6, 7]].max() < -25  # the others' cells are pushed down
    # A candidate outside the named group loses its share.
    torch.nn.init.normal_(choice.member[-1].weight)
    logits.requires_grad_()
    cells, out = choice(x, (3, 8), logits, offsets, expression)
    (cells.sum() + out["choice_logits"][0, 0]).backward()
    assert choice.gain.grad.abs() > 0 and choice.member[0].weight.grad.abs().sum() > 0
    assert logits.grad is None  # the detections it reads get no gradient from it


def test_hard_choice_at_test_keeps_only_the_most_probable_object():
    with pytest.raises(ValueError, match="CHOICE_HARD_AT_TEST needs MODEL.VIPA.DECODER.OBJECT_CHOICE True"):
        VIPATransformerDecoder(make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.CHOICE_HARD_AT_TEST": True}), SHAPES)
    torch.manual_seed(0)
    soft = ObjectChoice(32)
    x, expression = torch.randn(1, 24, 32), torch.randn(1, 32)
    logits, offsets = three_objects_in_a_row()
    # All members; the middle object likelier than the others, but unsure.
    torch.nn.init.constant_(soft.member[-1].bias, 20.0)
    torch.nn.init.zeros_(soft.member[-1].weight)
    with torch.no_grad():
        soft.select[-1].bias[1] = 1.0  # "one member on the left"
    hard = ObjectChoice(32, hard_at_test=True)
    hard.load_state_dict(soft.state_dict())
    train_soft, _ = soft(x, (3, 8), logits, offsets, expression)
    train_hard, _ = hard(x, (3, 8), logits, offsets, expression)
    torch.testing.assert_close(train_hard, train_soft)  # training is the soft choice
    test_soft = soft.eval()(x, (3, 8), logits, offsets, expression)[0][0]
    test_hard = hard.eval()(x, (3, 8), logits, offsets, expression)[0][0]
    assert test_soft[:, [0, 1, 2, 6, 7]].max() > -2  # soft: the runner-ups are barely lowered
    assert test_hard[:, [0, 1, 2, 6, 7]].max() < -13  # hard: log(1e-6) on every other object
    assert test_hard[:, 3:6].abs().max() < 0.02  # the picked object's cells are kept


def test_object_choice_adds_to_the_final_mask_and_returns_its_candidates_in_training():
    dec = object_block_decoder("OBJECT_CHOICE")
    multi, mf, kv, valid = decoder_inputs()
    out = dec(multi, mf, kv, valid)
    assert {"choice_logits", "member_logits", "choice_points", "choice_found"} <= set(out)
    with torch.no_grad():
        dec.object_choice.gain.zero_()
    without = dec(multi, mf, kv, valid)["pred_masks"]
    for early, early_without in zip(out["pred_masks"][:-1], without[:-1]):
        torch.testing.assert_close(early_without, early)
    assert not torch.allclose(out["pred_masks"][-1], without[-1])
    assert set(dec.eval()(multi, mf, kv, valid)) == {"pred_masks", "no_target_logit"}


def test_choice_size_ranks_pick_by_area_among_members():
    with pytest.raises(ValueError, match="CHOICE_SIZE_RANKS needs MODEL.VIPA.DECODER.OBJECT_CHOICE True"):
        object_block_decoder("CHOICE_SIZE_RANKS")
    areas, weight = torch.tensor([[3.0, 9.0, 5.0]]), torch.tensor([[1.0, 1.0, 0.5]])
    # Per candidate: the weight of the larger ones, then of the smaller ones.
    assert size_counts(areas, weight)[0].tolist() == [[1.5, 0.0], [0.0, 1.5], [1.0, 1.0]]
    torch.manual_seed(0)
    choice = ObjectChoice(32, size_ranks=True)
    x, expression = torch.randn(1, 24, 32), torch.randn(1, 32)
    logits, offsets = three_objects_in_a_row()
    with pytest.raises(ValueError, match="size_ranks needs the group gate's logits"):
        choice(x, (3, 8), logits, offsets, expression)
    # The group gate covers 3 cells of the left object, 9 of the middle one, 6 of the right one.
    group = torch.full((1, 3, 8), -20.0)
    group[0, :, [1, 3, 4, 5, 6, 7]] = 20.0
    torch.nn.init.constant_(choice.member[-1].bias, 20.0)
    torch.nn.init.zeros_(choice.member[-1].weight)
    bins = MAX_RANK + 1
    with torch.no_grad():
        choice.select[-1].bias[4 * bins] = 30.0  # "no member larger" (size side 0 after the 4 directions), bin 0
    cells = choice(x, (3, 8), logits, offsets, expression, group)[0][0]
    assert cells[:, 3:6].abs().max() < 0.02 and cells[:, [0, 1, 2, 6, 7]].max() < -25
    with torch.no_grad():
        choice.select[-1].bias.zero_()
        choice.select[-1].bias[5 * bins] = 30.0  # "no member smaller": the left one
    cells = choice(x, (3, 8), logits, offsets, expression, group)[0][0]
    assert cells[:, :2].abs().max() < 0.02 and cells[:, 3:].max() < -25


def test_choice_regressed_areas_rank_by_the_area_head_alone():
    """CHOICE_AREAS "regressed": the size ranks read an MLP of each candidate's token,
    detached (the area loss trains it), instead of the group gate."""
    with pytest.raises(ValueError, match='CHOICE_AREAS "regressed" needs MODEL.VIPA.DECODER.CHOICE_SIZE_RANKS True'):
        VIPATransformerDecoder(make_cfg(*SMALL, **{
            "MODEL.VIPA.DECODER.COUNT_MAPS": 4, "MODEL.VIPA.DECODER.COUNT_CENTRES": True,
            "MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES": True, "MODEL.VIPA.DECODER.OBJECT_CHOICE": True,
            "MODEL.VIPA.DECODER.CHOICE_AREAS": "regressed",
        }), SHAPES)
    with pytest.raises(ValueError, match=r"CHOICE_AREAS must be one of \('group_gate', 'regressed'\), got 'boxes'"):
        ObjectChoice(32, size_ranks=True, areas="boxes")
    with pytest.raises(ValueError, match=r"CHOICE_AREAS must be one of .*, got 'boxes'"):  # without the choice too
        VIPATransformerDecoder(make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.CHOICE_AREAS": "boxes"}), SHAPES)
    assert ObjectChoice(32, areas="regressed").area is None  # no size ranks: nothing reads it
    torch.manual_seed(0)
    choice = ObjectChoice(32, size_ranks=True, areas="regressed")
    x, expression = torch.randn(1, 24, 32), torch.randn(1, 32)
    logits, offsets = three_objects_in_a_row()
    torch.nn.init.constant_(choice.member[-1].bias, 20.0)
    torch.nn.init.zeros_(choice.member[-1].weight)
    bins = MAX_RANK + 1
    with torch.no_grad():
        choice.select[-1].bias[4 * bins] = 30.0  # "no member larger", bin 0
    cells, out = choice(x, (3, 8), logits, offsets, expression)  # no group gate needed
    found = out["choice_found"][0]
    log_areas = out["choice_log_areas"][0].masked_fill(~found, float("-inf"))
    column = int(out["choice_points"][0, log_areas.argmax(), 0] * 8)  # the largest by the head
    others = [c for c in range(8) if abs(c - column) > 1]
    assert cells[0, :, column].abs().max() < 0.02 and cells[0, :, others].max() < -25
    # The choice does not train the head; the area loss does.
    out["choice_logits"][0, found].sum().backward(retain_graph=True)
    assert choice.area[0].weight.grad is None
    out["choice_log_areas"].sum().backward()
    assert choice.area[0].weight.grad.abs().sum() > 0


def factor_query_choice(**keys):
    """A factor-query :class:`ObjectChoice` (seed 0; ``keys`` added) whose factors are not
    uniform, and its (P(side), P(bin)) on two fixed word sets, the second partly padding."""
    torch.manual_seed(0)
    choice = ObjectChoice(32, nheads=4, from_words=True, factorised=True, factor_queries=True, **keys)
    torch.nn.init.normal_(choice.select[-1].weight)  # zero at the start: every factor uniform
    words, valid = torch.randn(2, 5, 32), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])

    def marginals():
        weights = choice.select_vector(None, words, valid).unflatten(1, (choice.sides, MAX_RANK + 1))
        weights = weights / choice.factor_scale
        return weights.sum(dim=2), weights.sum(dim=1)  # P(side), P(bin)

    return choice, marginals


def moved_factors(marginals, change):
    """Which of (P(side), P(bin)) an in-place parameter ``change`` moves."""
    before = marginals()
    with torch.no_grad():
        change()
    return [not torch.allclose(a, b) for a, b in zip(marginals(), before)]


def test_choice_factor_queries_read_side_and_bin_from_their_own_pools():
    with pytest.raises(ValueError, match="CHOICE_FACTOR_QUERIES needs MODEL.VIPA.DECODER.OBJECT_CHOICE True"):
        VIPATransformerDecoder(make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.CHOICE_FACTOR_QUERIES": True}), SHAPES)
    with pytest.raises(ValueError, match="CHOICE_FACTOR_QUERIES .* needs CHOICE_FROM_WORDS and CHOICE_FACTORISED True"):
        ObjectChoice(32, from_words=True, factor_queries=True)
    choice, marginals = factor_query_choice()
    assert moved_factors(marginals, lambda: choice.word_query_embed[:, 1].add_(1.0)) == [False, True]  # the bin's query
    assert moved_factors(marginals, lambda: choice.word_query_embed[:, 0].add_(1.0)) == [True, False]  # the side's
    # The two queries share one attention: its keys move both factors.
    assert moved_factors(marginals, lambda: choice.word_pool.k_proj.weight.mul_(3.0)) == [True, True]


def test_choice_factor_pools_give_each_factor_its_own_attention():
    with pytest.raises(ValueError, match="CHOICE_FACTOR_POOLS needs MODEL.VIPA.DECODER.OBJECT_CHOICE True"):
        VIPATransformerDecoder(make_cfg(*SMALL, **{"MODEL.VIPA.DECODER.CHOICE_FACTOR_POOLS": True}), SHAPES)
    with pytest.raises(ValueError, match="CHOICE_FACTOR_POOLS .* needs CHOICE_FACTOR_QUERIES True"):
        ObjectChoice(32, from_words=True, factorised=True, factor_pools=True)
    choice, marginals = factor_query_choice(factor_pools=True)
    assert moved_factors(marginals, lambda: choice.bin_pool.k_proj.weight.mul_(3.0)) == [False, True]
    assert moved_factors(marginals, lambda: choice.word_pool.k_proj.weight.mul_(3.0)) == [True, False]
    assert moved_factors(marginals, lambda: choice.word_query_embed[:, 1].add_(1.0)) == [False, True]


def test_choice_from_words_reads_the_valid_words():
    with pytest.raises(ValueError, match="CHOICE_FROM_WORDS needs MODEL.VIPA.DECODER.OBJECT_CHOICE True"):
        object_block_decoder("CHOICE_FROM_WORDS")
    torch.manual_seed(0)
    choice = ObjectChoice(32, nheads=4, from_words=True)
    torch.nn.init.normal_(choice.select[-1].weight)  # zero at the start: nothing would reach the words
    x, expression = torch.randn(1, 24, 32), torch.randn(1, 32)
    logits, offsets = three_objects_in_a_row()
    with pytest.raises(ValueError, match="from_words needs the words"):
        choice(x, (3, 8), logits, offsets, expression)
    words, valid = torch.randn(1, 5, 32), torch.tensor([[True, True, True, False, False]])
    before = choice(x, (3, 8), logits, offsets, expression, words=words, words_valid=valid)[1]["choice_logits"]
    padded = words.clone()
    padded[0, 3:] = 7.0
    same = choice(x, (3, 8), logits, offsets, expression, words=padded, words_valid=valid)[1]["choice_logits"]
    torch.testing.assert_close(same, before)
    other = words.clone()
    other[0, 1] = -words[0, 1]
    changed = choice(x, (3, 8), logits, offsets, expression, words=other, words_valid=valid)[1]["choice_logits"]
    assert not torch.allclose(changed[0, :3], before[0, :3])
    # The pooled expression no longer selects: it changes membership only.
    changed[0, :3].sum().backward()
    assert choice.word_query_embed.grad.abs().sum() > 0 and choice.word_pool.q_proj.weight.grad.abs().sum() > 0


def test_factorised_choice_weights_are_side_times_bin():
    with pytest.raises(ValueError, match="CHOICE_FACTORISED needs MODEL.VIPA.DECODER.OBJECT_CHOICE True"):
        object_block_decoder("CHOICE_FACTORISED")
    torch.manual_seed(0)
    choice = ObjectChoice(32, factorised=True)
    x, expression = torch.randn(1, 24, 32), torch.randn(1, 32)
    logits, offsets = three_objects_in_a_row()
    torch.nn.init.constant_(choice.member[-1].bias, 20.0)
    torch.nn.init.zeros_(choice.member[-1].weight)
    # Untrained: uniform side and bin probabilities add the same to every candidate.
    out = choice(x, (3, 8), logits, offsets, expression)[1]
    torch.testing.assert_close(out["choice_logits"][0, :3].exp(), torch.full((3,), 1 / 3), atol=1e-4, rtol=0)
    # Side scores first (4), then bins (MAX_RANK + 1): "left" and "bin 1" -> the scale on (left, 1).
    with torch.no_grad():
        choice.select[-1].bias[0] = 30.0
        choice.select[-1].bias[HALF_PLANES + 1] = 30.0
    weights = choice.select_vector(expression, None, None)[0].view(HALF_PLANES, MAX_RANK + 1)
    torch.testing.assert_close(weights[0, 1], choice.factor_scale, atol=1e-3, rtol=0)
    assert weights.sum() - weights[0, 1] < 1e-3
    cells = choice(x, (3, 8), logits, offsets, expression)[0][0]
    assert cells[:, 3:6].abs().max() < 0.02 and cells[:, [0, 1, 7]].max() < -9  # the scale, 10 at the start
    cells.sum().backward()
    assert choice.factor_scale.grad.abs() > 0


def test_choice_loss_targets_the_candidates_centred_on_the_target():
    # A 16 x 16 input; the target covers the left half of image 0; image 1 has none.
    gt = torch.zeros(2, 16, 16)
    gt[0, :, :8] = 1
    points = torch.tensor([[[0.25, 0.5], [0.75, 0.5], [0.1, 0.1]]] * 2)
    found = torch.tensor([[True, True, False], [True, True, True]])
    log_prob = torch.log_softmax(torch.tensor([[0.0, 1.0, -5.0], [2.0, 0.0, 0.0]]), dim=-1).requires_grad_()
    loss = choice_loss(log_prob, points, found, gt)
    # Only candidate 0 of image 0 counts (candidate 2 lies on the target but is an empty slot).
    torch.testing.assert_close(loss, -log_prob[0, 0])
    loss.backward()
    assert torch.isfinite(log_prob.grad).all() and log_prob.grad[1].abs().sum() == 0
    # No positive anywhere: zero, still differentiable.
    none = choice_loss(log_prob, points, found, torch.zeros(2, 16, 16))
    assert none.item() == 0 and none.requires_grad


def test_member_loss_reads_the_group_of_the_box_each_candidate_lies_in():
    # A 32 x 32 input; box 1 lies inside box 0 (its centre is the nearer one there).
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 16.0], [16.0, 0.0, 32.0, 8.0]]), torch.zeros(0, 4)]
    in_group = [torch.tensor([False, True]), torch.zeros(0, dtype=torch.bool)]
    # Image 0: in box 1 only via nearest centre, in box 0 only, in no box, an empty slot.
    points = torch.tensor([[[0.75, 0.125], [0.25, 0.25], [0.5, 0.9], [0.75, 0.125]]] * 2)
    found = torch.tensor([[True, True, True, False], [True] * 4])
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0] * 4])
    expected = (F.binary_cross_entropy_with_logits(logits[0, :2], torch.tensor([1.0, 0.0]), reduction="sum")) / 2
    torch.testing.assert_close(member_loss(logits, points, found, boxes, in_group, (32, 32)), expected)


def test_area_loss_reads_the_log_area_of_the_box_each_candidate_lies_in():
    # A 32 x 32 input; box 1 lies inside box 0 (its centre is the nearer one there).
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 16.0], [16.0, 0.0, 32.0, 8.0]]), torch.zeros(0, 4)]
    areas = [torch.tensor([256.0, 64.0]), torch.zeros(0)]
    points = torch.tensor([[[0.75, 0.125], [0.25, 0.25], [0.5, 0.9], [0.75, 0.125]]] * 2)
    found = torch.tensor([[True, True, True, False], [True] * 4])
    log_areas = torch.tensor([[-3.0, -1.0, 5.0, 9.0], [0.0] * 4])
    # Fractions of the 1,024-pixel input: 64 / 1024 for box 1, 256 / 1024 for box 0.
    expected = ((-3.0 - math.log(64 / 1024)) ** 2) ** 0.5 + abs(-1.0 - math.log(256 / 1024))
    torch.testing.assert_close(area_loss(log_areas, points, found, boxes, areas, (32, 32)), torch.tensor(expected / 2))
    # An object shrunk to nothing counts as one pixel, not log(0).
    zero = area_loss(log_areas, points, found, boxes, [torch.tensor([256.0, 0.0]), torch.zeros(0)], (32, 32))
    assert torch.isfinite(zero)
