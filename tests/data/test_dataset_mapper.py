"""ReferringDatasetMapper: image reading, resizing, target masks and tokenization."""

import copy
import logging
import re
import uuid

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from common import IMAGE_H as H
from common import IMAGE_W as W
from common import MAPPER_IMAGE_SIZE as SIZE
from common import MAPPER_MAX_TEXT_LEN as MAX_LEN
from common import MAPPER_OPTS, POLY, captured_log, make_cfg, mapper_record, write_image
from vipa_d2.data import ReferringDataError, ReferringDatasetMapper, mask_to_rle
from vipa_d2.data.dataset_mapper import swap_left_right
from vipa_d2.modeling.text_encoder import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(make_cfg(*MAPPER_OPTS))


def _rle_mask():
    m = np.zeros((H, W), np.uint8)
    m[30:58, 60:88] = 1
    return m


def _expected_poly_mask(out_h, out_w):
    sx, sy = out_w / W, out_h / H
    poly = np.asarray(POLY).reshape(-1, 2) * [sx, sy]
    rle = mask_util.frPyObjects([poly.reshape(-1).tolist()], out_h, out_w)
    return mask_util.decode(mask_util.merge(rle))


@pytest.mark.parametrize("mode,out_hw", [("square", (SIZE, SIZE)), ("keep_ratio", (21, SIZE))])
def test_train_outputs(tmp_path, tokenizer, mode, out_hw):
    write_image(tmp_path / "a.png")
    rec = mapper_record(tmp_path / "a.png")
    before = copy.deepcopy(rec)
    out = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS, "INPUT.RESIZE_MODE", mode), is_train=True)(rec)
    assert rec == before  # the record is not modified
    assert out["image"].dtype == torch.uint8 and tuple(out["image"].shape) == (3, *out_hw)
    assert out["gt_mask"].dtype == torch.uint8 and tuple(out["gt_mask"].shape) == out_hw
    for k in ("input_ids", "attention_mask"):
        assert out[k].dtype == torch.int64 and tuple(out[k].shape) == (MAX_LEN,)
    # The mask is the polygon transformed with the image's resize.
    np.testing.assert_array_equal(out["gt_mask"].numpy(), _expected_poly_mask(*out_hw))
    assert out["gt_mask"].sum() > 0 and out["empty"] is False
    assert "annotations" not in out
    assert (out["height"], out["width"], out["image_id"], out["ref_id"], out["sent_id"]) == (
        H,
        W,
        3,
        11,
        5,
    )
    assert out["file_name"] == str(tmp_path / "a.png") and out["sentence"] == "the box on the left"


def test_test_mode_keeps_annotations_and_rle(tmp_path):
    write_image(tmp_path / "a.png")
    anns = [
        mapper_record(tmp_path / "a.png")["annotations"][0],  # the POLY target
        {
            "segmentation": mask_to_rle(_rle_mask()),
            "bbox": [60.0, 30.0, 28.0, 28.0],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": 2,
            "iscrowd": 0,
        },
    ]
    rec = mapper_record(tmp_path / "a.png", "both boxes", anns)
    out = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS), is_train=False)(rec)
    assert out["annotations"] == anns  # original coordinates, untouched
    assert out["annotations"] is not rec["annotations"]
    resize = T.ResizeTransform(H, W, SIZE, SIZE)
    expected = np.maximum(_expected_poly_mask(SIZE, SIZE), resize.apply_segmentation(_rle_mask()))
    np.testing.assert_array_equal(out["gt_mask"].numpy(), expected)


def test_no_target_mask_is_empty(tmp_path):
    write_image(tmp_path / "a.png")
    out = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS), is_train=False)(
        mapper_record(tmp_path / "a.png", "the purple cow", [])
    )
    assert (
        out["empty"] is True
        and out["gt_mask"].sum() == 0
        and tuple(out["gt_mask"].shape) == (SIZE, SIZE)
    )
    assert out["annotations"] == []


def test_tokenization_padding_and_truncation(tmp_path, tokenizer):
    write_image(tmp_path / "a.png")
    mapper = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS), is_train=True)
    short = mapper(mapper_record(tmp_path / "a.png", "the box"))
    n = int(short["attention_mask"].sum())
    assert n == 4  # [CLS] the box [SEP]
    assert (
        short["input_ids"][0] == tokenizer.cls_token_id
        and short["input_ids"][n - 1] == tokenizer.sep_token_id
    )
    assert short["attention_mask"][:n].eq(1).all() and short["attention_mask"][n:].eq(0).all()
    assert short["input_ids"][n:].eq(tokenizer.pad_token_id).all()
    long = mapper(
        mapper_record(tmp_path / "a.png", "the second small red square from the left above the blue star")
    )
    assert long["attention_mask"].eq(1).all()
    assert (
        long["input_ids"][0] == tokenizer.cls_token_id
        and long["input_ids"][-1] == tokenizer.sep_token_id
    )
    assert tokenizer.decode(long["input_ids"][1:-1]) == "the second small red square from"


