"""
REFER / gRefCOCO loading against an independent reading done the way the official APIs do
it (lichengunc/refer's ``REFER`` as LAVT uses it, ReLA's ``G_REFER``): records, masks at
the original and at the input resolution, odd images and sentences; then every kind of
bad input, loaded in a memory-capped subprocess, gives a one-line error naming file, id
and field, and never a dead or hung process.
"""

import json
import math
import os
import pickle
import resource
import subprocess
import sys
from typing import Callable, NamedTuple, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from common import MAPPER_OPTS, REPO_ROOT, RunsCode, compressed_rle, make_cfg, uncompressed_rle, write_image
from vipa_d2.data import ReferringDataError, ReferringDatasetMapper, annotations_to_mask, load_refer_dicts
from vipa_d2.data.masks import segmentation_to_mask
from vipa_d2.data.refer import make_sentence, save_refer_dataset

SIZE = 32  # MAPPER_OPTS' INPUT.IMAGE_SIZE
# (image id, file, height, width, PIL mode): gray and RGBA files, odd sizes.
IMAGES = [
    (1, "gray.png", 23, 37, "L"),
    (2, "rgba.png", 30, 41, "RGBA"),
    (3, "rgb.png", 48, 64, "RGB"),
]
LONG_UNICODE = "the bow tie " + "ÿ中文🙂é, la señal à gauche; " * 60


def _blob(h, w):
    m = np.zeros((h, w), np.uint8)
    m[10:40, 30:60] = 1
    m[5:9, 2:6] = 1
    return m


def _annotations():
    h3, w3 = 48, 64
    segs = {
        11: (1, [[2, 2, 30, 20, 30, 2, 2, 20]]),  # self-intersecting bow-tie: shoelace area 0
        12: (1, [[3, 3, 12, 3, 12, 12, 3, 12], [20, 5, 25, 10, 30, 15]]),  # + collinear part
        13: (2, [[5, 5, 20, 5, 20, 15], [25, 2, 35, 20]]),  # + a 2-point part
        14: (2, [[2.5, 25, 15, 25.5, 15, 29, 2]]),  # odd count: pycocotools reads 3 points
        15: (3, compressed_rle(_blob(h3, w3))),
        16: (3, uncompressed_rle(1 - _blob(h3, w3))),
        17: (3, [[-10, -10, 30, -5, 40, 60, -5, 50]]),  # partly outside: clipped
        18: (3, [[5, 5, 10, 10, 15, 15]]),  # collinear: an empty mask
        19: (2, [[0, 0, 40, 0, 40, 29, 0, 29]]),  # integer coordinates
        # A list of RLE parts (ReferIt's form), overlapping: REFER decodes and sums them.
        20: (3, [compressed_rle(_blob(h3, w3)), compressed_rle(np.roll(_blob(h3, w3), 7, axis=1))]),
    }
    return [
        {"id": aid, "image_id": iid, "category_id": 1, "segmentation": seg, "iscrowd": 0}
        for aid, (iid, seg) in segs.items()
    ]


def _instances():
    images = [{"id": i, "file_name": f, "height": h, "width": w} for i, f, h, w, _ in IMAGES]
    return {"images": images, "annotations": _annotations(), "categories": [{"id": 1, "name": "x"}]}


def _refs():
    image_of = {a["id"]: a["image_id"] for a in _annotations()}
    spec = [  # (ann_id, split, sentences)
        (11, "train", [LONG_UNICODE, "bow tie"]),
        (12, "train", ["square and a line", "   "]),
        (13, "val", ["the triangle"]),
        (14, "testA", ["odd polygon"]),
        (15, "testB", ["the blob"]),
        (16, "testAB", ["everything but the blob"]),  # official: in testA, testB and test
        (17, "val", ["clipped"]),
        (18, "val", ["nothing drawn"]),
        (19, "train", []),  # no sentence: no record
        (20, "val", ["two blobs"]),
    ]
    refs, sid = [], 0
    for ref_id, (aid, split, texts) in enumerate(spec):
        sents = [make_sentence(t, sid + k) for k, t in enumerate(texts)]
        sid += len(texts)
        refs.append(
            {
                "ref_id": ref_id,
                "ann_id": aid,
                "image_id": image_of[aid],
                "category_id": 1,
                "split": split,
                "sentences": sents,
                "sent_ids": [s["sent_id"] for s in sents],
            }
        )
    return refs


