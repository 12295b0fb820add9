"""
Read and write REFER-format referring datasets (RefCOCO/+/g, RefClef, gRefCOCO, the
synthetic benchmark) as Detectron2 dataset records, one record per expression.

Layout of one dataset folder ``<refer_root>/<dataset>/``::

    instances.json         COCO-style images / annotations (polygons or RLE) / categories
    refs(<splitBy>).p      pickled list of refs (one target object each)     [classic]
    grefs(<splitBy>).json  JSON list of refs, ``ann_id`` a list, [-1] = none [generalized]
"""

import collections
import json
import logging
import math
import numbers
import os
import pickle
import re
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from detectron2.structures import BoxMode

from . import validation as check
from ..utils.atomic_io import atomic_open
from .landmark import find_phrase
from .masks import coco_rle, record_segmentation
from .validation import ReferringDataError, data_error, quote

logger = logging.getLogger(__name__)

__all__ = [
    "ReferringDataError",
    "INVALID_MODES",
    "REFERRING_EVALUATOR_TYPE",
    "refs_file_name",
    "expected_layout",
    "load_refer_dicts",
    "make_sentence",
    "save_refer_dataset",
]

INVALID_MODES = ("error", "skip")
# The evaluator_type the registrations (builtin.py, custom.py) put in a referring dataset's
# metadata: the trainer scores such datasets with ReferringEvaluator.
REFERRING_EVALUATOR_TYPE = "referring"
# How many individual skips are logged before only the summary is.
_MAX_LOGGED_SKIPS = 10


def refs_file_name(split_by: str, generalized: bool) -> str:
    return f"grefs({split_by}).json" if generalized else f"refs({split_by}).p"


INSTANCES_FILE = "instances.json"

# The names refs_file_name gives, for any split provider.
_REFS_FILE_RE = re.compile(r"grefs\(.+\)\.json|refs\(.+\)\.p")


def refer_paths(refer_root: str, dataset: str, split_by: str, generalized: bool) -> Tuple[str, str]:
    """The refs file and ``instances.json`` that a split of ``<refer_root>/<dataset>/`` is read from."""
    data_dir = os.path.join(refer_root, dataset)
    return os.path.join(data_dir, refs_file_name(split_by, generalized)), os.path.join(data_dir, INSTANCES_FILE)


def is_refer_file(name: str) -> bool:
    """Whether a file name is one of a REFER folder's: ``instances.json`` or a refs file."""
    return name == INSTANCES_FILE or _REFS_FILE_RE.fullmatch(name) is not None


def expected_layout(
    dataset: str, split_by: str, generalized: bool, image_root: str = "", refer_root: str = "<refer_root>"
) -> str:
    """Human-readable folder tree shown when a file is missing."""
    lines = [
        f"{refer_root}/{dataset}/{INSTANCES_FILE}",
        f"{refer_root}/{dataset}/{refs_file_name(split_by, generalized)}",
    ]
    if image_root:
        lines.append(f"{image_root}/<file_name of each image in instances.json>")
    return "\n  ".join(["expected layout (see datasets/README.md):"] + lines)


def _require_file(path: str, layout: str) -> None:
    if not os.path.isfile(path):
        # A relative refer_root (e.g. in DATASETS.REFER_SPLITS) is read from the working
        # directory, not from the config file's folder: say which folder that was.
        where = "" if os.path.isabs(path) else f" (a relative path, read from the working directory {os.getcwd()})"
        raise FileNotFoundError(f"Referring dataset file not found: {path}{where}\n  {layout}")


def _load_refs(path: str, generalized: bool) -> List:
    # REFER pickles are read admitting plain data only: a pickle can name code to run.
    refs = check.read_json_file(path) if generalized else check.read_pickle_file(path)
    if not isinstance(refs, list):
        raise data_error(path, None, None, f"expected a list of refs, got {type(refs).__name__}")
    return refs