def test_image_format_grayscale_and_rgba(tmp_path):
    write_image(tmp_path / "a.png")
    rec = mapper_record(tmp_path / "a.png")
    rgb = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS, "INPUT.FORMAT", "RGB"), is_train=False)(rec)["image"]
    bgr = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS, "INPUT.FORMAT", "BGR"), is_train=False)(rec)["image"]
    assert torch.equal(rgb, bgr.flip(0))
    assert (
        rgb[0, :, : SIZE // 2 - 1].float().mean() > 250
        and rgb[1, :, : SIZE // 2 - 1].float().mean() < 5
    )
    for mode in ("L", "RGBA"):
        write_image(tmp_path / f"{mode}.png", mode)
        out = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS), is_train=False)(mapper_record(tmp_path / f"{mode}.png"))
        assert tuple(out["image"].shape) == (3, SIZE, SIZE)
    gray = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS), is_train=False)(mapper_record(tmp_path / "L.png"))["image"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_exif_orientation_is_applied(tmp_path):
    # Stored 90 x 60 (W x H) with EXIF "rotate 90": readers must see it as 60 wide, 90 high.
    stored = Image.fromarray(np.zeros((H, W, 3), np.uint8))
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rot.jpg", exif=exif)
    rec = mapper_record(tmp_path / "rot.jpg", annotations=[])
    rec["height"], rec["width"] = W, H
    out = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS, "INPUT.RESIZE_MODE", "keep_ratio"), is_train=False)(rec)
    assert tuple(out["image"].shape) == (3, SIZE, 21)


def test_keep_ratio_keeps_a_strip_one_pixel_thick(tmp_path):
    # 2 x 200 pixels: the long side to SIZE=32 rounds the short one to 0.32 -> 0 pixels.
    strip = np.zeros((2, 200), np.uint8)
    strip[:, :100] = 1
    write_image(tmp_path / "strip.png", size=strip.shape)
    ann = {"segmentation": mask_to_rle(strip), "bbox": [0.0, 0.0, 100.0, 2.0], "bbox_mode": BoxMode.XYWH_ABS,
           "category_id": 1, "iscrowd": 0}
    rec = mapper_record(tmp_path / "strip.png", annotations=[ann])
    rec["height"], rec["width"] = strip.shape
    cfg = make_cfg(*MAPPER_OPTS, "INPUT.RESIZE_MODE", "keep_ratio", "INPUT.RANDOM_FLIP", "horizontal")
    for is_train in (True, False):
        out = ReferringDatasetMapper(cfg, is_train=is_train)(copy.deepcopy(rec))
        assert tuple(out["image"].shape) == (3, 1, SIZE) and tuple(out["gt_mask"].shape) == (1, SIZE)
        assert out["gt_mask"].sum() == SIZE // 2


def test_unreadable_image_names_the_file(tmp_path, monkeypatch):
    mapper = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS), is_train=True)
    with pytest.raises(
        OSError, match=r"Cannot read image .*missing\.jpg \(image_id=3, ref_id=11\)"
    ):
        mapper(mapper_record(tmp_path / "missing.jpg"))
    (tmp_path / "corrupt.jpg").write_bytes(b"this is not an image")
    with pytest.raises(OSError, match=r"Cannot read image .*corrupt\.jpg"):
        mapper(mapper_record(tmp_path / "corrupt.jpg"))
    # PIL would saturate a 16-bit image to nearly all white: refused, not read wrong.
    Image.fromarray(np.full((H, W), 40000, np.uint16)).save(tmp_path / "wide.png")
    with pytest.raises(OSError, match=r"Cannot read image .*wide\.png \(image_id=3, ref_id=11\): PIL mode I;16"):
        mapper(mapper_record(tmp_path / "wide.png"))
    # Over twice PIL's pixel limit (a decompression bomb): PIL's error, with the file named.
    write_image(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W // 3)
    with pytest.raises(OSError, match=r"Cannot read image .*bomb\.png .*decompression bomb"):
        mapper(mapper_record(tmp_path / "bomb.png"))


def test_horizontal_flip_mirrors_mask_and_words(tmp_path):
    write_image(tmp_path / "a.png")
    rec = mapper_record(tmp_path / "a.png", "the Left box, left of the rightmost star")
    plain = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS), is_train=True)(rec)["gt_mask"].numpy()
    mapper = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS, "INPUT.RANDOM_FLIP", "horizontal"), is_train=True)
    seen = set()
    for _ in range(30):
        out = mapper(rec)
        if out["sentence"] == rec["sentence"]["raw"]:
            np.testing.assert_array_equal(out["gt_mask"].numpy(), plain)
            seen.add("kept")
        else:
            assert out["sentence"] == "the Right box, right of the leftmost star"
            np.testing.assert_array_equal(out["gt_mask"].numpy(), plain[:, ::-1])
            seen.add("flipped")
    assert seen == {"kept", "flipped"}
    # Never flipped at test time.
    test_mapper = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS, "INPUT.RANDOM_FLIP", "horizontal"), is_train=False)
    assert all(test_mapper(rec)["sentence"] == rec["sentence"]["raw"] for _ in range(10))


def test_swap_left_right_word_boundaries():
    assert swap_left_right("leftover right-hand Rightmost") == "leftover left-hand Leftmost"
    # Compounds the tokenizer splits into a left / right piece (helper review, session 46).
    assert swap_left_right("guy on leftside, righthand LEFTEST rightwards") == "guy on rightside, lefthand RIGHTEST leftwards"
    assert swap_left_right("lefthanded Lefty leftish") == "righthanded Righty rightish"
    assert swap_left_right("upright bright leftover rights") == "upright bright leftover rights"


def test_bad_config_values(tmp_path):
    with pytest.raises(ValueError, match="RESIZE_MODE='stretch'"):
        ReferringDatasetMapper(make_cfg(*MAPPER_OPTS, "INPUT.RESIZE_MODE", "stretch"), is_train=True)
    with pytest.raises(ValueError, match="RANDOM_FLIP='vertical'"):
        ReferringDatasetMapper(make_cfg(*MAPPER_OPTS, "INPUT.RANDOM_FLIP", "vertical"), is_train=True)