def _grefs():
    spec = [  # (ann_id, image_id, extra)
        ([11, 12], 1, {}),  # multi-target
        ([-1], 2, {"no_target": True}),  # gRefCOCO's no-target
        ([], 3, {}),
        (15, 3, {}),  # a bare id, as ReLA's loader accepts
        ([13], 2, {"no_target": True}),  # the flag disagrees: ann_id decides
        ([16, 17], 3, {}),
    ]
    return [
        dict(
            {
                "ref_id": i,
                "ann_id": aid,
                "image_id": iid,
                "category_id": [1],
                "split": "val",
                "sentences": [make_sentence(LONG_UNICODE if i == 0 else f"gref {i}", 100 + i)],
            },
            **extra,
        )
        for i, (aid, iid, extra) in enumerate(spec)
    ]


def _write_dataset(root, instances=None, refs=None, grefs=None):
    save_refer_dataset(
        os.path.join(root, "toy"),
        "unc",
        _refs() if refs is None else refs,
        _instances() if instances is None else instances,
    )
    save_refer_dataset(
        os.path.join(root, "gtoy"),
        "unc",
        _grefs() if grefs is None else grefs,
        _instances() if instances is None else instances,
        generalized=True,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("refer_parity"))
    _write_dataset(root)
    os.makedirs(os.path.join(root, "images"))
    for _, fname, h, w, mode in IMAGES:
        write_image(os.path.join(root, "images", fname), mode, size=(h, w))
    return root


# ----------------------------------------------------- the independent, official reading
def _official_split(ref_split, split, generalized):
    """lichengunc/refer getRefIds' split selection; ReLA's G_REFER compares names."""
    if generalized or split in ("train", "val"):
        return ref_split == split
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    return "test" in ref_split


def _official_mask(segm, h, w):
    """REFER.getMask / G_REFER.getMask: frPyObjects, decode, parts summed; RLE decoded."""
    if isinstance(segm, dict):
        rle = mask_util.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else segm
        return mask_util.decode(rle).astype(bool)
    if isinstance(segm[0], dict):  # REFER: ann['segmentation'][0] is no list, so the list is RLE
        return np.sum(mask_util.decode(segm), axis=2) > 0
    m = mask_util.decode(mask_util.frPyObjects(segm, h, w))
    return np.sum(m, axis=2) > 0


def _official_reading(root, dataset, split, generalized):
    d = os.path.join(root, dataset)
    if generalized:
        with open(os.path.join(d, "grefs(unc).json")) as f:
            refs = json.load(f)
    else:
        with open(os.path.join(d, "refs(unc).p"), "rb") as f:
            refs = pickle.load(f)  # our own fixture: trusted
    with open(os.path.join(d, "instances.json")) as f:
        inst = json.load(f)
    anns = {a["id"]: a for a in inst["annotations"]}
    imgs = {i["id"]: i for i in inst["images"]}
    out = []
    for ref in refs:
        if not _official_split(ref["split"], split, generalized):
            continue
        img = imgs[ref["image_id"]]
        ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
        ids = [a for a in ids if a != -1]
        mask = np.zeros((img["height"], img["width"]), bool)
        for a in ids:
            mask |= _official_mask(anns[a]["segmentation"], img["height"], img["width"])
        for sent in ref["sentences"]:
            out.append(
                {
                    "ref_id": ref["ref_id"],
                    "sent_id": sent["sent_id"],
                    "raw": sent["raw"],
                    "file_name": img["file_name"],
                    "hw": (img["height"], img["width"]),
                    "empty": not ids,
                    "mask": mask,
                    "ann_ids": ids,
                }
            )
    return out


def _segmentations(root):
    with open(os.path.join(root, "toy", "instances.json")) as f:
        return {a["id"]: a["segmentation"] for a in json.load(f)["annotations"]}


