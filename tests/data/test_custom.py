"""Simple JSON format: validation, conversion to REFER layout, registration, CLI."""

import copy
import json
import os
import pickle
import re

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from common import REPO_ROOT, load_script
from vipa_d2.data import refer as refer_module
from vipa_d2.data.custom import check_refer_splits
from vipa_d2.data import (
    ReferringFormatError,
    annotations_to_mask,
    convert_simple_json,
    mask_to_rle,
    register_referring_dataset,
    validate_simple_json,
)

H, W = 50, 80


def _blob():
    m = np.zeros((H, W), np.uint8)
    m[10:40, 50:75] = 1
    return m


def _data():
    return {
        "images": [
            {
                "file_name": "one.jpg",
                "height": H,
                "width": W,
                "split": "train",
                "objects": [
                    {"id": 1, "category": "cup", "segmentation": [[5, 5, 30, 5, 30, 30, 5, 30]]},
                    {"id": "b", "category": "cup", "segmentation": mask_to_rle(_blob())},
                    {
                        "id": 3,
                        "category": "apple",
                        "segmentation": [[35, 35, 45, 35, 40, 45]],
                        "note": "ignored",
                    },
                ],
                "expressions": [
                    {"text": "the cup on the left", "targets": [1]},
                    {"text": "left cup", "targets": [1]},
                    {"text": "the cup on the right", "targets": ["b"]},
                    {"text": "the apple", "targets": [3]},
                ],
            },
            {
                "file_name": "two.jpg",
                "height": H,
                "width": W,
                "split": "val",
                "objects": [{"id": 1, "category": "cup", "segmentation": [[0, 0, 80, 0, 80, 50]]}],
                "expressions": [{"text": "the only cup", "targets": [1]}],
            },
        ]
    }


def _generalized_data():
    data = _data()
    data["images"][0]["expressions"] += [
        {"text": "both cups", "targets": [1, "b"]},
        {"text": "the green cup", "targets": []},
    ]
    return data


