#!/usr/bin/env python
"""
Look at a referring dataset before training on it (what Detectron2's
``tools/visualize_data.py`` does for detection): one PNG per expression, the target over
the image (everything else dimmed) with the expression as caption.

    python tools/visualize_data.py --config-file configs/synthetic/vipa_tiny_cpu.yaml \\
        --source annotation --output-dir vis/ [--dataset NAME ...] [--num 20] [KEY VALUE ...]

``--source annotation``: the records of each ``--dataset`` (default: ``DATASETS.TRAIN``)
as registered, at their images' own size. The target is the union of the record's
annotations (a no-target expression dims the whole image); the caption adds the expression
type where the record has one; a relation's landmark object is drawn beside it.
Written to ``<output-dir>/<dataset>/<k>_<image_id>_<sent_id>.png`` (k: the record's position).

``--source dataloader``: what training reads, from the train loader of ``DATASETS.TRAIN``:
resized and flipped as the config says (a flipped sample's left/right words swapped), the
target as the mapper rasterized it. Written to
``<output-dir>/dataloader/<k>_<image_id>_<sent_id>.png``.

``DATASETS.REFER_SPLITS`` entries are registered first, as ``train_net.py`` does. A record
that cannot be drawn (a missing or unreadable image, a size that does not match) ends the
run with one message naming it.
"""
import argparse
import os
import re
import sys
from typing import Dict, Iterator, Tuple

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

from vipa_d2 import get_vipa_cfg
from vipa_d2.config import add_config_function_option, import_config_functions
from vipa_d2.data import referring_dataset_names, register_refer_splits
from vipa_d2.data.dataset_mapper import check_record_fields, read_record_image, record_name
from vipa_d2.data.masks import annotations_to_mask
from vipa_d2.data.validation import ReferringDataError
from vipa_d2.engine import ReferringTrainer
from vipa_d2.utils.visualizer import draw_overlay, save_image, side_by_side

SOURCES = ("annotation", "dataloader")
# Pictures per dataset (annotation) or in all (dataloader) unless --num says otherwise.
DEFAULT_NUM = 20
# What ends the run with one message: records and images that cannot be drawn
# (ReferringDataError and Detectron2's SizeMismatchError are ValueErrors).
DRAW_ERRORS = (OSError, ValueError, KeyError)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the training config")
    add_config_function_option(parser)
    parser.add_argument("--source", choices=SOURCES, required=True, help="registered records, or the train loader's samples")
    parser.add_argument("--output-dir", required=True, help="folder of the PNGs")
    parser.add_argument("--dataset", nargs="+", default=None,
                        help="registered datasets (annotation only; default: DATASETS.TRAIN); "
                        "KEY VALUE overrides go after another option, or this list takes them")
    parser.add_argument("--num", type=int, default=DEFAULT_NUM,
                        help=f"pictures per dataset (annotation; 0: all) or in all (dataloader); default {DEFAULT_NUM}")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.num < 0 or (args.num == 0 and args.source == "dataloader"):
        parser.error(f"--num {args.num}: expected a positive count (0, all records, only with --source annotation)")
    if args.dataset and args.source == "dataloader":
        parser.error("--dataset: the train loader reads DATASETS.TRAIN; set it in the config or as KEY VALUE")
    return parser, args


def file_stem(name: str) -> str:
    """A dataset name or id as a file-name part: anything but letters, digits, '.', '-' as '_'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", str(name))


def caption(record: Dict) -> str:
    text = record["sentence"]["raw"]
    if record.get("type"):
        text = f"{text} [{record['type']}]"
    if not record["annotations"]:
        text = f"{text} (no target)"
    return text


def draw_record(record: Dict) -> np.ndarray:
    """A registered record at its image's size: its target and, for a relation, its landmark."""
    image = read_record_image(record, "RGB")
    height, width = image.shape[:2]
    target = annotations_to_mask(record["annotations"], height, width).astype(bool)
    picture = draw_overlay(image, {"mask": target}, caption(record))
    landmark = record.get("landmark")
    if landmark is None:
        return picture
    landmark_mask = annotations_to_mask([landmark["annotation"]], height, width).astype(bool)
    return side_by_side([picture, draw_overlay(image, {"mask": landmark_mask}, f"landmark: {landmark['phrase']}")])


def annotation_pictures(datasets, num: int) -> Iterator[Tuple[str, np.ndarray]]:
    for name in datasets:
        records = DatasetCatalog.get(name)
        records = records[:num] if num else records
        # Misshapen fields named as training names them, not an AttributeError from drawing.
        check_record_fields(records, name)
        for k, record in enumerate(tqdm(records, desc=name, unit="expression")):
            try:
                # The position first: two records never share a name, ids or not.
                stem = f"{k:04d}_{file_stem(record['image_id'])}_{file_stem(record['sentence'].get('sent_id'))}"
                picture = draw_record(record)
            except DRAW_ERRORS as e:
                problem = f"missing key {e}" if isinstance(e, KeyError) else str(e)
                item = f"record #{k} ({record_name(record)})"
                raise ReferringDataError(f"{name}: {item}: {problem}", item=item) from e
            yield os.path.join(file_stem(name), f"{stem}.png"), picture


def dataloader_pictures(cfg, num: int) -> Iterator[Tuple[str, np.ndarray]]:
    # Mapped in this process: a bad record's error keeps its own one-line message (a
    # worker's comes wrapped in its traceback). The samples are the same with workers or
    # without, since each one's augmentation is seeded by its position in the run.
    cfg = cfg.clone()
    cfg.DATALOADER.NUM_WORKERS = 0
    loader = iter(ReferringTrainer.build_train_loader(cfg))
    with tqdm(total=num, desc="train loader", unit="sample") as progress:
        while progress.n < num:
            for sample in next(loader)[: num - progress.n]:
                image = sample["image"].permute(1, 2, 0).numpy()
                mask = sample["gt_mask"].numpy().astype(bool)
                stem = f"{progress.n:04d}_{file_stem(sample['image_id'])}_{file_stem(sample['sent_id'])}"
                yield os.path.join("dataloader", f"{stem}.png"), draw_overlay(image, {"mask": mask}, sample["sentence"], cfg.INPUT.FORMAT)
                progress.update()


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    setup_logger(name="detectron2")
    try:
        cfg = get_vipa_cfg(args.config_file, args.opts, import_config_functions(args.config_function))
        register_refer_splits(cfg.DATASETS.REFER_SPLITS)
    except ValueError as e:  # ConfigError, or a REFER_SPLITS entry that clashes
        parser.error(str(e))
    if args.source == "annotation":
        datasets = args.dataset or list(cfg.DATASETS.TRAIN)
        unknown = [name for name in datasets if name not in DatasetCatalog.list()]
        if unknown:
            parser.error(f"dataset {unknown[0]!r} is not registered; referring datasets: {', '.join(referring_dataset_names())}")
        pictures = annotation_pictures(datasets, args.num)
    else:
        pictures = dataloader_pictures(cfg, args.num)
    written = 0
    try:
        for relative, picture in pictures:
            save_image(os.path.join(args.output_dir, relative), picture)
            written += 1
    except DRAW_ERRORS as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    print(f"{written} pictures in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
