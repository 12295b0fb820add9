#!/usr/bin/env python
"""
Render the results JSON of ``tools/study.py``: markdown tables and PNG pictures.

    python tools/study_report.py output/study/study.json --output docs/study

Writes ``study.md`` (also printed): per variant mean ± std over seeds per split; paired
differences (reference minus variant, same seeds) per seed with mean ± standard error,
per split and per expression type, and the verdict of the rule below; the retrieval
report. Pictures: ``ratio_curve.png`` (oIoU against the token ratio r, seed spread) and
``variants.png`` (per-variant bars). Only what the JSON holds: no targets, no paper numbers.
"""
import argparse
import json
import math
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from tabulate import tabulate  # noqa: E402

RULE = (
    "a claim reproduces when the paired mean difference (VIPA minus variant, same seeds) on val exceeds "
    "twice its standard error over seeds, with at least 2 seeds, and has the same sign on testA and testB"
)
DECIDING_SPLIT, CONFIRMING_SPLITS = "val", ("testA", "testB")
MIN_SEEDS = 2
SE_MULTIPLE = 2.0
RATIO_PREFIX = "ratio_"  # variants that differ from the reference in MODEL.VIPA.VEG.RATIO only


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="the JSON tools/study.py writes")
    parser.add_argument("--output", default="docs/study", help="folder of study.md and the PNGs")
    parser.add_argument("--reference", default="vipa", help="the variant every other one is paired with")
    parser.add_argument("--metric", default="oIoU", help="metric of the differences and pictures")
    return parser.parse_args(argv)


def by_variant(runs):
    """{variant: {seed: entry}} of the finished runs, variants in first-seen order."""
    out = {}
    for entry in runs.values():
        if entry.get("status") == "done":
            out.setdefault(entry["variant"], {})[entry["seed"]] = entry
    return out


def stats(values):
    """(n, mean, sample std, standard error); spreads are None below 2 values."""
    n = len(values)
    if n == 0:
        return 0, None, None, None
    std = statistics.stdev(values) if n > 1 else None
    return n, statistics.fmean(values), std, None if std is None else std / math.sqrt(n)


def fmt(mean, spread=None, sign=False):
    if mean is None:
        return "-"
    text = f"{mean:+.2f}" if sign else f"{mean:.2f}"
    return text if spread is None else f"{text} ± {spread:.2f}"


def value(entry, split, metric, kind="splits"):
    """The metric of a run in a split (``kind="by_type"``: split is "val/<type>"), or None."""
    if kind == "by_type":
        split, type_ = split.split("/", 1)
        return entry["by_type"].get(split, {}).get(type_, {}).get(metric)
    return entry["splits"].get(split, {}).get(metric)


def paired(ref, runs, split, metric, kind="splits"):
    """{seed: reference minus variant} over the seeds both ran."""
    diffs = {}
    for seed in sorted(set(ref) & set(runs)):
        a, b = value(ref[seed], split, metric, kind), value(runs[seed], split, metric, kind)
        if a is not None and b is not None:
            diffs[seed] = a - b
    return diffs


def verdict(diffs):
    """The rule on {split: {seed: difference}}."""
    n, mean, _, se = stats(list(diffs[DECIDING_SPLIT].values()))
    if n < MIN_SEEDS:
        return f"undecided ({n} seed{'s' * (n != 1)})"
    others = [stats(list(diffs[s].values()))[1] for s in CONFIRMING_SPLITS]
    same_sign = all(m is not None and (m > 0) == (mean > 0) for m in others)
    return "reproduces" if mean > SE_MULTIPLE * se and same_sign else "does not reproduce"