def test_size_mismatch_is_reported(tmp_path):
    cv2.imwrite(str(tmp_path / "small.png"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(Exception, match=r"small\.png"):
        ReferringDatasetMapper(make_cfg(*MAPPER_OPTS), is_train=True)(mapper_record(tmp_path / "small.png"))


def _landmark_record(file_name, sentence="the box left of the red box"):
    rec = mapper_record(file_name, sentence)
    rec["type"] = "relation"
    rec["landmark"] = {
        "ann_id": 9,
        "phrase": "red box",
        "annotation": {
            "segmentation": mask_to_rle(_rle_mask()),
            "bbox": [60.0, 30.0, 28.0, 28.0],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": 2,
            "iscrowd": 0,
        },
    }
    return rec


def test_test_mode_carries_type_landmark_mask_and_tokens(tmp_path, tokenizer):
    write_image(tmp_path / "a.png")
    rec = _landmark_record(tmp_path / "a.png")
    rec["target_phrase"] = "box"
    before = copy.deepcopy(rec)
    out = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS, "INPUT.MAX_TEXT_LEN", 12), is_train=False)(rec)
    assert rec == before
    assert out["type"] == "relation"
    # The landmark mask is at the original resolution, like the evaluator's target.
    assert out["landmark_mask"].dtype == torch.uint8
    np.testing.assert_array_equal(out["landmark_mask"].numpy(), _rle_mask())
    tokens = out["landmark_tokens"]
    assert tokens.dtype == torch.bool and tuple(tokens.shape) == (12,)
    words = tokenizer.convert_ids_to_tokens(out["input_ids"][tokens].tolist())
    assert words == ["red", "box"]  # the last "box": the landmark's, not the target's
    # The target's name is its first occurrence: "the [box] left of the red box".
    named = out["target_tokens"]
    assert named.dtype == torch.bool and named.nonzero().flatten().tolist() == [2]
    assert tokenizer.convert_ids_to_tokens(out["input_ids"][named].tolist()) == ["box"]
    # A target named only inside the landmark phrase has no name of its own (helper review,
    # session 46: "red box" is the landmark; the target's name was read from it).
    landmark_only = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS, "INPUT.MAX_TEXT_LEN", 12), is_train=False)(
        {**_landmark_record(tmp_path / "a.png", "the object left of the red box"), "target_phrase": "box"}
    )
    assert landmark_only["landmark_tokens"].sum() == 2 and not landmark_only["target_tokens"].any()
    # Training never needs them.
    train = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS), is_train=True)(rec)
    assert not {"type", "landmark_mask", "landmark_tokens", "target_tokens"} & set(train)


def test_landmark_tokens_truncated_or_missing_phrase(tmp_path):
    write_image(tmp_path / "a.png")
    mapper = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS, "INPUT.MAX_TEXT_LEN", 8), is_train=False)
    # [CLS] the box left of the red [SEP]: "box" of the landmark is cut off.
    out = mapper(_landmark_record(tmp_path / "a.png"))
    assert out["landmark_tokens"].tolist() == [False] * 6 + [True, False]
    # A text that does not name the landmark (e.g. the shuffled-expression control's):
    # no landmark token, the mask is still there.
    out = mapper(_landmark_record(tmp_path / "a.png", "the blue circle"))
    assert not out["landmark_tokens"].any() and out["landmark_mask"].sum() == _rle_mask().sum()
    # Records without the fields (real datasets) get none of them.
    plain = mapper(mapper_record(tmp_path / "a.png"))
    assert not {"type", "landmark_mask", "landmark_tokens"} & set(plain)


def test_training_landmark_fields_follow_the_flip(tmp_path, tokenizer):
    """LANDMARK_WEIGHT > 0: training inputs carry the augmented landmark and its phrase's tokens."""
    write_image(tmp_path / "a.png")
    rec = _landmark_record(tmp_path / "a.png", "the box left of the red box")
    opts = [*MAPPER_OPTS, "INPUT.MAX_TEXT_LEN", 12, "MODEL.VIPA.LOSS.LANDMARK_WEIGHT", 1.0]
    plain = ReferringDatasetMapper(make_cfg(*opts), is_train=True)(rec)
    assert plain["landmark_mask"].shape == plain["gt_mask"].shape and plain["landmark_mask"].sum() > 0
    words = tokenizer.convert_ids_to_tokens(plain["input_ids"][plain["landmark_tokens"]].tolist())
    assert words == ["red", "box"]
    mapper = ReferringDatasetMapper(make_cfg(*opts, "INPUT.RANDOM_FLIP", "horizontal"), is_train=True)
    seen = set()
    for _ in range(30):
        out = mapper(rec)
        flipped = out["sentence"] != rec["sentence"]["raw"]
        expected = plain["landmark_mask"].numpy()[:, ::-1] if flipped else plain["landmark_mask"].numpy()
        np.testing.assert_array_equal(out["landmark_mask"].numpy(), expected)
        assert torch.equal(out["landmark_tokens"], plain["landmark_tokens"])  # "right of the red box"
        seen.add(flipped)
    assert seen == {True, False}
    # A phrase with a side in it is looked up as the flip mirrored it (it was lost before).
    rec = _landmark_record(tmp_path / "a.png", "the box above the left red box")
    rec["landmark"]["phrase"] = "left red box"
    for _ in range(10):
        out = mapper(rec)
        words = tokenizer.convert_ids_to_tokens(out["input_ids"][out["landmark_tokens"]].tolist())
        assert words == (["right", "red", "box"] if "right" in out["sentence"] else ["left", "red", "box"])
    # A record without a landmark gets empty fields, so a batch still stacks.
    none = ReferringDatasetMapper(make_cfg(*opts), is_train=True)(mapper_record(tmp_path / "a.png"))
    assert none["landmark_mask"].shape == none["gt_mask"].shape and not none["landmark_mask"].any()
    assert tuple(none["landmark_tokens"].shape) == (12,) and not none["landmark_tokens"].any()


