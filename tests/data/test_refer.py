"""REFER / gRefCOCO loaders, built-in registrations and bad-input handling."""

import importlib
import json
import logging
import os
import pickle

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from common import uncompressed_rle
import vipa_d2  # noqa: F401  registers the built-ins
from vipa_d2.data import annotations_to_mask, load_refer_dicts, save_refer_dataset
from vipa_d2.data import builtin
from vipa_d2.data.refer import ReferringDataError, make_sentence
from vipa_d2.data.validation import quote, record_problem

H, W = 40, 60
SQUARE = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]
TRIANGLE = [35.0, 5.0, 55.0, 5.0, 45.0, 35.0]


def _rle_mask():
    m = np.zeros((H, W), np.uint8)
    m[20:35, 40:58] = 1
    return m


def _instances():
    return {
        "images": [
            {"id": 7, "file_name": "a.jpg", "height": H, "width": W},
            {"id": 8, "file_name": "sub/b.jpg", "height": H, "width": W},
        ],
        "annotations": [
            {
                "id": 100,
                "image_id": 7,
                "category_id": 1,
                "segmentation": [SQUARE],
                "bbox": [10, 10, 20, 20],
                "iscrowd": 0,
            },
            {
                "id": 101,
                "image_id": 7,
                "category_id": 2,
                "segmentation": [TRIANGLE],
                "bbox": [35, 5, 20, 30],
                "iscrowd": 0,
            },
            {
                "id": 102,
                "image_id": 8,
                "category_id": 3,
                "segmentation": uncompressed_rle(_rle_mask()),
                "iscrowd": 0,
            },
        ],
        "categories": [{"id": i, "name": n} for i, n in ((1, "box"), (2, "tri"), (3, "blob"))],
    }


def _refs():
    return [
        {
            "ref_id": 0,
            "ann_id": 100,
            "image_id": 7,
            "category_id": 1,
            "split": "train",
            "sentences": [make_sentence("the box", 0), make_sentence("Left square", 1)],
            "sent_ids": [0, 1],
        },
        {
            "ref_id": 1,
            "ann_id": 101,
            "image_id": 7,
            "category_id": 2,
            "split": "train",
            "sentences": [make_sentence("the triangle", 2)],
            "sent_ids": [2],
        },
        {
            "ref_id": 2,
            "ann_id": 102,
            "image_id": 8,
            "category_id": 3,
            "split": "val",
            "sentences": [
                make_sentence("the blob", 3),
                make_sentence("blob at the bottom right", 4),
            ],
            "sent_ids": [3, 4],
        },
    ]


def _grefs():
    return [
        {
            "ref_id": 0,
            "ann_id": [100, 101],
            "image_id": 7,
            "category_id": [1, 2],
            "split": "val",
            "sentences": [make_sentence("both shapes", 0)],
            "no_target": False,
        },
        {
            "ref_id": 1,
            "ann_id": [-1],
            "image_id": 7,
            "category_id": [-1],
            "split": "val",
            "sentences": [make_sentence("the red car", 1), make_sentence("a dog", 2)],
            "no_target": True,
        },
        {
            "ref_id": 2,
            "ann_id": [],
            "image_id": 8,
            "category_id": [],
            "split": "val",
            "sentences": [make_sentence("nothing here", 3)],
        },
        {
            "ref_id": 3,
            "ann_id": 102,
            "image_id": 8,
            "category_id": 3,
            "split": "val",
            "sentences": [make_sentence("the blob", 4)],
        },
        {
            "ref_id": 4,
            "ann_id": [101],
            "image_id": 7,
            "category_id": [2],
            "split": "train",
            "sentences": [make_sentence("the triangle", 5)],
        },
    ]


@pytest.fixture
def refer_root(tmp_path):
    save_refer_dataset(str(tmp_path / "toy"), "unc", _refs(), _instances())
    save_refer_dataset(str(tmp_path / "gtoy"), "unc", _grefs(), _instances(), generalized=True)
    return str(tmp_path)


