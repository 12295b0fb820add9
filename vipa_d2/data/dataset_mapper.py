"""Turn a referring record into model inputs: resized image, tokens and target mask."""

import copy
import logging
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import log_first_n

from ..modeling.losses import object_area_losses, object_box_losses, object_group_losses
from ..modeling.text_encoder import build_tokenizer
from .expressions import text_fit_notes, tokenize_expression
from .landmark import breakdown_inputs, landmark_training_inputs
from .masks import augmented_mask
from .mirror_words import is_flipped, swap_left_right
from .validation import (
    IMAGE_READ_ERRORS,
    ReferringDataError,
    has_no_target,
    quote,
    record_problem,
    shortlist,
    stored_image_header,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ReferringDatasetMapper",
    "build_referring_augmentations",
    "check_image_files",
    "read_image",
    "read_record_image",
    "swap_left_right",
]

RESIZE_MODES = ("square", "keep_ratio")
# PIL modes of more than 8 bits per channel: PIL's conversion to RGB saturates them (a
# 16-bit PNG becomes nearly all white), so they are refused rather than read wrong.
WIDE_IMAGE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
FLIP_MODES = ("none", "horizontal")

# Overrides that turn the object choice off, with the keys that need it (README's "Configs").
OBJECT_CHOICE_OFF_OPTS = (
    "MODEL.VIPA.DECODER.OBJECT_CHOICE False MODEL.VIPA.DECODER.CHOICE_FROM_WORDS False "
    "MODEL.VIPA.DECODER.CHOICE_FACTORISED False MODEL.VIPA.DECODER.CHOICE_FACTOR_QUERIES False "
    "MODEL.VIPA.DECODER.CHOICE_SIZE_RANKS False MODEL.VIPA.DECODER.CHOICE_AREAS group_gate"
)
# ... and those that turn off every loss that trains on object boxes (the counts the
# object choice needs, then the choice).
OBJECT_BOX_LOSSES_OFF_OPTS = (
    f"{OBJECT_CHOICE_OFF_OPTS} MODEL.VIPA.DECODER.COUNT_AT_OBJECT_CENTRES False MODEL.VIPA.DECODER.COUNT_CENTRES False"
)
# Record keys that training losses read: what each holds, and where it comes from.
LOSS_RECORD_KEYS = {
    "object_boxes": (
        "XYWH_ABS boxes of every object of its image",
        "vipa_d2's REFER loader writes them, a custom loader must too; on data without them, turn the "
        f"object counts and the object choice off: {OBJECT_BOX_LOSSES_OFF_OPTS}",
    ),
    "object_in_group": (
        "per object box, whether the expression's category / colour words name it",
        "vipa_d2's REFER loader writes it for sentences with 'group_ann_ids' (a synthetic benchmark "
        "generated before that field needs regenerating), a custom loader must too; on data without "
        f"it, turn the object choice off: {OBJECT_CHOICE_OFF_OPTS}",
    ),
    "object_areas": (
        "per object box, the area of its object in pixels",
        "vipa_d2's REFER loader writes them from the annotations' 'area', a custom loader must too; on data "
        "without them, pick by the group gate's areas: MODEL.VIPA.DECODER.CHOICE_AREAS group_gate",
    ),
}
# Missing image files a refusal lists before "... (+N more)".
MAX_FILES_LISTED = 3


def read_image(file_name: str, image_format: str, source: str = "") -> np.ndarray:
    """
    ``file_name`` as an HxWx3 uint8 array in ``image_format`` (Detectron2's reader: EXIF
    orientation applied). Errors name the file and ``source`` (where it came from, e.g. a
    record's ids): FileNotFoundError if it is missing, OSError if it is no readable image.
    """
    where = f" ({source})" if source else ""
    if not os.path.isfile(file_name):
        what = "a folder, not an image file" if os.path.isdir(file_name) else "no such file"
        raise FileNotFoundError(f"Cannot read image {file_name}{where}: {what}")
    try:
        with Image.open(file_name) as header:  # reads the header only
            mode = header.mode
        if mode not in WIDE_IMAGE_MODES:
            return utils.read_image(file_name, format=image_format)
    except IMAGE_READ_ERRORS as e:
        raise OSError(f"Cannot read image {file_name}{where}: expected an image file ({e})") from e
    raise OSError(f"Cannot read image {file_name}{where}: {wide_mode_problem(mode)}")


