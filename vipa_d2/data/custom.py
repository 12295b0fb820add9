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
number (``[]`` = no target) for a generalized (gRefCOCO-style) one. Optional, per
expression, for the evaluator's per-type and landmark breakdowns: ``type`` (a name such
as "relation") and, together, ``landmark`` (an object id of the image) and
``landmark_phrase`` (the words of ``text`` naming that object); they become the REFER
sentence fields ``type``, ``landmark_ann_id`` and ``landmark_phrase``. Optional too, for
the object choice's ``MODEL.VIPA.LOSS.CHOICE_WEIGHT`` and ``MODEL.VIPA.LOSS.GROUP_WEIGHT``: ``group``, the object ids its category / colour words
name (the candidates of "the second cup from the left": every cup), which becomes the
REFER sentence field ``group_ann_ids``.
"""

import os
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog

from .landmark import find_phrase
from .masks import normalize_rle, segmentation_problem
from .record_cache import CachedReferSplit
from .refer import (
    INSTANCES_FILE,
    INVALID_MODES,
    REFERRING_EVALUATOR_TYPE,
    instances_json,
    is_refer_file,
    make_sentence,
    refs_file_name,
    save_refer_dataset,
)
from .validation import (
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    ReferringDataError,
    is_int,
    quote,
    read_json_file,
    stored_image_size,
    unicode_problem,
    valid_id,
)

__all__ = [
    "ReferringFormatError",
    "register_referring_dataset",
    "referring_dataset_names",
    "check_refer_splits",
    "register_refer_splits",
    "validate_simple_json",
    "simple_json_to_refer",
    "load_simple_json",
    "convert_simple_json",
    "ReferFolderConflict",
]

# Polygon coordinates may overshoot the image border by this many pixels (annotation
# tools round outwards); more means the coordinates or the image size are wrong.
_BORDER_TOLERANCE_PX = 1.0
# How many problems one validation error message lists.
_MAX_LISTED_PROBLEMS = 25


class ReferringFormatError(ReferringDataError):
    """The simple JSON file is malformed; the message names the file and JSON paths."""


class ReferFolderConflict(FileExistsError):
    """A conversion would replace REFER files of its folder (``files``): its refs file, even
    one from the same conversion, or an ``instances.json`` of other content."""

    def __init__(self, message: str, files: List[str]):
        super().__init__(message)
        self.files = files


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
    stored in the metadata next to ``evaluator_type="referring"``. The same call again (a
    rerun notebook cell) is a no-op; another registration under ``name`` is refused.
    """
    if invalid not in INVALID_MODES:
        raise ValueError(f"invalid={invalid!r}: expected one of {INVALID_MODES}")
    # "~/data" from a config or notebook: read as the shell would (it was a folder named "~").
    refer_root, image_root = os.path.expanduser(refer_root), os.path.expanduser(image_root)
    own = dict(
        evaluator_type=REFERRING_EVALUATOR_TYPE,
        generalized=generalized,
        dataset_root=refer_root,
        dataset=dataset,
        split_by=split_by,
        split=split,
        image_root=image_root,
        invalid=invalid,
    )
    clash = sorted(set(metadata) & set(own))
    if clash:
        raise ValueError(f"Dataset {name!r}: metadata {clash} are set from the arguments; pass other keywords")
    if name in DatasetCatalog.list():
        held = MetadataCatalog.get(name).as_dict() if name in MetadataCatalog.list() else {}
        try:
            same = bool(held == {"name": name, **own, **metadata})
        except ValueError:  # array values (numpy) have no single truth value: not known to be the same
            same = False
        if same:
            return
        raise ValueError(
            f"Dataset {name!r} is already registered (a built-in, or a registration with other arguments); pick "
            "another name or call DatasetCatalog.remove(name) and MetadataCatalog.remove(name) first"
        )
    # Checked before anything is registered: a refusal halfway would leave the name taken.
    left = MetadataCatalog.get(name).as_dict() if name in MetadataCatalog.list() else {}
    differ = [f"{k}={left[k]!r}" for k, v in {**own, **metadata}.items() if k in left and left[k] != v]
    if differ:
        raise ValueError(
            f"Dataset {name!r}: MetadataCatalog still holds another registration's {', '.join(differ)}; "
            "call MetadataCatalog.remove(name) too"
        )
    arguments = dict(refer_root=refer_root, dataset=dataset, split_by=split_by, split=split,
                     image_root=image_root, generalized=generalized, invalid=invalid)
    DatasetCatalog.register(name, CachedReferSplit(lambda: arguments))
    MetadataCatalog.get(name).set(**own, **metadata)