def _load_instances(path: str):
    """{image id: image}, {ann id: ann}, {category id: name}; images and annotations without
    a usable id make the file unreadable. Categories are optional (they only name targets
    for the retrieval report): one without an id or a name is not used."""
    data = check.read_json_file(path)
    if not isinstance(data, dict):
        raise data_error(
            path, None, None, f"expected a COCO-style object, got {type(data).__name__}"
        )
    tables = []
    for key in ("images", "annotations"):
        entries = data.get(key)
        if not isinstance(entries, list):
            raise data_error(path, None, key, f"expected a list, got {quote(entries)}")
        table = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise data_error(
                    path, f"{key}[{i}]", None, f"expected an object, got {type(entry).__name__}"
                )
            if not check.valid_id(entry.get("id")):
                raise data_error(
                    path,
                    f"{key}[{i}]",
                    "id",
                    f"expected an integer or string id, got {quote(entry.get('id'))}",
                )
            if key == "annotations" and not check.valid_id(entry.get("image_id")):
                raise data_error(
                    path, f"{key}[{i}]", "image_id", f"expected the id of its image, got {quote(entry.get('image_id'))}"
                )
            if entry["id"] in table:  # the official reader keeps the last: one entry would vanish unseen
                first = next(j for j, e in enumerate(entries) if isinstance(e, dict) and e.get("id") == entry["id"])
                raise data_error(
                    path, f"{key}[{i}]", "id", f"{quote(entry['id'])} is also the id of {key}[{first}]; expected unique ids"
                )
            table[entry["id"]] = entry
        tables.append(table)
    categories = data.get("categories")
    names = {
        c["id"]: c["name"].strip()
        for c in (categories if isinstance(categories, list) else [])
        if isinstance(c, dict) and check.valid_id(c.get("id")) and isinstance(c.get("name"), str) and c["name"].strip()
    }
    return (*tables, names)


class _InvalidRefPolicy:
    """Raise the error of a malformed ref, or skip the ref with a log line and a count ("skip")."""

    def __init__(self, mode: str, source: str):
        if mode not in INVALID_MODES:
            raise ValueError(f"invalid={mode!r}: expected one of {INVALID_MODES}")
        self.mode = mode
        self.source = source
        self.counts = collections.Counter()

    def __call__(self, reason: str, error: ReferringDataError) -> None:
        if self.mode == "error":
            raise error
        self.counts[reason] += 1
        if sum(self.counts.values()) <= _MAX_LOGGED_SKIPS:
            logger.warning("Skipping invalid ref: %s", error)

    def log_summary(self) -> None:
        if self.counts:
            logger.warning(
                "%s: skipped %d invalid item(s): %s",
                self.source,
                sum(self.counts.values()),
                ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())),
            )


def _is_box(bbox) -> bool:
    return (
        isinstance(bbox, (list, tuple))
        and len(bbox) == 4
        and check.polygon_values_problem(list(bbox)) is None
    )


def _merged_splits_note(split: str, selected_splits: set) -> Optional[str]:
    """
    What the official selection of ``split`` also takes, if anything: REFER.getRefIds
    selects testA/B/C by the letter and "test" by the word anywhere in a ref's split. Parity
    keeps that, but with a user's own split names a "trainB" would be scored as testB, a
    "test_unseen" with test. The official test splits that "test" unites by design
    (RefClef's testA/B/C) go unsaid.
    """
    if split in check.LETTER_TEST_SPLITS:
        others = sorted(s for s in selected_splits if not s.startswith("test"))
        how, advice = f"by the letter {split[-1]!r}", "rename them if they are not test splits"
    elif split == "test":
        others = sorted(selected_splits - {split} - set(check.LETTER_TEST_SPLITS))
        how, advice = "by the word", "register those splits by their own names to score them apart"
    else:
        return None
    if not others:
        return None
    return (f"split {split!r} also takes the refs of splits {others} (REFER.getRefIds selects {split} {how} "
            f"anywhere in a ref's split); {advice}")


def _segmentation_box(segm, height: int, width: int) -> List[float]:
    """[x, y, w, h] around a validated ``segm`` (see :func:`record_segmentation`)."""
    rle = segm if isinstance(segm, dict) else coco_rle(segm, height, width)
    return mask_util.toBbox(rle).tolist()


