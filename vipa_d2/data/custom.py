"""
Your own referring data: register any REFER-format folder, and validate / convert the
simple JSON format (documented in ``datasets/README.md``) to the REFER layout.

Simple JSON format::

    {"images": [{"file_name": "a.jpg", "height": 480, "width": 640, "split": "train",
                 "objects": [{"id": 1, "category": "cup",
                              "segmentation": [[x0, y0, x1, y1, x2, y2, ...]]}],
                 "expressions": [{"text": "the red cup", "targets": [1]}]}]}

``segmentation`` is COCO polygons or an RLE dict ``{"size": [h, w], "counts": ...}``;
``targets`` lists object ids of the same image: exactly one for a classic dataset, any
number (``[]`` = no target) for a generalized (gRefCOCO-style) one.
"""

import json
import os
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog

from .masks import normalize_rle, segmentation_problem
from .refer import INVALID_MODES, load_refer_dicts, make_sentence, save_refer_dataset
from .validation import ReferringDataError

__all__ = [
    "ReferringFormatError",
    "register_referring_dataset",
    "validate_simple_json",
    "simple_json_to_refer",
    "load_simple_json",
    "convert_simple_json",
]

# Polygon coordinates may overshoot the image border by this many pixels (annotation
# tools round outwards); more means the coordinates or the image size are wrong.
_BORDER_TOLERANCE_PX = 1.0
# How many problems one validation error message lists.
_MAX_LISTED_PROBLEMS = 25


class ReferringFormatError(ReferringDataError):
    """The simple JSON file is malformed; the message names the file and JSON paths."""


def register_referring_dataset(
    name: str,
    refer_root: str,
    dataset: str,
    split_by: str,
    split: str,
    image_root: str,
    generalized: bool = False,
    invalid: str = "error",
    **metadata,
) -> None:
    """
    Register one split of a REFER-format folder ``<refer_root>/<dataset>/`` as ``name``.
    Nothing is read until ``DatasetCatalog.get(name)``. Extra keyword arguments are
    stored in the metadata next to ``evaluator_type="referring"``.
    """
    if name in DatasetCatalog.list():
        raise ValueError(
            f"Dataset {name!r} is already registered; pick another name or call "
            "DatasetCatalog.remove(name) and MetadataCatalog.remove(name) first"
        )
    if invalid not in INVALID_MODES:
        raise ValueError(f"invalid={invalid!r}: expected one of {INVALID_MODES}")
    DatasetCatalog.register(
        name,
        lambda: load_refer_dicts(
            refer_root,
            dataset,
            split_by,
            split,
            image_root,
            generalized=generalized,
            invalid=invalid,
        ),
    )
    MetadataCatalog.get(name).set(
        evaluator_type="referring",
        generalized=generalized,
        dataset_root=refer_root,
        dataset=dataset,
        split_by=split_by,
        split=split,
        image_root=image_root,
        **metadata,
    )


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_image(img, p: str, problems: List[str], generalized: bool, image_root: Optional[str]):
    if not isinstance(img, dict):
        problems.append(
            f"{p}: expected an object with file_name/height/width/split/objects/expressions"
        )
        return
    fname = img.get("file_name")
    if not isinstance(fname, str) or not fname:
        problems.append(
            f"{p}.file_name: expected a non-empty string (path relative to the image root)"
        )
    elif image_root is not None and not os.path.isfile(os.path.join(image_root, fname)):
        problems.append(f"{p}.file_name: image {os.path.join(image_root, fname)} does not exist")
    h, w = img.get("height"), img.get("width")
    size_ok = True
    for key, v in (("height", h), ("width", w)):
        if not _is_int(v) or v <= 0:
            problems.append(f"{p}.{key}: expected a positive integer, got {v!r}")
            size_ok = False
    if not isinstance(img.get("split"), str) or not img.get("split"):
        problems.append(
            f"{p}.split: expected a split name such as 'train', got {img.get('split')!r}"
        )

    objects = img.get("objects")
    ids = set()
    if not isinstance(objects, list):
        problems.append(f"{p}.objects: expected a list of objects")
        objects = []
    for j, obj in enumerate(objects):
        q = f"{p}.objects[{j}]"
        if not isinstance(obj, dict):
            problems.append(f"{q}: expected an object with id/category/segmentation")
            continue
        oid = obj.get("id")
        if not (_is_int(oid) or isinstance(oid, str)):
            problems.append(f"{q}.id: expected an integer or string id, got {oid!r}")
        elif oid in ids:
            problems.append(f"{q}.id: duplicate object id {oid!r} in this image")
        else:
            ids.add(oid)
        if not isinstance(obj.get("category"), str) or not obj.get("category"):
            problems.append(f"{q}.category: expected a non-empty category name")
        if size_ok:
            _check_segmentation(obj.get("segmentation"), f"{q}.segmentation", h, w, problems)

    exprs = img.get("expressions")
    if not isinstance(exprs, list):
        problems.append(f"{p}.expressions: expected a list of {{'text', 'targets'}} objects")
        exprs = []
    for k, ex in enumerate(exprs):
        q = f"{p}.expressions[{k}]"
        if not isinstance(ex, dict):
            problems.append(f"{q}: expected an object with 'text' and 'targets'")
            continue
        if not isinstance(ex.get("text"), str) or not ex["text"].strip():
            problems.append(f"{q}.text: expected a non-empty expression, got {ex.get('text')!r}")
        targets = ex.get("targets")
        if not isinstance(targets, list):
            problems.append(f"{q}.targets: expected a list of object ids of this image")
            continue
        for t in targets:
            if t not in ids:
                problems.append(f"{q}.targets: {t!r} is not the id of an object of this image")
        if len(set(map(repr, targets))) != len(targets):
            problems.append(f"{q}.targets: duplicate ids in {targets}")
        if not generalized and len(targets) != 1:
            problems.append(
                f"{q}.targets: expected exactly one target, got {len(targets)} "
                "(multi-target / no-target expressions need the generalized format: --generalized)"
            )