def test_object_boxes_follow_resize_and_flip(tmp_path):
    """COUNT_CENTRES: training inputs carry every object's box, augmented with the image."""
    write_image(tmp_path / "a.png")
    rec = mapper_record(tmp_path / "a.png", "the box on the left")
    rec["object_boxes"] = [[10.0, 5.0, 40.0, 40.0], [60.0, 30.0, 28.0, 28.0]]
    opts = [*MAPPER_OPTS, "INPUT.RANDOM_FLIP", "none",  # Detectron2's default flips
            "MODEL.VIPA.DECODER.COUNT_MAPS", 4, "MODEL.VIPA.DECODER.COUNT_CENTRES", True]
    before = copy.deepcopy(rec)
    out = ReferringDatasetMapper(make_cfg(*opts), is_train=True)(rec)
    assert rec == before
    out_h, out_w = out["gt_mask"].shape
    sx, sy = out_w / W, out_h / H
    expected = torch.tensor([[10 * sx, 5 * sy, 50 * sx, 45 * sy], [60 * sx, 30 * sy, 88 * sx, 58 * sy]])
    torch.testing.assert_close(out["object_boxes"], expected)
    mapper = ReferringDatasetMapper(make_cfg(*opts, "INPUT.RANDOM_FLIP", "horizontal"), is_train=True)
    seen = set()
    for _ in range(30):
        got = mapper(rec)
        flipped = got["sentence"] != rec["sentence"]["raw"]
        mirrored = torch.stack([out_w - expected[:, 2], expected[:, 1], out_w - expected[:, 0], expected[:, 3]], 1)
        torch.testing.assert_close(got["object_boxes"], mirrored if flipped else expected)
        seen.add(flipped)
    assert seen == {True, False}
    # Test mode and configs without centre maps never need them.
    assert "object_boxes" not in ReferringDatasetMapper(make_cfg(*opts), is_train=False)(rec)
    assert "object_boxes" not in ReferringDatasetMapper(make_cfg(*MAPPER_OPTS), is_train=True)(rec)
    # A box that lies outside the image marks no centre.
    outside = dict(rec, object_boxes=rec["object_boxes"] + [[W + 5.0, 10.0, 20.0, 20.0]])
    torch.testing.assert_close(ReferringDatasetMapper(make_cfg(*opts), is_train=True)(outside)["object_boxes"], expected)
    del rec["object_boxes"]
    with pytest.raises(KeyError, match=r"image_id=3, ref_id=11 has no 'object_boxes'"):
        ReferringDatasetMapper(make_cfg(*opts), is_train=True)(rec)
    # The offsets of COUNT_AT_OBJECT_CENTRES train on them too, with the centre loss off;
    # a record without them is refused in that loss's name.
    offsets = make_cfg(*opts, "MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES", True, "MODEL.VIPA.LOSS.CENTRE_WEIGHT", 0.0)
    torch.testing.assert_close(ReferringDatasetMapper(offsets, is_train=True)(before)["object_boxes"], expected)
    with pytest.raises(KeyError, match=r"no 'object_boxes'.*which MODEL.VIPA.LOSS.OFFSET_WEIGHT > 0 trains on"):
        ReferringDatasetMapper(offsets, is_train=True)(rec)


def test_object_in_group_follows_the_boxes_kept(tmp_path):
    """LOSS.GROUP_WEIGHT: training inputs say which of their object boxes the expression's
    category / colour words name, for the boxes the augmentation kept."""
    write_image(tmp_path / "a.png")
    rec = mapper_record(tmp_path / "a.png", "the box on the left")
    rec["object_boxes"] = [[10.0, 5.0, 40.0, 40.0], [W + 5.0, 10.0, 20.0, 20.0], [60.0, 30.0, 28.0, 28.0]]
    rec["object_in_group"] = [True, True, False]
    opts = [*MAPPER_OPTS, "MODEL.VIPA.DECODER.COUNT_MAPS", 4, "MODEL.VIPA.DECODER.COUNT_CENTRES", True]
    mapper = ReferringDatasetMapper(make_cfg(*opts, "MODEL.VIPA.LOSS.GROUP_WEIGHT", 1.0), is_train=True)
    out = mapper(rec)
    assert len(out["object_boxes"]) == 2  # the box outside the image is dropped, and its flag with it
    assert out["object_in_group"].tolist() == [True, False]
    assert "object_in_group" not in ReferringDatasetMapper(make_cfg(*opts), is_train=True)(rec)
    with pytest.raises(ValueError, match=r"ref_id=11: 'object_in_group' has 2 entries for 3 'object_boxes'"):
        mapper(dict(rec, object_in_group=[True, False]))
    del rec["object_in_group"]
    with pytest.raises(KeyError, match=r"image_id=3, ref_id=11 has no 'object_in_group'.*GROUP_WEIGHT > 0"):
        mapper(rec)
    # The object choice trains its membership on the group too.
    choice = [*opts, "MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES", True, "MODEL.VIPA.DECODER.OBJECT_CHOICE", True]
    with pytest.raises(KeyError, match=r"ref_id=11 has no 'object_in_group'.*which MODEL.VIPA.LOSS.CHOICE_WEIGHT > 0"):
        ReferringDatasetMapper(make_cfg(*choice), is_train=True)(rec)
    # The group loss marks centres too: without the centre loss the boxes still come, and a
    # record without them is refused in the group loss's name.
    no_centre = make_cfg(*opts, "MODEL.VIPA.LOSS.GROUP_WEIGHT", 1.0, "MODEL.VIPA.LOSS.CENTRE_WEIGHT", 0.0)
    out = ReferringDatasetMapper(no_centre, is_train=True)(dict(rec, object_in_group=[False, True, True]))
    assert len(out["object_boxes"]) == 2 and out["object_in_group"].tolist() == [False, True]
    del rec["object_boxes"]
    with pytest.raises(KeyError, match=r"ref_id=11 has no 'object_boxes'.*which MODEL.VIPA.LOSS.GROUP_WEIGHT > 0"):
        ReferringDatasetMapper(no_centre, is_train=True)(dict(rec, object_in_group=[]))