def _record_annotation(ann: Dict, img: Dict) -> Dict:
    """A record annotation of a validated target (see :func:`record_segmentation`)."""
    h, w = img["height"], img["width"]
    segm = record_segmentation(ann["segmentation"], h, w)
    bbox = ann.get("bbox")
    if not _is_box(bbox):
        bbox = _segmentation_box(segm, h, w)
    category_id = ann.get("category_id", 0)
    iscrowd = ann.get("iscrowd", 0)
    return {
        "segmentation": segm,
        "bbox": [float(v) for v in bbox],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": category_id if check.valid_id(category_id) else 0,
        "iscrowd": int(iscrowd) if isinstance(iscrowd, (int, bool)) else 0,
    }


def _usable_area(ann: Dict) -> Optional[float]:
    """An annotation's "area" as a float, or None when it is missing, not a number, not finite or < 0."""
    area = ann.get("area")
    if not isinstance(area, numbers.Real) or isinstance(area, bool):
        return None
    try:
        area = float(area)
    except OverflowError:  # an integer beyond the float range
        return None
    return area if math.isfinite(area) and area >= 0 else None


def _object_boxes_by_image(anns: Dict, images: Dict, notes) -> Dict:
    """{image id: [(ann id, [x, y, w, h], area or None) of every annotation of the image
    with a usable bbox, or else a usable segmentation to take it from]}: the objects an
    image holds, targets or not (centre maps learn where objects are, see
    MODEL.VIPA.DECODER.COUNT_CENTRES, and the object choice picks among them); what is done
    with annotations without a box, or of no image in ``images``, is counted in ``notes``."""
    boxes: Dict = collections.defaultdict(list)
    image_problems: Dict = {}  # image id -> check.image_problem, once each
    for aid, ann in anns.items():
        bbox = ann.get("bbox")
        img = images.get(ann["image_id"])
        if img is None:
            notes["annotations whose image_id is no image of instances.json (left out of object_boxes)"] += 1
            continue
        if not _is_box(bbox):
            # A box-less object left out would be missing from the centre maps and the
            # object choice's candidates, a box-less target too (its record has its box).
            # Its size comes from its image, which no ref of the split may have checked.
            if ann["image_id"] not in image_problems:
                image_problems[ann["image_id"]] = check.image_problem(img)
            if image_problems[ann["image_id"]] is not None:
                notes["annotations without a usable bbox, of an unusable image (left out of object_boxes)"] += 1
                continue
            h, w, segm = img["height"], img["width"], ann.get("segmentation")
            if check.segmentation_problem(segm, h, w) is not None:
                notes["annotations without a usable bbox or segmentation (left out of object_boxes)"] += 1
                continue
            bbox = _segmentation_box(record_segmentation(segm, h, w), h, w)
            if bbox[2] <= 0 or bbox[3] <= 0:
                notes["annotations without a usable bbox, whose segmentation is empty (left out of object_boxes)"] += 1
                continue
            notes["annotations without a usable bbox (in object_boxes with their segmentation's box)"] += 1
        boxes[ann["image_id"]].append((aid, [float(v) for v in bbox], _usable_area(ann)))
    return boxes