def referring_dataset_names() -> List[str]:
    """The registered datasets whose metadata names the referring evaluator, sorted."""
    return sorted(
        n for n in DatasetCatalog.list() if MetadataCatalog.get(n).get("evaluator_type", None) == REFERRING_EVALUATOR_TYPE
    )


# DATASETS.REFER_SPLITS entries: register_referring_dataset's arguments, required and optional.
_SPLIT_REQUIRED = ("name", "refer_root", "dataset", "split_by", "split", "image_root")
_SPLIT_OPTIONAL = {"generalized": bool, "invalid": str}
# Where a config-registered split records its entry: a second registration of the same
# entry (train_net.main called again in one process) is then a no-op, another one a clash.
_SPLIT_METADATA_KEY = "refer_split_entry"


def check_refer_splits(entries) -> None:
    """ValueError naming the entry and key of ``DATASETS.REFER_SPLITS`` that is malformed."""
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"DATASETS.REFER_SPLITS: expected a list of mappings, got {entries!r}")
    for i, entry in enumerate(entries):
        where = f"DATASETS.REFER_SPLITS[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping of {_SPLIT_REQUIRED} (+ optional {tuple(_SPLIT_OPTIONAL)}), got {entry!r}")
        missing = [k for k in _SPLIT_REQUIRED if k not in entry]
        unknown = [k for k in entry if k not in _SPLIT_REQUIRED and k not in _SPLIT_OPTIONAL]
        if missing or unknown:
            raise ValueError(f"{where}: missing keys {missing}, unknown keys {unknown}; expected "
                             f"{_SPLIT_REQUIRED} (+ optional {tuple(_SPLIT_OPTIONAL)})")
        for k, v in entry.items():
            expected = _SPLIT_OPTIONAL.get(k, str)
            if not isinstance(v, expected) or (expected is str and not v.strip()):
                raise ValueError(f"{where}.{k}: expected a {'non-empty string' if expected is str else 'bool'}, got {v!r}")
        if entry.get("invalid", "error") not in INVALID_MODES:
            raise ValueError(f"{where}.invalid: {entry['invalid']!r}, expected one of {INVALID_MODES}")
        name = entry["name"]
        first = next(j for j, other in enumerate(entries) if isinstance(other, dict) and other.get("name") == name)
        if dict(entries[first]) != dict(entry):  # only the first would be registered
            raise ValueError(f"{where}.name: {name!r} is also the name of DATASETS.REFER_SPLITS[{first}]; "
                             "give each split its own name")
        # The same entry registered before (another main in this process) is no clash.
        if name in DatasetCatalog.list() and MetadataCatalog.get(name).get(_SPLIT_METADATA_KEY, None) != dict(entry):
            raise ValueError(f"{where}.name: {name!r} is already registered as another dataset; pick another name")


def register_refer_splits(entries) -> None:
    """
    Register each ``DATASETS.REFER_SPLITS`` entry (see :func:`check_refer_splits`) with
    :func:`register_referring_dataset`. An entry registered before is skipped; a name
    registered otherwise (a built-in, a different entry) is refused.
    """
    check_refer_splits(entries)
    for entry in entries:
        entry = dict(entry)
        if entry["name"] not in DatasetCatalog.list():
            register_referring_dataset(**entry, **{_SPLIT_METADATA_KEY: entry})


