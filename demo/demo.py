#!/usr/bin/env python
r"""
Segment what referring expressions describe in images and write overlay PNGs.

    python demo/demo.py --config-file configs/synthetic/vipa_tiny_cpu.yaml \
        --input img.png --text "the red circle" --output out.png \
        [--text "another expression" ...] [--show-relevance] [--save-masks] [--save-json] \
        [--opts KEY VALUE ...]
    python demo/demo.py --config-file ... --manifest images.csv --output out/ ...

``--input`` takes image files, folders (their images, not recursive) or quoted glob
patterns, each segmented for every ``--text``; ``--manifest`` (JSON or CSV, see
vipa_d2/data/manifest.py) gives each image its own expressions instead. ``--output`` is a
file (single image and single expression only) or a folder: ``<stem>.png`` per image for
one expression, ``<stem>_<k>.png`` (k = 0, 1, ... in expression order) for several.
``--show-relevance`` adds ``<name>_relevance.png``: the relevance heatmap and the visual
tokens each word retrieved; ``--save-masks`` adds ``<name>_mask.png`` (the binary mask,
0/255); ``--save-json`` writes ``<stem>.json`` per image: per expression its text, the mask
as COCO RLE, the confidence, the no-target score and the retrieved words. Config overrides
go after ``--opts`` or, Detectron2 style, at the end of the command line (after an option
other than ``--input``, whose list would swallow them).

Bad input (missing config or image, unknown config key, empty expression, missing or
mismatched weights) ends the run with one message on stderr and exit status 1; inputs that
are no image, or have 16-bit or float pixels, are found from their headers before the model
is built. An image whose header reads but whose pixels do not (a truncated file) is skipped:
the others are segmented, and the run ends with one such message naming it. A folder's
subfolders and files of other extensions are left out, with a warning listing them.
"""
import argparse
import contextlib
import glob
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from vipa_d2 import ConfigError, get_vipa_cfg
from vipa_d2.config import add_config_function_option, flatten_config, import_config_functions
from vipa_d2.data.manifest import ManifestEntry, read_manifest
from vipa_d2.data.masks import mask_to_rle
from vipa_d2.data.dataset_mapper import image_header_problem
from vipa_d2.data.validation import ReferringDataError, shortlist
from vipa_d2.predictor import VIPAPredictor, WeightsError, read_image, validate_expressions
from vipa_d2.utils.atomic_io import atomic_open
from vipa_d2.utils.checkpoint_file import UntrustedCheckpointError
from vipa_d2.utils.visualizer import (
    draw_overlay,
    draw_prediction_and_target,
    draw_relevance_figure,
    save_image,
)

# An --output ending in one of these is one picture file (formats save_image writes).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# What a folder given as --input contributes: the images read_image reads (GIFs too, which
# are not written).
INPUT_EXTENSIONS = IMAGE_EXTENSIONS + (".gif",)
GLOB_CHARS = "*?["
# Files a message lists before "... (+N more)".
MAX_LISTED = 8
REFUSAL_EXIT_CODE = 1
# A binary mask PNG: 0 outside, this inside.
MASK_PNG_VALUE = 255

# Under vipa_d2's logger, so that _console_logging shows it with the predictor's messages.
logger = logging.getLogger("vipa_d2.demo")

# Every image to segment, with its expressions (and targets, from a manifest).
Jobs = List[ManifestEntry]


class DemoError(Exception):
    """Bad input: reported as one line on stderr, without a traceback."""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to a config file")
    add_config_function_option(parser)
    parser.add_argument(
        "--input", nargs="+", metavar="IMG|DIR|GLOB",
        help="image files, folders of images or quoted glob patterns (with --text)",
    )
    parser.add_argument(
        "--text", action="append", metavar="EXPRESSION",
        help="a referring expression for every input image; repeat for several",
    )
    parser.add_argument(
        "--manifest", metavar="FILE.json|FILE.csv",
        help="images with their own expressions, instead of --input and --text",
    )
    parser.add_argument(
        "--output", required=True, metavar="FILE|DIR",
        help="output image file (one image, one expression) or folder",
    )
    parser.add_argument(
        "--show-relevance", action="store_true",
        help="also write the relevance heatmap and the visual tokens each word retrieved",
    )
    parser.add_argument("--save-masks", action="store_true", help="also write each binary mask as a PNG")
    parser.add_argument(
        "--save-json", action="store_true",
        help="also write a JSON per image: text, COCO RLE mask, confidence, no-target score, retrieved words",
    )
    add_override_arguments(parser)
    return parser


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """Config overrides after ``--opts`` (``args.opts``) or, Detectron2 style, at the end of
    the command line (``args.trailing_opts``); the two lists add up, in that order."""
    parser.add_argument(
        "--opts", nargs="*", default=[], metavar="KEY VALUE",
        help="config overrides as KEY VALUE pairs, e.g. --opts MODEL.DEVICE cpu",
    )
    parser.add_argument(
        "trailing_opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
        help="config overrides, Detectron2 style, at the end of the command line",
    )