def test_object_areas_scale_with_their_boxes(tmp_path):
    """LOSS.AREA_WEIGHT: training inputs carry each kept object's area in augmented pixels,
    scaled as its box was; records without usable areas are refused by name."""
    write_image(tmp_path / "a.png")
    rec = mapper_record(tmp_path / "a.png", "the bigger box")
    rec["object_boxes"] = [[10.0, 5.0, 40.0, 40.0], [W + 5.0, 10.0, 20.0, 20.0], [60.0, 30.0, 28.0, 28.0]]
    rec["object_in_group"] = [True, True, False]
    rec["object_areas"] = [1200.0, 300.0, 500.0]
    opts = [*MAPPER_OPTS, "INPUT.RANDOM_FLIP", "none", "MODEL.VIPA.DECODER.COUNT_MAPS", 4,
            "MODEL.VIPA.DECODER.COUNT_CENTRES", True, "MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES", True,
            "MODEL.VIPA.DECODER.OBJECT_CHOICE", True, "MODEL.VIPA.DECODER.CHOICE_SIZE_RANKS", True]
    regressed = make_cfg(*opts, "MODEL.VIPA.DECODER.CHOICE_AREAS", "regressed")
    out = ReferringDatasetMapper(regressed, is_train=True)(rec)
    out_h, out_w = out["gt_mask"].shape
    scale = (out_w / W) * (out_h / H)
    # The box outside the image is dropped, and its area with it.
    torch.testing.assert_close(out["object_areas"], torch.tensor([1200.0 * scale, 500.0 * scale]))
    assert "object_areas" not in ReferringDatasetMapper(make_cfg(*opts), is_train=True)(rec)  # group-gate areas
    assert "object_areas" not in ReferringDatasetMapper(regressed, is_train=False)(rec)
    # No area loss: nothing to read.
    no_loss = make_cfg(*opts, "MODEL.VIPA.DECODER.CHOICE_AREAS", "regressed", "MODEL.VIPA.LOSS.AREA_WEIGHT", 0.0)
    assert "object_areas" not in ReferringDatasetMapper(no_loss, is_train=True)(rec)
    mapper = ReferringDatasetMapper(regressed, is_train=True)
    with pytest.raises(ValueError, match=r"ref_id=11: 'object_areas' has 2 entries for 3 'object_boxes'"):
        mapper(dict(rec, object_areas=[1.0, 2.0]))
    with pytest.raises(ValueError, match=r"ref_id=11: 'object_areas' \[1200.0, -1.0, 500.0\] must be finite and >= 0"):
        mapper(dict(rec, object_areas=[1200.0, -1.0, 500.0]))
    # A NaN box used to fall out of the kept ones, its object with it, unsaid.
    nan_box = [[10.0, 5.0, 40.0, float("nan")], *rec["object_boxes"][1:]]
    with pytest.raises(ValueError, match=r"ref_id=11: 'object_boxes' \[\[10.0, 5.0, 40.0, nan\], .* must be finite"):
        mapper(dict(rec, object_boxes=nan_box))
    del rec["object_areas"]
    with pytest.raises(KeyError, match=r"ref_id=11 has no 'object_areas'.*which MODEL.VIPA.LOSS.AREA_WEIGHT > 0"):
        mapper(rec)


