"""Rasterize and encode referring-target masks (COCO polygons, RLE or binary arrays)."""

import copy
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data.detection_utils import transform_instance_annotations

from . import validation

__all__ = [
    "segmentation_to_mask",
    "annotations_to_mask",
    "augmented_mask",
    "mask_to_rle",
    "normalize_rle",
    "polygon_area",
    "segmentation_problem",
    "coco_rle",
    "record_segmentation",
]

Segmentation = Union[List[List[float]], Dict, np.ndarray]
# Image sizes beyond the image that a polygon may reach when rasterised. Wider than the
# loaders' validation.COORDINATE_MARGIN: transforms of a checked record move points beyond
# it (a resize's rounding at its edge, a rotation of an elongated image), and only far
# larger values (~1e7 pixels) make pycocotools' allocation run away.
RASTER_MARGIN = 10.0


def polygon_area(flat_xy: Sequence[float]) -> float:
    """Area of one COCO polygon ``[x0, y0, x1, y1, ...]`` (shoelace formula)."""
    pts = np.asarray(flat_xy, dtype=np.float64).reshape(-1, 2)
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def normalize_rle(rle: Dict, height: int, width: int) -> Dict:
    """
    Return a compressed RLE with ``str`` counts (JSON/pickle friendly), converting
    uncompressed (list ``counts``) RLE, which pycocotools cannot decode directly.
    """
    if isinstance(rle.get("counts"), list):
        rle = mask_util.frPyObjects(rle, height, width)
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(s) for s in rle["size"]], "counts": counts}


def segmentation_problem(segm, height: int, width: int) -> Optional[str]:
    """
    Why ``segm`` cannot serve as a target mask of a ``height`` x ``width`` image in the
    simple JSON format, or None when it is fine. Stricter than the REFER readers (see
    :func:`vipa_d2.data.validation.segmentation_problem`, checked first): every polygon
    needs >= 3 points and a mask that is not empty, and an RLE mask must not be empty.
    """
    if isinstance(segm, dict):
        problem = validation.segmentation_problem(segm, height, width)
        if problem is not None:
            return problem[1]
        area = int(mask_util.area(normalize_rle(segm, height, width)))
        return None if area > 0 else "RLE mask is empty (zero area)"
    if isinstance(segm, (list, tuple)):
        if len(segm) == 0:
            return "polygon list is empty"
        if all(isinstance(v, (int, float, np.number)) for v in segm):
            return "expected a list of polygons [[x0, y0, x1, y1, ...], ...], got one flat list of numbers"
        for i, poly in enumerate(segm):
            if not isinstance(poly, (list, tuple, np.ndarray)) or not all(
                isinstance(v, (int, float, np.number)) for v in poly
            ):
                return f"polygon {i} must be a flat list of numbers [x0, y0, x1, y1, ...]"
            if len(poly) % 2 != 0 or len(poly) < 6:
                return (
                    f"polygon {i} is degenerate: {len(poly)} coordinates, expected an even "
                    "number >= 6 (at least 3 points)"
                )
            bad_value = validation.polygon_values_problem(list(poly))
            if bad_value is not None:
                return f"polygon {i}, value {bad_value[0]}: {bad_value[1]}"
            # Far-outside coordinates must not reach pycocotools (the caller reports them
            # as outside the image): the shoelace area stands in for the raster area.
            if validation.polygon_coordinates_problem(list(poly), height, width) is None:
                area = _polygon_mask_area(poly, height, width)
            else:
                area = polygon_area(poly)
            if area <= 0.0:
                return f"polygon {i} is degenerate: zero area"
        return None
    return f"segmentation must be a list of polygons or an RLE dict, got {type(segm).__name__}"


def _polygon_mask_area(poly, height: int, width: int) -> int:
    """Pixels of one polygon as pycocotools rasterises it (non-zero for a self-intersecting one)."""
    rle = mask_util.frPyObjects([[float(v) for v in poly]], height, width)
    return int(mask_util.area(rle)[0])


def coco_rle(segm, height: int, width: int) -> Dict:
    """
    The mask of an annotation's ``segmentation`` exactly as the official REFER / G_REFER
    readers compute it: polygons through ``pycocotools.mask.frPyObjects`` on the list as
    given, parts merged (union); RLE as is; a list of RLE parts merged. Returns compressed RLE with ``str`` counts.
    Only for input that :func:`vipa_d2.data.validation.segmentation_problem` accepts:
    pycocotools' C code checks nothing itself.
    """
    if isinstance(segm, dict):
        return normalize_rle(segm, height, width)
    if validation.is_rle_list(segm):
        return normalize_rle(mask_util.merge([normalize_rle(p, height, width) for p in segm]), height, width)
    polys = [[float(v) for v in poly] for poly in segm]
    rle = mask_util.merge(mask_util.frPyObjects(polys, height, width))
    return normalize_rle(rle, height, width)