def wide_mode_problem(mode: str) -> str:
    """What :func:`read_image` (and the predictor, of a PIL image) says of an image of a
    ``WIDE_IMAGE_MODES`` mode."""
    return f"PIL mode {mode} (16-bit or float); expected 8 bits per channel (grey, RGB, RGBA or palette)"


def record_name(record: Dict) -> str:
    """How errors name a record: its image and referred object."""
    return f"image_id={record.get('image_id')}, ref_id={record.get('ref_id')}"


def check_record_fields(records: List[Dict], source: str, landmark: bool = True) -> None:
    """ReferringDataError naming ``source``, the first record that lacks or misshapes a field
    the mapper reads (:func:`vipa_d2.data.validation.record_problem`; ``landmark``: its
    ``landmark`` too) and the field."""
    for i, record in enumerate(records):
        problem = record_problem(record, landmark=landmark)
        if problem is not None:
            field, what = problem
            item = f"record #{i}" + (f" ({record_name(record)})" if isinstance(record, dict) else "")
            raise ReferringDataError(
                f"{source}: {item}: {field + ': ' if field else ''}{what}", item=item, field=field or None
            )


def read_record_image(record: Dict, image_format: str) -> np.ndarray:
    """A record's image (see :func:`read_image`), refused with Detectron2's
    ``SizeMismatchError`` when it is not the record's ``height`` x ``width``."""
    image = read_image(record["file_name"], image_format, record_name(record))
    utils.check_image_size(record, image)
    return image


def image_header_problem(path: str) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    """(height, width) of an image file, from its header (after EXIF rotation), and what
    keeps :func:`read_image` from reading it, or None: no image PIL reads (PIL's reason: bad
    data, a decompression bomb's pixel count), or pixels of more than 8 bits per channel."""
    try:
        height, width, mode = stored_image_header(path)
    except IMAGE_READ_ERRORS as e:
        return None, f"{path} is no image file PIL reads ({e})"
    if mode in WIDE_IMAGE_MODES:
        return (height, width), f"{path} has {wide_mode_problem(mode)}"
    return (height, width), None


def check_image_files(records: List[Dict], source: str) -> None:
    """Refuse ``records`` (of the datasets ``source`` names) whose image files do not exist,
    or whose files (read from their headers) are no image, not 8 bits per channel, or not the
    records' height x width, before a loader reads any: a worker would fail on the first one
    midway (:func:`read_image`'s refusal, Detectron2's SizeMismatchError), or the evaluation
    after the whole training. Pixels that do not decode (a truncated JPEG) are found only
    when read."""
    # Every size the records give a file: two images entries may name one file.
    sizes: Dict[str, set] = {}
    for r in records:
        said = sizes.setdefault(r["file_name"], set())
        if "height" in r and "width" in r:
            said.add((r["height"], r["width"]))
    missing = sorted(f for f in sizes if not PathManager.isfile(f))
    if missing:
        raise ReferringDataError(
            f"{source}: {len(missing)} of its {len(sizes)} image files do not exist: {shortlist(missing, MAX_FILES_LISTED)}",
            file=missing[0],
        )
    unreadable, wrong = {}, {}  # file -> what is wrong
    for name, said in sizes.items():
        stored, problem = image_header_problem(name)
        if problem is not None:
            unreadable[name] = problem
        elif any(size != stored for size in said):
            listed = " and ".join(f"{h} x {w}" for h, w in sorted(size for size in said if size != stored))
            wrong[name] = f"{name} is {stored[0]} x {stored[1]}, records of it say {listed}"
    if unreadable:
        raise ReferringDataError(
            f"{source}: {len(unreadable)} of its {len(sizes)} image files cannot be read as images of 8 bits per "
            f"channel: {shortlist(list(unreadable.values()), MAX_FILES_LISTED)}",
            file=next(iter(unreadable)),
        )
    if wrong:
        raise ReferringDataError(
            f"{source}: {len(wrong)} of its {len(sizes)} image files are not the height x width of their records "
            f"(after EXIF rotation): {shortlist(list(wrong.values()), MAX_FILES_LISTED)}",
            file=next(iter(wrong)),
        )