def _check_image(img, p: str, problems: List[str], generalized: bool, image_root: Optional[str]):
    if not isinstance(img, dict):
        problems.append(
            f"{p}: expected an object with file_name/height/width/split/objects/expressions"
        )
        return
    fname = img.get("file_name")
    image_path = None  # the image file to measure below, when there is one
    if not isinstance(fname, str) or not fname:
        problems.append(
            f"{p}.file_name: expected a non-empty string (path relative to the image root)"
        )
    elif image_root is not None:
        image_path = os.path.join(image_root, fname)
        if not os.path.isfile(image_path):
            problems.append(f"{p}.file_name: image {image_path} does not exist")
            image_path = None
    h, w = img.get("height"), img.get("width")
    size_ok = True
    for key, v in (("height", h), ("width", w)):
        # The loader's bounds too (validation.MAX_IMAGE_SIDE, MAX_IMAGE_PIXELS): a file it
        # would refuse is not written, and no mask is merged in a buffer beyond them.
        if not is_int(v) or not 0 < v <= MAX_IMAGE_SIDE:
            problems.append(f"{p}.{key}: expected an integer in 1..{MAX_IMAGE_SIDE}, got {quote(v)}")
            size_ok = False
    if size_ok and h * w > MAX_IMAGE_PIXELS:
        problems.append(f"{p}: height x width {h} x {w} is more than {MAX_IMAGE_PIXELS} pixels")
        size_ok = False
    if size_ok and image_path is not None:
        # Detectron2's mapper checks the two at training time (SizeMismatchError); here the
        # file is named before anything is written.
        stored = stored_image_size(image_path)
        if stored is None:
            problems.append(f"{p}.file_name: {image_path} is not a readable image")
        elif stored != (h, w):
            problems.append(f"{p}: height x width {h} x {w}, but {image_path} is {stored[0]} x {stored[1]} (after EXIF rotation)")
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
        if not valid_id(oid):
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
        elif (problem := unicode_problem(ex["text"])) is not None:
            problems.append(f"{q}.text: {problem}")
        targets = ex.get("targets")
        if not isinstance(targets, list):
            problems.append(f"{q}.targets: expected a list of object ids of this image")
            continue
        for t in targets:
            if not valid_id(t):
                problems.append(f"{q}.targets: expected object ids (integers or strings), got {quote(t)}")
            elif t not in ids:
                problems.append(f"{q}.targets: {t!r} is not the id of an object of this image")
        if len(set(map(repr, targets))) != len(targets):
            problems.append(f"{q}.targets: duplicate ids in {targets}")
        if not generalized and len(targets) != 1:
            problems.append(
                f"{q}.targets: expected exactly one target, got {len(targets)} "
                "(multi-target / no-target expressions need the generalized format: --generalized)"
            )
        _check_breakdown_fields(ex, q, ids, problems)