def render(runs, ref_name, metric):
    splits = (DECIDING_SPLIT, *CONFIRMING_SPLITS)
    ref = runs.get(ref_name, {})
    parts = [f"# Ablation study\n\nVerdict rule, fixed before reading the numbers: {RULE}.\n",
             f"## {metric} per variant (mean ± std over seeds)\n"]
    rows = []
    for name, seeds in runs.items():
        cells = [stats([value(e, s, metric) for e in seeds.values() if value(e, s, metric) is not None]) for s in splits]
        wall = sum(e["wall_s"] for e in seeds.values()) / 60
        rows.append([name, " ".join(map(str, sorted(seeds))), *(fmt(c[1], c[2]) for c in cells),
                     next(iter(seeds.values()))["iterations"], f"{wall:.0f}"])
    parts.append(tabulate(rows, ["variant", "seeds", *splits, "iterations", "minutes (all seeds)"], tablefmt="github"))
    parts.append(f"\n## Paired differences, {ref_name} minus variant ({metric}; mean ± standard error)\n")
    rows = []
    for name, seeds in runs.items():
        if name == ref_name:
            continue
        diffs = {s: paired(ref, seeds, s, metric) for s in splits}
        per_seed = ", ".join(f"{k}: {d:+.2f}" for k, d in diffs[DECIDING_SPLIT].items())
        rows.append([name, per_seed or "-", *(fmt(*stats(list(diffs[s].values()))[1::2], sign=True) for s in splits),
                     verdict(diffs)])
    parts.append(tabulate(rows, ["variant", f"{DECIDING_SPLIT} per seed", *splits, "verdict"], tablefmt="github"))
    types = sorted({t for e in ref.values() for t in e["by_type"].get(DECIDING_SPLIT, {})})
    if types:
        parts.append(f"\n## Paired differences per expression type on {DECIDING_SPLIT} ({metric})\n")
        rows = [[name] + [fmt(*stats(list(paired(ref, seeds, f"{DECIDING_SPLIT}/{t}", metric, "by_type").values()))[1::2],
                              sign=True) for t in types] for name, seeds in runs.items() if name != ref_name]
        parts.append(tabulate(rows, ["variant", *types], tablefmt="github"))
    keys = sorted({k for seeds in runs.values() for e in seeds.values() for k in e["retrieval"].get(DECIDING_SPLIT, {})
                   if not k.endswith("samples")})
    if keys:
        parts.append(f"\n## Retrieval report on {DECIDING_SPLIT} (percent, mean ± std over seeds)\n")
        rows = [[name] + [fmt(*stats([e["retrieval"][DECIDING_SPLIT][k] for e in seeds.values()
                                      if k in e["retrieval"].get(DECIDING_SPLIT, {})])[1:3]) for k in keys]
                for name, seeds in runs.items()]
        parts.append(tabulate(rows, ["variant", *keys], tablefmt="github"))
    return "\n".join(parts) + "\n"


def plot(runs, names, x_of, metric, path, xlabel=None):
    """Per split: mean ± std over seeds at ``x_of(variant, index)``, seeds as dots."""
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names)), 3.8))
    for i, split in enumerate((DECIDING_SPLIT, *CONFIRMING_SPLITS)):
        xs = [x_of(n, i) for n in names]
        vals = [[value(e, split, metric) for e in runs[n].values()] for n in names]
        means, stds = [stats(v)[1] for v in vals], [stats(v)[2] or 0 for v in vals]
        if xlabel:  # a curve over a numeric setting
            line = ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=split)[0]
        else:
            line = ax.bar(xs, means, 0.8 / (len(CONFIRMING_SPLITS) + 1), yerr=stds, capsize=2, label=split)
        for x, v in zip(xs, vals):
            ax.scatter([x] * len(v), v, s=8, color="black" if not xlabel else line.get_color(), zorder=3)
    if xlabel:
        ax.set_xlabel(xlabel)
    else:
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(f"{metric} (mean ± std over seeds; dots: seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    with open(args.results) as f:
        runs = by_variant(json.load(f).get("runs", {}))
    runs = {n: runs[n] for n in sorted(runs, key=lambda n: n != args.reference)}  # the reference first
    if not runs:
        print(f"study_report.py: error: {args.results} holds no finished run", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    text = render(runs, args.reference, args.metric)
    names, pictures = list(runs), ["variants.png"]
    width = 0.8 / (len(CONFIRMING_SPLITS) + 1)
    plot(runs, names, lambda n, i: names.index(n) + (i - len(CONFIRMING_SPLITS) / 2) * width, args.metric,
         os.path.join(args.output, pictures[0]))
    ratios = sorted((n for n in runs if n == args.reference or n.startswith(RATIO_PREFIX)),
                    key=lambda n: next(iter(runs[n].values()))["ratio"])
    if len(ratios) > 1:  # the token-ratio curve: the reference and its ratio_* variants
        pictures.insert(0, "ratio_curve.png")
        plot(runs, ratios, lambda n, i: next(iter(runs[n].values()))["ratio"], args.metric,
             os.path.join(args.output, pictures[0]), xlabel="token ratio r (MODEL.VIPA.VEG.RATIO)")
    text += "\n" + "\n".join(f"![{p[:-4]}]({p})" for p in pictures) + "\n"
    with open(os.path.join(args.output, "study.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