class _TargetChecker:
    """
    Checks the image and target annotations a ref uses, each entry once (problems cached),
    naming instances.json in its errors. Returns (reason, error) or None.
    """

    def __init__(self, inst_path: str, images: Dict, anns: Dict):
        self.inst_path = inst_path
        self.images = images
        self.anns = anns
        self._image_problems: Dict = {}
        self._ann_problems: Dict = {}

    def image(self, ref: Dict, where: str, refs_path: str):
        iid = ref["image_id"]
        img = self.images.get(iid)
        if img is None:
            return "unknown_image_id", data_error(
                refs_path, where, "image_id", f"{quote(iid)} is not an image id of {self.inst_path}"
            )
        if iid not in self._image_problems:
            self._image_problems[iid] = check.image_problem(img)
        problem = self._image_problems[iid]
        if problem is not None:
            item = f"image_id={quote(iid)} (image of ref_id={quote(ref['ref_id'])})"
            return "bad_image", data_error(self.inst_path, item, *problem)
        return None

    def annotation(self, aid, ref: Dict, where: str, refs_path: str, role: str = "target", field: str = "ann_id"):
        """``field``: where the ref holds ``aid`` (a sentence's group member or landmark)."""
        if not check.valid_id(aid):  # a group member or landmark: the ref's own ids are checked before
            return "bad_ann_id", data_error(
                refs_path, where, field, f"expected an annotation id (an integer or a string), got {quote(aid)}"
            )
        ann = self.anns.get(aid)
        if ann is None:
            return "unknown_ann_id", data_error(
                refs_path,
                where,
                field,
                f"{quote(aid)} is not an annotation id of {self.inst_path}",
            )
        def item():  # built on a failure only: ~400k checks at RefCOCO's size (scale review, session 60)
            return f"ann_id={quote(aid)} ({role} of ref_id={quote(ref['ref_id'])})"

        if ann.get("image_id") != ref["image_id"]:
            # ReLA's loader asserts this; a target drawn on another image is no target.
            return "ann_image_mismatch", data_error(
                self.inst_path,
                item(),
                "image_id",
                f"{quote(ann.get('image_id'))}, "
                f"but the ref is about image {quote(ref['image_id'])}",
            )
        if aid not in self._ann_problems:
            img = self.images[ref["image_id"]]
            if "segmentation" not in ann:
                self._ann_problems[aid] = ("segmentation", "missing")
            else:
                self._ann_problems[aid] = check.segmentation_problem(
                    ann["segmentation"], img["height"], img["width"]
                )
        problem = self._ann_problems[aid]
        if problem is not None:
            return "bad_segmentation", data_error(self.inst_path, item(), *problem)
        return None


def _sentence_breakdown(sent: Dict, raw: str, ref: Dict, where: str, field: str, targets, refs_path: str, ann_ids):
    """
    The record fields of a sentence's optional ``type`` / ``group_ann_ids`` /
    ``landmark_ann_id`` + ``landmark_phrase`` (see :mod:`vipa_d2.data.custom`): ({"type":
    ..., "group_ann_ids": [...], "landmark": {"ann_id", "phrase"}}, None), or ({}, (reason,
    error)) when malformed.
    """
    out = {}
    if "group_ann_ids" in sent:
        group = sent["group_ann_ids"]
        if not isinstance(group, list):
            error = data_error(refs_path, where, f"{field}.group_ann_ids", f"expected a list of annotation ids, got {quote(group)}")
            return {}, ("bad_group", error)
        for k, aid in enumerate(group):
            failure = targets.annotation(aid, ref, where, refs_path, role="group member", field=f"{field}.group_ann_ids[{k}]")
            if failure is not None:
                return {}, ("group_" + failure[0], failure[1])
        # The objects the category / colour words name include the targets (``ann_ids``):
        # the object choice's loss would otherwise learn that a target is outside its group.
        left_out = [aid for aid in ann_ids if aid not in group]
        if left_out:
            error = data_error(refs_path, where, f"{field}.group_ann_ids", f"leaves out the target(s) {quote(left_out)}: "
                               "the group is every object the expression's category / colour words name, its targets too")
            return {}, ("group_without_target", error)
        out["group_ann_ids"] = group
    if "type" in sent:
        if not isinstance(sent["type"], str) or not sent["type"].strip():
            error = data_error(refs_path, where, f"{field}.type", f"expected a non-empty string, got {quote(sent['type'])}")
            return {}, ("bad_type", error)
        out["type"] = sent["type"]
    if "landmark_ann_id" not in sent and "landmark_phrase" not in sent:
        return out, None
    aid, phrase = sent.get("landmark_ann_id"), sent.get("landmark_phrase")
    if not isinstance(phrase, str) or find_phrase(raw, phrase) is None:
        why = (
            f"{quote(phrase)} is not a phrase of the sentence {quote(raw)} "
            "('landmark_ann_id' and 'landmark_phrase' come together)"
        )
        return {}, ("bad_landmark", data_error(refs_path, where, f"{field}.landmark_phrase", why))
    if "landmark_ann_id" not in sent:
        why = "missing ('landmark_ann_id' and 'landmark_phrase' come together)"
        return {}, ("bad_landmark", data_error(refs_path, where, f"{field}.landmark_ann_id", why))
    failure = targets.annotation(aid, ref, where, refs_path, role="landmark", field=f"{field}.landmark_ann_id")
    if failure is not None:
        return {}, ("landmark_" + failure[0], failure[1])
    out["landmark"] = {"ann_id": aid, "phrase": phrase}
    return out, None