def test_loader_round_trip(refer_root):
    train = load_refer_dicts(refer_root, "toy", "unc", "train", "/imgs")
    val = load_refer_dicts(refer_root, "toy", "unc", "val", "/imgs")
    # One record per expression of the split.
    assert len(train) == 3 and len(val) == 2
    assert [r["sentence"] for r in train] == [
        {"raw": "the box", "sent_id": 0},
        {"raw": "Left square", "sent_id": 1},
        {"raw": "the triangle", "sent_id": 2},
    ]
    r = train[0]
    assert r["file_name"] == os.path.join("/imgs", "a.jpg")
    assert (r["height"], r["width"], r["image_id"], r["ref_id"], r["empty"]) == (H, W, 7, 0, False)
    (ann,) = r["annotations"]
    assert ann["segmentation"] == [SQUARE]
    assert ann["bbox"] == [10.0, 10.0, 20.0, 20.0] and ann["bbox_mode"] == BoxMode.XYWH_ABS
    assert (ann["category_id"], ann["iscrowd"]) == (1, 0)
    # Uncompressed RLE is normalized to compressed str counts, same mask, bbox derived.
    rle_ann = val[0]["annotations"][0]
    assert isinstance(rle_ann["segmentation"]["counts"], str)
    np.testing.assert_array_equal(annotations_to_mask(val[0]["annotations"], H, W), _rle_mask())
    assert rle_ann["bbox"] == [40.0, 20.0, 18.0, 15.0]
    assert val[1]["file_name"] == os.path.join("/imgs", "sub/b.jpg")
    # The polygon rasterizes to the square it describes.
    assert annotations_to_mask(train[0]["annotations"], H, W)[15, 15] == 1
    assert annotations_to_mask(train[0]["annotations"], H, W)[35, 45] == 0


def test_python2_pickle_is_read(tmp_path):
    # The original REFER pickles hold Python 2 byte strings; non-ASCII ones are UTF-8 bytes
    # (read as latin1 they were mojibake) or, failing that, latin1.
    root = tmp_path / "toy"
    save_refer_dataset(str(root), "unc", _refs(), _instances())
    py3 = pickle.dumps(_refs(), protocol=2)
    for raw, text in ((b"U\x07caf\xc3\xa9bo", "caf\xe9bo"), (b"U\x07caf\xe9box", "caf\xe9box")):
        py2 = py3.replace(b"X\x07\x00\x00\x00the box", raw)
        assert py2 != py3
        with pytest.raises(UnicodeDecodeError):
            pickle.loads(py2)
        (root / "refs(unc).p").write_bytes(py2)
        recs = load_refer_dicts(str(tmp_path), "toy", "unc", "train", "/imgs")
        assert recs[0]["sentence"]["raw"] == text


def test_grefcoco_multi_and_no_target(refer_root):
    recs = load_refer_dicts(refer_root, "gtoy", "unc", "val", "/imgs", generalized=True)
    assert len(recs) == 5
    by_sent = {r["sentence"]["raw"]: r for r in recs}
    multi = by_sent["both shapes"]
    assert multi["empty"] is False and len(multi["annotations"]) == 2
    union = annotations_to_mask(multi["annotations"], H, W)
    assert union[15, 15] == 1 and union[10, 45] == 1
    for s in ("the red car", "a dog", "nothing here"):
        assert by_sent[s]["empty"] is True and by_sent[s]["annotations"] == []
        assert annotations_to_mask(by_sent[s]["annotations"], H, W).sum() == 0
    single = by_sent["the blob"]
    assert single["empty"] is False and len(single["annotations"]) == 1
    assert len(load_refer_dicts(refer_root, "gtoy", "unc", "train", "/imgs", generalized=True)) == 1


def test_grefcoco_leaves_crowd_targets_out_as_rela_does(tmp_path, caplog):
    instances = _instances()
    crowd = next(a for a in instances["annotations"] if a["id"] == 101)
    crowd["iscrowd"] = 1
    save_refer_dataset(str(tmp_path / "g"), "unc", _grefs(), instances, generalized=True)
    save_refer_dataset(str(tmp_path / "c"), "unc", _refs(), instances)
    with caplog.at_level("WARNING", logger="vipa_d2"):
        recs = load_refer_dicts(str(tmp_path), "g", "unc", "val", "/imgs", generalized=True)
    multi = next(r for r in recs if r["sentence"]["raw"] == "both shapes")
    # Still a target record, its mask the non-crowd target only.
    assert multi["empty"] is False and [a["iscrowd"] for a in multi["annotations"]] == [0]
    union = annotations_to_mask(multi["annotations"], H, W)
    assert union[15, 15] == 1 and union[10, 45] == 0
    assert "1 refs with crowd targets (left out of the target, as in ReLA)" in caplog.text
    # A ref whose targets are all crowd stays a target one with an empty mask, as in ReLA's
    # loader, and passes the record checks (they refused it, and with it the whole split).
    (only_crowd,) = load_refer_dicts(str(tmp_path), "g", "unc", "train", "/imgs", generalized=True)
    assert only_crowd["empty"] is False and only_crowd["annotations"] == []
    assert record_problem(only_crowd) is None
    # Classic REFER data keeps a crowd target: REFER's getMask reads it.
    classic = load_refer_dicts(str(tmp_path), "c", "unc", "train", "/imgs")
    assert any(a["iscrowd"] == 1 for r in classic for a in r["annotations"])