def _check_segmentation(segm, q: str, h: int, w: int, problems: List[str]):
    why = segmentation_problem(segm, h, w)
    if why is not None:
        problems.append(f"{q}: {why}")
        return
    if isinstance(segm, list):
        for i, poly in enumerate(segm):
            pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            if (
                (lo < -_BORDER_TOLERANCE_PX).any()
                or hi[0] > w + _BORDER_TOLERANCE_PX
                or hi[1] > h + _BORDER_TOLERANCE_PX
            ):
                problems.append(
                    f"{q}[{i}]: polygon spans x {lo[0]:.1f}..{hi[0]:.1f}, y {lo[1]:.1f}..{hi[1]:.1f}, "
                    f"outside the {w}x{h} image (expected x, y pixel coordinates)"
                )


def validate_simple_json(
    data: Dict, source: str = "<data>", generalized: bool = False, image_root: Optional[str] = None
) -> None:
    """
    Raise :class:`ReferringFormatError` listing every problem (file, JSON path, what
    was expected) of the simple JSON format in ``data``. ``image_root`` additionally
    checks that every image file exists.
    """
    problems: List[str] = []
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        problems.append("$.images: expected a top-level object with a list 'images'")
    else:
        if not data["images"]:
            problems.append("$.images: the list is empty")
        for i, img in enumerate(data["images"]):
            _check_image(img, f"$.images[{i}]", problems, generalized, image_root)
    if problems:
        listed = problems[:_MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        raise ReferringFormatError(
            f"{source}: {len(problems)} problem(s) in the simple referring JSON format:\n  "
            + "\n  ".join(listed)
            + (f"\n  ... and {more} more" if more else "")
        )


def simple_json_to_refer(data: Dict, generalized: bool = False) -> Tuple[Dict, List[Dict]]:
    """
    Convert validated simple-format ``data`` to (COCO-style instances, REFER refs).
    Expressions with the same target set in one image become one ref with several
    sentences. Ids are assigned in file order, starting at 1.
    """
    names = sorted({o["category"] for img in data["images"] for o in img["objects"]})
    cat_ids = {n: i + 1 for i, n in enumerate(names)}
    images, annotations, refs = [], [], []
    sent_id = 0
    for img in data["images"]:
        image_id = len(images) + 1
        h, w = img["height"], img["width"]
        images.append({"id": image_id, "file_name": img["file_name"], "height": h, "width": w})
        ann_of = {}
        for obj in img["objects"]:
            segm = obj["segmentation"]
            if isinstance(segm, dict):
                segm = normalize_rle(segm, h, w)
                rle = segm
            else:
                segm = [[float(v) for v in poly] for poly in segm]
                rle = mask_util.merge(mask_util.frPyObjects(segm, h, w))
            ann_id = len(annotations) + 1
            ann_of[obj["id"]] = (ann_id, cat_ids[obj["category"]])
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat_ids[obj["category"]],
                    "segmentation": segm,
                    "area": float(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
        groups: Dict[Tuple, List[str]] = {}
        for ex in img["expressions"]:
            key = tuple(sorted(ann_of[t][0] for t in ex["targets"]))
            groups.setdefault(key, []).append(ex["text"])
        cat_of_ann = dict(ann_of.values())
        for key, texts in groups.items():
            sentences = [make_sentence(t, sent_id + k) for k, t in enumerate(texts)]
            sent_id += len(texts)
            ref = {
                "ref_id": len(refs),
                "image_id": image_id,
                "split": img["split"],
                "sentences": sentences,
                "sent_ids": [s["sent_id"] for s in sentences],
                "file_name": img["file_name"],
            }
            if generalized:
                ref["ann_id"] = list(key) if key else [-1]
                ref["category_id"] = [cat_of_ann[a] for a in key] if key else [-1]
                ref["no_target"] = not key
            else:
                ref["ann_id"] = key[0]
                ref["category_id"] = cat_of_ann[key[0]]
            refs.append(ref)
    categories = [{"id": i, "name": n, "supercategory": "object"} for n, i in cat_ids.items()]
    return {"images": images, "annotations": annotations, "categories": categories}, refs


def load_simple_json(path: str) -> Dict:
    """Read a simple-format JSON file (not validated yet) with clear errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Simple referring JSON file not found: {path}")
    try:
        with open(path, "r") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ReferringFormatError(f"{path}: not valid JSON ({e})") from e


def convert_simple_json(
    src: Union[str, Dict],
    out_dir: str,
    split_by: str = "unc",
    generalized: bool = False,
    image_root: Optional[str] = None,
) -> Dict[str, str]:
    """
    Validate the simple JSON format (a file path or already-loaded data) and write
    ``out_dir/instances.json`` + ``out_dir/refs(<split_by>).p`` (or, generalized,
    ``out_dir/grefs(<split_by>).json``). Returns the written paths.
    """
    if isinstance(src, str):
        data, source = load_simple_json(src), src
    else:
        data, source = src, "<data>"
    validate_simple_json(data, source, generalized=generalized, image_root=image_root)
    instances, refs = simple_json_to_refer(data, generalized=generalized)
    return save_refer_dataset(out_dir, split_by, refs, instances, generalized=generalized)