def test_check_records_refuses_before_any_batch(tmp_path):
    """What the mapper would fail on in a worker, midway, is refused up front by name."""
    write_image(tmp_path / "a.png")
    rec = mapper_record(tmp_path / "a.png")
    rec["object_boxes"] = [[10.0, 5.0, 40.0, 40.0]]
    opts = [*MAPPER_OPTS, "MODEL.VIPA.DECODER.COUNT_MAPS", 4, "MODEL.VIPA.DECODER.COUNT_CENTRES", True]
    mapper = ReferringDatasetMapper(make_cfg(*opts), is_train=True)
    mapper.check_records([rec, rec], "mine")
    gone = [dict(rec, file_name=str(tmp_path / f"{i}.png")) for i in range(5)]
    with pytest.raises(ReferringDataError, match=r"^mine: 5 of its 6 image files do not exist: .*0\.png, .*1\.png, .*2\.png, \.\.\. \(\+2 more\)$"):
        mapper.check_records([rec, *gone], "mine")
    unboxed = {k: v for k, v in rec.items() if k != "object_boxes"}
    with pytest.raises(ReferringDataError, match=r"^mine: 1 of 2 records have no 'object_boxes' .*the first image_id=3, ref_id=11; ") as info:
        mapper.check_records([rec, unboxed], "mine")
    # It says how to train without them (it did not; extension review, session 55), and that works.
    off = str(info.value).split("turn the object counts and the object choice off: ")[1].split()
    ReferringDatasetMapper(make_cfg(*opts, *off), is_train=True).check_records([unboxed], "mine")
    # Test mode reads no boxes.
    ReferringDatasetMapper(make_cfg(*opts), is_train=False).check_records([unboxed], "mine")
    # Values the losses read per box, refused before the first batch (a NaN box used to
    # surface only when a worker read its sample).
    opts += ["MODEL.VIPA.DECODER.OBJECT_CHOICE", True, "MODEL.VIPA.DECODER.CHOICE_SIZE_RANKS", True,
             "MODEL.VIPA.DECODER.CHOICE_AREAS", "regressed"]
    mapper = ReferringDatasetMapper(make_cfg(*opts), is_train=True)
    good = dict(rec, object_in_group=[True], object_areas=[1600.0])
    mapper.check_records([good], "mine")
    unsized = {k: v for k, v in good.items() if k != "object_areas"}
    with pytest.raises(ReferringDataError, match=r"^mine: 1 of 1 records have no 'object_areas' ") as info:
        mapper.check_records([unsized], "mine")
    off = str(info.value).split("pick by the group gate's areas: ")[1].split()
    ReferringDatasetMapper(make_cfg(*opts, *off), is_train=True).check_records([unsized], "mine")
    for change, field, problem in [
        ({"object_boxes": [[10.0, 5.0, float("nan"), 40.0]]}, "object_boxes", r"'object_boxes' \[\[10.0, 5.0, nan, 40.0\]\] must be finite"),
        ({"object_boxes": [[10.0, 5.0, 40.0]]}, "object_boxes", r"'object_boxes' \[\[10.0, 5.0, 40.0\]\]: expected a list of \[x, y, w, h\] boxes"),
        ({"object_boxes": [[1, 2, 3, 4], [1, 2]]}, "object_boxes", r"'object_boxes' .*: expected a list of \[x, y, w, h\] boxes"),
        ({"object_in_group": [True, False]}, "object_in_group", r"'object_in_group' has 2 entries for 1 'object_boxes'"),
        ({"object_areas": 5.0}, "object_areas", r"'object_areas' has 5.0 for 1 'object_boxes'"),
        ({"object_areas": [-1.0]}, "object_areas", r"'object_areas' \[-1.0\] must be finite and >= 0"),
        ({"object_areas": ["big"]}, "object_areas", r"'object_areas' \['big'\] must be finite and >= 0"),
    ]:
        with pytest.raises(ReferringDataError, match=r"^mine: record #1 \(image_id=3, ref_id=11\): " + problem) as info:
            mapper.check_records([good, dict(good, **change)], "mine")
        assert info.value.field == field
        with pytest.raises(ValueError, match=r"^Record image_id=3, ref_id=11: " + problem):
            mapper(dict(good, **change))  # a direct call says the same


def test_check_records_compares_every_size_records_give_a_file(tmp_path):
    # Two images entries naming one file: the check kept one record per file, so a wrong
    # size on another failed in a worker midway (SizeMismatchError).
    write_image(tmp_path / "a.png")
    rec = mapper_record(tmp_path / "a.png")
    mapper = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS), is_train=False)
    with pytest.raises(ReferringDataError, match=rf"^mine: 1 of its 1 image files are not the height x width of their "
                                                 rf"records .*a\.png is {H} x {W}, records of it say {H - 1} x {W}$"):
        mapper.check_records([dict(rec, height=H - 1), rec], "mine")


def test_check_records_refuses_image_files_that_do_not_read_as_8_bit_images(tmp_path, monkeypatch):
    # They passed, and read_image refused them in a worker midway, or in the evaluation after
    # the whole training (data review, session 57).
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("I;16", (W, H)).save(tmp_path / "deep.png")
    write_image(tmp_path / "a.png")
    mapper = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS), is_train=False)
    records = [mapper_record(tmp_path / name) for name in ("a.png", "notes.png", "deep.png")]
    with pytest.raises(ReferringDataError, match=rf"^mine: 2 of its 3 image files cannot be read as images of 8 bits per "
                                                 rf"channel: .*notes\.png is no image file .*deep\.png has PIL mode I;16 ") as e:
        mapper.check_records(records, "mine")
    assert e.value.file == str(tmp_path / "notes.png")
    mapper.check_records(records[:1], "mine")
    # PIL's reason is said: an image over its pixel limit was "no image file" (helper review,
    # session 58), which read_image then refused for its size.
    Image.new("RGB", (4 * W, 4 * H)).save(tmp_path / "big.png")
    with monkeypatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", W * H)
        with pytest.raises(ReferringDataError, match=r"big\.png is no image file PIL reads \(Image size .* exceeds limit"):
            mapper.check_records([dict(records[0], file_name=str(tmp_path / "big.png"), height=4 * H, width=4 * W)], "mine")


@pytest.fixture(scope="module")
def record_checkers():
    """A training and a test mapper, for check_records only."""
    cfg = make_cfg(*MAPPER_OPTS)
    return ReferringDatasetMapper(cfg, is_train=True), ReferringDatasetMapper(cfg, is_train=False)


def _without(key):
    return lambda rec: rec.pop(key)


