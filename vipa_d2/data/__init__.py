"""
Referring datasets for Detectron2: REFER / gRefCOCO loaders, lazy built-in
registrations (done on import), your own data, the mapper and the synthetic benchmark.
"""

from . import builtin as _builtin
from .builtin import BUILTIN_REFERRING, register_all_referring
from .custom import (
    ReferringFormatError,
    check_refer_splits,
    convert_simple_json,
    register_refer_splits,
    referring_dataset_names,
    register_referring_dataset,
    simple_json_to_refer,
    validate_simple_json,
)
from .dataset_mapper import ReferringDatasetMapper, build_referring_augmentations
from .masks import annotations_to_mask, mask_to_rle, segmentation_to_mask
from .refer import ReferringDataError, load_refer_dicts, save_refer_dataset

__all__ = [
    "BUILTIN_REFERRING",
    "register_all_referring",
    "ReferringFormatError",
    "convert_simple_json",
    "register_referring_dataset",
    "referring_dataset_names",
    "check_refer_splits",
    "register_refer_splits",
    "simple_json_to_refer",
    "validate_simple_json",
    "ReferringDatasetMapper",
    "build_referring_augmentations",
    "annotations_to_mask",
    "mask_to_rle",
    "segmentation_to_mask",
    "ReferringDataError",
    "load_refer_dicts",
    "save_refer_dataset",
]

_builtin.register_all_referring()