def setup_cfg(config_file: str, opts: Sequence[str], config_function_specs: Sequence[str] = ()):
    """The frozen config: defaults + vipa keys + the keys of ``config_function_specs``
    (``--config-function``) + ``config_file`` + ``opts``."""
    if not os.path.isfile(config_file):
        raise DemoError(f"config file not found: {config_file}")
    options = [key for key in list(opts)[::2] if key.startswith("--")]
    if options:  # argparse hands every word after the first override to the overrides
        raise DemoError(f"{options[0]}: options go before the KEY VALUE config overrides (here it was read as a key)")
    try:
        cfg = get_vipa_cfg(config_file, opts, import_config_functions(config_function_specs))
    except ConfigError as e:
        raise DemoError(str(e)) from e
    cfg.freeze()
    return cfg


def collect_inputs(patterns: Sequence[str]) -> List[str]:
    """Image paths named by files, folders and glob patterns, in order, without repeats."""
    paths: List[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            names = sorted(os.listdir(pattern))
            images = [f for f in names if f.lower().endswith(INPUT_EXTENSIONS) and os.path.isfile(os.path.join(pattern, f))]
            if not images:
                raise DemoError(f"no images ({', '.join(INPUT_EXTENSIONS)}) in folder {pattern}")
            found = [os.path.join(pattern, f) for f in images]
            # A folder is read by extension, without its subfolders: what that leaves out is said.
            chosen = set(images)
            others = [f + os.sep * os.path.isdir(os.path.join(pattern, f)) for f in names if f not in chosen]
            if others:
                logger.warning("%d entries of %s left out (subfolders, files not named %s): %s", len(others), pattern,
                               "/".join(INPUT_EXTENSIONS), shortlist(others, MAX_LISTED))
        elif os.path.exists(pattern):
            found = [pattern]
        elif any(c in pattern for c in GLOB_CHARS):
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not found:
                raise DemoError(f"no files match {pattern}")
        elif pattern in flatten_config(get_vipa_cfg()):  # e.g. MODEL.WEIGHTS
            raise DemoError(f"input image not found: {pattern}, a config key: --input's list took the overrides "
                            "after it; put them after --opts, or after another option")
        else:
            raise DemoError(f"input image not found: {pattern}")
        paths.extend(p for p in found if p not in paths)
    return paths


def _is_file_output(output: str) -> bool:
    return output.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(output)


def _check_writable(output: str, folder: str) -> None:
    """DemoError unless ``folder`` can be made and written to: found before the model is
    built, and without making anything (a later refusal leaves no empty folder behind)."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DemoError(f"--output {output}: cannot write under {existing}, which is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DemoError(f"--output {output}: the folder {existing} is not writable")


def plan_outputs(jobs: Jobs, output: str) -> Dict[Tuple[str, int], str]:
    """Overlay path for each (image, expression index)."""
    _check_writable(output, os.path.dirname(os.path.abspath(output)) if _is_file_output(output) else output)
    if _is_file_output(output):
        if len(jobs) != 1 or len(jobs[0].expressions) != 1:
            raise DemoError(
                f"--output {output} is a file, which takes a single image and a single --text; "
                f"got {len(jobs)} image(s) and {sum(len(j.expressions) for j in jobs)} image-expression pair(s): "
                "give a folder instead"
            )
        return {(jobs[0].image, 0): output}
    if os.path.exists(output) and not os.path.isdir(output):
        raise DemoError(f"--output {output} exists and is not a folder")
    by_stem: Dict[str, str] = {}
    plan = {}
    for job in jobs:
        stem = os.path.splitext(os.path.basename(job.image))[0]
        if stem in by_stem:
            raise DemoError(f"inputs {by_stem[stem]} and {job.image} would write the same output name {stem!r}")
        by_stem[stem] = job.image
        count = len(job.expressions)
        for k in range(count):
            name = f"{stem}.png" if count == 1 else f"{stem}_{k}.png"
            plan[(job.image, k)] = os.path.join(output, name)
    return plan


def _suffixed(overlay_path: str, suffix: str, ext: str = "") -> str:
    root, overlay_ext = os.path.splitext(overlay_path)
    return f"{root}{suffix}{ext or overlay_ext}"


def relevance_path(overlay_path: str) -> str:
    return _suffixed(overlay_path, "_relevance")


def mask_path(overlay_path: str) -> str:
    return _suffixed(overlay_path, "_mask", ".png")


def json_path(image_path: str, output: str) -> str:
    """``<stem>.json`` in the output folder, or beside an output file."""
    if _is_file_output(output):
        return _suffixed(output, "", ".json")
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return os.path.join(output, f"{stem}.json")


def check_outputs(jobs: Jobs, plan: Dict[Tuple[str, int], str], args) -> List[str]:
    """Every file the run writes; DemoError when one is an input image, or is also written
    for another image or expression: either would be lost without a word (an overlay named
    ``a_mask.png`` is also input ``a.jpg``'s mask; ``--output`` the input folder overwrites
    a PNG input with its overlay)."""
    inputs = {os.path.realpath(job.image): job.image for job in jobs}
    writers: Dict[str, str] = {}
    written: List[str] = []

    def claim(path: str, what: str) -> None:
        real = os.path.realpath(path)
        if real in inputs:
            raise DemoError(f"--output {args.output}: {path} ({what}) would overwrite the input image {inputs[real]}")
        if real in writers:
            raise DemoError(f"{path} would be written twice, as {writers[real]} and as {what}: rename an input")
        if os.path.isdir(path):
            raise DemoError(f"--output {args.output}: {path} ({what}) is a folder; move it or give another --output")
        writers[real] = what
        written.append(path)

    for (image, k), overlay in plan.items():
        claim(overlay, f"the overlay of {image}, expression {k}")
        if args.show_relevance:
            claim(relevance_path(overlay), f"the relevance picture of {image}, expression {k}")
        if args.save_masks:
            claim(mask_path(overlay), f"the mask of {image}, expression {k}")
    if args.save_json:
        for job in jobs:
            claim(json_path(job.image, args.output), f"the JSON of {job.image}")
    return written


def image_record(path: str, image: np.ndarray, texts: Sequence[str], results: Sequence[Dict]) -> Dict:
    """What ``--save-json`` writes for one image (masks as compressed COCO RLE)."""
    return {
        # A file name that is not UTF-8 (Python keeps its bytes as lone surrogates) as
        # backslash escapes: JSON has no way to write those bytes.
        "image": os.fsencode(path).decode("utf-8", "backslashreplace"),
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "expressions": [
            {
                "text": text,
                "mask": mask_to_rle(result["mask"]),
                "area": int(result["mask"].sum()),
                "confidence": result["confidence"],
                "no_target_score": result["no_target_score"],
                "retrieved_words": [cue["word"] for cue in result["retrieved"]],
            }
            for text, result in zip(texts, results)
        ],
    }


def collect_jobs(args) -> Jobs:
    """The images and their expressions, from --manifest or from --input and --text."""
    if args.manifest:
        if args.input or args.text:
            raise DemoError("--manifest gives the images and their expressions: drop --input and --text")
        try:
            return read_manifest(args.manifest)
        except ReferringDataError as e:
            raise DemoError(f"invalid manifest {e}") from e
    if not args.input or not args.text:
        raise DemoError("give --input and --text, or --manifest")
    texts = list(args.text)
    try:
        validate_expressions(texts)
    except ValueError as e:
        raise DemoError(str(e)) from e
    return [ManifestEntry(path, texts) for path in collect_inputs(args.input)]


def summary(jobs: Jobs) -> str:
    """"N image(s) x M expression(s)", or the total when images have different counts."""
    counts = {len(job.expressions) for job in jobs}
    if len(counts) == 1:
        return f"{len(jobs)} image(s) x {counts.pop()} expression(s)"
    return f"{len(jobs)} image(s), {sum(len(job.expressions) for job in jobs)} expression(s) in all"


def run(args) -> Tuple[str, str]:
    """Run the demo for parsed ``args``; returns (what was segmented, output)."""
    jobs = collect_jobs(args)
    cfg = setup_cfg(args.config_file, list(args.opts) + list(args.trailing_opts), args.config_function)
    plan = plan_outputs(jobs, args.output)
    written = check_outputs(jobs, plan, args)
    # Every input's header before the model: a bad file (a glob's notes.txt, a broken
    # download, 16-bit pixels) would otherwise stop the run after the images before it.
    sizes, unusable = {}, []
    for job in jobs:
        sizes[job.image], problem = image_header_problem(job.image)
        if problem is not None:
            unusable.append(problem)
    if unusable:
        raise DemoError(f"{len(unusable)} of the {len(jobs)} inputs cannot be read as images of 8 bits per channel: "
                        f"{shortlist(unusable, MAX_LISTED)}")
    for job in jobs:  # a manifest's targets, against the sizes just read
        try:
            job.check_targets(*sizes[job.image])
        except ReferringDataError as e:
            raise DemoError(f"invalid manifest {e}") from e
    replaced = [path for path in written if os.path.isfile(path)]
    if replaced:  # a rerun's own files, usually: said, since anything else there is lost
        logger.warning("%d existing file(s) will be replaced: %s", len(replaced), shortlist(replaced, MAX_LISTED))

    try:
        predictor = VIPAPredictor(cfg)
    except (FileNotFoundError, WeightsError, UntrustedCheckpointError) as e:
        raise DemoError(str(e)) from e
    except ValueError as e:  # a config value the model rejects, e.g. an unknown mode name
        raise DemoError(f"invalid config: {e}") from e

    fmt, unread = cfg.INPUT.FORMAT, []
    for job in tqdm(jobs, desc="images", unit="img", disable=len(jobs) <= 1):
        path, texts = job.image, job.expressions
        try:
            image = read_image(path, fmt)
        # What a header does not show (a truncated file): the images after
        # it are still segmented, and the run ends in a refusal naming each such one.
        except OSError as e:
            if len(jobs) == 1:
                raise DemoError(str(e)) from e
            logger.error("%s", e)
            unread.append(str(e))
            continue
        targets = job.target_masks(*image.shape[:2])  # checked against the header's size above
        try:
            results = predictor(image, texts)
        except ValueError as e:  # the predictor refuses an image or expression it cannot take
            raise DemoError(f"cannot segment {path}: {e}{_unread_note(unread)}") from e
        try:
            _save_pictures(args, job, image, results, targets, plan, fmt)
        except OSError as e:  # a full disk, a folder removed meanwhile
            raise DemoError(f"cannot write the results of {path}: {e}{_unread_note(unread)}") from e
    if unread:
        raise DemoError(f"{len(unread)} of the {len(jobs)} inputs could not be read, the others were segmented: "
                        f"{shortlist(unread, MAX_LISTED)}")
    return summary(jobs), args.output


def _unread_note(unread: List[str]) -> str:
    """What a refusal midway adds about the inputs skipped before it (their errors were logged)."""
    return f" ({len(unread)} earlier input(s) could not be read: {shortlist(unread, MAX_LISTED)})" if unread else ""


def _save_pictures(args, job, image, results, targets, plan, fmt) -> None:
    """Overlays (or prediction beside target), relevance pictures, masks and JSON of one image."""
    path, texts = job.image, job.expressions
    for k, (text, result) in enumerate(zip(texts, results)):
        out_path = plan[(path, k)]
        if targets is None:
            picture = draw_overlay(image, result, text, image_format=fmt)
        else:  # evaluation pictures: prediction beside target
            picture = draw_prediction_and_target(image, result, targets[k], text, image_format=fmt)
        save_image(out_path, picture)
        if args.show_relevance:
            save_image(relevance_path(out_path), draw_relevance_figure(image, result, text, image_format=fmt))
        if args.save_masks:
            save_image(mask_path(out_path), result["mask"].astype(np.uint8) * MASK_PNG_VALUE)
    if args.save_json:
        record = image_record(path, image, texts, results)
        with atomic_open(json_path(path, args.output), "w") as f:
            json.dump(record, f, ensure_ascii=False, indent=1)


@contextlib.contextmanager
def _console_logging():
    """
    vipa_d2's INFO logs to the current stdout for one run, removed afterwards so that
    ``main`` can be called repeatedly in one process (tests, the main job). transformers'
    warnings (the unused BERT pooler weights) are silenced meanwhile: on stderr they
    would bury a refusal message; its errors still come through.
    """
    log = logging.getLogger("vipa_d2")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(levelname)s: %(message)s", "%H:%M:%S"))
    level, hf_level = log.level, hf_logging.get_verbosity()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        hf_logging.set_verbosity(hf_level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Demo entry point; returns the exit status (0, or 1 after a refusal)."""
    args = get_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        with _console_logging():
            done, output = run(args)
    except DemoError as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return REFUSAL_EXIT_CODE
    print(f"Done: {done} -> {output} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
