#!/usr/bin/env python
"""
What a RefCOCO-sized dataset makes a run wait for in vipa_d2's data path, on this machine:
writes a REFER folder of RefCOCO's size with the project's own writer (default 20,000
640x480 images, 2.5 objects and refs an image, ~2.84 sentences a ref: ~142,000
expressions, split as RefCOCO's unc), then times what the trainer does before the first
iteration and again at every evaluation, in a run's order: the train split
(``DatasetCatalog.get``, and again: a resumed run's second loader), the test sets' checks
before training (``check_test_sets``: the first read of each), then what every evaluation
pays before inference: each test set's loader and its shuffled-expression control's
(``build_test_loader``, ``build_shuffled_test_loader``). Wall seconds and this process's
peak RSS after each step. Files already written are kept (rerun = time again).

  python tools/data_scale.py --out /tmp/refscale [--images 20000] [--output scale.json]
"""
import argparse
import json
import math
import os
import random
import resource
import sys
import time

from detectron2.data import DatasetCatalog
from PIL import Image
from tabulate import tabulate
from tqdm import tqdm

from vipa_d2 import get_vipa_cfg
from vipa_d2.data import register_referring_dataset
from vipa_d2.data.refer import INSTANCES_FILE, make_sentence, refs_file_name, save_refer_dataset
from vipa_d2.engine import ReferringTrainer

SPLITS = (("train", 0.8497), ("val", 0.9247), ("testA", 0.9622), ("testB", 1.0))  # RefCOCO unc's shares
SIZE = (640, 480)
CATEGORIES = ("person", "car", "dog", "cat", "chair", "cup", "bottle", "horse", "sheep", "cow")
WORDS = ("red", "blue", "white", "black", "left", "right", "middle", "front", "back")
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "synthetic", "vipa_tiny_cpu.yaml")
NAME = "refscale"


def polygon(rng, cx, cy, rx, ry, points=20):
    """A 20-point ring around (cx, cy), inside the image."""
    out = []
    for k in range(points):
        a, r = 2 * math.pi * k / points, 0.8 + 0.2 * rng.random()
        out += [round(min(max(cx + rx * r * math.cos(a), 0.0), SIZE[0] - 1.0), 2),
                round(min(max(cy + ry * r * math.sin(a), 0.0), SIZE[1] - 1.0), 2)]
    return out


def write_folder(out: str, images: int, objects: float) -> str:
    """The REFER folder under ``out`` (images in ``out/images``); kept if already there."""
    folder = os.path.join(out, NAME)
    if os.path.isfile(os.path.join(folder, refs_file_name("unc", False))):
        return folder
    rng, image_dir = random.Random(0), os.path.join(out, "images")
    os.makedirs(image_dir, exist_ok=True)
    entries, anns, refs, sent_id = [], [], [], 0
    for i in tqdm(range(images), desc="images", unit="image"):
        name = f"{i:012d}.jpg"
        if not os.path.exists(os.path.join(image_dir, name)):
            Image.new("RGB", SIZE, (40 * (i % 5), 90, 160)).save(os.path.join(image_dir, name), quality=75)
        entries.append({"id": i + 1, "file_name": name, "height": SIZE[1], "width": SIZE[0]})
        split = next(s for s, share in SPLITS if i / images < share)
        count = int(objects) + (rng.random() < objects % 1)
        kinds = [rng.randrange(len(CATEGORIES)) for _ in range(count)]
        first = len(anns) + 1
        for kind in kinds:
            ring = polygon(rng, rng.uniform(80, 560), rng.uniform(60, 420), rng.uniform(15, 75), rng.uniform(15, 55))
            xs, ys = ring[0::2], ring[1::2]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": kind + 1, "segmentation": [ring],
                         "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                         "area": (max(xs) - min(xs)) * (max(ys) - min(ys)) * math.pi / 4, "iscrowd": 0})
        for j, kind in enumerate(kinds):
            group = [first + k for k, other in enumerate(kinds) if other == kind]
            sentences = []
            for _ in range(rng.choices((2, 3, 4), (0.3, 0.56, 0.14))[0]):
                text = f"{rng.choice(WORDS)} {CATEGORIES[kind]} {rng.choice(WORDS)}"
                sentences.append({**make_sentence(text, sent_id), "group_ann_ids": group})
                sent_id += 1
            refs.append({"ref_id": len(refs), "ann_id": first + j, "image_id": i + 1, "split": split,
                         "category_id": kind + 1, "file_name": name, "sentences": sentences,
                         "sent_ids": [s["sent_id"] for s in sentences]})
    categories = [{"id": k + 1, "name": n, "supercategory": n} for k, n in enumerate(CATEGORIES)]
    save_refer_dataset(folder, "unc", refs, {"images": entries, "annotations": anns, "categories": categories})
    return folder


def timed(rows, label, fn):
    start = time.perf_counter()
    result = fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append({"step": label, "wall_s": round(time.perf_counter() - start, 2), "peak_rss_mib": round(peak)})
    print(f"{label}: {rows[-1]['wall_s']} s", file=sys.stderr)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the dataset (written once, then reused)")
    p.add_argument("--images", type=int, default=20000, help="images (RefCOCO: 19,994)")
    p.add_argument("--objects", type=float, default=2.5, help="referred objects an image (RefCOCO: 2.5)")
    p.add_argument("--output", default="", help="write the timings as JSON here")
    args = p.parse_args(argv)
    folder = write_folder(os.path.abspath(args.out), args.images, args.objects)
    sizes = {f: os.path.getsize(os.path.join(folder, f)) for f in (INSTANCES_FILE, refs_file_name("unc", False))}
    names = [f"{NAME}_{split}" for split, _ in SPLITS]
    for name, (split, _) in zip(names, SPLITS):
        register_referring_dataset(name, os.path.dirname(folder), NAME, "unc", split, os.path.join(args.out, "images"))
    rows = []
    timed(rows, f"DatasetCatalog.get {names[0]}", lambda: DatasetCatalog.get(names[0]))
    timed(rows, f"DatasetCatalog.get {names[0]}, again", lambda: DatasetCatalog.get(names[0]))
    cfg = get_vipa_cfg(CONFIG, ["DATASETS.TRAIN", f"('{names[0]}',)", "DATASETS.TEST", str(tuple(names[1:]))])
    timed(rows, "check_test_sets (before training: each test set's first read)", lambda: ReferringTrainer.check_test_sets(cfg))
    for name in names[1:]:
        timed(rows, f"build_test_loader {name} (each evaluation)", lambda: ReferringTrainer.build_test_loader(cfg, name))
        timed(rows, f"build_shuffled_test_loader {name} (each evaluation)",
              lambda: ReferringTrainer.build_shuffled_test_loader(cfg, name))
    counts = {name: len(DatasetCatalog.get(name)) for name in names}
    print(f"{folder}: {counts} expressions; files {sizes} bytes")
    print(tabulate(rows, headers="keys", tablefmt="github"))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"folder": folder, "expressions": counts, "file_bytes": sizes, "steps": rows}, f, indent=1)


if __name__ == "__main__":
    main()