@pytest.mark.parametrize(
    "dataset,split,generalized",
    [("toy", s, False) for s in ("train", "val", "testA", "testB", "test")]
    + [("gtoy", "val", True)],
)
def test_records_and_masks_equal_the_official_reading(root, dataset, split, generalized):
    expected = _official_reading(root, dataset, split, generalized)
    records = load_refer_dicts(root, dataset, "unc", split, "/imgs", generalized=generalized)
    assert len(records) == len(expected) > 0
    for rec, exp in zip(records, expected):
        assert (rec["ref_id"], rec["sentence"]["sent_id"], rec["sentence"]["raw"]) == (
            exp["ref_id"],
            exp["sent_id"],
            exp["raw"],
        )
        assert rec["file_name"] == os.path.join("/imgs", exp["file_name"])
        assert (rec["height"], rec["width"]) == exp["hw"] and rec["empty"] == exp["empty"]
        assert len(rec["annotations"]) == len(exp["ann_ids"])
        got = annotations_to_mask(rec["annotations"], *exp["hw"]).astype(bool)
        np.testing.assert_array_equal(got, exp["mask"], err_msg=f"ref {exp['ref_id']}")


def test_fixture_covers_the_hard_cases(root):
    # Guards the fixture itself: the cases the parity test is meant to cover are there.
    segs, hw = _segmentations(root), {i: (h, w) for i, _, h, w, _ in IMAGES}
    bow_tie = np.array(segs[11][0], float).reshape(-1, 2)
    shoelace = 0.5 * abs(
        np.dot(bow_tie[:, 0], np.roll(bow_tie[:, 1], 1))
        - np.dot(bow_tie[:, 1], np.roll(bow_tie[:, 0], 1))
    )
    assert shoelace == 0 and _official_mask(segs[11], *hw[1]).sum() > 0
    assert _official_mask([segs[12][1]], *hw[1]).sum() == 0  # the degenerate part alone
    assert _official_mask(segs[18], *hw[3]).sum() == 0
    recs = {r["ref_id"]: r for r in load_refer_dicts(root, "toy", "unc", "val", "/imgs")}
    # Polygons of >= 3 points stay polygons (transforms move their points); pycocotools'
    # readings of other lengths are carried as its RLE.
    assert isinstance(recs[2]["annotations"][0]["segmentation"], dict)
    assert isinstance(recs[6]["annotations"][0]["segmentation"], list)
    grecs = load_refer_dicts(root, "gtoy", "unc", "val", "/imgs", generalized=True)
    assert [len(r["annotations"]) for r in grecs] == [2, 0, 0, 1, 1, 2]


def test_segmentation_to_mask_reads_every_form_as_the_official_readers():
    # Public, and what manifests' targets go through: ReferIt's list of RLE parts was read
    # as polygons (a bare TypeError) although validation accepts it (helper review, session 46).
    hw = {i: (h, w) for i, _, h, w, _ in IMAGES}
    for ann in _annotations():
        h, w = hw[ann["image_id"]]
        got = segmentation_to_mask(ann["segmentation"], h, w).astype(bool)
        np.testing.assert_array_equal(got, _official_mask(ann["segmentation"], h, w), err_msg=f"annotation {ann['id']}")


def test_segmentation_to_mask_refuses_what_pycocotools_misreads():
    """pycocotools checks nothing: counts short of the image decoded to memory it never
    wrote, and a first polygon of 4 numbers was read as a box. Only cases that fail without
    a crash are run in this process: a NaN or huge coordinate would take it down without the
    guard (the same validation.segmentation_problem refuses them in
    test_validation_accepts_what_pycocotools_reads_safely and, in a memory-capped
    subprocess, in the loaders' bad_results cases)."""
    with pytest.raises(ReferringDataError, match=r"^segmentation.counts: run lengths add up to 0, expected height \* width = 2500$"):
        segmentation_to_mask({"size": [50, 50], "counts": "0"}, 50, 50)
    with pytest.raises(ReferringDataError, match=r"^segmentation.size: RLE size \[40, 50\] does not match"):
        segmentation_to_mask(mask_util.encode(np.asfortranarray(np.ones((40, 50), np.uint8))), 50, 50)
    with pytest.raises(ReferringDataError, match=r"^segmentation\[0\]: 4 numbers: the first polygon needs at least 5"):
        segmentation_to_mask([[2, 2, 30, 20]], 50, 50)


