"""
Checks of referring-dataset input before any of it reaches pycocotools' C code, and the
error they raise.

pycocotools rasterises without checks of its own: a NaN or huge polygon coordinate
overflows an ``int`` and makes it allocate without bound, and RLE counts that do not add
up to the image size make it write past its buffer; either takes the process down. Every
value that reaches it from a dataset file is checked here first, so bad input gives a
one-line :class:`ReferringDataError` naming the file, the entry and the field.

What is accepted follows what the official readers (lichengunc/refer's ``REFER`` as
ported in LAVT, ReLA's ``G_REFER`` and its detectron2 loader) can read: polygons exactly
as ``pycocotools.mask.frPyObjects`` takes them (self-intersecting, several parts, parts of
any length after the first), RLE as is. Beyond that only values that are not finite, or
far outside the image, are refused.

Records (what a loader gives ``ReferringDatasetMapper``, a loader of your own included) are
checked for the fields the mapper reads and the values that reach pycocotools
(:func:`record_problem`), before the first training iteration, for every training and test
set.
"""

import json
import math
import numbers
import os
import reprlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from detectron2.structures import BoxMode

from .safe_pickle import load_plain_pickle

__all__ = [
    "ReferringDataError",
    "is_int",
    "is_rle_list",
    "shortlist",
    "data_error",
    "IMAGE_READ_ERRORS",
    "MAX_IMAGE_SIDE",
    "MAX_IMAGE_PIXELS",
    "COORDINATE_MARGIN",
    "image_problem",
    "stored_image_header",
    "stored_image_size",
    "unicode_problem",
    "segmentation_problem",
    "polygon_coordinates_problem",
    "polygon_values_problem",
    "valid_id",
    "read_json_file",
    "read_pickle_file",
    "NO_TARGET_ANN_ID",
    "ref_problem",
    "target_ann_ids",
    "sentence_text",
    "split_matches",
    "record_problem",
    "record_annotation_problem",
    "expression_problem",
]

# Largest image side and pixel count accepted. pycocotools merges the parts of a mask in a
# buffer of 4 bytes per pixel: these bound it (256 MiB) whatever a file claims.
MAX_IMAGE_SIDE = 1 << 15
MAX_IMAGE_PIXELS = 1 << 26
# Polygon coordinates may lie outside the image (pycocotools clips them) by at most this
# many image widths / heights; further out they are corrupt. Bounded coordinates also
# bound pycocotools' work and memory, which grow with the polygon's perimeter.
COORDINATE_MARGIN = 1.0
# Longest value representation quoted in an error message.
_MAX_QUOTED = 60
# pycocotools' compressed RLE: 6 bits per character, offset by '0'; a 32-bit count never
# needs more than 7 characters.
_RLE_CHAR_MIN, _RLE_CHAR_MAX = 48, 48 + 63
_RLE_MAX_CHARS_PER_COUNT = 7

# What PIL raises for a file that is no readable image (bad or truncated data), and for
# more pixels than Image.MAX_IMAGE_PIXELS allows (a decompression bomb).
IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# The EXIF orientation tag, and its values that turn the image by 90 degrees (height and
# width swap when Detectron2 applies them).
_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSED = (5, 6, 7, 8)

Problem = Tuple[str, str]  # (field, what is wrong)


def stored_image_header(path: str) -> Tuple[int, int, str]:
    """(height, width, PIL mode) of the image file as Detectron2's reader sees it (EXIF
    rotation applied), from its header; one of IMAGE_READ_ERRORS, PIL's reason, if it is no
    image PIL can open."""
    with Image.open(path) as im:
        (w, h), mode = im.size, im.mode
        if im.getexif().get(_EXIF_ORIENTATION) in _EXIF_TRANSPOSED:
            h, w = w, h
    return h, w, mode


def stored_image_size(path: str) -> Optional[Tuple[int, int]]:
    """(height, width) of :func:`stored_image_header`; None if it is no image PIL can open."""
    try:
        return stored_image_header(path)[:2]
    except IMAGE_READ_ERRORS:
        return None


