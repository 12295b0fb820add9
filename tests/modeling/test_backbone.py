"""timm backbones as Detectron2 backbones, and the bundled EfficientNet-Lite0 weights."""
import copy
import re

import cv2
import numpy as np
import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformerBlock
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from common import make_cfg
from vipa_d2 import ConfigError
from vipa_d2.engine.optimizer import get_vipa_optimizer_params
from vipa_d2.modeling.backbone import load_backbone_weights
from vipa_d2.modeling.backbone.swin_windows import PadThenShiftSwinBlock
from vipa_d2.modeling.backbone.weights import SWIN_ORIGINAL_LAYOUT_KEY
from vipa_d2.modeling.backbone.conv_bn_fold import FoldedBatchNorm2d, FoldedConv2d, set_conv_bn_folding

# ImageNet-1k indices of the cat classes: tabby, tiger cat, Egyptian cat.
CAT_CLASSES = {281, 282, 285}


# A timm backbone as Detectron2's backbone, random weights unless a test sets them.
BACKBONE = ["MODEL.BACKBONE.NAME", "VIPATimmBackbone", "MODEL.TIMM.ARCH", "tf_efficientnet_lite0", "MODEL.TIMM.WEIGHTS", ""]


def _cat_tensor(size=224):
    from skimage import data  # ships the 'chelsea' cat photograph

    img = cv2.resize(data.chelsea(), (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    x = (img - 127.5) / 127.5  # the bundled Lite0 weights' TF-style normalization
    return torch.from_numpy(x).permute(2, 0, 1)[None]


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "efficientnet_lite0"])
def test_bundled_lite0_weights_classify_cat(arch):
    model = timm.create_model(arch)
    load_backbone_weights(model, "bundled", arch)
    with torch.no_grad():
        top5 = model.eval()(_cat_tensor()).topk(5).indices[0].tolist()
    assert CAT_CLASSES & set(top5[:2]), f"top-5 {top5} has no cat class in its first two"
    assert len(CAT_CLASSES & set(top5)) >= 2


def test_backbone_features_match_timm_with_bundled_weights():
    cfg = make_cfg(*BACKBONE, "MODEL.TIMM.WEIGHTS", "bundled")
    # Folding off: the exact stage split; folding is compared to this below.
    backbone = set_conv_bn_folding(build_backbone(cfg, ShapeSpec(channels=3)), False).eval()
    ref = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3, 4))
    load_backbone_weights(ref, "bundled", "tf_efficientnet_lite0")
    x = _cat_tensor(160)
    with torch.no_grad():
        ours, theirs = backbone(x), ref.eval()(x)
    for name, feat in zip(["res2", "res3", "res4", "res5"], theirs):
        torch.testing.assert_close(ours[name], feat)
        assert backbone.output_shape()[name].channels == feat.shape[1]
        assert x.shape[-1] // backbone.output_shape()[name].stride == feat.shape[-1]
    assert backbone.size_divisibility == 32


def test_swin_any_aspect():
    cfg = make_cfg(*BACKBONE, "MODEL.TIMM.ARCH", "swin_tiny_patch4_window7_224")
    cfg.MODEL.TIMM.OUT_FEATURES = ["res3", "res4", "res5"]
    backbone = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 96, 160))
    assert list(out) == ["res3", "res4", "res5"]
    assert out["res5"].shape == (1, backbone.output_shape()["res5"].channels, 3, 5)


@pytest.mark.parametrize("arch,kept_out", [
    ("swin_tiny_patch4_window7_224", ("relative_position_bias_table",)),
    ("swinv2_tiny_window8_256", ("logit_scale", "cpb_mlp")),
])
def test_what_timm_keeps_out_of_weight_decay_gets_the_embeddings_decay(arch, kept_out):
    # Swin's relative position bias tables (SwinV2's logit scales and bias MLPs) were decayed
    # like weights: their local names are no "*embed*" (engine review, session 53).
    cfg = make_cfg(*BACKBONE, "MODEL.TIMM.ARCH", arch, "MODEL.BACKBONE.FREEZE_AT", "0", "SOLVER.WEIGHT_DECAY", "0.05",
                   "SOLVER.WEIGHT_DECAY_EMBED", "0.0")
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    params = dict(backbone.named_parameters())
    listed = {n for n in params if any(k in n for k in kept_out)}
    assert listed and backbone.no_weight_decay() == listed
    decay = {p: g["weight_decay"] for g in get_vipa_optimizer_params(cfg, backbone) for p in g["params"]}
    assert all(decay[params[n]] == 0.0 for n in listed)
    assert decay[params["stages.0.blocks.0.attn.qkv.weight"]] == 0.05
    effnet = build_backbone(make_cfg(*BACKBONE), ShapeSpec(channels=3))
    assert effnet.no_weight_decay() == set()  # timm's EfficientNet lists nothing


