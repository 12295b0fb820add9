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
import os
import pickle
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from detectron2.structures import BoxMode

from .landmark import find_phrase
from .masks import normalize_rle, segmentation_problem

logger = logging.getLogger(__name__)

__all__ = [
    "ReferringDataError",
    "INVALID_MODES",
    "refs_file_name",
    "expected_layout",
    "load_refer_dicts",
    "make_sentence",
    "save_refer_dataset",
]

INVALID_MODES = ("error", "skip")
# gRefCOCO marks a no-target ref with this ann_id.
NO_TARGET_ANN_ID = -1
# How many individual skips are logged before only the summary is.
_MAX_LOGGED_SKIPS = 10


class ReferringDataError(ValueError):
    """A referring annotation file is malformed (names the file and the offending entry)."""


def refs_file_name(split_by: str, generalized: bool) -> str:
    return f"grefs({split_by}).json" if generalized else f"refs({split_by}).p"


def expected_layout(dataset: str, split_by: str, generalized: bool, image_root: str = "") -> str:
    """Human-readable folder tree shown when a file is missing."""
    lines = [
        f"<refer_root>/{dataset}/instances.json",
        f"<refer_root>/{dataset}/{refs_file_name(split_by, generalized)}",
    ]
    if image_root:
        lines.append(f"{image_root}/<file_name of each image in instances.json>")
    return "\n  ".join(["expected layout (see datasets/README.md):"] + lines)


def _require_file(path: str, layout: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Referring dataset file not found: {path}\n  {layout}")


def _load_refs(path: str, generalized: bool) -> List[Dict]:
    if generalized:
        with open(path, "r") as f:
            refs = json.load(f)
    else:
        with open(path, "rb") as f:
            try:
                refs = pickle.load(f)
            except UnicodeDecodeError:
                # The original REFER pickles were written by Python 2.
                f.seek(0)
                refs = pickle.load(f, encoding="latin1")
    if not isinstance(refs, list):
        raise ReferringDataError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def _load_instances(path: str):
    with open(path, "r") as f:
        data = json.load(f)
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ReferringDataError(f"{path}: expected a COCO-style object with a list '{key}'")
    images = {img["id"]: img for img in data["images"]}
    anns = {ann["id"]: ann for ann in data["annotations"]}
    return images, anns


class _InvalidRefPolicy:
    """Raise on malformed refs, or skip them with a log line and a count ("skip")."""

    def __init__(self, mode: str, source: str):
        if mode not in INVALID_MODES:
            raise ValueError(f"invalid={mode!r}: expected one of {INVALID_MODES}")
        self.mode = mode
        self.source = source
        self.counts = collections.Counter()

    def __call__(self, reason: str, detail: str) -> None:
        msg = f"{self.source}: {detail}"
        if self.mode == "error":
            raise ReferringDataError(
                msg + " (set DATASETS.INVALID_REFS 'skip' / invalid='skip' to skip such refs)"
            )
        self.counts[reason] += 1
        if sum(self.counts.values()) <= _MAX_LOGGED_SKIPS:
            logger.warning("Skipping invalid ref: %s", msg)

    def log_summary(self) -> None:
        if self.counts:
            logger.warning(
                "%s: skipped %d invalid item(s): %s",
                self.source,
                sum(self.counts.values()),
                ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())),
            )


def _target_ann_ids(ref: Dict, generalized: bool) -> List:
    ann_id = ref.get("ann_id")
    ids = list(ann_id) if isinstance(ann_id, (list, tuple)) else [ann_id]
    if generalized:
        ids = [a for a in ids if a is not None and a != NO_TARGET_ANN_ID]
    return ids


def _record_annotation(ann: Dict, img: Dict) -> Dict:
    h, w = img["height"], img["width"]
    segm = ann["segmentation"]
    if isinstance(segm, dict):
        segm = normalize_rle(segm, h, w)
    else:
        segm = [[float(v) for v in poly] for poly in segm]
    bbox = ann.get("bbox")
    if bbox is None:
        rle = segm if isinstance(segm, dict) else mask_util.merge(mask_util.frPyObjects(segm, h, w))
        bbox = mask_util.toBbox(rle).tolist()
    return {
        "segmentation": segm,
        "bbox": [float(v) for v in bbox],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": ann.get("category_id", 0),
        "iscrowd": int(ann.get("iscrowd", 0)),
    }