def test_missing_files_name_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_refer_dicts(str(tmp_path), "refcoco", "unc", "train", "/imgs")
    msg = str(e.value)
    assert os.path.join(str(tmp_path), "refcoco", "refs(unc).p") in msg
    assert f"{tmp_path}/refcoco/instances.json" in msg and "expected layout" in msg  # the layout under this root
    # A relative root is read from the working directory, not from a config's folder: named.
    with pytest.raises(FileNotFoundError, match=rf"not found: refer/refcoco/refs\(unc\)\.p \(a relative path, read from "
                                                rf"the working directory {os.getcwd()}\)"):
        load_refer_dicts("refer", "refcoco", "unc", "train", "/imgs")
    save_refer_dataset(str(tmp_path / "g"), "unc", _grefs(), _instances(), generalized=True)
    # The other format's refs there: the flag is what is wrong (data review, session 59).
    with pytest.raises(FileNotFoundError, match=r"refs\(unc\)\.p, but .*g/grefs\(unc\)\.json is there: that is the "
                                                r"generalized \(gRefCOCO-style\) format; register with generalized=True$"):
        load_refer_dicts(str(tmp_path), "g", "unc", "val", "/imgs")
    save_refer_dataset(str(tmp_path / "p"), "unc", _refs(), _instances())
    with pytest.raises(FileNotFoundError, match=r"grefs\(unc\)\.json, but .*p/refs\(unc\)\.p is there: that is the "
                                                r"plain format; register with generalized=False$"):
        load_refer_dicts(str(tmp_path), "p", "unc", "val", "/imgs", generalized=True)
    os.remove(tmp_path / "g" / "instances.json")
    with pytest.raises(FileNotFoundError, match=r"g/instances\.json"):
        load_refer_dicts(str(tmp_path), "g", "unc", "val", "/imgs", generalized=True)


def test_unknown_split_lists_available(refer_root):
    with pytest.raises(ReferringDataError, match=r"refs\(unc\)\.p: no ref has split 'testC'.*\['train', 'val'\]"):
        load_refer_dicts(refer_root, "toy", "unc", "testC", "/imgs")


def test_test_letter_splits_warn_when_they_take_another_split(tmp_path, caplog):
    # REFER.getRefIds takes every ref whose split holds the letter: kept for parity, but a
    # user's "trainB" would be scored as testB (helper review, session 46).
    refs = _refs()
    refs[0]["split"] = "trainB"
    save_refer_dataset(str(tmp_path / "toy"), "unc", refs, _instances())
    with caplog.at_level("WARNING", logger="vipa_d2"):
        records = load_refer_dicts(str(tmp_path), "toy", "unc", "testB", "/imgs")
    assert {r["ref_id"] for r in records} == {refs[0]["ref_id"]}
    assert "split 'testB' also takes the refs of splits ['trainB']" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vipa_d2"):
        for split in ("train", "val"):  # exact names: nothing to say (it warned for these too)
            load_refer_dicts(str(tmp_path), "toy", "unc", split, "/imgs")
    assert "also takes the refs" not in caplog.text