def _check_breakdown_fields(ex: Dict, q: str, ids, problems: List[str]):
    """The optional "type", "group", "landmark" and "landmark_phrase" of expression ``ex``."""
    if "group" in ex:
        group = ex["group"]
        if not isinstance(group, list) or not all(valid_id(g) for g in group):
            problems.append(f"{q}.group: expected a list of object ids of this image, got {group!r}")
        elif len(set(group)) != len(group):
            problems.append(f"{q}.group: duplicate ids in {group}")
        else:
            unknown = [g for g in group if g not in ids]
            if unknown:
                problems.append(f"{q}.group: {unknown!r} are not ids of objects of this image")
            targets = ex.get("targets") if isinstance(ex.get("targets"), list) else []
            left_out = [t for t in targets if valid_id(t) and t not in group]
            if left_out:
                problems.append(f"{q}.group: leaves out the target(s) {left_out!r}; the group is every object "
                                "the expression's category / colour words name, its targets too")
    if "type" in ex and (not isinstance(ex["type"], str) or not ex["type"].strip()):
        problems.append(
            f"{q}.type: expected a non-empty expression type such as 'relation', "
            f"got {ex['type']!r}"
        )
    if "landmark" not in ex and "landmark_phrase" not in ex:
        return
    for missing, given in (("landmark_phrase", "landmark"), ("landmark", "landmark_phrase")):
        if missing not in ex:
            problems.append(f"{q}.{missing}: required when '{given}' is given (both or neither)")
            return
    landmark, phrase = ex["landmark"], ex["landmark_phrase"]
    if not valid_id(landmark):
        problems.append(
            f"{q}.landmark: expected the id of an object of this image, got {landmark!r}"
        )
    elif landmark not in ids:
        problems.append(f"{q}.landmark: {landmark!r} is not the id of an object of this image")
    elif isinstance(ex.get("targets"), list) and landmark in ex["targets"]:
        problems.append(f"{q}.landmark: {landmark!r} is also a target of the expression")
    text = ex.get("text")
    if not isinstance(phrase, str) or not phrase.strip():
        problems.append(
            f"{q}.landmark_phrase: expected the words of 'text' naming the landmark, "
            f"got {phrase!r}"
        )
    elif isinstance(text, str) and find_phrase(text, phrase) is None:
        problems.append(
            f"{q}.landmark_phrase: {phrase!r} does not occur (as whole words) in the text {text!r}"
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
        first_listed: Dict[str, int] = {}
        for i, img in enumerate(data["images"]):
            _check_image(img, f"$.images[{i}]", problems, generalized, image_root)
            name = img.get("file_name") if isinstance(img, dict) else None
            if isinstance(name, str) and first_listed.setdefault(name, i) != i:
                # Two entries would be two images, each blind to the other's objects.
                problems.append(
                    f"$.images[{i}].file_name: {name!r} is listed again (first at $.images[{first_listed[name]}]); "
                    "list each image once, with all its objects and expressions"
                )
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
    sentences. Ids are assigned in file order: image, annotation and category ids from 1
    (COCO's convention), ref and sentence ids from 0 (REFER's).
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
        groups: Dict[Tuple, List[Dict]] = {}
        for ex in img["expressions"]:
            key = tuple(sorted(ann_of[t][0] for t in ex["targets"]))
            groups.setdefault(key, []).append(ex)
        cat_of_ann = dict(ann_of.values())
        for key, exprs in groups.items():
            sentences = [
                make_sentence(ex["text"], sent_id + k) | _breakdown_fields(ex, ann_of)
                for k, ex in enumerate(exprs)
            ]
            sent_id += len(exprs)
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


def _breakdown_fields(ex: Dict, ann_of: Dict) -> Dict:
    """The optional sentence fields of expression ``ex`` (its landmark and group as ann ids)."""
    out = {"type": ex["type"]} if "type" in ex else {}
    if "group" in ex:
        out["group_ann_ids"] = [ann_of[g][0] for g in ex["group"]]
    if "landmark" in ex:
        out.update(landmark_ann_id=ann_of[ex["landmark"]][0], landmark_phrase=ex["landmark_phrase"])
    return out


def load_simple_json(path: str) -> Dict:
    """Read a simple-format JSON file (not validated yet) with clear errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Simple referring JSON file not found: {path}")
    try:
        return read_json_file(path)  # the loader's reader: bad bytes, depth or numbers named
    except ReferringDataError as e:
        raise ReferringFormatError(str(e), file=path) from e


def convert_simple_json(
    src: Union[str, Dict],
    out_dir: str,
    split_by: str = "unc",
    generalized: bool = False,
    image_root: Optional[str] = None,
    overwrite: bool = False,
) -> Dict[str, Union[str, List[str]]]:
    """
    Validate the simple JSON format (a file path or already-loaded data) and write
    ``out_dir/instances.json`` + ``out_dir/refs(<split_by>).p`` (or, generalized,
    ``out_dir/grefs(<split_by>).json``). Returns the written paths, and under
    ``"outdated_refs"`` the folder's other refs files when ``instances.json`` changed:
    they index the annotations it had. Files it would replace (its refs file, even from the
    same conversion, and a different ``instances.json``, which every refs file there indexes)
    are refused (:class:`ReferFolderConflict`) unless ``overwrite``; a second split provider of the same
    images and objects (refcocog's google and umd) is written beside the first.
    """
    if isinstance(src, str):
        data, source = load_simple_json(src), src
    else:
        data, source = src, "<data>"
    validate_simple_json(data, source, generalized=generalized, image_root=image_root)
    instances, refs = simple_json_to_refer(data, generalized=generalized)
    refs_name = refs_file_name(split_by, generalized)
    inst_path = os.path.join(out_dir, INSTANCES_FILE)
    present = os.path.isfile(inst_path)
    changed = present and _read_text(inst_path) != instances_json(instances)
    replaced = [INSTANCES_FILE] * changed + [refs_name] * os.path.exists(os.path.join(out_dir, refs_name))
    if replaced and not overwrite:
        held = ", ".join(("a different " if name == INSTANCES_FILE else "") + name for name in replaced)
        raise ReferFolderConflict(
            f"{out_dir} already holds {held}; write into another folder, or pass overwrite=True to replace "
            f"{'them' if len(replaced) > 1 else 'it'}", replaced
        )
    outdated = [f for f in _refer_files(out_dir) if f not in (INSTANCES_FILE, refs_name)] if changed else []
    # The same instances.json already there is kept as it is, not serialised and written again.
    kept = inst_path if present and not changed else None
    paths = save_refer_dataset(out_dir, split_by, refs, instances, generalized=generalized, instances_file=kept)
    return {**paths, "outdated_refs": outdated}


def _read_text(path: str) -> Optional[str]:
    """A file's text, or None when it is no UTF-8 text (then it differs from any written one)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        return None


def _refer_files(out_dir: str) -> List[str]:
    """The REFER files (``instances.json``, refs and grefs files) in ``out_dir``, sorted."""
    return sorted(name for name in os.listdir(out_dir) if is_refer_file(name)) if os.path.isdir(out_dir) else []