def unicode_problem(text: str) -> Optional[str]:
    """Why ``text`` is no valid Unicode, or None: undecodable bytes of a terminal or a file
    (an emoji cut in half, a JSON "\\ud83d") stay in Python as lone surrogates, which encode
    to no UTF-8 and which the tokenizer refuses from deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"{text!r} is not valid text (undecodable bytes?)"
    return None


class ReferringDataError(ValueError):
    """
    A referring dataset file cannot be used. The message is one line naming the file, the
    entry (ref / annotation / image id) and the field where they are known; they are also
    in the attributes ``file``, ``item`` and ``field`` (None when not applicable).
    """

    def __init__(self, message: str, *, file=None, item=None, field=None):
        super().__init__(message)
        self.file = file
        self.item = item
        self.field = field


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _QuotingRepr(reprlib.Repr):
    """repr() that stops after what fits in a quote. A value from a stranger's file can be
    small on disk and huge in memory (a pickle of nested lists that share themselves: 2^40
    elements in 14 KB), and repr() would walk all of it: containers are cut to a few levels
    and items. Strings stay whole (their repr is linear in the file), and an integer too
    long for str() (Python's digit limit) is described instead."""

    def __init__(self):
        super().__init__()
        self.maxlevel = 4
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdeque = self.maxdict = _MAX_QUOTED // 3
        # Other values are cut in the middle past this; the quote keeps a shorter prefix.
        self.maxother = 4 * _MAX_QUOTED

    def repr_str(self, x, level):
        return repr(x)

    def repr_int(self, x, level):
        try:
            return repr(x)
        except ValueError:
            return f"<an integer of {x.bit_length()} bits>"


_QUOTING_REPR = _QuotingRepr()


def quote(value: Any) -> str:
    """A short one-line representation of ``value`` for error messages, in time bounded by
    the quote's length whatever the value's size."""
    text = _one_line(_QUOTING_REPR.repr(value))
    return text if len(text) <= _MAX_QUOTED else text[: _MAX_QUOTED - 3] + "..."


def shortlist(items: Sequence[str], limit: int) -> str:
    """``items`` joined by commas, at most ``limit`` of them, then how many more there are."""
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def data_error(
    file: str, item: Optional[str], field: Optional[str], problem: str
) -> ReferringDataError:
    """``ReferringDataError("<file>: <item>: <field>: <problem>")`` on one line."""
    parts = [str(file)] + [p for p in (item, field) if p] + [problem]
    return ReferringDataError(_one_line(": ".join(parts)), file=file, item=item, field=field)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def is_int(v) -> bool:
    """An integer, Python's or numpy's, and not a bool."""
    # type() first: the ABC check is most of the cost of the per-record checks.
    return type(v) is int or (isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)))


def _is_finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond the float range
        return False


def valid_id(v) -> bool:
    """An id the official readers can index by: an integer or a string (not a bool)."""
    return is_int(v) or isinstance(v, str)


