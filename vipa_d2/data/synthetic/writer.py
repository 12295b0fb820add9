"""
Generate the synthetic referring benchmark and write it in REFER layout::

    <root>/refsynth/images/000000.jpg ...     shared by both variants
    <root>/refsynth/instances.json, refs(unc).p, stats.json
    <root>/grefsynth/instances.json, grefs(unc).json (multi-target and no-target refs too)

Splits: train / val / testA share the training colour-category combinations; testB
images each hold >= 1 object in a combination held out from every other split, and
only such objects (or groups containing one) are testB targets.
"""

import collections
import functools
import json
import logging
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from ..custom import simple_json_to_refer, validate_simple_json
from ..masks import mask_to_rle
from ...utils.atomic_io import atomic_open
from ..refer import save_refer_dataset
from ..validation import read_json_file
from .config import SPLITS, SynthConfig
from .grammar import (
    EXPRESSION_TYPES,
    Expression,
    multi_target_expressions,
    no_target_expressions,
    single_target_expressions,
)
from .scene import Scene, heldout_combos, sample_scene

logger = logging.getLogger(__name__)

__all__ = ["assign_splits", "finished_benchmark", "generate_image", "regenerate_image", "write_benchmark", "format_stats"]

REFSYNTH, GREFSYNTH = "refsynth", "grefsynth"
SPLIT_BY = "unc"
IMAGE_DIR = "images"
STATS_FILE = "stats.json"
# Written first into each variant's folder and removed when its stats file is written: a
# folder that holds it is the generator's own unfinished output, which a rerun may clear.
UNFINISHED_MARK = "generating"
_IMAGE_NAME = "{:06d}.jpg"
# Images handed to a worker at a time.
_CHUNK = 32


def assign_splits(num_images: int, seed: int, cfg: SynthConfig) -> List[str]:
    """Split of each image index: seeded, proportional to cfg.split_fractions, >= 1 each."""
    if num_images < len(SPLITS):
        raise ValueError(f"num_images={num_images}: need at least {len(SPLITS)} (one per split)")
    fracs = dict(cfg.split_fractions)
    counts = {s: max(1, int(round(fracs[s] * num_images))) for s in SPLITS[1:]}
    counts[SPLITS[0]] = num_images - sum(counts.values())
    if counts[SPLITS[0]] < 1:
        raise ValueError(f"num_images={num_images} leaves no training image")
    labels = [s for s in SPLITS for _ in range(counts[s])]
    order = np.random.default_rng([seed, num_images]).permutation(num_images)
    return [labels[i] for i in order]


def generate_image(
    cfg: SynthConfig, seed: int, index: int, split: str, heldout: Dict[str, str]
) -> Tuple[Scene, List[Expression]]:
    """Scene and expressions of image ``index`` (deterministic in seed, index, split)."""
    rng = np.random.default_rng([seed, index])
    use_heldout = split == "testB"
    scene = sample_scene(cfg, rng, heldout, use_heldout)
    novel = {k for k, o in enumerate(scene.objects) if heldout[o.category] == o.colour}
    targets = sorted(novel) if use_heldout else range(len(scene.objects))
    exprs = [e for t in targets for e in single_target_expressions(t, scene, cfg, rng)]
    multi = multi_target_expressions(scene, cfg, rng)
    exprs += [e for e in multi if not use_heldout or novel.intersection(e.targets)]
    exprs += no_target_expressions(scene, cfg, rng, heldout, use_heldout)
    return scene, exprs


def regenerate_image(stats: Dict, index: int) -> Tuple[Scene, List[Expression]]:
    """Rebuild image ``index`` of a written benchmark from its ``stats.json`` content."""
    gen = stats["generator"]
    cfg = SynthConfig(**{k: _as_tuple(v) for k, v in gen["config"].items()})
    split = assign_splits(gen["num_images"], gen["seed"], cfg)[index]
    return generate_image(cfg, gen["seed"], index, split, heldout_combos(gen["seed"]))


def _as_tuple(v):
    return tuple(_as_tuple(x) for x in v) if isinstance(v, list) else v


def _image_entry(index_split, cfg: SynthConfig, seed: int, heldout, image_dir: str) -> Dict:
    index, split = index_split
    scene, exprs = generate_image(cfg, seed, index, split, heldout)
    file_name = _IMAGE_NAME.format(index)
    path = os.path.join(image_dir, file_name)
    if not cv2.imwrite(path, scene.image, [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality]):
        raise OSError(f"Could not write image {path}")
    objs = scene.objects
    cats = collections.Counter(o.category for o in objs)
    return {
        "file_name": file_name,
        "height": scene.height,
        "width": scene.width,
        "split": split,
        "objects": [
            {
                "id": k,
                "category": o.category,
                "colour": o.colour,
                "segmentation": mask_to_rle(scene.instance_map == k + 1),
            }
            for k, o in enumerate(objs)
        ],
        "expressions": [_expression_entry(e) for e in exprs],
        "_stats": {
            "distractor": max(cats.values()) >= 2,
            "occluded": sum(o.visible_frac < 1.0 for o in objs),
            "heldout": sum(heldout[o.category] == o.colour for o in objs),
        },
    }


