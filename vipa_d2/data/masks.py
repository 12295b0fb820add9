"""Rasterize and encode referring-target masks (COCO polygons, RLE or binary arrays)."""

from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import pycocotools.mask as mask_util

__all__ = [
    "segmentation_to_mask",
    "annotations_to_mask",
    "mask_to_rle",
    "normalize_rle",
    "polygon_area",
    "segmentation_problem",
]

Segmentation = Union[List[List[float]], Dict, np.ndarray]


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
    Why ``segm`` cannot serve as a target mask of a ``height`` x ``width`` image,
    or None when it is fine. Checks polygons for < 3 points and zero area, and RLE
    for its structure, its size and an empty mask.
    """
    if isinstance(segm, dict):
        if "size" not in segm or "counts" not in segm:
            return f"RLE must have keys 'size' and 'counts', got keys {sorted(segm)}"
        size = list(segm["size"])
        if size != [height, width]:
            return f"RLE size {size} does not match the image size [{height}, {width}]"
        if not isinstance(segm["counts"], (str, bytes, list)):
            return f"RLE 'counts' must be a string or a list, got {type(segm['counts']).__name__}"
        try:
            area = int(mask_util.area(normalize_rle(segm, height, width)))
        except Exception as e:  # pycocotools raises bare Exceptions on corrupt counts
            return f"RLE could not be decoded ({e})"
        return None if area > 0 else "RLE mask is empty (zero area)"
    if isinstance(segm, (list, tuple)):
        if len(segm) == 0:
            return "polygon list is empty"
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
            if polygon_area(poly) <= 0.0:
                return f"polygon {i} is degenerate: zero area"
        return None
    return f"segmentation must be a list of polygons or an RLE dict, got {type(segm).__name__}"


def segmentation_to_mask(segm: Segmentation, height: int, width: int) -> np.ndarray:
    """Rasterize one instance's segmentation to a uint8 (height, width) 0/1 mask."""
    if isinstance(segm, np.ndarray):
        if segm.shape[:2] != (height, width):
            raise ValueError(
                f"Binary mask of shape {segm.shape[:2]} does not match ({height}, {width})"
            )
        return (segm > 0).astype(np.uint8)
    if isinstance(segm, dict):
        rle = normalize_rle(segm, height, width)
        if list(rle["size"]) != [height, width]:
            raise ValueError(f"RLE size {rle['size']} does not match ({height}, {width})")
        return mask_util.decode(rle).astype(np.uint8)
    if isinstance(segm, (list, tuple)):
        polys = [np.asarray(p, dtype=np.float64).reshape(-1).tolist() for p in segm]
        if not polys:
            return np.zeros((height, width), dtype=np.uint8)
        rles = mask_util.frPyObjects(polys, height, width)
        return mask_util.decode(mask_util.merge(rles)).astype(np.uint8)
    raise TypeError(
        f"Unsupported segmentation type {type(segm).__name__}: expected COCO polygons "
        "(list of flat coordinate lists), an RLE dict or a binary ndarray"
    )


def annotations_to_mask(annotations: Sequence[Dict], height: int, width: int) -> np.ndarray:
    """
    Union of the target masks of a referring record as a uint8 (height, width) 0/1
    array; all zeros for a no-target record (empty ``annotations``).
    """
    out = np.zeros((height, width), dtype=np.uint8)
    for ann in annotations:
        np.maximum(out, segmentation_to_mask(ann["segmentation"], height, width), out=out)
    return out


def mask_to_rle(mask: np.ndarray) -> Dict:
    """Encode a binary (H, W) mask as compressed COCO RLE with ``str`` counts."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