def _input_resolution_target(rec, h, w):
    """The target at SIZE x SIZE, computed independently: polygons scaled then rasterised
    by pycocotools, RLE targets resized nearest-neighbour (detectron2's Resize)."""
    out = np.zeros((SIZE, SIZE), bool)
    for ann in rec["annotations"]:
        segm = ann["segmentation"]
        if isinstance(segm, dict):
            m = Image.fromarray(mask_util.decode(segm)).resize((SIZE, SIZE), Image.NEAREST)
            out |= np.asarray(m).astype(bool)
        else:
            scaled = []
            for poly in segm:
                xy = np.asarray(poly, float).reshape(-1, 2)
                xy[:, 0] *= SIZE * 1.0 / w
                xy[:, 1] *= SIZE * 1.0 / h
                scaled.append(xy.reshape(-1).tolist())
            out |= mask_util.decode(
                mask_util.merge(mask_util.frPyObjects(scaled, SIZE, SIZE))
            ).astype(bool)
    return out


def test_mapper_reads_odd_images_and_long_unicode(root):
    mapper = ReferringDatasetMapper(make_cfg(*MAPPER_OPTS, "INPUT.FORMAT", "RGB"), is_train=False)
    images = os.path.join(root, "images")
    records = [
        r
        for s in ("train", "val", "testB")
        for r in load_refer_dicts(root, "toy", "unc", s, images)
    ]
    assert {os.path.basename(r["file_name"]) for r in records} == {f for _, f, *_ in IMAGES}
    for rec in records:
        out = mapper(rec)
        h, w = rec["height"], rec["width"]
        expected_image = (
            Image.open(rec["file_name"]).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
        )
        np.testing.assert_array_equal(
            out["image"].permute(1, 2, 0).numpy(), np.asarray(expected_image)
        )
        np.testing.assert_array_equal(
            out["gt_mask"].numpy().astype(bool), _input_resolution_target(rec, h, w)
        )
        assert out["sentence"] == rec["sentence"]["raw"]
        assert len(out["input_ids"]) == len(out["attention_mask"]) == 8  # _cfg's MAX_TEXT_LEN
    long = next(r for r in records if r["sentence"]["raw"] == LONG_UNICODE)
    assert int(mapper(long)["attention_mask"].sum()) == 8  # truncated, not dropped
    # A blank sentence (kept, as the official readers keep it) is the empty expression.
    blank = mapper(next(r for r in records if not r["sentence"]["raw"].strip()))
    tok = mapper.tokenizer
    assert blank["input_ids"][:2].tolist() == [tok.cls_token_id, tok.sep_token_id]
    assert blank["attention_mask"].tolist() == [1, 1] + [0] * 6


# ------------------------------------------------------------------------- bad input
def _mutate_json(name, fn):
    def apply(root):
        path = os.path.join(root, name)
        with open(path) as f:
            data = json.load(f)
        fn(data)
        with open(path, "w") as f:
            f.write(json.dumps(data))

    return apply


def _write_bytes(name, make):
    def apply(root):
        path = os.path.join(root, name)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(make(data, root))

    return apply


def _ann(data, aid):
    return next(a for a in data["annotations"] if a["id"] == aid)


def _img(data, iid):
    return next(i for i in data["images"] if i["id"] == iid)


INST, REFS, GREFS = "toy/instances.json", "toy/refs(unc).p", "gtoy/grefs(unc).json"


def _set_poly_value(aid, i, j, value):
    return _mutate_json(INST, lambda d: _ann(d, aid)["segmentation"][i].__setitem__(j, value))


def _refs_pickle(edit):
    """Rewrites the refs pickle after ``edit(refs, root)`` changed the refs in place."""

    def make(data, root):
        refs = pickle.loads(data)
        edit(refs, root)
        return pickle.dumps(refs, protocol=2)

    return _write_bytes(REFS, make)


class _Bad(NamedTuple):
    """A broken copy of the fixture: how to break it, what the error must name (file, item,
    field, problem substrings; None for a load that must succeed), and how to load it."""

    mutate: Callable
    expect: Optional[Tuple]
    split: str = "train"
    generalized: bool = False
    invalid: str = "error"


