"""
What the tests share: the repository root, the one config factory and the config files.

Layout: a test file mirrors what it tests. ``vipa_d2/<sub>/<module>.py`` is tested in
``tests/<sub>/test_<module>.py`` (``tests/data/test_dataset_mapper.py``); a subpackage or a
module with small helpers of its own is tested in one file named for the main part
(``modeling/backbone/`` in ``tests/modeling/test_backbone.py``; the sampler and attention
of the VEG in ``tests/modeling/test_veg.py``; the pixel/transformer decoders and their
losses in ``tests/modeling/test_decoder.py``). Top-level modules and scripts
(``vipa_d2/config.py``, ``vipa_d2/predictor.py``, ``train_net.py``, ``demo/demo.py``) are
tested in ``tests/test_<name>.py``; ``tests/test_safe_loading.py`` covers every loader of
files from strangers. Test folders have no ``__init__.py``: pytest imports each file by its
basename, so basenames are unique across ``tests/``, and this module is imported as
``common`` (``tests/`` is on ``sys.path`` because ``tests/conftest.py`` lives there).

Fixtures (seeding, one thread, the synthetic benchmark) are in ``tests/conftest.py``.
Paths are built from this file's location, never from the working directory.
"""
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import sys

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.structures import BoxMode
from PIL import Image

from vipa_d2 import get_vipa_cfg
from vipa_d2.evaluation import ReferringEvaluator, results_file_name

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(REPO_ROOT, "configs")
# The CPU model of the synthetic benchmark.
TINY_CONFIG = os.path.join(CONFIGS_DIR, "synthetic", "vipa_tiny_cpu.yaml")
# TINY_CONFIG shrunk to a few-iteration training run (DensePose's quick_schedules idea).
INSTANT_TEST_CONFIG = os.path.join(CONFIGS_DIR, "quick_schedules", "vipa_tiny_instant_test.yaml")
# The object choice without the size ranks (group-gated areas instead of regressed ones),
# for tests that compare masks of a barely trained or random model: with the ranks (the tiny
# config's default) such a model spreads its choice over the candidates so thinly that every
# mask is empty, and equal masks would show nothing. Strings, so they also serve as
# command-line overrides.
NO_SIZE_RANKS_OPTS = ["MODEL.VIPA.DECODER.CHOICE_SIZE_RANKS", "False", "MODEL.VIPA.DECODER.CHOICE_AREAS", "group_gate"]
# TINY_CONFIG as a random 96 px model for the predictor and the demo. Without the object
# choice: untrained, it is uniform over its candidates and lowers every mask logit by
# log(candidates), so random masks are empty and mask comparisons would compare nothing.
PREDICTOR_OPTS = [
    "MODEL.DEVICE", "cpu", "INPUT.IMAGE_SIZE", "96", "MODEL.VIPA.HIDDEN_DIM", "64", "MODEL.TIMM.WEIGHTS", "",
    "MODEL.VIPA.DECODER.OBJECT_CHOICE", "False", "MODEL.VIPA.DECODER.CHOICE_FROM_WORDS", "False",
    "MODEL.VIPA.DECODER.CHOICE_FACTORISED", "False", "MODEL.VIPA.DECODER.CHOICE_FACTOR_QUERIES", "False",
    *NO_SIZE_RANKS_OPTS,
]


def make_cfg(*opts, config_file: str = "", **keys):
    """
    The tests' config: Detectron2's defaults and the VIPA keys, then ``config_file`` (none
    by default), ``opts`` (``KEY, VALUE, ...``) and ``keys`` (``**{"FULL.KEY": value}``),
    later ones winning. Every value goes through the config's type check.
    """
    pairs = [item for key_value in keys.items() for item in key_value]
    return get_vipa_cfg(config_file, [*opts, *pairs])


def load_script(relative_path: str):
    """Import a script of the repository (``"tools/main_job.py"``) as a module, by path."""
    path = os.path.join(REPO_ROOT, relative_path)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_train_net():
    """
    ``train_net.py`` imported by its module name, so ranks spawned by ``launch`` (which
    inherit ``sys.path``) can unpickle its functions.
    """
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    return importlib.import_module("train_net")


# ------------------------------------------------------------ trainer runs
# The dataset the instant-test schedule evaluates.
INSTANT_TEST_VAL = "refsynth_unc_val"


def train_net_args(output_dir, *flags, opts=()):
    """``train_net.py`` arguments of an instant-test run writing to ``output_dir``."""
    argv = ["--config-file", INSTANT_TEST_CONFIG, *flags, "--dist-url", "auto"]
    return default_argument_parser().parse_args(argv + ["OUTPUT_DIR", str(output_dir), *opts])


def results_file(output_dir, name=INSTANT_TEST_VAL, sub="inference"):
    """The per-sample results file the evaluator wrote for dataset ``name``."""
    with open(os.path.join(output_dir, sub, results_file_name(name))) as f:
        return json.load(f)


# ------------------------------------------------------- mapper inputs on disk
# A landscape image ("square" and "keep_ratio" resizing differ) and its polygon target.
IMAGE_H, IMAGE_W = 60, 90
POLY = [10.0, 5.0, 50.0, 5.0, 50.0, 45.0, 10.0, 45.0]
# Small mapper settings.
MAPPER_IMAGE_SIZE = 32
MAPPER_MAX_TEXT_LEN = 8
MAPPER_OPTS = ["INPUT.IMAGE_SIZE", MAPPER_IMAGE_SIZE, "INPUT.MAX_TEXT_LEN", MAPPER_MAX_TEXT_LEN]