def _regular_polygons(segm) -> bool:
    return isinstance(segm, (list, tuple)) and all(
        len(poly) >= 6 and len(poly) % 2 == 0 for poly in segm
    )


def record_segmentation(segm, height: int, width: int):
    """
    ``segm`` in the form a record carries: polygons of >= 3 points each stay polygons
    (float lists; transforms move their points and rasterising them gives :func:`coco_rle`
    exactly); anything else that pycocotools reads (a part of 1-2 points or an odd number
    of values, which detectron2's transforms cannot take) becomes the RLE pycocotools
    gives for it. Validated input only, as for :func:`coco_rle`.
    """
    if _regular_polygons(segm):
        return [[float(v) for v in poly] for poly in segm]
    return coco_rle(segm, height, width)


def segmentation_to_mask(segm: Segmentation, height: int, width: int) -> np.ndarray:
    """Rasterize one instance's segmentation to a uint8 (height, width) 0/1 mask."""
    if isinstance(segm, np.ndarray):
        if segm.shape[:2] != (height, width):
            raise ValueError(
                f"Binary mask of shape {segm.shape[:2]} does not match ({height}, {width})"
            )
        return (segm > 0).astype(np.uint8)
    if isinstance(segm, dict) or validation.is_rle_list(segm):  # a list: ReferIt's parts, their union
        _refuse_unsafe_segmentation(segm, height, width)
        return mask_util.decode(coco_rle(segm, height, width)).astype(np.uint8)
    if isinstance(segm, (list, tuple)):
        polys = [np.asarray(p, dtype=np.float64).reshape(-1).tolist() for p in segm]
        if not polys:
            return np.zeros((height, width), dtype=np.uint8)
        _refuse_unsafe_segmentation(polys, height, width)
        rles = mask_util.frPyObjects(polys, height, width)
        return mask_util.decode(mask_util.merge(rles)).astype(np.uint8)
    raise TypeError(
        f"Unsupported segmentation type {type(segm).__name__}: expected COCO polygons "
        "(list of flat coordinate lists), an RLE dict or a binary ndarray"
    )


def _refuse_unsafe_segmentation(segm, height: int, width: int) -> None:
    """Refuse what pycocotools cannot rasterise safely (it checks nothing: a NaN or huge
    coordinate takes the process down, counts that do not add up give memory it never
    wrote), for callers whose input no loader or record check has seen. Polygons may reach
    :data:`RASTER_MARGIN` image sizes beyond the image, not only the loaders' margin."""
    problem = validation.segmentation_problem(segm, height, width, margin=RASTER_MARGIN)
    if problem is not None:
        field, what = problem
        raise validation.ReferringDataError(f"{field}: {what}", field=field)


def annotations_to_mask(annotations: Sequence[Dict], height: int, width: int) -> np.ndarray:
    """
    Union of the target masks of a referring record as a uint8 (height, width) 0/1
    array; all zeros for a no-target record (empty ``annotations``).
    """
    out = np.zeros((height, width), dtype=np.uint8)
    for ann in annotations:
        np.maximum(out, segmentation_to_mask(ann["segmentation"], height, width), out=out)
    return out


def augmented_mask(annotations: Sequence[Dict], transforms, out_hw) -> np.ndarray:
    """Union mask (uint8, ``out_hw``) of ``annotations`` after the image's ``transforms``
    (the annotations are copied, never modified). For checked records
    (:func:`vipa_d2.data.validation.record_problem`): detectron2's transform decodes an RLE
    before :func:`segmentation_to_mask` could refuse it."""
    annos = [transform_instance_annotations(_as_detectron2_annotation(a), transforms, out_hw) for a in annotations]
    return annotations_to_mask(annos, *out_hw)


def _as_detectron2_annotation(annotation: Dict) -> Dict:
    """A copy of ``annotation`` that Detectron2's transform takes: a tuple of polygons (which
    the record checks accept, as a list) as a list, which is all it moves."""
    annotation = copy.deepcopy(annotation)
    if isinstance(annotation["segmentation"], tuple):
        annotation["segmentation"] = list(annotation["segmentation"])
    return annotation


def mask_to_rle(mask: np.ndarray) -> Dict:
    """Encode a binary (H, W) mask as compressed COCO RLE with ``str`` counts."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