def _annotation(**changes):
    """The record's target annotation with ``changes`` (None: key removed)."""
    def change(rec):
        ann = dict(rec["annotations"][0], **changes)
        rec["annotations"] = [{k: v for k, v in ann.items() if v is not None}]
    return change


@pytest.mark.parametrize("change,field,problem", [
    (lambda rec: rec.update(sentence="the box"), "sentence",
     r"expected a dict \{'raw': text, 'sent_id': id\}, got 'the box'"),
    (lambda rec: rec.update(sentence={"sent": "the box", "sent_id": 5}), "sentence.raw",
     "expected the expression as a string, got None"),
    (_without("annotations"), "annotations", r"expected a list of target annotations \(\[\] for no target\), got None"),
    (_annotation(segmentation=None), "annotations[0].segmentation", "missing: expected COCO polygons"),
    (_annotation(bbox=None), "annotations[0].bbox", "missing: expected its box, 4 numbers"),
    (_annotation(segmentation=[POLY[:4]]), "annotations[0].segmentation[0]",
     r"expected a polygon .* of 3 or more points, got \[10.0, 5.0, 50.0, 5.0\]"),
    (_annotation(segmentation=[{"size": [H, W], "counts": "PPYo1"}]), "annotations[0].segmentation",
     "a list of RLE parts: expected one RLE dict"),
    (_annotation(segmentation={"size": [H, W], "counts": [0, H * W]}), "annotations[0].segmentation.counts",
     "expected compressed counts .*, got list"),
    (_annotation(segmentation={"size": [H // 2, W], "counts": "PPYo1"}), "annotations[0].segmentation.size",
     rf"RLE size \[{H // 2}, {W}\] does not match the image size \[{H}, {W}\]"),
    (lambda rec: rec.update(height=str(H)), "height", f"expected a positive integer, got '{H}'"),
    (_without("image_id"), "image_id", "missing"),
    # Written into the evaluator's per-sample JSON, which failed on it after the training.
    (lambda rec: rec.update(ref_id=uuid.UUID(int=5)), "ref_id",
     r"expected an integer or string id, got UUID\('00000000-0000-0000-0000-000000000005'\)"),
    (lambda rec: rec["sentence"].update(sent_id=uuid.UUID(int=6)), "sentence.sent_id",
     r"expected an integer or string id, got UUID\('00000000-0000-0000-0000-000000000006'\)"),
    # An emoji cut in half (JSON's "\ud83d"): the tokenizer's TypeError in a worker.
    (lambda rec: rec["sentence"].update(raw="the box \ud83d"), "sentence.raw",
     r"'the box \\ud83d' is not valid text \(undecodable bytes\?\)"),
    # Values that reach pycocotools, which checks nothing: a NaN or huge coordinate had the
    # process killed for its memory, counts short of the image gave a mask of stale memory.
    (_annotation(segmentation=[[*POLY[:3], float("nan"), *POLY[4:]]]), "annotations[0].segmentation[0][3]",
     "nan is not a finite number"),
    (_annotation(segmentation=[POLY, [*POLY[:4], 1e8, *POLY[5:]]]), "annotations[0].segmentation[1][4]",
     rf"x = 100000000.0 is far outside the {W}x{H} image"),
    (_annotation(segmentation={"size": [H, W], "counts": "0"}), "annotations[0].segmentation.counts",
     rf"run lengths add up to 0, expected height \* width = {H * W}"),
    # What Detectron2's transform_instance_annotations fails on in a worker (extension
    # review, session 52): ValueError, NotImplementedError, AssertionError.
    (_annotation(bbox=["a", "b", "c", "d"]), "annotations[0].bbox[0]", "expected a number, got 'a'"),
    (_annotation(bbox=[1.0, 2.0, float("inf"), 4.0]), "annotations[0].bbox[2]", "inf is not a finite number"),
    (_annotation(bbox_mode="XYWH_ABS"), "annotations[0].bbox_mode",
     "expected BoxMode.XYXY_ABS or BoxMode.XYWH_ABS, got 'XYWH_ABS'"),
    (_annotation(bbox_mode=BoxMode.XYWH_REL), "annotations[0].bbox_mode",
     "expected BoxMode.XYXY_ABS or BoxMode.XYWH_ABS, got <BoxMode.XYWH_REL: 3>"),
    # Read by the test mapper (the retrieval report) and the evaluator (per-type tables).
    (lambda rec: rec.update(target_phrase=5), "target_phrase", "expected a non-empty string .*, got 5"),
    (lambda rec: rec.update(type=["relation"]), "type", r"expected a non-empty string .*, got \['relation'\]"),
    (lambda rec: rec.update(target_phrase="box \ud83d"), "target_phrase", r"'box \\ud83d' is not valid text"),
    # A no-target flag on a record with a target: scored a hit on a no-target sample (mIoU
    # 100, N-acc 0; evaluation review, session 53).
    (lambda rec: rec.update(empty=True), "empty", r"expected False \(the record has 1 target annotation\(s\)\), got True"),
    (lambda rec: rec.update(empty="no"), "empty", "expected False .*, got 'no'"),
], ids=["sentence-string", "no-raw", "no-annotations", "bbox-only", "no-bbox", "4-number-polygon", "rle-parts",
        "uncompressed-rle", "rle-size", "height-string", "no-image-id", "uuid-ref-id", "uuid-sent-id", "lone-surrogate",
        "nan-coordinate", "huge-coordinate",
        "short-rle-counts", "bbox-strings", "bbox-inf", "bbox-mode-string", "bbox-mode-relative",
        "target-phrase-number", "type-list", "target-phrase-surrogate", "empty-with-target", "empty-string"])
def test_check_records_refuses_misshaped_fields_by_name(tmp_path, record_checkers, change, field, problem):
    """Records of a loader of one's own that __call__ cannot read (it failed on them in a
    worker at the first step, or in the evaluation after the training, with a bare KeyError or
    TypeError) are refused up front, naming the source, the record, the field and what was
    expected (extension review, session 48)."""
    write_image(tmp_path / "a.png")
    good = mapper_record(tmp_path / "a.png")
    bad = copy.deepcopy(good)
    change(bad)
    for mapper in record_checkers:
        with pytest.raises(ReferringDataError, match=rf"^mine: record #1 \(image_id=.*\): {re.escape(field)}: {problem}") as e:
            mapper.check_records([good, bad], "mine")
        assert e.value.field == field


def test_check_records_accepts_what_records_may_carry(tmp_path, record_checkers):
    """No-target records (any dataset: the mapper reads [] as an empty mask), RLE targets, and a
    landmark only where the mapper reads it (test mode; training with landmark supervision)."""
    write_image(tmp_path / "a.png")
    target = mapper_record(tmp_path / "a.png")
    rle = copy.deepcopy(target)
    rle["annotations"][0]["segmentation"] = mask_to_rle(_rle_mask())
    no_target = mapper_record(tmp_path / "a.png", "the purple cow", [])
    landmark = dict(target, landmark={"phrase": "box"})  # no annotation
    as_path = dict(target, file_name=tmp_path / "a.png", empty=np.False_)  # a loader's pathlib.Path, numpy bool
    # A target whose mask is empty: a gRefCOCO ref whose targets are all crowd (ReLA's loader
    # leaves them out of the mask); the check refused it, and with it the whole split.
    only_crowd = dict(mapper_record(tmp_path / "a.png", "the crowd", []), empty=False)
    # Polygons in a tuple (the checks take them as a list): Detectron2's transform refused them.
    as_tuple = copy.deepcopy(target)
    as_tuple["annotations"][0]["segmentation"] = tuple(as_tuple["annotations"][0]["segmentation"])
    no_sent_id = dict(target, sentence={"raw": "the box", "sent_id": None})  # written as null
    train, test = record_checkers
    train.check_records([target, rle, no_target, landmark, as_path, only_crowd, as_tuple, no_sent_id], "mine")
    test.check_records([target, rle, no_target, as_path, only_crowd, as_tuple, no_sent_id], "mine")
    for record in [target, rle, no_target, as_path, only_crowd, as_tuple, no_sent_id]:
        test(record)  # what the checks pass, the mapper reads
        train(record)
    assert test(only_crowd)["empty"] is False and not test(only_crowd)["gt_mask"].any()
    assert torch.equal(test(as_tuple)["gt_mask"], test(target)["gt_mask"])
    with pytest.raises(ReferringDataError, match=r"^mine: record #0 .*: landmark.annotation: expected an annotation dict, got None$"):
        test.check_records([landmark], "mine")


def test_augmented_mask_takes_a_checked_polygon_moved_past_the_margin():
    """A point at the records' margin (x = 2 w, accepted) lands a rounding step past it once
    resized (226 * 480 / 113 = 960.0000000000001): the rasteriser's guard must not refuse it
    in a worker, midway through training (helper review, session 50)."""
    from vipa_d2.data.masks import augmented_mask
    from vipa_d2.data.validation import record_annotation_problem

    ann = {"segmentation": [[0.0, 0.0, 226.0, 0.0, 226.0, 40.0, 0.0, 40.0]], "bbox": [0, 0, 226, 40],
           "bbox_mode": BoxMode.XYWH_ABS}
    assert record_annotation_problem(ann, 50, 113) is None
    resize = T.TransformList([T.ResizeTransform(50, 113, 50, 480)])
    assert resize.apply_coords(np.array([[226.0, 0.0]]))[0, 0] > 960  # past 2 x 480
    assert augmented_mask([ann], resize, (50, 480))[5:35].all()  # the whole width, as resized


def test_check_records_says_once_what_the_tokenizer_loses(tmp_path):
    # Training and evaluation cut long expressions, and read another script as [UNK],
    # without a word; only the predictor said so (data review, session 59).
    write_image(tmp_path / "a.png")
    long = "the box " + "that is very big " * 4 + "on the left"
    records = [mapper_record(tmp_path / "a.png", text) for text in ("the box", long, "左边的盒子", "the box on the left")]
    mapper = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS), is_train=False)
    source = f"mine_{uuid.uuid4().hex}"  # Detectron2's log_first_n says a message once per process
    with captured_log("vipa_d2.data.dataset_mapper", logging.WARNING) as seen:
        mapper.check_records(records, source)
        mapper.check_records(records, source)  # as at every evaluation: said once
    messages = [m for _, m in seen]
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"{source}: 1 of 4 expressions are longer than INPUT.MAX_TEXT_LEN={MAX_LEN} tokens "
                                  f"([CLS] and [SEP] included; the longest {len(mapper.tokenizer(long)['input_ids'])}): "
                                  f"the model reads only their beginning, e.g. '{long[:20]}"), messages[0]
    assert messages[1] == (f"{source}: 1 of 4 expressions are mostly unknown tokens ([UNK]: words the text encoder's "
                           "vocabulary lacks), e.g. '左边的盒子'")
    with captured_log("vipa_d2.data.dataset_mapper", logging.WARNING) as seen:
        mapper.check_records([records[0]], f"mine_{uuid.uuid4().hex}")
    assert not seen