def _write(tmp_path, data, name="refs.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_convert_and_register_round_trip(tmp_path):
    src = _write(tmp_path, _data())
    paths = convert_simple_json(src, str(tmp_path / "root" / "mine"), split_by="unc")
    assert paths["refs"].endswith(os.path.join("mine", "refs(unc).p"))
    with open(paths["refs"], "rb") as f:
        refs = pickle.load(f)
    # Expressions with the same target become one ref with several sentences.
    assert sorted(len(r["sentences"]) for r in refs) == [1, 1, 1, 2]
    with open(paths["instances"]) as f:
        inst = json.load(f)
    assert [c["name"] for c in inst["categories"]] == ["apple", "cup"]

    name = "test_custom_mine_train"
    register_referring_dataset(
        name, str(tmp_path / "root"), "mine", "unc", "train", "/img", extra_key=7
    )
    try:
        recs = DatasetCatalog.get(name)
        meta = MetadataCatalog.get(name)
        assert (meta.evaluator_type, meta.generalized, meta.extra_key) == ("referring", False, 7)
        assert len(recs) == 4
        by_text = {r["sentence"]["raw"]: r for r in recs}
        assert by_text["left cup"]["file_name"] == os.path.join("/img", "one.jpg")
        np.testing.assert_array_equal(
            annotations_to_mask(by_text["the cup on the right"]["annotations"], H, W), _blob()
        )
        left = annotations_to_mask(by_text["the cup on the left"]["annotations"], H, W)
        assert left[10, 10] == 1 and left.sum() == 25 * 25
        assert by_text["the apple"]["annotations"][0]["category_id"] == 1
        with pytest.raises(ValueError, match="already registered \\(a built-in, or a registration with other arguments\\)"):
            register_referring_dataset(name, str(tmp_path / "root"), "mine", "unc", "train", "/img")
        with pytest.raises(ValueError, match="already registered \\(a built-in, or a registration with other arguments\\)"):
            register_referring_dataset(name, str(tmp_path / "root"), "mine", "unc", "train", "/img", extra_key=7,
                                       invalid="skip")
        # The same call again (a rerun notebook cell) was refused too (extension review, session 55).
        register_referring_dataset(name, str(tmp_path / "root"), "mine", "unc", "train", "/img", extra_key=7)
        assert len(DatasetCatalog.get(name)) == 4
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_a_split_is_parsed_again_only_when_its_files_change(tmp_path, monkeypatch):
    # Every evaluation re-read the whole refs file: 10-15 s a set at RefCOCO's size with
    # the safe unpickler (scale review, session 60).
    root = tmp_path / "root"
    convert_simple_json(_write(tmp_path, _data()), str(root / "mine"), split_by="unc")
    parsed = []
    read_pickle = refer_module.check.read_pickle_file
    monkeypatch.setattr(refer_module.check, "read_pickle_file", lambda path: parsed.append(path) or read_pickle(path))
    name = "test_custom_cached_train"
    register_referring_dataset(name, str(root), "mine", "unc", "train", "/img")
    try:
        first = DatasetCatalog.get(name)
        first[0]["sentence"]["raw"] = "changed by a caller"  # a fresh list each call: not seen again
        again = DatasetCatalog.get(name)
        assert len(parsed) == 1 and pickle.dumps(again) == pickle.dumps(DatasetCatalog.get(name))
        assert [r["sentence"]["raw"] for r in again] == ["the cup on the left", "left cup", "the cup on the right", "the apple"]
        # Rewritten in place, same size, its modification time put back (rsync -t): read too.
        instances = root / "mine" / "instances.json"
        stat, text = os.stat(instances), instances.read_text()
        assert again[0]["target_phrase"] == "cup" and text.count('"name": "cup"') == 1
        instances.write_text(text.replace('"name": "cup"', '"name": "cap"'))
        os.utime(instances, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert "target_phrase" not in DatasetCatalog.get(name)[0] and len(parsed) == 2
        # Converted again with another expression: the new file is read.
        data = _data()
        data["images"][0]["expressions"].append({"text": "the small apple", "targets": [3]})
        convert_simple_json(_write(tmp_path, data), str(root / "mine"), split_by="unc", overwrite=True)
        assert len(DatasetCatalog.get(name)) == 5 and len(parsed) == 3
        # ... and a missing file is said by the loader, as before.
        os.remove(root / "mine" / "refs(unc).p")
        with pytest.raises(FileNotFoundError, match=r"refs\(unc\).p"):
            DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_generalized_conversion(tmp_path):
    src = _write(tmp_path, _generalized_data())
    with pytest.raises(
        ReferringFormatError, match=r"expressions\[4\]\.targets: expected exactly one target, got 2"
    ):
        convert_simple_json(src, str(tmp_path / "root" / "g"))
    convert_simple_json(src, str(tmp_path / "root" / "g"), generalized=True)
    name = "test_custom_g_train"
    register_referring_dataset(
        name, str(tmp_path / "root"), "g", "unc", "train", "/img", generalized=True
    )
    try:
        recs = DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    by_text = {r["sentence"]["raw"]: r for r in recs}
    assert len(recs) == 6
    assert (
        by_text["the green cup"]["empty"] is True and by_text["the green cup"]["annotations"] == []
    )
    both = annotations_to_mask(by_text["both cups"]["annotations"], H, W)
    assert both.sum() == 25 * 25 + _blob().sum()


def test_type_and_landmark_reach_refer_sentences_and_records(tmp_path):
    data = _data()
    data["images"][0]["expressions"] += [
        {"text": "the cup left of the apple", "targets": [1], "type": "relation",
         "landmark": 3, "landmark_phrase": "apple"},
        {"text": "the right cup", "targets": ["b"], "type": "position", "group": [1, "b"]},
        {"text": "the thing on the left", "targets": [1]},
    ]
    paths = convert_simple_json(_write(tmp_path, data), str(tmp_path / "root" / "mine"))
    with open(paths["refs"], "rb") as f:
        sentences = {s["raw"]: s for r in pickle.load(f) for s in r["sentences"]}
    # The apple is the third object of the first image: ann id 3.
    assert sentences["the cup left of the apple"]["type"] == "relation"
    assert sentences["the cup left of the apple"]["landmark_ann_id"] == 3
    assert sentences["the cup left of the apple"]["landmark_phrase"] == "apple"
    assert sentences["the right cup"]["type"] == "position"
    assert "landmark_ann_id" not in sentences["the right cup"]
    assert sentences["the right cup"]["group_ann_ids"] == [1, 2]  # the two cups
    assert set(sentences["left cup"]) == {"raw", "sent", "tokens", "sent_id"}  # as before

    name = "test_custom_landmark_train"
    register_referring_dataset(name, str(tmp_path / "root"), "mine", "unc", "train", "/img")
    try:
        recs = {r["sentence"]["raw"]: r for r in DatasetCatalog.get(name)}
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    rel = recs["the cup left of the apple"]
    assert rel["type"] == "relation" and rel["sentence"]["sent_id"] is not None
    assert (rel["landmark"]["ann_id"], rel["landmark"]["phrase"]) == (3, "apple")
    np.testing.assert_array_equal(
        annotations_to_mask([rel["landmark"]["annotation"]], H, W),
        annotations_to_mask(recs["the apple"]["annotations"], H, W),
    )
    # A one-target sentence naming its target's category carries that name (the mapper
    # looks up its first occurrence); one that does not name it carries none.
    assert rel["target_phrase"] == "cup" and recs["the apple"]["target_phrase"] == "apple"
    assert "target_phrase" not in recs["the thing on the left"]
    assert recs["the right cup"]["type"] == "position" and "landmark" not in recs["the right cup"]
    assert recs["the right cup"]["object_in_group"] == [True, True, False]  # cups, not the apple
    assert not {"type", "landmark"} & set(recs["left cup"])
    # Every record lists the boxes of all objects of its image, targets or not.
    assert len(rel["object_boxes"]) == 3 and rel["object_boxes"] == recs["left cup"]["object_boxes"]
    assert [5.0, 5.0, 25.0, 25.0] in rel["object_boxes"]
    assert recs["the apple"]["annotations"][0]["bbox"] in rel["object_boxes"]


def _mutations():
    def m(path_fn):
        data = _data()
        path_fn(data)
        return data

    img0 = lambda d: d["images"][0]  # noqa: E731
    return [
        (
            m(lambda d: img0(d).pop("height")),
            r"\$\.images\[0\]\.height: expected an integer in 1\.\.32768, got None",
        ),
        (  # the loader's bound: a file it would refuse is not written
            m(lambda d: img0(d).update(width=40000)),
            r"\$\.images\[0\]\.width: expected an integer in 1\.\.32768, got 40000",
        ),
        (  # the loader's pixel bound: written anyway, and merging its masks could kill the process
            m(lambda d: img0(d).update(height=10000, width=10000)),
            r"\$\.images\[0\]: height x width 10000 x 10000 is more than 67108864 pixels$",
        ),
        (  # not an id at all (a list is not hashable: this was a TypeError from inside)
            m(lambda d: img0(d)["expressions"][0].update(targets=[[1]])),
            r"\$\.images\[0\]\.expressions\[0\]\.targets: expected object ids \(integers or strings\), got \[1\]",
        ),
        (m(lambda d: img0(d).update(split=3)), r"\$\.images\[0\]\.split: expected a split name"),
        (
            m(lambda d: img0(d)["objects"][0].update(segmentation=[[1, 1, 5, 5]])),
            r"\$\.images\[0\]\.objects\[0\]\.segmentation: polygon 0 is degenerate: 4 coordinates, expected",
        ),
        (
            m(lambda d: img0(d)["objects"][0].update(segmentation=[[1, 1, 2, 2, 3, 3]])),
            r"\$\.images\[0\]\.objects\[0\]\.segmentation: polygon 0 is degenerate: zero area",
        ),
        (  # one polygon without its enclosing list: it said "must be a flat list of numbers"
            m(lambda d: img0(d)["objects"][0].update(segmentation=[20, 5, 40, 5, 40, 15, 20, 15])),
            r"\$\.images\[0\]\.objects\[0\]\.segmentation: expected a list of polygons \[\[x0, y0, x1, y1, \.\.\.\], "
            r"\.\.\.\], got one flat list of numbers",
        ),
        (
            m(lambda d: img0(d)["objects"][1]["segmentation"].update(size=[W, H])),
            r"\$\.images\[0\]\.objects\[1\]\.segmentation: RLE size \[80, 50\] does not match the image size \[50, 80\]",
        ),
        (
            m(lambda d: img0(d)["objects"][0].update(segmentation=[[1, 1, 200, 1, 200, 20]])),
            r"\$\.images\[0\]\.objects\[0\]\.segmentation\[0\]: polygon spans .* outside the 80x50 image",
        ),
        (
            m(
                lambda d: (
                    img0(d)["objects"][2].update(id=1),
                    img0(d)["expressions"][3].update(targets=[1]),
                )
            ),
            r"\$\.images\[0\]\.objects\[2\]\.id: duplicate object id 1",
        ),
        (
            m(lambda d: img0(d)["objects"][2].pop("category")),
            r"\$\.images\[0\]\.objects\[2\]\.category: expected a non-empty",
        ),
        (
            m(lambda d: img0(d)["expressions"][1].update(text=" ")),
            r"\$\.images\[0\]\.expressions\[1\]\.text: expected a non-empty expression",
        ),
        (  # an emoji cut in half: it converted, and the tokenizer refused it in training
            m(lambda d: img0(d)["expressions"][1].update(text="the cup \ud83d")),
            r"\$\.images\[0\]\.expressions\[1\]\.text: 'the cup \\ud83d' is not valid text \(undecodable bytes\?\)",
        ),
        (
            m(lambda d: img0(d)["expressions"][0].update(targets=[9])),
            r"\$\.images\[0\]\.expressions\[0\]\.targets: 9 is not the id of an object of this image",
        ),
        (
            m(lambda d: img0(d)["expressions"][0].update(targets=[])),
            r"\$\.images\[0\]\.expressions\[0\]\.targets: expected exactly one target, got 0",
        ),
        (
            m(lambda d: d.pop("images")),
            r"\$\.images: expected a top-level object with a list 'images'",
        ),
        (
            m(lambda d: img0(d)["expressions"][1].update(type="")),
            r"\$\.images\[0\]\.expressions\[1\]\.type: expected a non-empty expression type",
        ),
        (
            m(lambda d: img0(d)["expressions"][0].update(landmark="b")),
            r"expressions\[0\]\.landmark_phrase: required when 'landmark' is given",
        ),
        (
            m(lambda d: img0(d)["expressions"][0].update(landmark_phrase="cup")),
            r"expressions\[0\]\.landmark: required when 'landmark_phrase' is given",
        ),
        (
            m(lambda d: img0(d)["expressions"][0].update(landmark=9, landmark_phrase="cup")),
            r"expressions\[0\]\.landmark: 9 is not the id of an object of this image",
        ),
        (
            m(lambda d: img0(d)["expressions"][0].update(landmark=1, landmark_phrase="cup")),
            r"expressions\[0\]\.landmark: 1 is also a target of the expression",
        ),
        (
            m(lambda d: img0(d)["expressions"][0].update(landmark="b", landmark_phrase="mug")),
            r"expressions\[0\]\.landmark_phrase: 'mug' does not occur \(as whole words\) in "
            r"the text 'the cup on the left'",
        ),
        (
            m(lambda d: img0(d)["expressions"][0].update(group=1)),
            r"expressions\[0\]\.group: expected a list of object ids of this image, got 1",
        ),
        (
            m(lambda d: img0(d)["expressions"][0].update(group=[1, 1])),
            r"expressions\[0\]\.group: duplicate ids in \[1, 1\]",
        ),
        (
            m(lambda d: img0(d)["expressions"][0].update(group=[1, 7])),
            r"expressions\[0\]\.group: \[7\] are not ids of objects of this image",
        ),
        (  # the group holds the targets too (extension review, session 53)
            m(lambda d: img0(d)["expressions"][0].update(group=["b"])),
            r"expressions\[0\]\.group: leaves out the target\(s\) \[1\]",
        ),
    ]


@pytest.mark.parametrize("data,pattern", _mutations())
def test_validation_errors_name_file_path_and_expectation(tmp_path, data, pattern):
    src = _write(tmp_path, data)
    with pytest.raises(ReferringFormatError) as e:
        convert_simple_json(src, str(tmp_path / "out"))
    assert str(e.value).startswith(src + ": 1 problem(s)")
    assert re.search(pattern, str(e.value)), str(e.value)
    assert not os.path.exists(tmp_path / "out")  # nothing written for invalid input


def test_validation_lists_every_problem_and_checks_images(tmp_path):
    data = _data()
    data["images"][0]["expressions"][0]["text"] = ""
    data["images"][1]["width"] = -1
    with pytest.raises(
        ReferringFormatError, match=r"2 problem\(s\)[\s\S]*images\[0\][\s\S]*images\[1\]\.width"
    ):
        validate_simple_json(data, "mine.json")
    (tmp_path / "one.jpg").write_bytes(b"x")
    with pytest.raises(
        ReferringFormatError, match=r"images\[1\]\.file_name: image .*two\.jpg does not exist"
    ):
        validate_simple_json(_data(), "mine.json", image_root=str(tmp_path))
    validate_simple_json(copy.deepcopy(_generalized_data()), "mine.json", generalized=True)
    twice = _data()
    twice["images"].append(copy.deepcopy(twice["images"][0]))
    with pytest.raises(ReferringFormatError, match=r"images\[2\]\.file_name: 'one\.jpg' is listed again \(first at \$\.images\[0\]\)"):
        validate_simple_json(twice, "mine.json")


def test_image_root_checks_each_image_size_as_the_trainer_will(tmp_path):
    # Detectron2's mapper compares the declared size with the image it reads (EXIF rotation
    # applied) only at training time; with --image-root the converter does it first.
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "one.jpg")
    turned = Image.fromarray(np.zeros((W, H, 3), np.uint8))  # stored W x H, shown H x W
    exif = turned.getexif()
    exif[0x0112] = 6  # "rotate 90"
    turned.save(tmp_path / "two.jpg", exif=exif)
    validate_simple_json(_data(), "mine.json", image_root=str(tmp_path))
    Image.fromarray(np.zeros((W, H, 3), np.uint8)).save(tmp_path / "two.jpg")  # no EXIF: really W x H
    with pytest.raises(ReferringFormatError, match=rf"images\[1\]: height x width {H} x {W}, but .*two\.jpg is {W} x {H}"):
        validate_simple_json(_data(), "mine.json", image_root=str(tmp_path))


def test_the_datasets_readme_example_is_valid_as_written():
    # Users paste it: it must pass validation as printed (generalized: it has a two-target
    # and a no-target expression, which the README says need --generalized).
    with open(os.path.join(REPO_ROOT, "datasets", "README.md")) as f:
        example = re.search(r"```json\n(.*?)```", f.read(), re.S).group(1)
    validate_simple_json(json.loads(example), "datasets/README.md", generalized=True)


def test_register_expands_the_home_folder(tmp_path, monkeypatch):
    # "~/data" in DATASETS.REFER_SPLITS or a notebook was a folder named "~", not found
    # (data review, session 59).
    monkeypatch.setenv("HOME", str(tmp_path))
    convert_simple_json(_write(tmp_path, _data()), str(tmp_path / "root" / "mine"), split_by="unc")
    name = "test_custom_home"
    register_referring_dataset(name, "~/root", "mine", "unc", "train", "~/img")
    try:
        records = DatasetCatalog.get(name)
        assert records[0]["file_name"].startswith(os.path.join(str(tmp_path), "img") + os.sep)
        assert MetadataCatalog.get(name).dataset_root == str(tmp_path / "root")
        register_referring_dataset(name, "~/root", "mine", "unc", "train", "~/img")  # the same call: a no-op
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_register_rejects_bad_invalid_mode():
    with pytest.raises(ValueError, match="invalid='drop'"):
        register_referring_dataset(
            "test_custom_bad_mode", "/x", "d", "unc", "train", "/img", invalid="drop"
        )
    assert "test_custom_bad_mode" not in DatasetCatalog.list()


def test_a_refused_registration_leaves_the_name_free():
    # Helper review (session 46): the dataset was registered before its metadata was set, so
    # a clash there left the name taken, with stale or missing metadata, for good.
    name = "test_custom_half_registered"
    with pytest.raises(ValueError, match=r"metadata \['evaluator_type'\] are set from the arguments"):
        register_referring_dataset(name, "/x", "d", "unc", "val", "/img", evaluator_type="coco")
    assert name not in DatasetCatalog.list()
    register_referring_dataset(name, "/x", "d", "unc", "val", "/img", generalized=True)
    DatasetCatalog.remove(name)  # the metadata stays behind
    with pytest.raises(ValueError, match=r"still holds another registration's generalized=True.*MetadataCatalog.remove"):
        register_referring_dataset(name, "/x", "d", "unc", "train", "/img")
    assert name not in DatasetCatalog.list()
    MetadataCatalog.remove(name)
    register_referring_dataset(name, "/x", "d", "unc", "train", "/img")
    assert MetadataCatalog.get(name).split == "train" and not MetadataCatalog.get(name).generalized
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_one_name_for_two_config_splits_is_refused():
    # Helper review (session 46): only the first was registered, so a copy-paste slip
    # evaluated (and picked model_best on) the train split, silently.
    entry = {"name": "test_custom_twice", "refer_root": "/x", "dataset": "d", "split_by": "unc",
             "split": "train", "image_root": "/img"}
    check_refer_splits([entry, dict(entry)])  # the same entry twice registers it once
    with pytest.raises(ValueError, match=r"REFER_SPLITS\[1\].name: 'test_custom_twice' is also the name of DATASETS.REFER_SPLITS\[0\]"):
        check_refer_splits([entry, {**entry, "split": "val"}])


def test_cli_tool(tmp_path, capsys):
    tool = load_script("tools/convert_referring_json.py")
    good = _write(tmp_path, _data(), "good.json")
    assert tool.main([good, "--check-only"]) == 0
    assert "valid (2 images)" in capsys.readouterr().out
    assert (
        tool.main(
            [good, "--out-root", str(tmp_path / "root"), "--dataset", "cli", "--split-by", "mine"]
        )
        == 0
    )
    assert os.path.isfile(tmp_path / "root" / "cli" / "refs(mine).p")
    assert os.path.isfile(tmp_path / "root" / "cli" / "instances.json")

    bad = _write(tmp_path, _generalized_data(), "bad.json")
    assert tool.main([bad, "--out-root", str(tmp_path / "root"), "--dataset", "bad"]) == 1
    err = capsys.readouterr().err
    assert bad in err and "expressions[4].targets" in err and "--generalized" in err
    assert (
        tool.main([bad, "--out-root", str(tmp_path / "root"), "--dataset", "bad", "--generalized"])
        == 0
    )
    assert os.path.isfile(tmp_path / "root" / "bad" / "grefs(unc).json")

    assert tool.main([str(tmp_path / "nope.json"), "--check-only"]) == 1
    assert "nope.json" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{not json")
    assert tool.main([str(tmp_path / "broken.json"), "--check-only"]) == 1
    assert "broken.json: not valid JSON" in capsys.readouterr().err
    # The loader's JSON reader: bytes that are not UTF-8 are named, not a UnicodeDecodeError.
    (tmp_path / "latin1.json").write_bytes('{"images": [{"file_name": "caf\u00e9.jpg"}]}'.encode("latin-1"))
    assert tool.main([str(tmp_path / "latin1.json"), "--check-only"]) == 1
    assert "latin1.json: not valid JSON (not UTF-8 text" in capsys.readouterr().err


def test_cli_tool_keeps_an_existing_refer_folder_unless_told(tmp_path, capsys):
    # A second conversion into a folder replaced its files without a word, among them the
    # instances.json that its other refs files index (tools review, session 56).
    tool = load_script("tools/convert_referring_json.py")
    good = _write(tmp_path, _data(), "good.json")
    folder = tmp_path / "root" / "mine"
    argv = [good, "--out-root", str(tmp_path / "root"), "--dataset", "mine"]
    assert tool.main(argv) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert tool.main(argv) == 1  # its own refs file again
    err = capsys.readouterr().err
    assert err == (f"error: {folder} already holds refs(unc).p, which this conversion would replace; give another "
                   "--dataset, or --overwrite to replace them\n")
    # Another split provider of the same images and objects (refcocog's google and umd) goes beside it.
    assert tool.main(argv + ["--split-by", "google"]) == 0
    assert capsys.readouterr().err == ""
    assert (folder / "instances.json").read_bytes() == before["instances.json"]
    # Other images or objects would change the instances.json that refs(unc).p and refs(google).p index.
    other = _data()
    other["images"] = other["images"][:1]
    smaller = [_write(tmp_path, other, "smaller.json"), *argv[1:], "--split-by", "umd"]
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert tool.main(smaller) == 1
    assert f"{folder} already holds instances.json, which this conversion would replace" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing written
    assert tool.main(smaller + ["--overwrite"]) == 0
    captured = capsys.readouterr()
    assert "refs(umd).p" in captured.out and (folder / "instances.json").read_bytes() != before["instances.json"]
    assert f"warning: refs(google).p, refs(unc).p in {folder} index the instances.json replaced now" in captured.err


def test_cli_tool_refuses_names_with_folders_and_unwritable_roots(tmp_path, capsys):
    tool = load_script("tools/convert_referring_json.py")
    good = _write(tmp_path, _data(), "good.json")
    root = tmp_path / "root"
    for option, name in (("--split-by", "a/b"), ("--split-by", ".."), ("--dataset", "../up")):
        argv = [good, "--out-root", str(root), "--dataset", "mine", option, name]
        with pytest.raises(SystemExit) as e:
            tool.main(argv)
        assert e.value.code == 2 and f"{option} {name!r}: expected a plain name" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert tool.main([good, "--out-root", str(tmp_path / "a_file"), "--dataset", "mine"]) == 1
    assert "a_file" in capsys.readouterr().err
    assert not root.exists()  # nothing half written


def test_a_failed_write_leaves_no_dataset_file(tmp_path):
    # Each file is written whole or not at all: a refs object that cannot be serialised
    # leaves the REFER folder as it was, no partial refs file beside instances.json.
    from vipa_d2.data.refer import save_refer_dataset

    with pytest.raises(TypeError):
        save_refer_dataset(str(tmp_path / "d"), "unc", [{"ref_id": object()}], {"images": []}, generalized=True)
    assert sorted(os.listdir(tmp_path / "d")) == ["instances.json"]