class LongSideResize(T.ResizeShortestEdge):
    """Resize so that the long side is ``size`` and the aspect is kept, at least 1 pixel
    on each side: an image more elongated than 2 x ``size``:1 (a panorama strip) rounds
    its short side to 0, and a 0-pixel resize stops the data-loading worker."""

    def __init__(self, size: int):
        # Short side to `size` capped by max_size=`size`: the long side always lands on `size`.
        super().__init__(size, max_size=size, sample_style="choice")
        self.size = size  # Augmentation's __repr__ reads the constructor's arguments back

    def get_transform(self, image):
        # The parent's draw is kept (it takes a number from numpy's generator), so the
        # augmentations after it draw what they drew before.
        resize = super().get_transform(image)
        if min(resize.new_h, resize.new_w) >= 1:
            return resize
        return T.ResizeTransform(resize.h, resize.w, max(resize.new_h, 1), max(resize.new_w, 1), self.interp)


def build_referring_augmentations(cfg, is_train: bool) -> List[T.Augmentation]:
    """
    Resize per ``INPUT.RESIZE_MODE`` ("square": IMAGE_SIZE x IMAGE_SIZE; "keep_ratio":
    long side = IMAGE_SIZE) and, while training, the optional ``INPUT.RANDOM_FLIP``.
    """
    size = cfg.INPUT.IMAGE_SIZE
    mode = cfg.INPUT.RESIZE_MODE
    if mode == "square":
        augs = [T.Resize((size, size))]
    elif mode == "keep_ratio":
        augs = [LongSideResize(size)]
    else:
        raise ValueError(f"INPUT.RESIZE_MODE={mode!r}: expected one of {RESIZE_MODES}")
    flip = cfg.INPUT.RANDOM_FLIP
    if flip not in FLIP_MODES:
        raise ValueError(f"INPUT.RANDOM_FLIP={flip!r}: expected one of {FLIP_MODES}")
    if is_train and flip == "horizontal":
        augs.append(T.RandomFlip(horizontal=True, vertical=False))
    return augs