BAD_INPUTS = {
    "nan_coordinate": _Bad(
        _set_poly_value(11, 0, 3, float("nan")),
        (
            INST,
            "ann_id=11 (target of ref_id=0)",
            "segmentation[0][3]",
            "nan is not a finite number",
        ),
    ),
    "inf_coordinate": _Bad(
        _set_poly_value(12, 1, 0, float("inf")),
        (
            INST,
            "ann_id=12 (target of ref_id=1)",
            "segmentation[1][0]",
            "inf is not a finite number",
        ),
    ),
    "absurd_coordinate": _Bad(
        _set_poly_value(11, 0, 0, 1e15),
        (INST, "ann_id=11", "segmentation[0][0]", "far outside the 37x23 image"),
    ),
    "huge_integer_coordinate": _Bad(
        _set_poly_value(11, 0, 1, 10**400),
        (INST, "ann_id=11", "segmentation[0][1]", "is not a finite number"),
    ),
    "bool_coordinate": _Bad(
        _set_poly_value(11, 0, 2, True),
        (INST, "ann_id=11", "segmentation[0][2]", "expected a number, got True"),
    ),
    "first_polygon_of_4": _Bad(
        _mutate_json(INST, lambda d: _ann(d, 11).update(segmentation=[[1, 2, 3, 4]])),
        (INST, "ann_id=11", "segmentation[0]", "4 numbers"),
    ),
    "segmentation_string": _Bad(
        _mutate_json(INST, lambda d: _ann(d, 11).update(segmentation="abc")),
        (INST, "ann_id=11", "segmentation", "got str"),
    ),
    "missing_segmentation": _Bad(
        _mutate_json(INST, lambda d: _ann(d, 11).pop("segmentation")),
        (INST, "ann_id=11", "segmentation", "missing"),
    ),
    "height_string": _Bad(
        _mutate_json(INST, lambda d: _img(d, 1).update(height="23")),
        (INST, "image_id=1 (image of ref_id=0)", "height", "expected a positive integer, got '23'"),
    ),
    "missing_height": _Bad(
        _mutate_json(INST, lambda d: _img(d, 1).pop("height")),
        (INST, "image_id=1", "height", "got None"),
    ),
    "huge_image": _Bad(
        _mutate_json(INST, lambda d: _img(d, 3).update(height=10**6)),
        (INST, "image_id=3", "height", "outside 1..32768"),
        split="testB",
    ),
    "annotation_without_id": _Bad(
        _mutate_json(INST, lambda d: d["annotations"][0].pop("id")),
        (INST, "annotations[0]", "id", "got None"),
    ),
    "rle_part_size": _Bad(
        _mutate_json(INST, lambda d: _ann(d, 20)["segmentation"][1].update(size=[2, 2])),
        (INST, "ann_id=20", "segmentation[1].size", "does not match the image size"),
        split="val",
    ),
    "rle_counts_sum": _Bad(
        _mutate_json(INST, lambda d: _ann(d, 16)["segmentation"]["counts"].__setitem__(-1, 999)),
        (INST, "ann_id=16", "segmentation.counts", "add up to"),
        split="testB",
    ),
    "rle_negative_run": _Bad(
        _mutate_json(INST, lambda d: _ann(d, 16)["segmentation"]["counts"].__setitem__(0, -5)),
        (INST, "ann_id=16", "segmentation.counts", "non-negative"),
        split="testB",
    ),
    "rle_bad_character": _Bad(
        _mutate_json(INST, lambda d: _ann(d, 15)["segmentation"].update(counts="0~~")),
        (INST, "ann_id=15", "segmentation.counts", "not an RLE character"),
        split="testB",
    ),
    "rle_endless_run": _Bad(
        _mutate_json(INST, lambda d: _ann(d, 15)["segmentation"].update(counts="o" * 40)),
        (INST, "ann_id=15", "segmentation.counts", "longer than 7"),
        split="testB",
    ),
    "rle_wrong_size": _Bad(
        _mutate_json(INST, lambda d: _ann(d, 15)["segmentation"].update(size=[48, 65])),
        (INST, "ann_id=15", "segmentation.size", "does not match"),
        split="testB",
    ),
    "instances_syntax_error": _Bad(
        _write_bytes(INST, lambda b, r: b[:-3] + b",]"),
        (INST, None, None, "not valid JSON (line 1"),
    ),
    "instances_not_utf8": _Bad(
        _write_bytes(INST, lambda b, r: b"\xff" + b), (INST, None, None, "not UTF-8")
    ),
    "grefs_syntax_error": _Bad(
        _write_bytes(GREFS, lambda b, r: b[: len(b) // 2]),
        (GREFS, None, None, "not valid JSON"),
        split="val",
        generalized=True,
    ),
    "truncated_pickle": _Bad(
        _write_bytes(REFS, lambda b, r: b[: len(b) // 2]),
        (REFS, None, None, "not a readable plain-data pickle"),
    ),
    "garbage_pickle": _Bad(
        _write_bytes(REFS, lambda b, r: b"\x80\x02garbage\x00\xff" * 10),
        (REFS, None, None, "not a readable plain-data pickle"),
    ),
    "pickle_that_runs_code": _Bad(
        _refs_pickle(lambda refs, root: refs[0].update(extra=RunsCode(os.path.join(root, "RAN")))),
        (REFS, None, None, "refers to the global os.makedirs"),
    ),
    "refs_not_a_list": _Bad(
        _write_bytes(REFS, lambda b, r: pickle.dumps({"refs": pickle.loads(b)})),
        (REFS, None, None, "expected a list of refs, got dict"),
    ),
    "ann_id_list_in_classic_refs": _Bad(
        _refs_pickle(lambda refs, root: refs[0].update(ann_id=[11])),
        (REFS, "ref #0 (ref_id=0)", "ann_id", "expected one annotation id"),
    ),
    "sentences_not_a_list": _Bad(
        _refs_pickle(lambda refs, root: refs[0].update(sentences="hello")),
        (REFS, "ref #0 (ref_id=0)", "sentences", "got str"),
    ),
    "ref_without_image_id": _Bad(
        _refs_pickle(lambda refs, root: refs[0].pop("image_id")),
        (REFS, "ref #0 (ref_id=0)", "image_id", "missing"),
    ),
    "no_target_mixed_with_targets": _Bad(
        _mutate_json(GREFS, lambda d: d[0].update(ann_id=[-1, 11])),
        (GREFS, "ref #0 (ref_id=0)", "ann_id", "mixes the no-target id -1"),
        split="val",
        generalized=True,
    ),
    # The skip policy (own datasets) drops the broken ref and reads the rest.
    "nan_coordinate_skipped": _Bad(_set_poly_value(11, 0, 3, float("nan")), None, invalid="skip"),
}

_RUNNER = r"""
import json, sys
from vipa_d2.data import load_refer_dicts
from vipa_d2.data.validation import ReferringDataError
results = {}
for name, root, split, generalized, invalid in json.loads(sys.argv[1]):
    try:
        recs = load_refer_dicts(root, "gtoy" if generalized else "toy", "unc", split, "/imgs",
                                generalized=generalized, invalid=invalid)
        results[name] = {"loaded": [r["ref_id"] for r in recs]}
    except ReferringDataError as e:
        results[name] = {"error": str(e), "file": e.file, "item": e.item, "field": e.field}
    except Exception as e:
        results[name] = {"other": f"{type(e).__name__}: {e}"}
print("RESULTS " + json.dumps(results))
"""
# Address space of the subprocess: enough for torch, far below what the crashes the
# checks prevent would take.
_MEMORY_LIMIT = 8 << 30
# Generous: the subprocess imports torch and detectron2, on a possibly busy machine.
_TIMEOUT_S = 1200


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT, _MEMORY_LIMIT))


@pytest.fixture(scope="module")
def bad_results(tmp_path_factory):
    """Every bad input loaded in ONE subprocess (capped memory, timeout): a crash there
    cannot take pytest down, and its exit status shows whether any input killed it."""
    jobs = []
    for name, case in BAD_INPUTS.items():
        case_root = str(tmp_path_factory.mktemp(name))
        _write_dataset(case_root)
        case.mutate(case_root)
        jobs.append([name, case_root, case.split, case.generalized, case.invalid])
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(jobs)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        preexec_fn=_limit_memory,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    return {"results": json.loads(line[len("RESULTS ") :]), "roots": {j[0]: j[1] for j in jobs}}


@pytest.mark.parametrize("name", [n for n, case in BAD_INPUTS.items() if case.expect is not None])
def test_bad_input_gives_one_line_error_naming_file_id_and_field(bad_results, name):
    result = bad_results["results"][name]
    assert "error" in result, result
    file, item, field, problem = BAD_INPUTS[name].expect
    message = result["error"]
    path = os.path.join(bad_results["roots"][name], file)
    assert "\n" not in message and message.startswith(path + ": "), message
    assert problem in message, message
    assert result["file"] == path
    if item is not None:
        assert item in message and item in result["item"], message
    if field is not None:
        assert result["field"] == field and f": {field}: " in message, message
    assert not os.path.exists(os.path.join(bad_results["roots"][name], "RAN"))  # no code ran


def test_skip_policy_drops_only_the_broken_ref(bad_results):
    assert bad_results["results"]["nan_coordinate_skipped"] == {
        "loaded": [1, 1]
    }  # ref 1's 2 sentences


def test_validation_accepts_what_pycocotools_reads_safely():
    # In-process: only the pure-Python checks run here, never pycocotools on bad input.
    from vipa_d2.data.validation import compressed_counts_problem, segmentation_problem

    blob = _blob(48, 64)
    assert segmentation_problem(compressed_rle(blob), 48, 64) is None
    assert segmentation_problem(uncompressed_rle(blob), 48, 64) is None
    for aid, seg in (
        (11, [[2, 2, 30, 20, 30, 2, 2, 20]]),
        (13, [[5, 5, 20, 5, 20, 15], [25, 2, 35, 20]]),
    ):
        assert segmentation_problem(seg, 30, 41) is None, aid
    # The Python decoder of compressed counts agrees with pycocotools on real strings.
    for mask in (blob, 1 - blob, np.zeros((48, 64), np.uint8), np.ones((48, 64), np.uint8)):
        counts = mask_util.encode(np.asfortranarray(mask))["counts"]
        assert compressed_counts_problem(counts, 48 * 64) is None
        assert compressed_counts_problem(counts, 48 * 64 - 1) is not None
    assert segmentation_problem([[0, 0, 5, math.nan, 5, 5]], 10, 10)[0] == "segmentation[0][3]"


def test_counts_decoded_with_numpy_agree_with_the_loop(monkeypatch):
    """compressed_counts_problem passes a string by a numpy decoding first (the records of a
    loader of one's own are all checked before training); on anything it passes, the
    per-character loop, run alone, must find nothing either, and the other way round."""
    from vipa_d2.data import validation

    rng = np.random.default_rng(0)
    cases = []
    for i in range(1500):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        if i % 2:
            counts = mask_util.encode(np.asfortranarray((rng.random((h, w)) < rng.random()).astype(np.uint8)))["counts"]
            if i % 4 == 1 and counts:  # one character changed
                counts = bytearray(counts)
                counts[rng.integers(len(counts))] = rng.integers(40, 120)
                counts = bytes(counts)
        else:  # random characters, mostly outside '0'..'o' or not adding up
            counts = bytes(rng.integers(40, 120, rng.integers(0, 12)).astype(np.uint8))
        cases += [(counts, h * w + d) for d in (-1, 0, 1)]
    # A run length of zeros padded with continuation characters ('P'): 7 characters are
    # read, 8 refused (validation._RLE_MAX_CHARS_PER_COUNT); random strings hardly hit it.
    cases += [(b"PPPPPP01", 1), (b"PPPPPPP01", 1)]
    fast = [validation._compressed_counts_add_up(c, t) for c, t in cases]
    monkeypatch.setattr(validation, "_compressed_counts_add_up", lambda counts, total: False)
    loop = [validation.compressed_counts_problem(c, t) is None for c, t in cases]
    assert fast == loop
    assert 200 < sum(loop) < len(loop) - 200  # both verdicts are well represented