def test_the_test_split_warns_when_it_takes_another_split(tmp_path, caplog):
    # "test" takes every split holding the word, as REFER.getRefIds does: a "test_unseen"
    # beside "test" was scored with it, unsaid (data review, session 59).
    refs = _refs()
    refs[0]["split"], refs[1]["split"] = "test", "test_unseen"
    save_refer_dataset(str(tmp_path / "toy"), "unc", refs, _instances())
    with caplog.at_level("WARNING", logger="vipa_d2"):
        records = load_refer_dicts(str(tmp_path), "toy", "unc", "test", "/imgs")
    assert {r["ref_id"] for r in records} == {refs[0]["ref_id"], refs[1]["ref_id"]}
    assert "split 'test' also takes the refs of splits ['test_unseen']" in caplog.text
    caplog.clear()
    refs[1]["split"] = "train"
    save_refer_dataset(str(tmp_path / "only"), "unc", refs, _instances())
    with caplog.at_level("WARNING", logger="vipa_d2"):
        load_refer_dicts(str(tmp_path), "only", "unc", "test", "/imgs")
    assert "also takes the refs" not in caplog.text
    # RefClef's "test" unites its testA/B/C by design: unsaid (built-in refclef_unc_test).
    refs[1]["split"] = "testC"
    save_refer_dataset(str(tmp_path / "clef"), "unc", refs, _instances())
    with caplog.at_level("WARNING", logger="vipa_d2"):
        assert len(load_refer_dicts(str(tmp_path), "clef", "unc", "test", "/imgs")) == 3
    assert "also takes the refs" not in caplog.text


def test_written_refs_read_in_old_pythons_and_keep_words_of_any_script(tmp_path):
    # The refs file was pickle protocol 5, which LAVT's Python 3.7 cannot read, and "sent"
    # kept [a-z0-9] only: "café" became "caf" for tools that read it (data review, session 59).
    assert make_sentence("The café's 2nd box, 左边的盒子", 7) == {
        "raw": "The café's 2nd box, 左边的盒子", "sent": "the café s 2nd box 左边的盒子",
        "tokens": ["the", "café", "s", "2nd", "box", "左边的盒子"], "sent_id": 7,
    }
    assert make_sentence("left_most  cup!", 8)["tokens"] == ["left", "most", "cup"]  # as before: no "_"
    # Combining marks stay in their word, composed (diff review, session 59).
    assert make_sentence("the cafe\u0301 हिंदी", 9)["tokens"] == ["the", "caf\u00e9", "हिंदी"]
    paths = save_refer_dataset(str(tmp_path / "toy"), "unc", _refs(), _instances())
    with open(paths["refs"], "rb") as f:
        assert f.read(2) == b"\x80\x02"  # protocol 2, as the official files


def _break(kind):
    inst, refs = _instances(), _refs()
    if kind == "unknown_ann_id":
        refs[0]["ann_id"] = 999
    elif kind == "bad_sentence":
        refs[0]["sentences"][1]["raw"] = None
        del refs[0]["sentences"][1]["sent"]
    elif kind == "lone_surrogate":  # an emoji cut in half: the tokenizer refused it from inside
        refs[0]["sentences"][1]["raw"] = "Left square \ud83d"
    elif kind == "first_polygon_4_numbers":
        # pycocotools cannot read it (it takes a first entry of 4 numbers for a box).
        inst["annotations"][0]["segmentation"] = [[10.0, 10.0, 30.0, 10.0]]
    elif kind == "ann_on_other_image":
        inst["annotations"][0]["image_id"] = 8
    return inst, refs


@pytest.mark.parametrize(
    "kind,pattern,reason",
    [
        (
            "unknown_ann_id",
            r"refs\(unc\)\.p: ref #0 \(ref_id=0\): ann_id: 999 is not an annotation id of .*instances\.json$",
            "unknown_ann_id",
        ),
        (
            "bad_sentence",
            r"refs\(unc\)\.p: ref #0 \(ref_id=0\): sentences\[1\]\.raw: expected the sentence as a string",
            "malformed_sentence",
        ),
        (
            "lone_surrogate",
            r"refs\(unc\)\.p: ref #0 \(ref_id=0\): sentences\[1\]\.raw: 'Left square \\ud83d' is not valid text \(undecodable bytes\?\)",
            "malformed_sentence",
        ),
        (
            "first_polygon_4_numbers",
            r"instances\.json: ann_id=100 \(target of ref_id=0\): segmentation\[0\]: 4 numbers",
            "bad_segmentation",
        ),
        (
            "ann_on_other_image",
            r"instances\.json: ann_id=100 \(target of ref_id=0\): image_id: 8, but the ref is about image 7",
            "ann_image_mismatch",
        ),
    ],
)
def test_bad_refs_error_or_counted_skip(tmp_path, caplog, kind, pattern, reason):
    inst, refs = _break(kind)
    save_refer_dataset(str(tmp_path / "bad"), "unc", refs, inst)
    with pytest.raises(ReferringDataError, match=pattern) as e:
        load_refer_dicts(str(tmp_path), "bad", "unc", "train", "/imgs")
    assert "\n" not in str(e.value)

    with caplog.at_level(logging.WARNING, logger="vipa_d2.data.refer"):
        recs = load_refer_dicts(str(tmp_path), "bad", "unc", "train", "/imgs", invalid="skip")
    sents = [r["sentence"]["raw"] for r in recs]
    if kind in ("bad_sentence", "lone_surrogate"):
        assert sents == ["the box", "the triangle"]  # only the bad sentence is dropped
    else:
        assert sents == ["the triangle"]  # the whole broken ref is dropped
    assert f"skipped 1 invalid item(s): {reason}=1" in caplog.text