class ReferringDatasetMapper:
    """
    Map one referring record (see the data contract) to::

        image (uint8 3xH'xW', cfg.INPUT.FORMAT), input_ids / attention_mask (int64, MAX_TEXT_LEN),
        gt_mask (uint8 H'xW', union of the targets, zeros for no-target), empty, sentence,
        height, width, image_id, ref_id, file_name, sent_id  [+ annotations in test mode]

    In test mode a record's optional ``type`` is passed on and its ``landmark`` becomes
    ``landmark_mask`` (uint8 height x width, original resolution) and ``landmark_tokens``
    (bool MAX_TEXT_LEN, the tokens of the landmark phrase), see :mod:`vipa_d2.data.landmark`.

    With ``landmark_supervision`` (``MODEL.VIPA.LOSS.LANDMARK_WEIGHT`` > 0) training
    inputs also carry ``landmark_mask`` (uint8 H'xW', augmented with the image) and
    ``landmark_tokens``, empty for records without a landmark.

    With ``box_losses`` (the losses that train on boxes,
    :func:`vipa_d2.modeling.losses.object_box_losses`) training inputs also carry
    ``object_boxes`` (float32 (K, 4) XYXY, the record's ``object_boxes`` after the image's
    augmentation, clipped to it; none left outside it): every object of the image, for the
    centre maps and offsets. With ``group_losses`` (those that train on the named group,
    :func:`vipa_d2.modeling.losses.object_group_losses`) they also carry
    ``object_in_group`` (bool (K,), the record's ``object_in_group`` for the same boxes):
    which objects the expression's category / colour words name. With ``area_losses``
    (those that train on areas, :func:`vipa_d2.modeling.losses.object_area_losses`) they
    carry ``object_areas`` (float32 (K,), the record's ``object_areas`` for the same boxes,
    in augmented pixels).

    A horizontal flip (training only, ``INPUT.RANDOM_FLIP "horizontal"``) also swaps the
    words left/right in the expression so it still describes the flipped image.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List,
        image_format: str,
        tokenizer,
        max_text_len: int,
        landmark_supervision: bool = False,
        box_losses: Tuple[str, ...] = (),
        group_losses: Tuple[str, ...] = (),
        area_losses: Tuple[str, ...] = (),
    ):
        self.is_train = is_train
        self.landmark_supervision = is_train and landmark_supervision  # test mode passes the landmark on as data
        self.box_losses = tuple(box_losses) if is_train else ()
        self.group_losses = tuple(group_losses) if is_train else ()
        self.area_losses = tuple(area_losses) if is_train else ()
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        mode = "training" if is_train else "inference"
        logger.info("[ReferringDatasetMapper] augmentations in %s: %s", mode, augmentations)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "augmentations": build_referring_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "tokenizer": build_tokenizer(cfg),
            "max_text_len": cfg.INPUT.MAX_TEXT_LEN,
            "landmark_supervision": cfg.MODEL.VIPA.LOSS.LANDMARK_WEIGHT > 0,
            "box_losses": object_box_losses(cfg),
            "group_losses": object_group_losses(cfg),
            "area_losses": object_area_losses(cfg),
        }

    def _loss_keys(self) -> Dict[str, Tuple[str, ...]]:
        """The record keys this mapper's training losses read, each with those losses."""
        keys = {"object_boxes": self.box_losses, "object_in_group": self.group_losses, "object_areas": self.area_losses}
        return {key: losses for key, losses in keys.items() if losses}

    def check_records(self, records: List[Dict], source: str) -> None:
        """
        Refuse, before any batch is read, what :meth:`__call__` would fail on midway (in a
        data-loader worker, maybe hours in, or in the evaluation after the training):
        records that lack or misshape a field it reads (a loader of your own,
        :func:`vipa_d2.data.validation.record_problem`), image files that do not exist, and
        records without a key that a training loss reads or with its values misshapen
        (:meth:`_object_values_problem`). ``source`` (the datasets) heads the message. Logs,
        once per message, how many expressions ``INPUT.MAX_TEXT_LEN`` cuts and how many are
        mostly unknown tokens (:func:`vipa_d2.data.expressions.text_fit_notes`).
        """
        check_record_fields(records, source, landmark=not self.is_train or self.landmark_supervision)
        check_image_files(records, source)
        for key, losses in self._loss_keys().items():
            lacking = [r for r in records if key not in r]
            if lacking:
                what, origin = LOSS_RECORD_KEYS[key]
                raise ReferringDataError(
                    f"{source}: {len(lacking)} of {len(records)} records have no {key!r} ({what}), which "
                    f"{' and '.join(losses)} trains on, the first {record_name(lacking[0])}; {origin}",
                    item=record_name(lacking[0]),
                    field=key,
                )
        for i, record in enumerate(records):
            problem = self._object_values_problem(record)
            if problem is not None:
                item = f"record #{i} ({record_name(record)})"
                raise ReferringDataError(f"{source}: {item}: {problem[1]}", item=item, field=problem[0])
        notes = text_fit_notes(self.tokenizer, [r["sentence"]["raw"] for r in records], self.max_text_len)
        for note in filter(None, notes.values()):
            # Once per message: the trainer checks each test set again at every evaluation.
            log_first_n(logging.WARNING, f"{source}: {note}", n=1, name=logger.name, key="message")

    def _object_values_problem(self, record: Dict):
        """
        (key, problem) when a value that the training losses read per object box is
        misshapen, else None: ``object_boxes`` [x, y, w, h] boxes of finite numbers (a NaN box
        would fall out of the boxes kept, its object with it, unsaid), and one
        ``object_in_group`` flag and one finite ``object_areas`` area >= 0 per box. Missing
        keys are :meth:`_require`'s (and :meth:`check_records`') to name.
        """
        if not self.box_losses or "object_boxes" not in record:
            return None
        boxes = record["object_boxes"]
        try:
            xywh = np.asarray(boxes, dtype=np.float64)
        except (TypeError, ValueError):  # ragged, or not numbers
            xywh = None
        if xywh is None or (xywh.size and (xywh.ndim != 2 or xywh.shape[1] != 4)):
            return "object_boxes", f"'object_boxes' {quote(boxes)}: expected a list of [x, y, w, h] boxes (pixels)"
        if not np.isfinite(xywh).all():
            return "object_boxes", f"'object_boxes' {quote(boxes)} must be finite [x, y, w, h] (pixels)"
        count = len(xywh)
        per_box = {key: record[key] for key in self._loss_keys() if key != "object_boxes" and key in record}
        for key, values in per_box.items():
            if not hasattr(values, "__len__") or len(values) != count:
                got = f"{len(values)} entries" if hasattr(values, "__len__") else quote(values)
                return key, f"{key!r} has {got} for {count} 'object_boxes'; expected one per box"
        if "object_areas" in per_box:
            try:
                areas = np.asarray(per_box["object_areas"], dtype=np.float64)
                usable = bool(np.isfinite(areas).all() and (areas >= 0).all())
            except (TypeError, ValueError):  # not numbers
                usable = False
            if not usable:
                return "object_areas", f"'object_areas' {quote(per_box['object_areas'])} must be finite and >= 0 (pixels)"
        return None

    @staticmethod
    def _require(record: Dict, key: str, needed_by: str):
        if key not in record:
            what, origin = LOSS_RECORD_KEYS[key]
            raise KeyError(f"Record {record_name(record)} has no {key!r} ({what}), which {needed_by} trains on; {origin}")
        return record[key]

    def _object_boxes(self, record: Dict, transforms, out_hw) -> Dict[str, torch.Tensor]:
        for key, losses in self._loss_keys().items():  # object_boxes first
            self._require(record, key, " and ".join(losses))
        boxes = record["object_boxes"]
        problem = self._object_values_problem(record)
        if problem is not None:
            raise ValueError(f"Record {record_name(record)}: {problem[1]}")
        xywh = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        xyxy = BoxMode.convert(xywh, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
        xyxy = transforms.apply_box(xyxy).clip(min=0)
        xyxy[:, 0::2] = xyxy[:, 0::2].clip(max=out_hw[1])
        xyxy[:, 1::2] = xyxy[:, 1::2].clip(max=out_hw[0])
        # An object outside the augmented image (e.g. cropped away) has no centre to mark.
        inside = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        out = {"object_boxes": torch.as_tensor(xyxy[inside], dtype=torch.float32)}
        if self.group_losses:
            out["object_in_group"] = torch.as_tensor(np.asarray(record["object_in_group"], dtype=bool)[inside])
        if self.area_losses:
            out["object_areas"] = self._object_areas(record["object_areas"], xywh, xyxy)[inside]
        return out

    @staticmethod
    def _object_areas(areas, xywh: np.ndarray, xyxy: np.ndarray) -> torch.Tensor:
        """A record's checked ``object_areas`` in augmented pixels: each scaled as its box was
        (resizing scales both alike, a crop keeps the share of the box left)."""
        before = xywh[:, 2] * xywh[:, 3]
        after = (xyxy[:, 2] - xyxy[:, 0]).clip(min=0) * (xyxy[:, 3] - xyxy[:, 1]).clip(min=0)
        scale = np.divide(after, before, out=np.zeros_like(after), where=before > 0)
        return torch.as_tensor(np.asarray(areas, dtype=np.float64) * scale, dtype=torch.float32)

    def __call__(self, dataset_dict: Dict) -> Dict:
        record = dataset_dict  # never modified: annotations are deep-copied below
        image = read_record_image(record, self.image_format)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        out_hw = image.shape[:2]

        sentence = record["sentence"]["raw"]
        if is_flipped(transforms):
            sentence = swap_left_right(sentence)
        tokens = tokenize_expression(self.tokenizer, sentence, self.max_text_len)

        gt_mask = augmented_mask(record["annotations"], transforms, out_hw)

        out = {
            "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "input_ids": tokens["input_ids"][0],
            "attention_mask": tokens["attention_mask"][0],
            "gt_mask": torch.as_tensor(gt_mask),
            "empty": has_no_target(record),
            "sentence": sentence,
            "sent_id": record["sentence"].get("sent_id"),
        }
        for key in ("height", "width", "image_id", "ref_id", "file_name"):
            out[key] = record[key]
        if self.landmark_supervision:
            out.update(landmark_training_inputs(record, transforms, out_hw, sentence, self.tokenizer, self.max_text_len))
        if self.box_losses:
            out.update(self._object_boxes(record, transforms, out_hw))
        if not self.is_train:
            out["annotations"] = copy.deepcopy(record["annotations"])
            # Only the evaluator's breakdowns read these, and test mode never flips, so the
            # landmark phrase is found in the sentence as written.
            out.update(breakdown_inputs(record, sentence, self.tokenizer, self.max_text_len))
        return out