def load_refer_dicts(
    refer_root: str,
    dataset: str,
    split_by: str,
    split: str,
    image_root: str,
    *,
    generalized: bool = False,
    invalid: str = "error",
) -> List[Dict]:
    """
    Load one split of a REFER-format dataset as Detectron2 records, one per expression,
    as the official readers read it (lichengunc/refer's ``REFER`` for ``refs(*).p``,
    ReLA's ``G_REFER`` and loader for ``grefs(*).json``): every sentence of every ref of
    the split is one record, refs are selected as the official ``getRefIds`` selects them
    (:func:`vipa_d2.data.validation.split_matches`), and each target's mask is the one
    pycocotools gives for its ``segmentation`` (:func:`vipa_d2.data.masks.coco_rle`).

    Args:
        refer_root: folder holding ``<dataset>/instances.json`` and the refs file.
        dataset: sub-folder name, e.g. "refcoco", "grefcoco", "refsynth".
        split_by: the split provider in the refs file name, e.g. "unc", "umd", "google".
        split: the split to load, e.g. "train", "testA".
        image_root: folder the ``file_name`` of each image in instances.json is relative to.
        generalized: read gRefCOCO's ``grefs(<split_by>).json`` (several or no targets per
            ref) instead of ``refs(<split_by>).p`` (exactly one target per ref).
        invalid: what to do with a ref the official readers cannot read or whose values
            are not finite (missing key, wrong type, unknown ``ann_id`` / ``image_id``, a
            target on another image, a segmentation pycocotools cannot read, non-finite or
            far-outside coordinates, RLE counts that do not fit the image): "error" raises
            :class:`ReferringDataError` naming the file, the ref / annotation and the field;
            "skip" drops the ref (a bad sentence: only that sentence) with a warning and a
            logged per-reason count. Files that cannot be read at all always raise.

    Returns:
        list[dict] in the record format of the shared data contract (``annotations`` in
        original image coordinates, empty with ``empty=True`` for no-target expressions).
        A sentence with the optional breakdown fields adds ``type`` and ``landmark``
        ({"ann_id", "phrase", "annotation"}: the landmark object as a record annotation).
        A sentence of a one-target ref that names the target's category (its name in
        instances.json's ``categories``, as whole words) adds ``target_phrase``: that name.
        Every record has ``object_boxes``: XYWH_ABS boxes of all annotated objects of its
        image, targets or not, and, where each of those annotations has a usable "area",
        ``object_areas`` (their areas in pixels, in the same order). A sentence with
        ``group_ann_ids`` adds ``object_in_group``: per box of ``object_boxes``, whether its
        object is one the expression's category / colour words name.
    """
    data_dir = os.path.join(refer_root, dataset)
    refs_path, inst_path = refer_paths(refer_root, dataset, split_by, generalized)
    layout = expected_layout(dataset, split_by, generalized, image_root, refer_root)
    other_kind = os.path.join(data_dir, refs_file_name(split_by, not generalized))
    if not os.path.isfile(refs_path) and os.path.isfile(other_kind):
        # The folder holds the other format's refs: what the user got wrong is the flag.
        raise FileNotFoundError(
            f"Referring dataset file not found: {refs_path}, but {other_kind} is there: that is the "
            f"{'plain' if generalized else 'generalized (gRefCOCO-style)'} format; register with "
            f"generalized={not generalized}"
        )
    _require_file(refs_path, layout)
    _require_file(inst_path, layout)
    policy = _InvalidRefPolicy(invalid, refs_path)
    refs = _load_refs(refs_path, generalized)
    images, anns, category_names = _load_instances(inst_path)

    # Refs of the split, every ref's structure checked first (its split must be readable
    # to know whether it is in the split).
    selected, available = [], set()
    first_of_id: Dict = {}  # ref_id -> index of the ref that has it
    for idx, ref in enumerate(refs):
        where = f"ref #{idx}" + (
            f" (ref_id={quote(ref.get('ref_id'))})" if isinstance(ref, dict) else ""
        )
        problem = check.ref_problem(ref, generalized)
        if problem is not None:
            if isinstance(ref, dict) and isinstance(ref.get("split"), str):
                if not check.split_matches(ref["split"], split, generalized):
                    continue  # another split's problem
            policy("malformed_ref", data_error(refs_path, where, *problem))
            continue
        first = first_of_id.setdefault(ref["ref_id"], idx)
        if first != idx:  # the official reader keeps the last under that id: one ref would be read twice
            raise data_error(refs_path, where, "ref_id", f"also the ref_id of ref #{first}; expected unique ids")
        available.add(ref["split"])
        if check.split_matches(ref["split"], split, generalized):
            selected.append((where, ref))
    if not selected and not policy.counts:
        raise data_error(refs_path, None, None, f"no ref has split {split!r}; available splits: {sorted(available)}")
    merged = None if generalized else _merged_splits_note(split, {ref["split"] for _, ref in selected})
    if merged:
        logger.warning(f"{refs_path}: {merged}")

    # Everything the split's refs use is checked before anything is rasterised.
    targets = _TargetChecker(inst_path, images, anns)
    usable = []
    notes = collections.Counter()  # readings of odd but readable input, logged once
    for where, ref in selected:
        ann_ids = check.target_ann_ids(ref, generalized)
        failure = targets.image(ref, where, refs_path)
        for aid in ann_ids:
            failure = failure or targets.annotation(aid, ref, where, refs_path)
        if failure is not None:
            policy(*failure)
            continue
        if (
            generalized
            and isinstance(ref.get("no_target"), bool)
            and ref["no_target"] != (not ann_ids)
        ):
            notes["'no_target' disagrees with ann_id (ann_id decides, as in ReLA)"] += 1
        sentences = []
        for j, sent in enumerate(ref["sentences"]):
            text, problem = check.sentence_text(sent)
            if problem is not None:
                field = f"sentences[{j}]" + (f".{problem[0]}" if problem[0] else "")
                policy("malformed_sentence", data_error(refs_path, where, field, problem[1]))
                continue
            if not text.strip():
                notes["blank sentences (kept)"] += 1
            extra, failure = _sentence_breakdown(sent, text, ref, where, f"sentences[{j}]", targets, refs_path, ann_ids)
            if failure is not None:
                policy(*failure)
                continue
            sentences.append((text, sent["sent_id"], extra))
        if not ref["sentences"]:
            notes["refs without sentences (no record)"] += 1
        usable.append((ref, ann_ids, sentences))

    record_anns: Dict = {}  # ann_id -> record annotation (shared between expressions)
    object_boxes = _object_boxes_by_image(anns, images, notes)
    records: List[Dict] = []
    for ref, ann_ids, sentences in usable:
        img = images[ref["image_id"]]
        objects = object_boxes.get(img["id"], [])
        target_ids = ann_ids
        if generalized:
            # ReLA's gRefCOCO loader leaves crowd targets out of the target mask (the record
            # stays a target one): so do we, for scores beside ReLA's.
            target_ids = [a for a in ann_ids if not anns[a].get("iscrowd")]
            if len(target_ids) < len(ann_ids):
                notes["refs with crowd targets (left out of the target, as in ReLA)"] += 1
        for aid in target_ids:
            if aid not in record_anns:
                record_anns[aid] = _record_annotation(anns[aid], img)
        base = {
            "file_name": os.path.join(image_root, img["file_name"]),
            "height": int(img["height"]),
            "width": int(img["width"]),
            "image_id": img["id"],
            "ref_id": ref["ref_id"],
            "annotations": [record_anns[a] for a in target_ids],
            "empty": len(ann_ids) == 0,
            "object_boxes": [box for _, box, _ in objects],
        }
        areas = [area for _, _, area in objects]
        if None in areas:
            notes["records whose image has an object box without a usable 'area' (no object_areas)"] += 1
        else:
            base["object_areas"] = areas
        # The retrieval report asks whether the word naming a single target retrieves it.
        category = anns[ann_ids[0]].get("category_id") if len(ann_ids) == 1 else None
        name = category_names.get(category) if check.valid_id(category) else None
        for raw, sent_id, extra in sentences:
            if name is not None and find_phrase(raw, name, first=True) is not None:
                extra = dict(extra, target_phrase=name)
            if "group_ann_ids" in extra:
                group = set(extra["group_ann_ids"])
                extra = {k: v for k, v in extra.items() if k != "group_ann_ids"}
                extra["object_in_group"] = [aid in group for aid, _, _ in objects]
            landmark = extra.get("landmark")
            if landmark is not None:
                aid = landmark["ann_id"]
                if aid not in record_anns:
                    record_anns[aid] = _record_annotation(anns[aid], img)
                extra = dict(extra, landmark=dict(landmark, annotation=record_anns[aid]))
            records.append(dict(base, sentence={"raw": raw, "sent_id": sent_id}) | extra)
    policy.log_summary()
    if notes:
        logger.warning(
            "%s: read with these notes: %s",
            refs_path,
            ", ".join(f"{n} {what}" for what, n in sorted(notes.items())),
        )
    logger.info(
        "Loaded %d expressions of %s/%s (%s, split %s) from %s",
        len(records),
        dataset,
        refs_file_name(split_by, generalized),
        split_by,
        split,
        data_dir,
    )
    return records