@pytest.mark.parametrize("key", ["images", "annotations"])
def test_a_duplicate_id_in_instances_is_refused(tmp_path, key):
    # The official reader keeps the last entry of an id: a ref would silently get another
    # image's file or another object's mask.
    inst = _instances()
    inst[key].append(dict(inst[key][0]))
    save_refer_dataset(str(tmp_path / "dup"), "unc", _refs(), inst)
    last = len(inst[key]) - 1
    with pytest.raises(ReferringDataError, match=rf"instances\.json: {key}\[{last}\]: id: \d+ is also the id of {key}\[0\]"):
        load_refer_dicts(str(tmp_path), "dup", "unc", "train", "/imgs")


@pytest.mark.parametrize("image_id", ["missing", [7]], ids=["missing", "a_list"])
def test_an_annotation_without_an_image_id_is_refused(tmp_path, image_id):
    # Any annotation, target or not (all of them give object_boxes): a list was a bare
    # TypeError (unhashable) from deep inside, a missing one left the object out unseen.
    inst = _instances()
    if image_id == "missing":
        del inst["annotations"][1]["image_id"]
    else:
        inst["annotations"][1]["image_id"] = image_id
    save_refer_dataset(str(tmp_path / "bad"), "unc", _refs()[2:], inst)
    shown = "None" if image_id == "missing" else r"\[7\]"
    with pytest.raises(ReferringDataError, match=rf"instances\.json: annotations\[1\]: image_id: expected the id of its "
                                                 rf"image, got {shown}$"):
        load_refer_dicts(str(tmp_path), "bad", "unc", "val", "/imgs")


def test_annotations_of_no_image_are_counted_not_dropped_unseen(tmp_path, caplog):
    inst = _instances()
    inst["annotations"][1]["image_id"] = "7"  # a string id: no image has it
    save_refer_dataset(str(tmp_path / "odd"), "unc", _refs()[:1], inst)
    with caplog.at_level(logging.WARNING, logger="vipa_d2.data.refer"):
        recs = load_refer_dicts(str(tmp_path), "odd", "unc", "train", "/imgs")
    assert recs[0]["object_boxes"] == [[10.0, 10.0, 20.0, 20.0]]
    assert "1 annotations whose image_id is no image of instances.json (left out of object_boxes)" in caplog.text


def test_a_duplicate_ref_id_is_refused(tmp_path):
    # The official reader keeps the last ref of an id and reads it for both entries.
    refs = _refs()
    refs[1]["ref_id"] = 0
    save_refer_dataset(str(tmp_path / "dup"), "unc", refs, _instances())
    with pytest.raises(ReferringDataError, match=r"refs\(unc\)\.p: ref #1 \(ref_id=0\): ref_id: also the ref_id of ref #0; "
                                                 r"expected unique ids$"):
        load_refer_dicts(str(tmp_path), "dup", "unc", "val", "/imgs")


def test_error_quotes_read_a_bounded_part_of_a_huge_value():
    # A pickle of lists that share themselves is 14 KB on disk and 2^40 elements deep in
    # memory: quoting it in an error must not walk it (session 42: the loader hung on one).
    seen = []

    class Counted:
        def __repr__(self):
            seen.append(1)
            return "x"

    assert quote([Counted() for _ in range(10_000)]).startswith("[x, x, x")
    assert len(seen) <= 30  # the items that fit in the quote, not all 10,000
    nested = []  # (after the check above, so that a regression fails rather than hangs)
    for _ in range(40):
        nested = [nested, nested]
    assert quote(nested).startswith("[[[[") and quote(nested).endswith("...")
    assert quote(10**5000) == "<an integer of 16610 bits>"  # too long for str(): described


