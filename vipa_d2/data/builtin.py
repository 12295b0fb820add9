"""
Built-in referring datasets, registered lazily on ``import vipa_d2``.

Registering reads no file. Paths are resolved when a dataset is loaded, under
``$DETECTRON2_DATASETS`` (default ``datasets/``), so exporting the variable after the
import still works. The expected folder tree is documented in ``datasets/README.md``.

Built-in datasets are read with one fixed policy, :data:`BUILTIN_INVALID_POLICY`: a ref the
official readers cannot read, or with values that are not finite, raises
``ReferringDataError``. The official files hold none, so such a ref means a damaged or
different file, which skipping would hide. To read such a file anyway, register it as your
own dataset: ``register_referring_dataset(..., invalid="skip")``.
"""

import os
from typing import Dict, NamedTuple, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .record_cache import CachedReferSplit
from .refer import REFERRING_EVALUATOR_TYPE

__all__ = [
    "BUILTIN_REFERRING",
    "BUILTIN_INVALID_POLICY",
    "DatasetsRoot",
    "register_all_referring",
    "builtin_root",
    "check_invalid_refs_setting",
]

# Environment variable (and default) of Detectron2's dataset root.
DATASETS_ENV = "DETECTRON2_DATASETS"
DEFAULT_DATASETS_ROOT = "datasets"
# How built-in loaders handle a ref they cannot read: fixed, not configurable (see above).
BUILTIN_INVALID_POLICY = "error"

# Image folders, relative to the dataset root.
COCO_TRAIN2014 = os.path.join("coco", "train2014")
SAIAPR = "saiapr_tc-12"
REFSYNTH_IMAGES = os.path.join("refsynth", "images")


class _Spec(NamedTuple):
    dataset: str
    split_by: str
    splits: Tuple[str, ...]
    image_dir: str
    generalized: bool


_SPECS = (
    _Spec("refcoco", "unc", ("train", "val", "testA", "testB"), COCO_TRAIN2014, False),
    _Spec("refcoco", "google", ("train", "val"), COCO_TRAIN2014, False),
    _Spec("refcoco+", "unc", ("train", "val", "testA", "testB"), COCO_TRAIN2014, False),
    _Spec("refcocog", "umd", ("train", "val", "test"), COCO_TRAIN2014, False),
    _Spec("refcocog", "google", ("train", "val"), COCO_TRAIN2014, False),
    _Spec("refclef", "unc", ("train", "val", "test"), SAIAPR, False),
    # Peers' ReferIt numbers use the berkeley split (train / val / test).
    _Spec("refclef", "berkeley", ("train", "val", "test"), SAIAPR, False),
    _Spec("grefcoco", "unc", ("train", "val", "testA", "testB"), COCO_TRAIN2014, True),
    _Spec("refsynth", "unc", ("train", "val", "testA", "testB"), REFSYNTH_IMAGES, False),
    _Spec("grefsynth", "unc", ("train", "val", "testA", "testB"), REFSYNTH_IMAGES, True),
)

# name -> (dataset, split_by, split, image_dir relative to the root, generalized)
BUILTIN_REFERRING: Dict[str, Tuple[str, str, str, str, bool]] = {
    f"{s.dataset}_{s.split_by}_{split}": (s.dataset, s.split_by, split, s.image_dir, s.generalized)
    for s in _SPECS
    for split in s.splits
}


def builtin_root() -> str:
    """The dataset root now: ``$DETECTRON2_DATASETS`` or ``datasets``."""
    return os.path.expanduser(os.environ.get(DATASETS_ENV, DEFAULT_DATASETS_ROOT))


class DatasetsRoot(os.PathLike):
    """
    Path-like stand-in for the dataset root in metadata, resolved on every use
    (``os.fspath``, ``str``, ``os.path.join``) so it follows later exports.
    """

    def __fspath__(self) -> str:
        return builtin_root()

    def __str__(self) -> str:
        return builtin_root()

    def __repr__(self) -> str:
        return f"DatasetsRoot(${DATASETS_ENV} -> {builtin_root()!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, DatasetsRoot)

    def __hash__(self) -> int:
        return hash(DatasetsRoot)


def check_invalid_refs_setting(value: str) -> None:
    """
    ``DATASETS.INVALID_REFS`` is kept so older configs still merge, but built-in datasets
    have one fixed policy: any other value is refused rather than silently ignored.
    """
    if value != BUILTIN_INVALID_POLICY:
        raise ValueError(
            f"DATASETS.INVALID_REFS={value!r}: built-in datasets are always read with "
            f"{BUILTIN_INVALID_POLICY!r} (datasets/README.md, 'Bad input'); to skip bad refs "
            "of a file, register it with register_referring_dataset(..., invalid='skip')"
        )


def _builtin_arguments(dataset, split_by, split, image_dir, generalized) -> Dict:
    """load_refer_dicts's arguments for a built-in split, under the root of the moment."""
    root = builtin_root()
    return dict(refer_root=root, dataset=dataset, split_by=split_by, split=split,
                image_root=os.path.join(root, image_dir), generalized=generalized, invalid=BUILTIN_INVALID_POLICY)


def register_all_referring() -> None:
    """Register every built-in name that is not in the catalog yet (safe to call again)."""
    registered = set(DatasetCatalog.list())
    for name, (dataset, split_by, split, image_dir, generalized) in BUILTIN_REFERRING.items():
        if name in registered:
            continue
        DatasetCatalog.register(
            name,
            CachedReferSplit(
                lambda d=dataset, b=split_by, s=split, i=image_dir, g=generalized: _builtin_arguments(d, b, s, i, g)
            ),
        )
        MetadataCatalog.get(name).set(
            evaluator_type=REFERRING_EVALUATOR_TYPE,
            generalized=generalized,
            dataset_root=DatasetsRoot(),
            dataset=dataset,
            split_by=split_by,
            split=split,
            image_dir=image_dir,
        )
