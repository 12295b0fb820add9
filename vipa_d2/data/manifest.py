"""
Inference manifests: each image with its own referring expressions (``demo/demo.py
--manifest``). Two formats, told apart by the extension:

- JSON: a list of ``{"image": "a.jpg", "expressions": ["the red cup", "the left one"]}``,
  optionally with ``"targets"``: per expression, the COCO segmentation (polygons or RLE) of
  what it refers to, or null for nothing; the demo then draws prediction beside target;
- CSV: a header with the columns ``image`` and ``expression``, then one row per expression
  (rows of one image are gathered in the order they come).

Relative image paths are relative to the manifest's folder. A malformed manifest raises
:class:`~vipa_d2.data.validation.ReferringDataError` naming the file, the entry (JSON) or
row (CSV, the header is row 1) and the key.
"""
import csv
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from .masks import segmentation_to_mask
from .validation import data_error, expression_problem, quote, read_json_file, segmentation_problem, stored_image_size

__all__ = ["ManifestEntry", "read_manifest"]

# JSON entry keys; CSV columns are IMAGE_KEY and EXPRESSION_COLUMN.
IMAGE_KEY = "image"
EXPRESSIONS_KEY = "expressions"
TARGETS_KEY = "targets"
EXPRESSION_COLUMN = "expression"
MANIFEST_EXTENSIONS = (".json", ".csv")


@dataclass
class ManifestEntry:
    """One image with its expressions and, optionally, their targets (see the module doc)."""

    image: str
    expressions: List[str]
    targets: Optional[List] = None
    # Where the entry came from, for error messages: the manifest file and "entry i".
    source: str = ""
    item: str = ""

    def target_masks(self, height: int, width: int) -> Optional[List[np.ndarray]]:
        """The targets as bool masks of a ``height`` x ``width`` image (None without targets);
        a ReferringDataError naming the manifest, entry and target when one does not fit."""
        if self.targets is None:
            return None
        self.check_targets(height, width)
        return [
            np.zeros((height, width), dtype=bool) if segm is None else segmentation_to_mask(segm, height, width).astype(bool)
            for segm in self.targets
        ]

    def check_targets(self, height: int, width: int) -> None:
        """A ReferringDataError naming the manifest, entry and target of the first target that
        is no segmentation of a ``height`` x ``width`` image."""
        for k, segm in enumerate(self.targets or []):
            problem = None if segm is None else segmentation_problem(segm, height, width)
            if problem is not None:
                field, what = problem
                raise data_error(self.source, self.item, f"{TARGETS_KEY}[{k}].{field}", what)


def _image_path(path: str, item: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise data_error(path, item, IMAGE_KEY, f"expected an image path, got {quote(value)}")
    resolved = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(value))
    if not os.path.isfile(resolved):
        raise data_error(path, item, IMAGE_KEY, f"image {value!r} not found (looked for {resolved})")
    return resolved


def _expression(path: str, item: str, field: str, value) -> str:
    problem = expression_problem(value)
    if problem is not None:
        raise data_error(path, item, field, f"not a referring expression: {problem}")
    return value


def _read_json(path: str) -> List[ManifestEntry]:
    data = read_json_file(path)
    if not isinstance(data, list) or not data:
        raise data_error(path, None, None, f"expected a non-empty list of {{{IMAGE_KEY!r}: ..., {EXPRESSIONS_KEY!r}: [...]}}")
    manifest, seen = [], {}
    for i, entry in enumerate(data):
        item = f"entry {i}"
        if not isinstance(entry, dict):
            raise data_error(path, item, None, f"expected an object, got {quote(entry)}")
        unknown = sorted(set(entry) - {IMAGE_KEY, EXPRESSIONS_KEY, TARGETS_KEY})
        if unknown or IMAGE_KEY not in entry or EXPRESSIONS_KEY not in entry:
            raise data_error(
                path, item, None,
                f"expected the keys {IMAGE_KEY!r}, {EXPRESSIONS_KEY!r} and optionally {TARGETS_KEY!r}, "
                f"got {sorted(entry)}",
            )
        image = _image_path(path, item, entry[IMAGE_KEY])
        if image in seen:
            raise data_error(path, item, IMAGE_KEY, f"image {entry[IMAGE_KEY]!r} is already listed in entry {seen[image]}")
        seen[image] = i
        texts = entry[EXPRESSIONS_KEY]
        if not isinstance(texts, list) or not texts:
            raise data_error(path, item, EXPRESSIONS_KEY, f"expected a non-empty list of expressions, got {quote(texts)}")
        texts = [_expression(path, item, f"{EXPRESSIONS_KEY}[{k}]", t) for k, t in enumerate(texts)]
        targets = entry.get(TARGETS_KEY)
        if targets is not None and (not isinstance(targets, list) or len(targets) != len(texts)):
            raise data_error(
                path, item, TARGETS_KEY,
                f"expected a list of {len(texts)} segmentations (one per expression, null for none), got {quote(targets)}",
            )
        manifest.append(ManifestEntry(image, texts, targets, source=path, item=item))
        size = stored_image_size(image) if targets is not None else None
        if size is not None:  # (an image that is none is the demo's to refuse, by name)
            # Every entry's targets before the first image is segmented, not when it comes.
            manifest[-1].check_targets(*size)
    return manifest


def _read_csv(path: str) -> List[ManifestEntry]:
    try:
        # utf-8-sig: spreadsheet programs start their UTF-8 CSV files with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise data_error(path, None, None, f"not a readable UTF-8 CSV file ({e})") from e
    header = [h.strip() for h in rows[0]] if rows else []
    if sorted(header) != sorted([IMAGE_KEY, EXPRESSION_COLUMN]):
        raise data_error(path, "row 1", None, f"expected the header {IMAGE_KEY},{EXPRESSION_COLUMN}, got {quote(header)}")
    gathered: Dict[str, List[str]] = {}
    for number, row in enumerate(rows[1:], start=2):
        item = f"row {number}"
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) != len(header):
            raise data_error(path, item, None, f"expected {len(header)} columns, got {len(row)}: {quote(row)}")
        values = dict(zip(header, row))
        image = _image_path(path, item, values[IMAGE_KEY])
        gathered.setdefault(image, []).append(_expression(path, item, EXPRESSION_COLUMN, values[EXPRESSION_COLUMN]))
    if not gathered:
        raise data_error(path, None, None, "no rows after the header")
    return [ManifestEntry(image, texts, source=path) for image, texts in gathered.items()]


def read_manifest(path: str) -> List[ManifestEntry]:
    """The entries of a JSON or CSV manifest (see the module doc), image paths resolved."""
    if not os.path.isfile(path):
        raise data_error(path, None, None, "manifest file not found")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".json":
        return _read_json(path)
    if extension == ".csv":
        return _read_csv(path)
    raise data_error(path, None, None, f"unknown manifest format {extension!r}; expected one of {MANIFEST_EXTENSIONS}")