def test_readable_oddities_are_read_as_the_official_api_does(tmp_path, caplog):
    # A blank sentence, a ref without sentences and a target whose polygon has no area
    # are all read by lichengunc/refer: a record each (none for no sentence), no error.
    inst, refs = _instances(), _refs()
    refs[0]["sentences"][1]["raw"] = "   "
    refs[1]["sentences"] = []
    inst["annotations"][0]["segmentation"] = [[10.0, 10.0, 20.0, 20.0, 30.0, 30.0]]
    save_refer_dataset(str(tmp_path / "odd"), "unc", refs, inst)
    with caplog.at_level(logging.WARNING, logger="vipa_d2.data.refer"):
        recs = load_refer_dicts(str(tmp_path), "odd", "unc", "train", "/imgs")
    assert [r["sentence"]["raw"] for r in recs] == ["the box", "   "]
    assert annotations_to_mask(recs[0]["annotations"], H, W).sum() == 0
    assert "1 blank sentences (kept)" in caplog.text
    assert "1 refs without sentences (no record)" in caplog.text


def test_invalid_mode_is_checked(refer_root):
    with pytest.raises(ValueError, match="invalid='ignore'"):
        load_refer_dicts(refer_root, "toy", "unc", "train", "/imgs", invalid="ignore")


EXPECTED_BUILTINS = (
    [f"refcoco_unc_{s}" for s in ("train", "val", "testA", "testB")]
    + [f"refcoco+_unc_{s}" for s in ("train", "val", "testA", "testB")]
    + [f"refcocog_umd_{s}" for s in ("train", "val", "test")]
    + [f"refcocog_google_{s}" for s in ("train", "val")]
    + [f"refclef_unc_{s}" for s in ("train", "val", "test")]
    + [f"grefcoco_unc_{s}" for s in ("train", "val", "testA", "testB")]
    + [f"refsynth_unc_{s}" for s in ("train", "val", "testA", "testB")]
    + [f"grefsynth_unc_{s}" for s in ("train", "val", "testA", "testB")]
)


def test_builtins_registered_without_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "nothing_here"))
    names = set(DatasetCatalog.list())
    missing = [n for n in EXPECTED_BUILTINS if n not in names]
    assert not missing
    for n in EXPECTED_BUILTINS:
        meta = MetadataCatalog.get(n)
        assert meta.evaluator_type == "referring"
        assert meta.generalized == n.startswith("g")
        assert meta.split_by in ("unc", "umd", "google")
        assert os.fspath(meta.dataset_root) == str(tmp_path / "nothing_here")
    assert MetadataCatalog.get("refclef_unc_test").image_dir == "saiapr_tc-12"
    assert MetadataCatalog.get("refcoco_unc_val").image_dir == os.path.join("coco", "train2014")
    # Loading without the data names the file under the root read at load time.
    with pytest.raises(FileNotFoundError, match=r"nothing_here/refcoco/refs\(unc\)\.p"):
        DatasetCatalog.get("refcoco_unc_val")


def test_builtin_registration_is_idempotent():
    before = len(DatasetCatalog.list())
    builtin.register_all_referring()
    importlib.reload(builtin)  # a module reload registers again: already-present names are skipped
    builtin.register_all_referring()
    assert len(DatasetCatalog.list()) == before


def test_builtin_root_is_read_at_load_time(synthetic_benchmark, monkeypatch):
    root, stats = synthetic_benchmark(8, seed=5)
    monkeypatch.setenv("DETECTRON2_DATASETS", root)  # exported after the import
    recs = DatasetCatalog.get("refsynth_unc_val")
    assert len(recs) == stats["splits"]["val"]["expressions"] > 0
    assert all(
        r["file_name"].startswith(os.path.join(root, "refsynth", "images")) for r in recs
    )
    assert all(os.path.isfile(r["file_name"]) for r in recs)
    grecs = DatasetCatalog.get("grefsynth_unc_val")
    assert any(r["empty"] for r in grecs) and any(len(r["annotations"]) > 1 for r in grecs)
    # The malformed-ref policy of built-ins is fixed: no environment variable changes it.
    monkeypatch.setenv("VIPA_INVALID_REFS", "bogus")
    assert len(DatasetCatalog.get("refsynth_unc_val")) == len(recs)


def test_invalid_refs_setting_only_accepts_the_fixed_policy():
    builtin.check_invalid_refs_setting("error")
    with pytest.raises(ValueError, match=r"DATASETS.INVALID_REFS='skip'.*invalid='skip'"):
        builtin.check_invalid_refs_setting("skip")


