#!/usr/bin/env python
r"""
Segment what referring expressions describe in images and write overlay PNGs.

    python demo/demo.py --config-file configs/synthetic/vipa_tiny_cpu.yaml \
        --input img.png --text "the red circle" --output out.png \
        [--text "another expression" ...] [--show-relevance] [--opts KEY VALUE ...]

``--input`` takes image files, folders (their images, not recursive) or quoted glob
patterns. ``--output`` is a file (single image and single expression only) or a folder:
``<stem>.png`` per image for one expression, ``<stem>_<k>.png`` (k = 0, 1, ... in
``--text`` order) for several. ``--show-relevance`` adds ``<name>_relevance.png``: the
relevance heatmap and the visual tokens each word retrieved. Config overrides go after
``--opts`` or, Detectron2 style, at the end of the command line (after an option other
than ``--input``, whose list would swallow them).

Bad input (missing config or image, unknown config key, empty expression, missing or
mismatched weights) ends the run with one message on stderr and exit status 1.
"""
import argparse
import contextlib
import glob
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.config import get_cfg
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from vipa_d2 import add_vipa_config
from vipa_d2.predictor import VIPAPredictor, WeightsError, read_image, validate_expressions
from vipa_d2.utils.visualizer import draw_overlay, draw_relevance_figure, save_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
GLOB_CHARS = "*?["
REFUSAL_EXIT_CODE = 1


class DemoError(Exception):
    """Bad input: reported as one line on stderr, without a traceback."""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to a config file")
    parser.add_argument(
        "--input", required=True, nargs="+", metavar="IMG|DIR|GLOB",
        help="image files, folders of images or quoted glob patterns",
    )
    parser.add_argument(
        "--text", required=True, action="append", metavar="EXPRESSION",
        help="a referring expression; repeat for several",
    )
    parser.add_argument(
        "--output", required=True, metavar="FILE|DIR",
        help="output image file (one image, one expression) or folder",
    )
    parser.add_argument(
        "--show-relevance", action="store_true",
        help="also write the relevance heatmap and the visual tokens each word retrieved",
    )
    parser.add_argument(
        "--opts", nargs="*", default=[], metavar="KEY VALUE",
        help="config overrides as KEY VALUE pairs, e.g. --opts MODEL.DEVICE cpu",
    )
    parser.add_argument(
        "trailing_opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
        help="config overrides, Detectron2 style, at the end of the command line",
    )
    return parser


def setup_cfg(config_file: str, opts: Sequence[str]):
    """The frozen config: defaults + vipa keys + ``config_file`` + ``opts``."""
    if not os.path.isfile(config_file):
        raise DemoError(f"config file not found: {config_file}")
    cfg = get_cfg()
    add_vipa_config(cfg)
    # yacs reports an unknown key as KeyError (file) or AssertionError (list), a bad
    # value as ValueError/TypeError; all name the key in their message.
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, AssertionError, ValueError, TypeError) as e:
        raise DemoError(f"invalid config file {config_file}: {_message(e)}") from e
    if len(opts) % 2:
        raise DemoError(f"config overrides must be KEY VALUE pairs, got an odd number: {list(opts)}")
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError, ValueError, TypeError) as e:
        raise DemoError(f"invalid config override: {_message(e)}") from e
    cfg.freeze()
    return cfg


def _message(e: BaseException) -> str:
    # KeyError's str() adds quotes around its message.
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def collect_inputs(patterns: Sequence[str]) -> List[str]:
    """Image paths named by files, folders and glob patterns, in order, without repeats."""
    paths: List[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, f) for f in os.listdir(pattern)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(pattern, f))
            )
            if not found:
                raise DemoError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {pattern}")
        elif os.path.exists(pattern):
            found = [pattern]
        elif any(c in pattern for c in GLOB_CHARS):
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not found:
                raise DemoError(f"no files match {pattern}")
        else:
            raise DemoError(f"input image not found: {pattern}")
        paths.extend(p for p in found if p not in paths)
    return paths


def plan_outputs(
    inputs: Sequence[str], num_texts: int, output: str
) -> Dict[Tuple[str, int], str]:
    """Overlay path for each (image, expression index)."""
    as_file = output.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(output)
    if as_file:
        if len(inputs) != 1 or num_texts != 1:
            raise DemoError(
                f"--output {output} is a file, which takes a single image and a single --text; "
                f"got {len(inputs)} image(s) and {num_texts} expression(s): give a folder instead"
            )
        return {(inputs[0], 0): output}
    if os.path.exists(output) and not os.path.isdir(output):
        raise DemoError(f"--output {output} exists and is not a folder")
    by_stem: Dict[str, str] = {}
    for path in inputs:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in by_stem:
            raise DemoError(f"inputs {by_stem[stem]} and {path} would write the same output name {stem!r}")
        by_stem[stem] = path
    plan = {}
    for stem, path in by_stem.items():
        for k in range(num_texts):
            name = f"{stem}.png" if num_texts == 1 else f"{stem}_{k}.png"
            plan[(path, k)] = os.path.join(output, name)
    return plan


def relevance_path(overlay_path: str) -> str:
    root, ext = os.path.splitext(overlay_path)
    return f"{root}_relevance{ext}"


def run(args) -> Tuple[int, int, str]:
    """Run the demo for parsed ``args``; returns (images, expressions, output)."""
    texts = list(args.text)
    try:
        validate_expressions(texts)
    except ValueError as e:
        raise DemoError(str(e)) from e
    cfg = setup_cfg(args.config_file, list(args.opts) + list(args.trailing_opts))
    inputs = collect_inputs(args.input)
    plan = plan_outputs(inputs, len(texts), args.output)

    try:
        predictor = VIPAPredictor(cfg)
    except (FileNotFoundError, WeightsError) as e:
        raise DemoError(str(e)) from e
    except ValueError as e:  # a config value the model rejects, e.g. an unknown mode name
        raise DemoError(f"invalid config: {e}") from e

    for path in tqdm(inputs, desc="images", unit="img", disable=len(inputs) <= 1):
        try:
            image = read_image(path, cfg.INPUT.FORMAT)
        except OSError as e:
            raise DemoError(str(e)) from e
        results = predictor(image, texts)
        for k, (text, result) in enumerate(zip(texts, results)):
            out_path = plan[(path, k)]
            save_image(out_path, draw_overlay(image, result, text, image_format=cfg.INPUT.FORMAT))
            if args.show_relevance:
                figure = draw_relevance_figure(image, result, text, image_format=cfg.INPUT.FORMAT)
                save_image(relevance_path(out_path), figure)
    return len(inputs), len(texts), args.output


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
            images, expressions, output = run(args)
    except DemoError as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return REFUSAL_EXIT_CODE
    print(
        f"Done: {images} image(s) x {expressions} expression(s) -> {output} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