def test_ghostnet_without_stochastic_depth():
    # GhostNet's timm class takes no drop_path_rate: built without it at the default rate 0,
    # its stages (and the stem's separate activation) give timm's own features. The same
    # seed draws the same random weights in both.
    cfg = make_cfg(*BACKBONE, "MODEL.TIMM.ARCH", "ghostnet_100")
    ours = set_conv_bn_folding(build_backbone(cfg, ShapeSpec(channels=3)), False).eval()
    torch.manual_seed(0)  # the fixture's seed, which build_backbone drew from
    ref = timm.create_model("ghostnet_100", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = ours(x)
        for name, feat in zip(["res2", "res3", "res4", "res5"], ref(x)):
            torch.testing.assert_close(out[name], feat, rtol=0, atol=0)
            assert ours.output_shape()[name].channels == feat.shape[1]
    # A rate the model cannot apply is a config error naming both keys.
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.1
    with pytest.raises(ConfigError, match=r"MODEL\.TIMM\.DROP_PATH_RATE=0\.1 .*MODEL\.TIMM\.ARCH='ghostnet_100'"):
        build_backbone(cfg, ShapeSpec(channels=3))


def test_drop_path_rate_zero_reaches_swin():
    # timm's Swin defaults to a drop-path rate of 0.1: a configured 0 must be passed, not left out.
    cfg = make_cfg(*BACKBONE, "MODEL.TIMM.ARCH", "swin_tiny_patch4_window7_224", "MODEL.TIMM.DROP_PATH_RATE", 0.0)
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    rates = [m.drop_prob for m in backbone.modules() if hasattr(m, "drop_prob")]
    assert not any(rates)


def test_every_swin_stage_shifts_its_windows():
    # Built for timm's 224, Swin-T's last stage (7 x 7 there) was one window that never
    # shifted, also at 480 (15 x 15); Swin's segmentation code (LAVT's) shifts every other
    # block of every stage (config review, session 59).
    cfg = make_cfg(*BACKBONE, "MODEL.TIMM.ARCH", "swin_tiny_patch4_window7_224")
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    for stage in backbone.stages:
        assert [tuple(b.window_size) for b in stage.blocks] == [(7, 7)] * len(stage.blocks)
        assert [tuple(b.shift_size) for b in stage.blocks] == [(0, 0), (3, 3)] * (len(stage.blocks) // 2)


def test_shifted_windows_do_not_join_opposite_image_edges():
    # timm shifts, then pads to whole windows, under a mask that assumes the reverse: at 15
    # tokens (window 7, shift 3) the top rows shared windows with the bottom ones, unmasked
    # (diff review, session 59). Swin's segmentation code pads first.
    cfg = make_cfg(*BACKBONE, "MODEL.TIMM.ARCH", "swin_tiny_patch4_window7_224")
    block = build_backbone(cfg, ShapeSpec(channels=3)).stages[3].blocks[1].eval()
    assert type(block) is PadThenShiftSwinBlock and tuple(block.shift_size) == (3, 3)
    x = torch.randn(1, 15, 15, block.norm1.normalized_shape[0])
    poked = x.clone()
    poked[0, 0, 0] += 1.0
    with torch.no_grad():
        changed = (block(poked) - block(x)).abs().amax(-1)[0] > 0
    rows, cols = changed.nonzero().unbind(1)
    assert changed[0, 0] and rows.max() < 7 and cols.max() < 7, changed.nonzero().tolist()
    # Where no padding is needed, timm's own order gives the same.
    x = torch.randn(1, 14, 21, x.shape[-1])
    with torch.no_grad():
        torch.testing.assert_close(block._attn(x), SwinTransformerBlock._attn(block, x))


def test_unsupported_family_is_a_config_error():
    cfg = make_cfg(*BACKBONE, "MODEL.TIMM.ARCH", "resnet18")
    with pytest.raises(ConfigError, match=r"MODEL\.TIMM\.ARCH='resnet18' builds a timm ResNet"):
        build_backbone(cfg, ShapeSpec(channels=3))


def test_stage_hook_feeds_next_stage():
    backbone = build_backbone(make_cfg(*BACKBONE), ShapeSpec(channels=3)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = backbone(x)
        seen = []

        def zero_res3(name, feat):
            seen.append(name)
            return torch.zeros_like(feat) if name == "res3" else feat

        hooked = backbone(x, stage_hook=zero_res3)
        after = backbone(x)
    assert seen == ["res2", "res3", "res4", "res5"]
    torch.testing.assert_close(hooked["res2"], plain["res2"])
    assert hooked["res3"].abs().sum() == 0
    # The zeroed stage output was consumed by the later stages.
    assert not torch.allclose(hooked["res4"], plain["res4"])
    torch.testing.assert_close(after["res5"], plain["res5"])  # the hook leaves nothing behind


def test_checkpoint_problems_are_reported(tmp_path, caplog):
    model = timm.create_model("tf_efficientnet_lite0")
    state = model.state_dict()
    partial = {k: v for i, (k, v) in enumerate(state.items()) if i != 3}
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pth")
    with caplog.at_level("WARNING"):
        load_backbone_weights(model, str(tmp_path / "partial.pth"), "tf_efficientnet_lite0")
    assert "missing keys" in caplog.text and list(state)[3] in caplog.text
    assert "unexpected keys" in caplog.text and "extra.weight" in caplog.text

    other = timm.create_model("swin_tiny_patch4_window7_224").state_dict()
    torch.save(other, tmp_path / "swin.pth")
    with pytest.raises(ValueError, match="match only"):
        load_backbone_weights(model, str(tmp_path / "swin.pth"), "tf_efficientnet_lite0")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone_weights(model, str(tmp_path / "nope.pth"), "tf_efficientnet_lite0")


def test_swin_weights_of_the_original_code_load(tmp_path):
    # swin_base_patch4_window12_384_22k.pth, as LAVT and ReLA have it, downsamples at the end
    # of a stage: it stopped on a shape mismatch at layers.1.downsample (config review, session 59).
    source = timm.create_model("swin_tiny_patch4_window7_224").state_dict()
    original = {}
    for key, value in source.items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        original[key.replace("head.fc.", "head.")] = value
    original["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)  # a buffer the file keeps
    assert SWIN_ORIGINAL_LAYOUT_KEY in original
    torch.save({"model": original}, tmp_path / "swin_original.pth")
    model = timm.create_model("swin_tiny_patch4_window7_224")
    load_backbone_weights(model, str(tmp_path / "swin_original.pth"), "swin_tiny_patch4_window7_224")
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(source) and all(torch.equal(loaded[k], source[k]) for k in source)
    # A classifier of another class count (in1k weights for an in22k arch) is left out, not
    # a mismatch: it stopped the shape check (diff review, session 59).
    original["head.weight"], original["head.bias"] = torch.zeros(10, 768), torch.zeros(10)
    torch.save({"model": original}, tmp_path / "swin_original.pth")
    model = timm.create_model("swin_tiny_patch4_window7_224")
    load_backbone_weights(model, str(tmp_path / "swin_original.pth"), "swin_tiny_patch4_window7_224")
    assert all(torch.equal(model.state_dict()[k], source[k]) for k in source if not k.startswith("head."))
    # Into another family, such a file is refused as any foreign one is, not converted.
    with pytest.raises(ValueError, match="match only"):
        load_backbone_weights(timm.create_model("tf_efficientnet_lite0"), str(tmp_path / "swin_original.pth"),
                              "tf_efficientnet_lite0")


def test_freeze_at_and_frozen_bn():
    cfg = make_cfg(*BACKBONE)
    cfg.MODEL.BACKBONE.FREEZE_AT = 3  # stem, res2 and res3 stages
    cfg.MODEL.TIMM.FREEZE_BN = True
    backbone = build_backbone(cfg, ShapeSpec(channels=3)).train()
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in backbone.named_parameters() if p.requires_grad}
    # tf_efficientnet_lite0 stages: 0,1 -> res2; 2 -> res3; 3,4 -> res4; 5,6 -> res5.
    assert trainable == {"stages.3", "stages.4", "stages.5", "stages.6"}
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and not any(p.requires_grad for m in bns for p in m.parameters())
    before = [m.running_mean.clone() for m in bns]
    backbone(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))


def test_frozen_stages_fix_their_batchnorms():
    # As Detectron2's FrozenBatchNorm2d in frozen stages: without FREEZE_BN, the BatchNorms of
    # the frozen stem and res2 stages use and keep their running statistics, the others train.
    cfg = make_cfg(*BACKBONE)
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.MODEL.TIMM.FREEZE_BN = False
    backbone = build_backbone(cfg, ShapeSpec(channels=3)).train()
    frozen_parts = [backbone.stem, backbone.stages[0], backbone.stages[1]]
    fixed = [m for part in frozen_parts for m in part.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    fixed_ids = {id(m) for m in fixed}
    training = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d) and id(m) not in fixed_ids]
    assert fixed and training
    assert not any(m.training for m in fixed) and all(m.training for m in training)
    before = [m.running_mean.clone() for m in fixed + training]
    backbone(torch.randn(2, 3, 64, 64))
    after = [m.running_mean for m in fixed + training]
    assert all(torch.equal(a, b) for a, b in zip(before[: len(fixed)], after[: len(fixed)]))
    assert not any(torch.equal(a, b) for a, b in zip(before[len(fixed) :], after[len(fixed) :]))


def _pair(freeze_bn=False, arch="tf_efficientnet_lite0", freeze_at=2):
    """Backbones with Conv+BN folding (always built in) on and switched off, holding the
    same (bundled) weights."""
    cfg = make_cfg(*BACKBONE, "MODEL.TIMM.ARCH", arch, "MODEL.TIMM.WEIGHTS", "bundled")
    cfg.MODEL.TIMM.FREEZE_BN = freeze_bn
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    folded = build_backbone(cfg, ShapeSpec(channels=3))
    plain = set_conv_bn_folding(build_backbone(cfg, ShapeSpec(channels=3)), False)
    # The layout is unchanged: checkpoints move between the two either way.
    assert list(folded.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(folded.state_dict())
    return folded, plain


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "efficientnet_lite0"])
def test_conv_bn_folding_keeps_values_and_checkpoints(arch):
    folded, plain = _pair(arch=arch)
    n_folded = sum(isinstance(m, FoldedConv2d) for m in folded.modules())
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert n_folded >= n_bn - 5  # all but the TF-'same'-padded strided convs
    assert not any(m.fold for m in plain.modules() if isinstance(m, FoldedBatchNorm2d))
    x = _cat_tensor(160)
    with torch.no_grad():
        ours, ref = folded.eval()(x), plain.eval()(x)
        # channels_last and deepcopy keep each conv tied to its own BatchNorm.
        moved = copy.deepcopy(folded).to(memory_format=torch.channels_last)
        nhwc = moved(x.contiguous(memory_format=torch.channels_last))
    bns = {id(m) for m in moved.modules() if isinstance(m, FoldedBatchNorm2d)}
    assert all(id(m._bn[0]) in bns for m in moved.modules() if isinstance(m, FoldedConv2d))
    for name in ref:
        # float32 rounding of the folded weights, accumulated over ~16 layers
        tol = dict(rtol=1e-4, atol=1e-4 * ref[name].abs().max().item())
        torch.testing.assert_close(ours[name], ref[name], **tol)
        torch.testing.assert_close(nhwc[name], ref[name], **tol)


def test_conv_bn_folding_in_training():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96)
    # Frozen BatchNorm: folded in training too, with the same gradients.
    folded, plain = _pair(freeze_bn=True)
    grads = []
    for model in (folded.train(), plain.train()):
        model.zero_grad()
        sum(f.square().mean() for f in model(x).values()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-3, atol=1e-5, msg=n)
    # Trainable BatchNorm (no stage frozen): batch statistics, computed exactly as before,
    # running stats too.
    folded, plain = _pair(freeze_bn=False, freeze_at=0)
    with torch.no_grad():
        ours, ref = folded.train()(x), plain.train()(x)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=0)
    for (n, a), (_, b) in zip(folded.state_dict().items(), plain.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