def test_grefs_file_is_json_list(refer_root):
    with open(os.path.join(refer_root, "gtoy", "grefs(unc).json")) as f:
        data = json.load(f)
    assert isinstance(data, list) and data[1]["ann_id"] == [-1]


@pytest.mark.parametrize(
    "fields,pattern,reason",
    [
        (
            {"type": 3},
            r"refs\(unc\)\.p: ref #0 \(ref_id=0\): sentences\[1\]\.type: expected a non-empty string, got 3",
            "bad_type",
        ),
        (
            {"landmark_ann_id": 101, "landmark_phrase": "circle"},
            r"sentences\[1\]\.landmark_phrase: 'circle' is not a phrase of the sentence",
            "bad_landmark",
        ),
        ({"landmark_ann_id": 101}, r"sentences\[1\]\.landmark_phrase: None is not a phrase", "bad_landmark"),
        (
            {"landmark_phrase": "triangle"},
            r"ref #0 \(ref_id=0\): sentences\[1\]\.landmark_ann_id: missing \('landmark_ann_id' and 'landmark_phrase'",
            "bad_landmark",
        ),
        (
            {"landmark_ann_id": 102, "landmark_phrase": "triangle"},
            r"instances\.json: ann_id=102 \(landmark of ref_id=0\): image_id: 8, but the ref is about image 7",
            "landmark_ann_image_mismatch",
        ),
        (
            {"group_ann_ids": 100},
            r"sentences\[1\]\.group_ann_ids: expected a list of annotation ids, got 100",
            "bad_group",
        ),
        (
            {"group_ann_ids": [100, 999]},
            r"refs\(unc\)\.p: ref #0 \(ref_id=0\): sentences\[1\]\.group_ann_ids\[1\]: 999 is not an annotation id of "
            r".*instances\.json",
            "group_unknown_ann_id",
        ),
        (
            {"group_ann_ids": [[100]]},
            r"refs\(unc\)\.p: ref #0 \(ref_id=0\): sentences\[1\]\.group_ann_ids\[0\]: expected an annotation id \(an "
            r"integer or a string\), got \[100\]",
            "group_bad_ann_id",
        ),
        (
            {"landmark_ann_id": {"id": 101}, "landmark_phrase": "triangle"},
            r"ref #0 \(ref_id=0\): sentences\[1\]\.landmark_ann_id: expected an annotation id \(an integer or a string\), "
            r"got \{'id': 101\}",
            "landmark_bad_ann_id",
        ),
        (  # the category / colour words name the target too (extension review, session 53)
            {"group_ann_ids": [101]},
            r"refs\(unc\)\.p: ref #0 \(ref_id=0\): sentences\[1\]\.group_ann_ids: leaves out the target\(s\) \[100\]",
            "group_without_target",
        ),
        (
            {"group_ann_ids": [100, 102]},
            r"instances\.json: ann_id=102 \(group member of ref_id=0\): image_id: 8, but the ref is about image 7",
            "group_ann_image_mismatch",
        ),
    ],
)
def test_bad_breakdown_fields_error_or_skip_the_sentence(tmp_path, caplog, fields, pattern, reason):
    refs = _refs()
    refs[0]["sentences"][1] = make_sentence("the square left of the triangle", 1) | fields
    save_refer_dataset(str(tmp_path / "bad"), "unc", refs, _instances())
    with pytest.raises(ReferringDataError, match=pattern):
        load_refer_dicts(str(tmp_path), "bad", "unc", "train", "/imgs")
    with caplog.at_level(logging.WARNING, logger="vipa_d2.data.refer"):
        recs = load_refer_dicts(str(tmp_path), "bad", "unc", "train", "/imgs", invalid="skip")
    assert [r["sentence"]["raw"] for r in recs] == ["the box", "the triangle"]
    assert f"skipped 1 invalid item(s): {reason}=1" in caplog.text


def test_breakdown_fields_become_record_fields(tmp_path):
    refs = _refs()
    landmark = {"landmark_ann_id": 101, "landmark_phrase": "triangle"}
    refs[0]["sentences"][1] = make_sentence("the square left of the triangle", 1) | landmark
    refs[0]["sentences"][1]["type"] = "relation"
    save_refer_dataset(str(tmp_path / "toy"), "unc", refs, _instances())
    recs = load_refer_dicts(str(tmp_path), "toy", "unc", "train", "/imgs")
    rel = recs[1]
    assert rel["type"] == "relation"
    assert rel["sentence"] == {"raw": "the square left of the triangle", "sent_id": 1}
    assert rel["landmark"]["ann_id"] == 101 and rel["landmark"]["phrase"] == "triangle"
    # The landmark annotation is the one the triangle's own ref gets.
    assert rel["landmark"]["annotation"] == recs[2]["annotations"][0]
    assert not {"type", "landmark"} & set(recs[0])