def _expression_entry(e: Expression) -> Dict:
    """One simple-JSON expression; object ids are scene indices (the ``objects[].id``)."""
    entry = {"text": e.text, "targets": list(e.targets), "type": e.type, "group": list(e.group)}
    if e.landmark is not None:
        # For the per-type scoreboard and the retrieval report: which object, and which
        # words of the text, name a relation's landmark.
        entry.update(landmark=e.landmark, landmark_phrase=e.landmark_phrase)
    return entry


def _worker_init():
    # One process per core already: OpenCV's own thread pool would only oversubscribe.
    cv2.setNumThreads(1)


def _prepare_dir(path: str) -> None:
    if os.path.isdir(path) and os.listdir(path):
        ours = (os.path.join(path, STATS_FILE), os.path.join(path, UNFINISHED_MARK))
        if not any(os.path.isfile(p) for p in ours):
            raise FileExistsError(
                f"{path} exists, is not empty and was not written by the synthetic generator "
                f"(no {STATS_FILE} or {UNFINISHED_MARK}); refusing to overwrite it"
            )
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, UNFINISHED_MARK), "w") as f:
        f.write("a synthetic benchmark generation started here and has not finished\n")


def _variant(entries: List[Dict], keep) -> Dict:
    return {
        "images": [
            {k: v for k, v in e.items() if k != "_stats"}
            | {"expressions": [x for x in e["expressions"] if keep(x)]}
            for e in entries
        ]
    }


def _split_statistics(es: List[Dict]) -> Dict:
    exprs = [(e["file_name"], x) for e in es for x in e["expressions"]]
    single = [(f, x) for f, x in exprs if len(x["targets"]) == 1]
    distractors = sum(e["_stats"]["distractor"] for e in es)
    return {
        "images": len(es),
        "objects": sum(len(e["objects"]) for e in es),
        "referred_objects": len({(f, x["targets"][0]) for f, x in single}),
        "expressions": len(single),
        "images_with_same_category_distractors": distractors,
        "share_same_category_distractors": round(distractors / max(len(es), 1), 4),
        "occluded_objects": sum(e["_stats"]["occluded"] for e in es),
        "heldout_combination_objects": sum(e["_stats"]["heldout"] for e in es),
        "expression_types": dict(collections.Counter(x["type"] for _, x in single)),
        "generalized_expressions": {
            "single": len(single),
            "multi": sum(len(x["targets"]) > 1 for _, x in exprs),
            "no_target": sum(not x["targets"] for _, x in exprs),
        },
    }


def _statistics(entries: List[Dict], cfg: SynthConfig, seed: int, heldout, seconds: float) -> Dict:
    per_split = {
        split: _split_statistics([e for e in entries if e["split"] == split]) for split in SPLITS
    }
    total_types = collections.Counter()
    for s in per_split.values():
        total_types.update(s["expression_types"])
    return {
        "generator": {
            "num_images": len(entries),
            "seed": seed,
            "config": asdict(cfg),
            "seconds": round(seconds, 2),
        },
        "heldout_combinations": {cat: col for cat, col in sorted(heldout.items())},
        "testA_testB": (
            "train/val/testA objects never use the held-out colour-category combinations; every "
            "testB image holds at least one, and testB refs target only such objects"
        ),
        "splits": per_split,
        "share_same_category_distractors": round(
            sum(e["_stats"]["distractor"] for e in entries) / len(entries), 4
        ),
        "expression_types": {
            t: total_types.get(t, 0) for t in EXPRESSION_TYPES if t in total_types
        },
    }


def format_stats(stats: Dict) -> str:
    """A plain-text table of the per-split statistics."""
    head = ["split", "images", "objects", "occluded", "targets", "exprs", "distractor%"]
    head += ["multi", "no-target"]
    rows = []
    for split, s in stats["splits"].items():
        g = s["generalized_expressions"]
        rows.append(
            [split]
            + [str(s[k]) for k in ("images", "objects", "occluded_objects")]
            + [str(s[k]) for k in ("referred_objects", "expressions")]
            + [f"{100 * s['share_same_category_distractors']:.1f}"]
            + [str(g["multi"]), str(g["no_target"])]
        )
    lines = [tabulate(rows, headers=head, tablefmt="plain", stralign="right", disable_numparse=True)]
    types = ", ".join(f"{k}={v}" for k, v in stats["expression_types"].items())
    lines.append(f"expression types (refsynth, all splits): {types}")
    lines.append(f"held-out colour-category combinations (testB): {stats['heldout_combinations']}")
    return "\n".join(lines)