# The official refs files' protocol: Python 2 and 3 (LAVT's 3.7 too) read it; the highest
# one, 5, needs Python 3.8.
REFS_PICKLE_PROTOCOL = 2


def _words(text: str) -> List[str]:
    """Lower-case words: runs of letters and digits of any script, with the marks combined
    with them (a decomposed accent, Devanagari vowel signs), composed (NFC). For English text
    that is [a-z0-9]+ after lower(), as before; [a-z0-9] alone made "café" "caf" in the
    "sent" other REFER tools read."""
    text = unicodedata.normalize("NFC", text.lower())
    return "".join(c if c.isalnum() or unicodedata.category(c).startswith("M") else " " for c in text).split()


def make_sentence(raw: str, sent_id: int) -> Dict:
    """A REFER sentence entry: raw text, normalized lower-case ``sent`` and its tokens."""
    tokens = _words(raw)
    return {"raw": raw, "sent": " ".join(tokens), "tokens": tokens, "sent_id": int(sent_id)}


def save_refer_dataset(
    out_dir: str,
    split_by: str,
    refs: Sequence[Dict],
    instances: Dict,
    *,
    generalized: bool = False,
    instances_file: Optional[str] = None,
) -> Dict[str, str]:
    """
    Write ``instances.json`` and ``refs(<split_by>).p`` (or ``grefs(<split_by>).json``)
    into ``out_dir``. With ``instances_file`` given, that already written file is copied
    instead of serializing ``instances`` again. Returns the written paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    inst_path = os.path.join(out_dir, INSTANCES_FILE)
    # Each file appears whole or not at all: a converter stopped midway leaves no file that
    # a later load would trust.
    if instances_file is not None:
        if os.path.abspath(instances_file) != os.path.abspath(inst_path):
            with open(instances_file, "rb") as src, atomic_open(inst_path, "wb") as dst:
                dst.write(src.read())
    else:
        with atomic_open(inst_path, "w") as f:
            f.write(instances_json(instances))
    refs_path = os.path.join(out_dir, refs_file_name(split_by, generalized))
    if generalized:
        with atomic_open(refs_path, "w") as f:
            f.write(json.dumps(list(refs), default=_json_default))
    else:
        # Readers admit plain data only (see safe_pickle): numpy values become Python ones.
        plain = json.loads(json.dumps(list(refs), default=_json_default))
        with atomic_open(refs_path, "wb") as f:
            pickle.dump(plain, f, protocol=REFS_PICKLE_PROTOCOL)
    return {"instances": inst_path, "refs": refs_path}


def instances_json(instances: Dict) -> str:
    """The text of ``instances.json`` as :func:`save_refer_dataset` writes it."""
    # dumps (C encoder) + write: json.dump encodes in pure Python, ~10x slower.
    return json.dumps(instances, default=_json_default)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")