def test_group_ann_ids_become_object_in_group_beside_object_boxes(tmp_path):
    refs = _refs()
    refs[0]["sentences"][1] = make_sentence("the square left of the triangle", 1) | {"group_ann_ids": [100]}
    refs[1]["sentences"][0]["group_ann_ids"] = [100, 101]
    save_refer_dataset(str(tmp_path / "toy"), "unc", refs, _instances())
    recs = load_refer_dicts(str(tmp_path), "toy", "unc", "train", "/imgs")
    assert [r["object_boxes"] for r in recs] == [[[10.0, 10.0, 20.0, 20.0], [35.0, 5.0, 20.0, 30.0]]] * 3
    assert "object_in_group" not in recs[0]  # the sentence names no group
    assert recs[1]["object_in_group"] == [True, False] and recs[2]["object_in_group"] == [True, True]
    assert not any("group_ann_ids" in r for r in recs)


def test_annotations_without_a_box_give_object_boxes_from_their_segmentation(tmp_path, caplog):
    # Left out before: a box-less object, a target too, was missing from the centre maps and
    # the object choice's candidates, while its record annotation had a box (data review, session 59).
    inst = _instances()
    del inst["annotations"][1]["bbox"]  # a polygon target
    inst["annotations"].append({"id": 103, "image_id": 7, "category_id": 2, "segmentation": [[1.0, 1.0]], "iscrowd": 0})
    # An image no ref uses, whose size is unusable: its box-less object is counted, not a traceback.
    inst["images"].append({"id": 9, "file_name": "c.jpg", "height": "tall", "width": W})
    inst["annotations"].append({"id": 104, "image_id": 9, "category_id": 2, "segmentation": [SQUARE], "iscrowd": 0})
    save_refer_dataset(str(tmp_path / "toy"), "unc", _refs(), inst)
    with caplog.at_level("WARNING", logger="vipa_d2"):
        recs = load_refer_dicts(str(tmp_path), "toy", "unc", "train", "/imgs")
    triangle = recs[2]["annotations"][0]["bbox"]  # the record's box, from the same segmentation
    assert [r["object_boxes"] for r in recs] == [[[10.0, 10.0, 20.0, 20.0], triangle]] * 3
    assert "2 annotations without a usable bbox (in object_boxes with their segmentation's box)" in caplog.text  # + the blob
    assert "1 annotations without a usable bbox or segmentation (left out of object_boxes)" in caplog.text
    assert "1 annotations without a usable bbox, of an unusable image (left out of object_boxes)" in caplog.text
    # The RLE blob of the other image (no bbox in _instances) is its image's object.
    val = load_refer_dicts(str(tmp_path), "toy", "unc", "val", "/imgs")
    assert val[0]["object_boxes"] == [[40.0, 20.0, 18.0, 15.0]]


def test_annotation_areas_become_object_areas_beside_object_boxes(tmp_path):
    inst = _instances()
    inst["annotations"][0]["area"] = 400
    inst["annotations"][1]["area"] = 250.5
    save_refer_dataset(str(tmp_path / "toy"), "unc", _refs(), inst)
    recs = load_refer_dicts(str(tmp_path), "toy", "unc", "train", "/imgs")
    assert [r["object_areas"] for r in recs] == [[400.0, 250.5]] * 3
    # One object of the image without a usable area: no areas for its records (the area
    # loss then refuses them by name), the boxes as before.
    for bad in (None, "400", -1.0, float("nan"), True):
        inst["annotations"][1]["area"] = bad
        save_refer_dataset(str(tmp_path / "toy"), "unc", _refs(), inst)
        recs = load_refer_dicts(str(tmp_path), "toy", "unc", "train", "/imgs")
        assert not any("object_areas" in r for r in recs), bad
        assert [r["object_boxes"] for r in recs] == [[[10.0, 10.0, 20.0, 20.0], [35.0, 5.0, 20.0, 30.0]]] * 3