def finished_benchmark(root: str) -> Optional[Dict]:
    """
    The generator's settings (``num_images``, ``seed``, ...) of the finished benchmark under
    ``root``, or None when there is none: each variant's stats file is written last, so a
    generation stopped midway has neither. ValueError naming the file when it is unreadable.
    """
    paths = [os.path.join(root, name, STATS_FILE) for name in (REFSYNTH, GREFSYNTH)]
    if not all(os.path.isfile(p) for p in paths):
        return None
    generator = read_json_file(paths[0])
    generator = generator.get("generator") if isinstance(generator, dict) else None
    if not isinstance(generator, dict):
        raise ValueError(f"{paths[0]}: expected the generator's statistics (an object with 'generator'); delete "
                         f"{os.path.join(root, REFSYNTH)} and {os.path.join(root, GREFSYNTH)} to generate them again")
    return generator


def benchmark_settings(generator: Dict) -> Dict:
    """
    The settings of a benchmark flat, as a finished benchmark's ``generator`` statistics hold
    them (:func:`finished_benchmark`; JSON, tuples as lists): ``num_images``, ``seed`` and
    every :class:`SynthConfig` field. Its generation time is left out: it differs between
    two generations of the same data.
    """
    config = generator.get("config")
    return {"num_images": generator.get("num_images"), "seed": generator.get("seed"),
            **(config if isinstance(config, dict) else {})}


def requested_settings(num_images: int, seed: int, cfg: Optional[SynthConfig] = None) -> Dict:
    """:func:`benchmark_settings` of the benchmark ``write_benchmark`` writes with these arguments."""
    generator = {"num_images": num_images, "seed": seed, "config": asdict(cfg or SynthConfig())}
    return benchmark_settings(json.loads(json.dumps(generator)))


def settings_differences(stored: Dict, current: Dict, labels: Tuple[str, str]) -> List[str]:
    """'KEY STORED LABEL0, CURRENT LABEL1' for each setting the two :func:`benchmark_settings` differ in."""
    keys = list(stored) + [k for k in current if k not in stored]
    return [f"{k} {stored.get(k)!r} {labels[0]}, {current.get(k)!r} {labels[1]}"
            for k in keys if stored.get(k) != current.get(k)]


def write_benchmark(
    root: str,
    num_images: int,
    seed: int = 0,
    cfg: Optional[SynthConfig] = None,
    workers: int = 2,
    progress: bool = True,
) -> Dict:
    """
    Generate ``num_images`` scenes and write ``<root>/refsynth`` and ``<root>/grefsynth``
    (see the module docstring). ``workers`` > 1 renders in that many spawned processes
    (so a calling script needs the usual ``if __name__ == "__main__":`` guard); the
    result does not depend on it. Returns the statistics (also in refsynth/stats.json).
    """
    cfg = cfg or SynthConfig()
    start = time.time()
    splits = assign_splits(num_images, seed, cfg)  # refuses a bad num_images before any folder is made
    ref_dir, gref_dir = os.path.join(root, REFSYNTH), os.path.join(root, GREFSYNTH)
    _prepare_dir(gref_dir)
    _prepare_dir(ref_dir)
    image_dir = os.path.join(ref_dir, IMAGE_DIR)
    os.makedirs(image_dir)
    heldout = heldout_combos(seed)
    jobs = list(enumerate(splits))
    task = functools.partial(_image_entry, cfg=cfg, seed=seed, heldout=heldout, image_dir=image_dir)
    bar = functools.partial(
        tqdm, total=num_images, desc="refsynth", unit="img", disable=not progress
    )
    if workers > 1:
        # "spawn": forking a process whose OpenMP / OpenCV thread pools were already used
        # (torch, cv2 in the caller) can deadlock the children.
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
            entries = list(bar(pool.imap(task, jobs, chunksize=_CHUNK)))
    else:
        entries = [task(j) for j in bar(jobs)]

    classic = _variant(entries, lambda x: len(x["targets"]) == 1)
    general = _variant(entries, lambda x: True)
    validate_simple_json(classic, ref_dir, generalized=False, image_root=image_dir)
    validate_simple_json(general, gref_dir, generalized=True)
    instances, refs = simple_json_to_refer(classic, generalized=False)
    paths = save_refer_dataset(ref_dir, SPLIT_BY, refs, instances)
    _, grefs = simple_json_to_refer(general, generalized=True)
    save_refer_dataset(
        gref_dir, SPLIT_BY, grefs, None, generalized=True, instances_file=paths["instances"]
    )

    stats = _statistics(entries, cfg, seed, heldout, time.time() - start)
    for d in (ref_dir, gref_dir):  # the mark of a finished benchmark: whole or absent
        with atomic_open(os.path.join(d, STATS_FILE), "w") as f:
            json.dump(stats, f, indent=1)
        os.remove(os.path.join(d, UNFINISHED_MARK))
    logger.info(
        "Synthetic referring benchmark in %s (%.1f s):\n%s",
        root,
        stats["generator"]["seconds"],
        format_stats(stats),
    )
    return stats