def _target_problem(aid, img, anns, record_anns, bad_anns, inst_path) -> Optional[Tuple[str, str]]:
    """(reason, detail) if target ``aid`` of image ``img`` is unusable, else None. Valid
    annotations are converted once into ``record_anns``; problems are cached in ``bad_anns``."""
    ann = anns.get(aid)
    if ann is None:
        return "unknown_ann_id", f"ann_id {aid!r} is not in {inst_path}"
    if ann.get("image_id") != img["id"]:
        return (
            "ann_image_mismatch",
            f"ann_id {aid} belongs to image {ann.get('image_id')}, not {img['id']}",
        )
    if aid not in record_anns and aid not in bad_anns:
        why = segmentation_problem(ann.get("segmentation"), img["height"], img["width"])
        if why is None:
            record_anns[aid] = _record_annotation(ann, img)
        else:
            bad_anns[aid] = why
    if aid in bad_anns:
        return "degenerate_segmentation", f"ann_id {aid}: {bad_anns[aid]}"
    return None


def _sentence_breakdown(sent, raw, img, anns, record_anns, bad_anns, inst_path):
    """
    The record fields of a sentence's optional ``type`` / ``landmark_ann_id`` +
    ``landmark_phrase`` (see :mod:`vipa_d2.data.custom`): ({"type": ..., "landmark":
    {"ann_id", "phrase", "annotation"}}, None), or ({}, (reason, detail)) when malformed.
    """
    out = {}
    if "type" in sent:
        if not isinstance(sent["type"], str) or not sent["type"].strip():
            return {}, ("bad_type", f"'type' must be a non-empty string, got {sent['type']!r}")
        out["type"] = sent["type"]
    if "landmark_ann_id" not in sent and "landmark_phrase" not in sent:
        return out, None
    aid, phrase = sent.get("landmark_ann_id"), sent.get("landmark_phrase")
    if not isinstance(phrase, str) or find_phrase(raw, phrase) is None:
        why = (
            f"'landmark_phrase' {phrase!r} is not a phrase of the sentence {raw!r} "
            "('landmark_ann_id' and 'landmark_phrase' come together)"
        )
        return {}, ("bad_landmark", why)
    problem = _target_problem(aid, img, anns, record_anns, bad_anns, inst_path)
    if problem is not None:
        return {}, ("landmark_" + problem[0], f"landmark {problem[1]}")
    out["landmark"] = {"ann_id": aid, "phrase": phrase, "annotation": record_anns[aid]}
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
    Load one split of a REFER-format dataset as Detectron2 records, one per expression.

    Args:
        refer_root: folder holding ``<dataset>/instances.json`` and the refs file.
        dataset: sub-folder name, e.g. "refcoco", "grefcoco", "refsynth".
        split_by: the split provider in the refs file name, e.g. "unc", "umd", "google".
        split: the ``split`` value of the refs to keep, e.g. "train", "testA".
        image_root: folder the ``file_name`` of each image in instances.json is relative to.
        generalized: read gRefCOCO's ``grefs(<split_by>).json`` (several or no targets per
            ref) instead of ``refs(<split_by>).p`` (exactly one target per ref).
        invalid: "error" raises :class:`ReferringDataError` on a malformed ref (unknown
            ``ann_id`` / ``image_id``, empty sentence, degenerate polygon or empty RLE);
            "skip" drops it with a warning and a logged per-reason count.

    Returns:
        list[dict] in the record format of the shared data contract (``annotations`` in
        original image coordinates, empty with ``empty=True`` for no-target expressions).
        A sentence with the optional breakdown fields adds ``type`` and ``landmark``
        ({"ann_id", "phrase", "annotation"}: the landmark object as a record annotation).
    """
    data_dir = os.path.join(refer_root, dataset)
    refs_path = os.path.join(data_dir, refs_file_name(split_by, generalized))
    inst_path = os.path.join(data_dir, "instances.json")
    layout = expected_layout(dataset, split_by, generalized, image_root)
    _require_file(refs_path, layout)
    _require_file(inst_path, layout)
    refs = _load_refs(refs_path, generalized)
    images, anns = _load_instances(inst_path)
    policy = _InvalidRefPolicy(invalid, refs_path)

    available = sorted({str(r.get("split")) for r in refs})
    if split not in available:
        raise ValueError(f"{refs_path}: no ref has split {split!r}; available splits: {available}")

    record_anns: Dict = {}  # ann_id -> record annotation (shared between expressions)
    bad_anns: Dict = {}  # ann_id -> problem description
    records: List[Dict] = []
    for idx, ref in enumerate(refs):
        if ref.get("split") != split:
            continue
        where = f"ref #{idx} (ref_id={ref.get('ref_id')})"
        img = images.get(ref.get("image_id"))
        if img is None:
            policy(
                "unknown_image_id",
                f"{where}: image_id {ref.get('image_id')!r} is not in {inst_path}",
            )
            continue
        ann_ids = _target_ann_ids(ref, generalized)
        if not generalized and (len(ann_ids) != 1 or ann_ids[0] is None):
            policy(
                "missing_ann_id",
                f"{where}: expected exactly one target 'ann_id', got {ref.get('ann_id')!r}",
            )
            continue
        if generalized and ref.get("no_target") is True and ann_ids:
            policy(
                "inconsistent_no_target", f"{where}: 'no_target' is true but ann_id lists {ann_ids}"
            )
            continue

        problems = (
            _target_problem(a, img, anns, record_anns, bad_anns, inst_path) for a in ann_ids
        )
        problem = next((p for p in problems if p is not None), None)
        if problem is None and not ref.get("sentences"):
            problem = ("no_sentences", "the ref has no sentences")
        if problem is not None:
            policy(problem[0], f"{where}: {problem[1]}")
            continue

        base = {
            "file_name": os.path.join(image_root, img["file_name"]),
            "height": int(img["height"]),
            "width": int(img["width"]),
            "image_id": img["id"],
            "ref_id": ref.get("ref_id"),
            "annotations": [record_anns[a] for a in ann_ids],
            "empty": len(ann_ids) == 0,
        }
        for sent in ref["sentences"]:
            raw = sent.get("raw") if isinstance(sent.get("raw"), str) else sent.get("sent")
            if not isinstance(raw, str) or not raw.strip():
                policy(
                    "empty_sentence",
                    f"{where}: sentence sent_id={sent.get('sent_id')!r} is empty or missing",
                )
                continue
            extra, problem = _sentence_breakdown(
                sent, raw, img, anns, record_anns, bad_anns, inst_path
            )
            if problem is not None:
                detail = f"{where}: sentence sent_id={sent.get('sent_id')!r}: {problem[1]}"
                policy(problem[0], detail)
                continue
            record = dict(base, sentence={"raw": raw, "sent_id": sent.get("sent_id")})
            records.append(record | extra)
    policy.log_summary()
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


_TOKEN_RE = re.compile(r"[a-z0-9]+")


def make_sentence(raw: str, sent_id: int) -> Dict:
    """A REFER sentence entry: raw text, normalized lower-case ``sent`` and its tokens."""
    tokens = _TOKEN_RE.findall(raw.lower())
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
    inst_path = os.path.join(out_dir, "instances.json")
    if instances_file is not None:
        if os.path.abspath(instances_file) != os.path.abspath(inst_path):
            with open(instances_file, "rb") as src, open(inst_path, "wb") as dst:
                dst.write(src.read())
    else:
        with open(inst_path, "w") as f:
            # dumps (C encoder) + write: json.dump encodes in pure Python, ~10x slower.
            f.write(json.dumps(instances, default=_json_default))
    refs_path = os.path.join(out_dir, refs_file_name(split_by, generalized))
    if generalized:
        with open(refs_path, "w") as f:
            f.write(json.dumps(list(refs), default=_json_default))
    else:
        with open(refs_path, "wb") as f:
            pickle.dump(list(refs), f, protocol=pickle.HIGHEST_PROTOCOL)
    return {"instances": inst_path, "refs": refs_path}


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")