def write_image(path, mode="RGB", size=(IMAGE_H, IMAGE_W)):
    """A noise image of ``size`` (h, w) whose left half is pure red, saved in PIL ``mode``."""
    h, w = size
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    arr[:, : w // 2, 0] = 255  # left half strongly red: channel order is checkable
    arr[:, : w // 2, 1:] = 0
    img = Image.fromarray(arr)  # uint8 HxWx3: RGB
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)


def mapper_record(file_name, sentence="the box on the left", annotations=None):
    """A dataset record of a ``write_image`` file whose target is ``POLY``."""
    if annotations is None:
        annotations = [
            {
                "segmentation": [POLY],
                "bbox": [10.0, 5.0, 40.0, 40.0],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": 1,
                "iscrowd": 0,
            }
        ]
    return {
        "file_name": str(file_name),
        "height": IMAGE_H,
        "width": IMAGE_W,
        "image_id": 3,
        "ref_id": 11,
        "annotations": annotations,
        "sentence": {"raw": sentence, "sent_id": 5},
        "empty": not annotations,
    }


@contextlib.contextmanager
def captured_log(name: str, level: int = logging.INFO):
    """``[(levelno, message), ...]`` that logger ``name`` handles in the block, at ``level``
    or above. Its own handler: Detectron2's setup_logger stops vipa_d2's records from
    reaching the root logger, and with it pytest's caplog."""
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append((record.levelno, record.getMessage()))
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(min(level, logger.getEffectiveLevel()))
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def compressed_rle(mask):
    """COCO's compressed RLE of a 0/1 mask, counts as text (as JSON files hold them)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def read_rgb(path) -> np.ndarray:
    """The picture at ``path`` as an HxWx3 uint8 RGB array."""
    return np.asarray(Image.open(path).convert("RGB"))


def uncompressed_rle(mask):
    """COCO's uncompressed RLE (list counts, column-major runs starting with zeros)."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


# --------------------------------------------------------- evaluator inputs
# Metadata-only datasets the evaluator tests score (plain and generalized).
PLAIN = "test_evaluator_refer_plain"
GENERALIZED = "test_evaluator_refer_generalized"


def register_evaluator_metadata():
    # Idempotent: spawned workers start with an empty MetadataCatalog and call this too.
    if "generalized" not in MetadataCatalog.get(PLAIN).as_dict():
        MetadataCatalog.get(PLAIN).set(evaluator_type="referring", generalized=False)
    if "generalized" not in MetadataCatalog.get(GENERALIZED).as_dict():
        MetadataCatalog.get(GENERALIZED).set(evaluator_type="referring", generalized=True)


def rect_polygon(x0, y0, x1, y1):
    """Polygon annotation whose rasterization is rows y0..y1-1, cols x0..x1-1."""
    return {
        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": 0,
        "iscrowd": 0,
    }


def box_mask(height, width, rows, cols, value=1.0):
    mask = torch.zeros(height, width)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = value
    return mask


def sample(idx, height, width, annotations):
    return {
        "image_id": 100 + idx,
        "ref_id": 200 + idx,
        "sent_id": 300 + idx,
        "height": height,
        "width": width,
        "annotations": annotations,
    }


def run_evaluator(name, inputs, outputs, **kwargs):
    evaluator = ReferringEvaluator(name, distributed=False, **kwargs)
    evaluator.reset()
    # Two process() calls, as inference_on_dataset feeds batches.
    evaluator.process(inputs[:1], outputs[:1])
    evaluator.process(inputs[1:], outputs[1:])
    return evaluator.evaluate()["refer"]


def generalized_samples():
    """No-target and target samples with predictions; see the test for the expected values."""
    full = torch.ones(4, 4)
    inputs = [
        sample(0, 4, 4, []),  # no-target, predicted empty       -> U=0, IoU 1, N ok
        sample(1, 4, 4, []),  # no-target, 1 px predicted        -> U=1, IoU 0, N wrong
        sample(2, 4, 4, [rect_polygon(0, 0, 2, 2)]),  # exact    -> I=U=4, IoU 1, T ok
        sample(3, 4, 4, [rect_polygon(2, 2, 4, 4)]),  # missed   -> U=4, IoU 0, T wrong
        sample(4, 4, 4, [rect_polygon(0, 0, 4, 4)]),  # vetoed by no_target_score -> U=16
        sample(5, 4, 4, []),  # no-target, mask vetoed by no_target_score -> IoU 1, N ok
    ]
    outputs = [
        {"ref_seg": torch.zeros(4, 4), "no_target_score": torch.tensor(0.9)},
        {"ref_seg": box_mask(4, 4, (3, 4), (3, 4)), "no_target_score": torch.tensor(0.1)},
        {"ref_seg": box_mask(4, 4, (0, 2), (0, 2)), "no_target_score": torch.tensor(0.1)},
        {"ref_seg": torch.zeros(4, 4), "no_target_score": torch.tensor(0.1)},
        {"ref_seg": full.clone(), "no_target_score": torch.tensor(0.9)},
        {"ref_seg": full.clone(), "no_target_score": torch.tensor(0.8)},
    ]
    return inputs, outputs


# ------------------------------------------------------------- unsafe files
class RunsCode:
    """Pickles as a call of os.makedirs(path): loading it with plain pickle creates path."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))
