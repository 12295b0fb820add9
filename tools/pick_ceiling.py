#!/usr/bin/env python
"""
Split runs' oIoU into finding the object and segmenting it, from the per-sample results
that ``ReferringEvaluator`` writes (``<run>/inference/referring_results_<dataset>.json``;
with ``--tta``, the test-time-augmented pass's under ``<run>/inference_TTA/``).

    python tools/pick_ceiling.py output/study/vipa/seed0 output/study/language/seed0 [--datasets ...] [--tta]

Per run and split: the oIoU; the oIoU over the *hits*, the expressions whose mask meets
the target at IoU >= 0.5 (Prec@0.5's criterion), i.e. what the run would score if it never
segmented the wrong object, its ceiling for better picks with the same masks; and the
misses. oIoU is a ratio of sums, so a miss weighs by its union: an unsure pick whose mask
spreads over several objects costs more than its share of the expressions.
No-target expressions (generalized data) have no object to find and are left out.
"""
import argparse
import os
import sys

from tabulate import tabulate

from vipa_d2 import get_vipa_cfg
from vipa_d2.config import add_config_function_option, import_config_functions
from vipa_d2.engine import TTA_RESULTS_FOLDER, TTA_SUFFIX
from vipa_d2.evaluation.referring_evaluation import PRECISION_THRESHOLDS
from vipa_d2.utils.runs import required_results, split_label

HIT_IOU = PRECISION_THRESHOLDS[0]  # a hit is what Prec@0.5 counts
SAMPLE_KEYS = ("intersection", "union", "iou", "no_target")  # what each per-sample entry needs here


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="output folders of train_net.py runs (their inference/ results)")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="evaluated datasets to read (default: DATASETS.TEST of each run's config.yaml)")
    add_config_function_option(parser)
    parser.add_argument("--tta", action="store_true",
                        help=f"read the TEST.AUG pass's results ({TTA_RESULTS_FOLDER}/) instead of the plain pass's")
    return parser.parse_args(argv)


def oiou(samples) -> float:
    union = sum(s["union"] for s in samples)
    return 100.0 * sum(s["intersection"] for s in samples) / union if union else float("nan")


def split_hits(samples) -> dict:
    """{"oIoU", "hit_oIoU", "hits", "misses", "no_target"} of one dataset's per-sample results."""
    # A no-target expression is the record's (gRefCOCO), not an empty mask at the scored resolution.
    found = [s for s in samples if not s["no_target"]]
    hits = [s for s in found if s["iou"] >= HIT_IOU]
    return {"oIoU": oiou(found), "hit_oIoU": oiou(hits), "hits": len(hits), "misses": len(found) - len(hits),
            "no_target": len(samples) - len(found)}


def run_datasets(run: str, datasets, config_functions=()):
    if datasets:
        return list(datasets)
    config = os.path.join(run, "config.yaml")
    if not os.path.isfile(config):
        raise ValueError(f"{run}: no config.yaml to read DATASETS.TEST from; name them with --datasets")
    return list(get_vipa_cfg(config, [], config_functions).DATASETS.TEST)


def sample_problem(sample):
    """What is wrong with one per-sample entry for this tool (None when it can be read)."""
    if not isinstance(sample, dict):
        return f"is {type(sample).__name__}, expected an object with {list(SAMPLE_KEYS)}"
    lacking = [k for k in SAMPLE_KEYS if k not in sample]
    if lacking:
        return f"lacks {lacking} (expected {list(SAMPLE_KEYS)})"
    numbers = {k: sample[k] for k in SAMPLE_KEYS if k != "no_target"}
    wrong = {k: v for k, v in numbers.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
    return f"holds {wrong}, expected numbers" if wrong else None


def run_rows(run: str, datasets, tta: bool = False, config_functions=()):
    """One table row per evaluated dataset of ``run`` (its shuffled control left out; with
    ``tta``, its test-time-augmented pass); ``config_functions`` add the keys of the
    project that trained it."""
    names = run_datasets(run, datasets, config_functions)
    results = required_results(run, names, tta)
    suffix = TTA_SUFFIX if tta else ""
    for name in names:
        samples = results[name + suffix].get("samples")
        if not samples:
            raise ValueError(f"{run}: the results of {name + suffix} hold no per-sample entries")
        for i, sample in enumerate(samples):
            problem = sample_problem(sample)
            if problem:
                raise ValueError(f"{run}: per-sample results of {name + suffix}: samples[{i}] {problem}")
        h = split_hits(samples)
        yield [run, split_label(name) + suffix, h["oIoU"], h["hit_oIoU"], h["misses"], h["hits"] + h["misses"],
               h["no_target"]]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        functions = import_config_functions(args.config_function)
        rows = [row for run in args.runs for row in run_rows(run, args.datasets, args.tta, functions)]
    except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
        print(f"pick_ceiling.py: error: {e}", file=sys.stderr)
        return 2
    headers = ["run", "split", "oIoU", f"oIoU over hits (IoU >= {HIT_IOU})", "misses", "expressions"]
    print(tabulate([row[:-1] for row in rows], headers=headers, tablefmt="pipe", floatfmt=".2f"))
    left_out = sum(row[-1] for row in rows)
    if left_out:  # the oIoU column then differs from the evaluator's, which counts them
        print(f"{left_out} no-target expressions left out of every column")
    return 0


if __name__ == "__main__":
    sys.exit(main())