# ------------------------------------------------------------------------------ files
def read_json_file(path: str):
    """``json.load`` of ``path``; a ReferringDataError naming the file and position otherwise."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except json.JSONDecodeError as e:
        raise data_error(
            path, None, None, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from e
    except UnicodeDecodeError as e:
        raise data_error(
            path, None, None, f"not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})"
        ) from e
    except (ValueError, RecursionError, MemoryError) as e:  # 4300+ digit ints, deep nesting
        raise data_error(path, None, None, f"not readable JSON ({type(e).__name__}: {e})") from e


def read_pickle_file(path: str):
    """Plain-data pickle at ``path`` (see :mod:`.safe_pickle`); ReferringDataError otherwise."""
    try:
        return load_plain_pickle(path)
    except (OSError, MemoryError) as e:
        raise data_error(path, None, None, f"cannot be read ({type(e).__name__}: {e})") from e
    except Exception as e:  # truncated / malformed pickles raise many exception types
        raise data_error(
            path, None, None, f"not a readable plain-data pickle ({type(e).__name__}: {e})"
        ) from e


# ----------------------------------------------------------------------------- images
def image_problem(img: Dict) -> Optional[Problem]:
    """(field, problem) of an ``images`` entry of instances.json, or None when usable."""
    fname = img.get("file_name")
    if not isinstance(fname, str) or not fname:
        return "file_name", f"expected a non-empty file name, got {quote(fname)}"
    for key in ("height", "width"):
        v = img.get(key)
        if not is_int(v):
            return key, f"expected a positive integer, got {quote(v)}"
        if not 0 < v <= MAX_IMAGE_SIDE:
            return key, f"{v} is outside 1..{MAX_IMAGE_SIDE}"
    if img["height"] * img["width"] > MAX_IMAGE_PIXELS:
        return "height", f"{img['height']}x{img['width']} pixels is more than {MAX_IMAGE_PIXELS}"
    return None


# ----------------------------------------------------------------------- segmentation
def segmentation_problem(segm, height: int, width: int, margin: float = COORDINATE_MARGIN) -> Optional[Problem]:
    """
    (field, problem) when ``segm`` (an annotation's ``segmentation``) cannot be read as the
    mask of a ``height`` x ``width`` image, else None. After this returns None,
    ``pycocotools.mask.frPyObjects`` / ``decode`` on it are memory-safe and bounded.

    Polygons: a non-empty list of lists of finite numbers within ``margin`` image sizes of
    the image, whose first polygon has more than 4 numbers (pycocotools
    reads a first entry of 4 numbers as a box and fails on it; fewer is unsupported). Later
    parts may have any length, as for pycocotools. RLE: ``{"size": [height, width],
    "counts": str | bytes | list}`` whose counts add up to ``height * width``, or a
    non-empty list of them (parts merged).
    """
    if isinstance(segm, dict):
        return _rle_problem(segm, height, width)
    if is_rle_list(segm):
        for i, part in enumerate(segm):
            problem = _rle_problem(part, height, width)
            if problem is not None:
                return f"segmentation[{i}]" + problem[0][len("segmentation") :], problem[1]
        return None
    if isinstance(segm, (list, tuple)):
        return _polygons_problem(segm, height, width, margin)
    return "segmentation", f"expected a list of polygons or an RLE dict, got {type(segm).__name__}"


def is_rle_list(segm) -> bool:
    """A list of RLE dicts: ReferIt's form, which REFER's getMask decodes and merges."""
    return isinstance(segm, (list, tuple)) and len(segm) > 0 and all(isinstance(p, dict) for p in segm)


def _polygons_problem(segm: Sequence, height: int, width: int, margin: float) -> Optional[Problem]:
    if len(segm) == 0:
        return "segmentation", "empty list of polygons"
    for i, poly in enumerate(segm):
        field = f"segmentation[{i}]"
        if not isinstance(poly, (list, tuple)):
            return field, f"expected a list of numbers [x0, y0, x1, y1, ...], got {quote(poly)}"
        if i == 0 and len(poly) <= 4:
            return field, (
                f"{len(poly)} numbers: the first polygon needs at least 5 (pycocotools cannot "
                "read a first polygon of 4 or fewer numbers)"
            )
        problem = polygon_coordinates_problem(poly, height, width, margin)
        if problem is not None:
            return f"{field}{problem[0]}", problem[1]
    return None


def polygon_coordinates_problem(
    poly: Sequence, height: int, width: int, margin: float = COORDINATE_MARGIN
) -> Optional[Problem]:
    """
    ("[j]", problem) for the first coordinate of the flat polygon ``poly`` that is not a
    finite number within :data:`COORDINATE_MARGIN` image sizes of the image, else None.
    """
    return polygon_values_problem(poly) or _polygon_bounds_problem(poly, height, width, margin)


def polygon_values_problem(poly: Sequence) -> Optional[Problem]:
    """("[j]", problem) for the first value of ``poly`` that is not a finite number, else None."""
    # Fast path over plain int/float (every value of a JSON file); numpy scalars and other
    # Reals of Python-built data take the per-value path.
    if not {type(v) for v in poly} <= {int, float}:
        for j, v in enumerate(poly):
            if not _is_number(v):
                return f"[{j}]", f"expected a number, got {quote(v)}"
    try:
        finite = bool(np.isfinite(np.asarray(poly, dtype=np.float64)).all())
    except OverflowError:  # an integer beyond the float range
        finite = False
    if not finite:
        j = next(j for j, v in enumerate(poly) if not _is_finite(v))
        return f"[{j}]", f"{quote(poly[j])} is not a finite number"
    return None


def _polygon_bounds_problem(poly: Sequence, height: int, width: int, margin: float) -> Optional[Problem]:
    xy = np.asarray(poly, dtype=np.float64)
    lo_x, hi_x = -margin * width, (1 + margin) * width
    lo_y, hi_y = -margin * height, (1 + margin) * height
    outside = np.zeros(len(xy), dtype=bool)
    outside[0::2] = (xy[0::2] < lo_x) | (xy[0::2] > hi_x)
    outside[1::2] = (xy[1::2] < lo_y) | (xy[1::2] > hi_y)
    if not outside.any():
        return None
    j = int(np.argmax(outside))
    axis, lo, hi = ("x", lo_x, hi_x) if j % 2 == 0 else ("y", lo_y, hi_y)
    return f"[{j}]", (
        f"{axis} = {quote(poly[j])} is far outside the {width}x{height} image "
        f"(accepted: {lo:g}..{hi:g})"
    )


def _rle_problem(segm: Dict, height: int, width: int) -> Optional[Problem]:
    problem = _rle_size_problem(segm, height, width)
    if problem is not None:
        return problem
    counts = segm["counts"]
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            return "segmentation.counts", "compressed RLE counts must be ASCII"
    if isinstance(counts, bytes):
        problem = compressed_counts_problem(counts, height * width)
    elif isinstance(counts, (list, tuple)):
        problem = _uncompressed_counts_problem(counts, height * width)
    else:
        problem = f"expected a string or a list of run lengths, got {type(counts).__name__}"
    return None if problem is None else ("segmentation.counts", problem)


def _rle_size_problem(segm: Dict, height: int, width: int) -> Optional[Problem]:
    """(field, problem) when the RLE dict ``segm`` lacks ``size`` or ``counts``, or is not of
    a ``height`` x ``width`` image, else None; its counts are not read."""
    for key in ("size", "counts"):
        if key not in segm:
            return (
                f"segmentation.{key}",
                f"missing: an RLE needs 'size' and 'counts', got keys {sorted(map(str, segm))}",
            )
    size = segm["size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(is_int(s) for s in size):
        return "segmentation.size", f"expected [height, width], got {quote(size)}"
    if [int(s) for s in size] != [height, width]:
        return (
            "segmentation.size",
            f"RLE size {[int(s) for s in size]} does not match the image size [{height}, {width}]",
        )
    return None


def _uncompressed_counts_problem(counts: Sequence, total: int) -> Optional[str]:
    for j, c in enumerate(counts):
        if not is_int(c) or c < 0:
            return f"run length #{j} is {quote(c)}, expected a non-negative integer"
    if sum(counts) != total:
        return f"run lengths add up to {sum(counts)}, expected height * width = {total}"
    return None


def compressed_counts_problem(counts: bytes, total: int) -> Optional[str]:
    """
    Why pycocotools' compressed RLE string ``counts`` does not encode exactly ``total``
    pixels (None when it does). Decodes as pycocotools' ``rleFrString`` does: 5 value bits
    and a continuation bit per character, the last character's 0x10 bit a sign, counts
    from the fourth on stored as a difference to the count two before. The C decoder
    trusts all of this; here nothing is trusted.
    """
    if _compressed_counts_add_up(counts, total):
        return None
    # Only a string with a problem takes the per-character path, which says what it is.
    decoded: List[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return "the string ends inside a run length"
            c = counts[p]
            if not _RLE_CHAR_MIN <= c <= _RLE_CHAR_MAX:
                return f"character {chr(c)!r} at {p} is not an RLE character ('0'..'o')"
            c -= _RLE_CHAR_MIN
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if k > _RLE_MAX_CHARS_PER_COUNT:
                return f"run length #{len(decoded)} is longer than {_RLE_MAX_CHARS_PER_COUNT} characters"
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(decoded) > 2:
            x += decoded[-2]
        if not 0 <= x <= total:
            return f"run length #{len(decoded)} is {x}, outside 0..{total}"
        decoded.append(x)
    if sum(decoded) != total:
        return f"run lengths add up to {sum(decoded)}, expected height * width = {total}"
    return None


def _compressed_counts_add_up(counts: bytes, total: int) -> bool:
    """
    Whether :func:`compressed_counts_problem` finds nothing, decoded with numpy: the records
    check every RLE before training (RefCOCO-sized sets), where the per-character loop
    is 5 to 20 times slower. False for anything it would report, so that it says what.
    """
    c = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - _RLE_CHAR_MIN
    if len(c) == 0:
        return total == 0
    if (c < 0).any() or (c > _RLE_CHAR_MAX - _RLE_CHAR_MIN).any() or c[-1] & 0x20:
        return False  # a character outside '0'..'o', or the string ends inside a run length
    ends = (c & 0x20) == 0
    starts = np.flatnonzero(np.concatenate(([True], ends[:-1])))
    position = np.arange(len(c)) - np.repeat(starts, np.diff(np.append(starts, len(c))))
    if position.max() >= _RLE_MAX_CHARS_PER_COUNT:
        return False
    values = np.add.reduceat((c & 0x1F) << (5 * position), starts)
    # The last character's 0x10 bit extends the sign: x | (-1 << 5k) is x - 2^5k here.
    last = np.flatnonzero(ends)
    values = values - ((c[last] & 0x10) != 0) * (np.int64(1) << (5 * (position[last] + 1)))
    # From the fourth on, a count is stored as its difference to the count two before.
    decoded = values.copy()
    for first in (3, 4):
        if len(values) > first:
            decoded[first::2] = values[first - 2] + np.cumsum(values[first::2])
    return bool((decoded >= 0).all() and (decoded <= total).all() and decoded.sum() == total)


# ------------------------------------------------------------------------------- refs
# gRefCOCO marks a no-target ref with this ann_id.
NO_TARGET_ANN_ID = -1


def ref_problem(ref, generalized: bool) -> Optional[Problem]:
    """
    (field, problem) when a ref cannot be read as the official readers read it, else None:
    ``ref_id`` / ``image_id`` ids, ``ann_id`` one id (classic) or an id / a list of ids /
    ``[-1]`` (generalized, as ReLA's loader), ``sentences`` a list, ``split`` a string.
    """
    if not isinstance(ref, dict):
        return "", f"expected an object, got {type(ref).__name__}"
    for key in ("ref_id", "image_id", "split", "ann_id", "sentences"):
        if key not in ref:
            return key, "missing"
    for key in ("ref_id", "image_id"):
        if not valid_id(ref[key]):
            return key, f"expected an integer or string id, got {quote(ref[key])}"
    if not isinstance(ref["split"], str):
        return "split", f"expected a split name, got {quote(ref['split'])}"
    if not isinstance(ref["sentences"], list):
        return "sentences", f"expected a list of sentences, got {type(ref['sentences']).__name__}"
    ann_id = ref["ann_id"]
    if not generalized:
        if not valid_id(ann_id):
            return "ann_id", f"expected one annotation id, got {quote(ann_id)}"
        return None
    ids = ann_id if isinstance(ann_id, list) else [ann_id]
    if not all(valid_id(a) for a in ids):
        return "ann_id", f"expected annotation ids, got {quote(ann_id)}"
    if NO_TARGET_ANN_ID in ids and len(ids) > 1:
        return "ann_id", f"{quote(ann_id)} mixes the no-target id {NO_TARGET_ANN_ID} with targets"
    return None


def target_ann_ids(ref: Dict, generalized: bool) -> List:
    """Target annotation ids of a ref that :func:`ref_problem` accepts ([] = no target)."""
    ann_id = ref["ann_id"]
    if not generalized:
        return [ann_id]
    ids = ann_id if isinstance(ann_id, list) else [ann_id]
    return [] if ids == [NO_TARGET_ANN_ID] else list(ids)


def sentence_text(sent) -> Tuple[Optional[str], Optional[Problem]]:
    """(text, None) of a REFER sentence (``raw``, else ``sent``), or (None, (field, problem))."""
    if not isinstance(sent, dict):
        return None, ("", f"expected an object, got {type(sent).__name__}")
    raw = sent.get("raw")
    text = raw if isinstance(raw, str) else sent.get("sent")
    if not isinstance(text, str):
        return None, ("raw", f"expected the sentence as a string, got {quote(raw)}")
    problem = unicode_problem(text)
    if problem is not None:
        return None, ("raw" if text is raw else "sent", problem)
    if "sent_id" not in sent:
        return None, ("sent_id", "missing")
    if not valid_id(sent["sent_id"]):
        return None, ("sent_id", f"expected an integer or string id, got {quote(sent['sent_id'])}")
    return text, None


# Classic REFER splits selected by their last letter anywhere in a ref's split (getRefIds).
LETTER_TEST_SPLITS = ("testA", "testB", "testC")


def split_matches(ref_split: str, split: str, generalized: bool) -> bool:
    """
    Whether a ref of ``ref_split`` belongs to the requested ``split``, as the official
    readers select refs: lichengunc/refer's ``getRefIds`` takes every ref whose split
    contains "test" for "test" and whose split contains the letter for "testA/B/C" (so
    "testAB" counts for both), exact names otherwise; ReLA's ``G_REFER`` exact names.
    """
    if generalized:
        return ref_split == split
    if split in LETTER_TEST_SPLITS:
        return split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    return ref_split == split


# ---------------------------------------------------------------------------- records
# What a record annotation needs besides its mask: Detectron2's transform_instance_annotations
# moves the box with the image.
_RECORD_BOX_KEYS = {"bbox": "its box, 4 numbers", "bbox_mode": "the box's detectron2 BoxMode"}
# The box modes transform_instance_annotations converts (relative and rotated ones it refuses).
RECORD_BOX_MODES = (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
# Optional text fields a record may carry (datasets/README.md): the expression's type (the
# evaluator's per-type tables) and the words naming the target (the retrieval report).
_RECORD_TEXT_KEYS = ("type", "target_phrase")


def has_no_target(record: Dict) -> bool:
    """Whether a record (whose fields :func:`record_problem` passed) is a no-target
    expression: its ``empty`` where given, else no target annotation."""
    return bool(record.get("empty", len(record["annotations"]) == 0))


def record_problem(record, landmark: bool = False) -> Optional[Problem]:
    """
    (field, problem) when a dataset record (the data contract of ``datasets/README.md``)
    lacks or misshapes a field that ``ReferringDatasetMapper`` reads, else None:
    ``file_name``, ``height`` and ``width`` as :func:`image_problem` wants them, ``image_id``,
    ``ref_id``, ``sentence`` a dict whose ``raw`` is the text (and ``sent_id``, if present,
    an id), ``annotations`` a list (empty: no target) of
    :func:`record_annotation_problem` annotations, ``empty`` (if present) the bool saying
    whether the expression has no target (True only with no annotations; False with none is
    a target whose mask is empty), ``type`` and
    ``target_phrase`` non-empty strings where present and, with
    ``landmark`` (a mapper that reads it), a ``landmark`` ``{phrase, annotation}`` if any.

    It runs on every record of every set before the first iteration (RefCOCO's train split
    has 120k): a few microseconds a record plus, for the values that reach pycocotools,
    tens of microseconds a polygon and 0.1-0.2 ms an RLE mask of a 640x480 image. The
    built-in loaders have checked the values already (:func:`segmentation_problem`); a
    loader of your own has not.
    """
    if not isinstance(record, dict):
        return "", f"expected a dict, got {type(record).__name__}"
    if isinstance(record.get("file_name"), os.PathLike):  # a loader's pathlib.Path: the mapper reads it
        record = {**record, "file_name": os.fspath(record["file_name"])}
    problem = image_problem(record)
    if problem is not None:
        return problem
    for key in ("image_id", "ref_id"):
        if key not in record:
            return key, "missing: expected the record's id"
        # The evaluator writes ids into its per-sample JSON (a UUID failed there, after training).
        if not valid_id(record[key]):
            return key, f"expected an integer or string id, got {quote(record[key])}"
    sentence = record.get("sentence")
    if not isinstance(sentence, dict):
        return "sentence", f"expected a dict {{'raw': text, 'sent_id': id}}, got {quote(sentence)}"
    if not isinstance(sentence.get("raw"), str):
        return "sentence.raw", f"expected the expression as a string, got {quote(sentence.get('raw'))}"
    problem = unicode_problem(sentence["raw"])
    if problem is not None:
        return "sentence.raw", problem
    # The evaluator writes it into its per-sample JSON, after the whole training (None: null).
    if sentence.get("sent_id") is not None and not valid_id(sentence["sent_id"]):
        return "sentence.sent_id", f"expected an integer or string id, got {quote(sentence['sent_id'])}"
    annotations = record.get("annotations")
    if not isinstance(annotations, (list, tuple)):
        return "annotations", f"expected a list of target annotations ([] for no target), got {quote(annotations)}"
    height, width = record["height"], record["width"]
    for i, ann in enumerate(annotations):
        problem = record_annotation_problem(ann, height, width)
        if problem is not None:
            return f"annotations[{i}]{problem[0]}", problem[1]
    # "empty" (optional) says whether the expression has no target; the mapper and the
    # evaluator read it beside the annotations. A no-target record with annotations would
    # be scored as a hit; a target record without any is a target whose mask is empty (a
    # gRefCOCO ref whose targets are all crowd annotations, left out of the mask as ReLA
    # does), scored as a miss.
    empty = record.get("empty", len(annotations) == 0)
    if not isinstance(empty, (bool, np.bool_)) or (bool(empty) and annotations):
        allowed = "a bool, True or False," if not annotations else "False"
        return "empty", (f"expected {allowed} (the record has {len(annotations)} target annotation(s)), "
                         f"got {quote(record['empty'])}")
    for key in _RECORD_TEXT_KEYS:
        if key in record and (not isinstance(record[key], str) or not record[key].strip()):
            return key, f"expected a non-empty string (or no {key!r} key), got {quote(record[key])}"
        problem = unicode_problem(record[key]) if key in record else None  # tokenized, as the sentence
        if problem is not None:
            return key, problem
    if landmark and record.get("landmark") is not None:
        mark = record["landmark"]
        if not isinstance(mark, dict) or not isinstance(mark.get("phrase"), str):
            return "landmark", f"expected a dict {{'phrase': words, 'annotation': annotation}}, got {quote(mark)}"
        problem = unicode_problem(mark["phrase"])
        if problem is not None:
            return "landmark.phrase", problem
        problem = record_annotation_problem(mark.get("annotation"), height, width)
        if problem is not None:
            return f"landmark.annotation{problem[0]}", problem[1]
    return None


def record_annotation_problem(ann, height: int, width: int) -> Optional[Problem]:
    """
    (".field", problem) when ``ann`` is no record annotation of a ``height`` x ``width``
    image, else None: a dict with ``bbox`` (4 finite numbers) and ``bbox_mode`` (one of
    :data:`RECORD_BOX_MODES`), and a ``segmentation`` as
    records carry it (:func:`vipa_d2.data.masks.record_segmentation`): polygons of an even
    number >= 6 of values each (Detectron2's transforms move them as points; pycocotools
    reads a first one of 4 as a box) of finite coordinates within :data:`COORDINATE_MARGIN`
    image sizes of the image, or an RLE dict of the image with compressed counts that add
    up to its size (what pycocotools decodes).
    """
    if not isinstance(ann, dict):
        return "", f"expected an annotation dict, got {quote(ann)}"
    for key, what in _RECORD_BOX_KEYS.items():
        if key not in ann:
            return f".{key}", f"missing: expected {what}"
    bbox = ann["bbox"]
    if not isinstance(bbox, (list, tuple, np.ndarray)) or len(bbox) != 4:
        return ".bbox", f"expected 4 numbers, got {quote(bbox)}"
    problem = polygon_values_problem(bbox)  # the same test: finite numbers
    if problem is not None:
        return ".bbox" + problem[0], problem[1]
    if not is_int(ann["bbox_mode"]) or ann["bbox_mode"] not in RECORD_BOX_MODES:
        modes = " or ".join(f"BoxMode.{m.name}" for m in RECORD_BOX_MODES)
        return ".bbox_mode", f"expected {modes}, got {quote(ann['bbox_mode'])}"
    if "segmentation" not in ann:
        return ".segmentation", "missing: expected COCO polygons [[x0, y0, x1, y1, ...], ...] or an RLE dict"
    segm = ann["segmentation"]
    if isinstance(segm, dict):
        if "counts" in segm and not isinstance(segm["counts"], (str, bytes)):
            problem = "segmentation.counts", (
                f"expected compressed counts (a string), got {type(segm['counts']).__name__} "
                "(vipa_d2.data.masks.normalize_rle compresses them)"
            )
        else:  # counts that do not add up: pycocotools decodes memory it never wrote
            problem = _rle_problem(segm, height, width)
        return None if problem is None else ("." + problem[0], problem[1])
    if is_rle_list(segm):
        return ".segmentation", "a list of RLE parts: expected one RLE dict (vipa_d2.data.masks.coco_rle merges them)"
    if not isinstance(segm, (list, tuple)):
        return ".segmentation", f"expected a list of polygons or an RLE dict, got {type(segm).__name__}"
    for i, poly in enumerate(segm):
        if not isinstance(poly, (list, tuple, np.ndarray)) or len(poly) < 6 or len(poly) % 2:
            return (
                f".segmentation[{i}]",
                f"expected a polygon [x0, y0, x1, y1, x2, y2, ...] of 3 or more points, got {quote(poly)}",
            )
        # A NaN or huge coordinate makes pycocotools allocate without bound (the process
        # is killed, or segfaults under a memory limit).
        problem = polygon_coordinates_problem(poly, height, width)
        if problem is not None:
            return f".segmentation[{i}]{problem[0]}", problem[1]
    return None


# ------------------------------------------------------------------------- user input
def expression_problem(text) -> Optional[str]:
    """
    Why ``text``, typed or listed by a user (predictor, demo, manifest), is no referring
    expression, or None: not a str; not Unicode (undecodable bytes of a terminal or a
    file, which Python keeps as lone surrogates and the tokenizer refuses from deep
    inside); or no letter or digit at all (blank, or marks and invisible characters only,
    which tokenize to [CLS] [SEP] and still got a confident mask). Dataset sentences are
    not checked with it: the official readers keep blank ones.
    """
    if not isinstance(text, str):
        return f"{quote(text)}, a {type(text).__name__}; expected a str"
    problem = unicode_problem(text)
    if problem is not None:
        return problem + "; expected some words"
    if not any(ch.isalnum() for ch in text):
        return f"{text!r} has no letter or digit; expected some words"
    return None
