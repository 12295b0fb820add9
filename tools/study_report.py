#!/usr/bin/env python
"""
Render the results JSON of ``tools/study.py``: markdown tables and PNG pictures.

    python tools/study_report.py output/study/study.json --output docs/study

Writes ``study.md`` (also printed): per variant mean ± std over seeds per split and the
commits its runs trained at, the runs left out as unfinished (failed, or still running); paired
differences (reference minus variant, same seeds) per seed, their mean ± standard error per
split and per expression type, and the verdict of RULE, each variant against ``--reference``
or its ``--pair`` (VIPA at the variant's other settings, so that a pair differs in one key);
the retrieval report; the entries' ``note`` fields (hand-written provenance, e.g. a model
trained outside the study); pictures ``ratio_curve.png`` (oIoU against r), ``variants.png``
and ``differences.png`` (the paired differences, the rule's question, on a scale where they
show: linear near zero, logarithmic beyond DIFFERENCE_LINEAR_RANGE). No targets, no paper numbers.
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

from vipa_d2.utils.atomic_io import atomic_open  # noqa: E402
from vipa_d2.data.synthetic import settings_differences  # noqa: E402
from vipa_d2.utils.runs import read_study_results  # noqa: E402

RULE = (
    "a claim reproduces when the paired mean difference (VIPA minus variant, same seeds) on val exceeds "
    "twice its standard error over seeds, with at least 2 seeds, and has the same sign on testA and testB"
)
DECIDING_SPLIT, CONFIRMING_SPLITS, MIN_SEEDS, SE_MULTIPLE = "val", ("testA", "testB"), 2, 2.0  # RULE's terms
RULE_SPLITS = (DECIDING_SPLIT, *CONFIRMING_SPLITS)
BAR_WIDTH = 0.8 / (len(CONFIRMING_SPLITS) + 1)  # a variant's split bars fill 0.8 of its slot
RATIO_PREFIX = "ratio_"  # variants that differ from the reference in MODEL.VIPA.VEG.RATIO only
# The differences picture is linear within this many metric points of zero and logarithmic
# beyond: one ablation that costs 10-20 points (no fusion) would otherwise flatten the
# differences of a point or less that most verdicts turn on.
DIFFERENCE_LINEAR_RANGE = 2.0
DIFFERENCE_LINEAR_SCALE = 2.0  # the linear part's height, in decades of the logarithmic part
DIFFERENCE_TICKS = (-50, -20, -10, -5, -2, -1, -0.5, 0, 0.5, 1, 2, 5, 10, 20, 50)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="the JSON tools/study.py writes")
    parser.add_argument("--output", default="docs/study", help="folder of study.md and the PNGs")
    parser.add_argument("--reference", default="vipa", help="the variant every other one is paired with")
    parser.add_argument("--pair", action="append", default=[], metavar="VARIANT=REFERENCE",
                        help="pair VARIANT with REFERENCE instead of --reference, e.g. "
                        "language_fusion_none=fusion_none (the language baseline against VIPA, both without fusion); "
                        "repeatable; a VARIANT with no finished run yet is left out, with a note")
    parser.add_argument("--metric", default="oIoU", help="metric of the differences and pictures")
    return parser.parse_args(argv)


def references(runs, default, pairs):
    """({variant: the variant it is paired with}, [remarks]): ``default``, or the REFERENCE of
    the variant's ``VARIANT=REFERENCE`` in ``pairs``. A study renders while it runs: a
    ``default`` with no finished run yet pairs with nothing (its variants stay undecided), a
    pair whose VARIANT has none is left out, and the remarks say so; ValueError names any other
    pair that does not fit."""
    have = f"(have: {', '.join(runs)})"
    refs, remarks = {name: default for name in runs if name != default}, []
    if default not in runs:
        remarks.append(f"--reference {default!r} has no finished run yet {have}: nothing is paired with it")
    for pair in pairs:
        variant, sep, ref = pair.partition("=")
        if sep and variant not in runs and variant != ref:
            remarks.append(f"--pair {pair!r} left out: its variant has no finished run yet")
        elif not sep or variant == default or ref not in runs or ref == variant:
            raise ValueError(f"--pair {pair!r}: expected VARIANT=REFERENCE, REFERENCE a finished variant other "
                             f"than VARIANT, VARIANT not --reference {default!r} {have}")
        else:
            refs[variant] = ref
    return refs, remarks


# What the report reads of a finished run's entry (tools/study.py writes them all).
REQUIRED_KEYS = ("variant", "seed", "splits", "iterations", "ratio", "wall_s")


def load_runs(path):
    """(the finished runs of a results file by variant (:func:`by_variant`), {key: status} of
    the runs left out as unfinished); ValueError naming the file and the run where the file
    is not what tools/study.py writes, or its finished runs were made on other data."""
    runs = read_study_results(path)["runs"]
    settings = {}  # setting -> the first finished run made with it
    data = {}  # the benchmark settings a finished run names -> its key (older entries name none)
    for key, entry in runs.items():
        if entry.get("status") != "done":
            continue
        if entry.get("data") is not None:
            data.setdefault(json.dumps(entry["data"], sort_keys=True), key)
        missing = [k for k in REQUIRED_KEYS if k not in entry]
        if missing:
            raise ValueError(f"{path}: finished run {key!r} has no {', '.join(missing)}")
        splits = entry["splits"]
        if not isinstance(splits, dict) or not all(isinstance(scores, dict) for scores in splits.values()):
            raise ValueError(f"{path}: finished run {key!r}: 'splits' holds {json.dumps(splits)[:200]}, "
                             "expected an object of {split: {metric: value}}")
        settings.setdefault(run_setting(entry), key)
    if len(settings) > 1:  # means over seeds and paired differences compare like with like only
        (first, first_key), (other, other_key) = list(settings.items())[:2]
        raise ValueError(f"{path}: finished runs {first_key!r} and {other_key!r} were made with other settings "
                         f"({first[0]} iterations, overrides {list(first[1])}; {other[0]} iterations, overrides "
                         f"{list(other[1])}): keep each setting in its own results file")
    if len(data) > 1:  # a merged file of lanes: pairs on two benchmarks compare nothing
        (first, first_key), (other, other_key) = list(data.items())[:2]
        stored = [d if isinstance(d, dict) else {} for d in (runs[first_key]["data"], runs[other_key]["data"])]
        listed = "; ".join(settings_differences(*stored, (first_key, other_key))[:10])
        raise ValueError(f"{path}: finished runs {first_key!r} and {other_key!r} were trained on other synthetic "
                         f"benchmarks ({listed or f'{first}; {other}'}): keep each benchmark's runs in their own "
                         "results file")
    left_out = {key: str(entry.get("status")) for key, entry in runs.items() if entry.get("status") != "done"}
    return by_variant(runs), left_out


# Overrides a run's setting leaves out: the seed, and the schedule study.py's --max-iter
# derives from each leaf's own (its length is the "iterations" compared).
PER_RUN_KEYS = ("SEED", "SOLVER.MAX_ITER", "SOLVER.WARMUP_ITERS", "SOLVER.CHECKPOINT_PERIOD")


def run_setting(entry):
    """(iterations, the other overrides in key order) of a finished run: what its seeds and
    the variants it is paired with must share."""
    opts = entry.get("opts") or []
    pairs = sorted((key, value) for key, value in zip(opts[::2], opts[1::2]) if key not in PER_RUN_KEYS)
    return entry["iterations"], tuple(item for pair in pairs for item in pair)


def stored_metrics(runs):
    """Every metric name the runs' split scores hold."""
    return {m for seeds in runs.values() for e in seeds.values() for split in e["splits"].values() for m in split}


def by_variant(runs):
    """{variant: {seed: entry}} of the finished runs, variants in first-seen order."""
    out = {}
    for entry in runs.values():
        if entry.get("status") == "done":
            out.setdefault(entry["variant"], {})[entry["seed"]] = entry
    return out


def stats(values):
    """(n, mean, sample std, standard error); spreads are None below 2 values, all below 1."""
    n = len(values)
    std = statistics.stdev(values) if n > 1 else None
    return n, statistics.fmean(values) if n else None, std, None if std is None else std / math.sqrt(n)


def fmt(mean, spread=None, sign=False):
    text = "-" if mean is None else f"{mean:+.2f}" if sign else f"{mean:.2f}"
    return text if spread is None else f"{text} ± {spread:.2f}"  # no spread without a mean


def value(entry, *path):
    """entry[path[0]][path[1]]... (e.g. "splits", "val", "oIoU"), None where a level is missing."""
    for key in path:
        entry = entry.get(key) if isinstance(entry, dict) else None
    return entry


def spread(seeds, *path):
    """'mean ± std' over the seeds that have ``path``."""
    return fmt(*stats([v for v in (value(e, *path) for e in seeds.values()) if v is not None])[1:3])


def paired(ref, seeds, *path):
    """{seed: reference minus variant} over the seeds both ran."""
    pairs = {s: (value(ref[s], *path), value(seeds[s], *path)) for s in sorted(set(ref) & set(seeds))}
    return {s: a - b for s, (a, b) in pairs.items() if a is not None and b is not None}


def against(runs, name, ref, *path):
    """``paired`` of variant ``name`` with its reference ``ref``: nothing while ``ref`` has no
    finished run (see ``references``)."""
    return paired(runs.get(ref, {}), runs[name], *path)


def split_differences(runs, name, ref, metric):
    """{split: {seed: reference minus variant}} over RULE_SPLITS, what ``verdict`` reads: the
    confirming splits' over the deciding split's seeds only, so that the rule, the table and
    the pictures confirm a mean with the seeds it was taken over."""
    deciding = against(runs, name, ref, "splits", DECIDING_SPLIT, metric)
    confirming = {split: against(runs, name, ref, "splits", split, metric) for split in CONFIRMING_SPLITS}
    return {DECIDING_SPLIT: deciding,
            **{split: {seed: d for seed, d in diffs.items() if seed in deciding} for split, diffs in confirming.items()}}


def mean_se(diffs):
    """'mean ± standard error' of paired differences."""
    return fmt(*stats(list(diffs.values()))[1::2], sign=True)


def verdict(diffs):
    """The rule on {split: {seed: difference}} (``split_differences``); a confirming split
    without any pair leaves it undecided."""
    n, mean, _, se = stats(list(diffs[DECIDING_SPLIT].values()))
    if n < MIN_SEEDS:
        return f"undecided ({n} seed{'s' * (n != 1)})"
    others = {s: stats(list(diffs[s].values()))[1] for s in CONFIRMING_SPLITS}
    missing = [s for s, m in others.items() if m is None]
    if missing:
        return f"undecided (no {' / '.join(missing)} pairs)"
    same_sign = all((m > 0) == (mean > 0) for m in others.values())
    return "reproduces" if mean > SE_MULTIPLE * se and same_sign else "does not reproduce"


def commits(seeds):
    """The commits a variant's runs trained at (each sitting's, short), in first-seen order."""
    found = [c for e in seeds.values() for c in e.get("commits") or [e.get("commit")] if isinstance(c, str) and c]
    return " ".join(dict.fromkeys(c[:7] + "-dirty" * c.endswith("-dirty") for c in found)) or "-"


def notes(runs):
    """Lines for the runs whose entry carries a ``note`` (e.g. where a run's model came from)."""
    found = [f"- {name}, seed {seed}: {e['note']}" for name, seeds in runs.items()
             for seed, e in sorted(seeds.items()) if e.get("note")]
    return ["\nNotes on single runs:\n", *found] if found else []


def render(runs, refs, metric, left_out=None):
    """The markdown report; ``refs`` as ``references`` returns it, ``left_out`` as
    ``load_runs`` does (the unfinished runs, named under the first table)."""
    splits = RULE_SPLITS
    table = lambda rows, header: tabulate(rows, header, tablefmt="github", disable_numparse=True)  # noqa: E731
    rows = [[name, " ".join(map(str, sorted(seeds))), *(spread(seeds, "splits", s, metric) for s in splits),
             next(iter(seeds.values()))["iterations"], f"{sum(e['wall_s'] for e in seeds.values()) / 60:.0f}",
             commits(seeds)]
            for name, seeds in runs.items()]
    unfinished = [f"{key} ({status})" for key, status in (left_out or {}).items()]
    parts = [f"# Ablation study\n\nVerdict rule, fixed before reading the numbers: {RULE}.\n",
             f"## {metric} per variant (mean ± std over seeds)\n",
             table(rows, ["variant", "seeds", *splits, "iterations", "minutes (all seeds)", "commits"]),
             *([f"\nLeft out, not finished: {', '.join(unfinished)}."] if unfinished else []),
             *notes(runs),
             f"\n## Paired differences, reference minus variant ({metric}; mean ± standard error)\n"]
    rows = []
    for name, ref in refs.items():
        diffs = split_differences(runs, name, ref, metric)
        per_seed = ", ".join(f"{k}: {d:+.2f}" for k, d in diffs[DECIDING_SPLIT].items()) or "-"
        rows.append([name, ref, per_seed, *(mean_se(diffs[s]) for s in splits), verdict(diffs)])
    parts.append(table(rows, ["variant", "reference", f"{DECIDING_SPLIT} per seed", *splits, "verdict"]))
    types = sorted({t for seeds in runs.values() for e in seeds.values()
                    for t in value(e, "by_type", DECIDING_SPLIT) or {}})
    if types and refs:
        parts += [f"\n## Paired differences per expression type on {DECIDING_SPLIT} ({metric})\n",
                  table([[name, ref, *(mean_se(against(runs, name, ref, "by_type", DECIDING_SPLIT, t, metric))
                                       for t in types)]
                         for name, ref in refs.items()], ["variant", "reference", *types])]
    keys = sorted({k for seeds in runs.values() for e in seeds.values()
                   for k in value(e, "retrieval", DECIDING_SPLIT) or {} if not k.endswith("samples")})
    if keys:
        parts += [f"\n## Retrieval report on {DECIDING_SPLIT} (percent, mean ± std over seeds)\n",
                  table([[name, *(spread(seeds, "retrieval", DECIDING_SPLIT, k) for k in keys)]
                         for name, seeds in runs.items()], ["variant", *keys])]
    return "\n".join(parts) + "\n"


def differences(runs, refs, metric):
    """{variant: {seed: {"splits": {split: {metric: reference minus variant}}}}}: the paired
    differences shaped as runs, so ``plot`` draws them like scores."""
    out = {}
    for name, ref in refs.items():
        per_split = split_differences(runs, name, ref, metric)
        shared = sorted(set().union(*per_split.values()))
        if shared:
            out[name] = {seed: {"splits": {split: {metric: d[seed]} for split, d in per_split.items() if seed in d}}
                         for seed in shared}
    return out


def side_by_side(names):
    """``x_of`` for ``plot``'s bars: the splits' bars of a variant side by side at its index."""
    return lambda name, i: names.index(name) + (i - len(CONFIRMING_SPLITS) / 2) * BAR_WIDTH


def plot(runs, names, x_of, metric, path, xlabel=None, ylabel=None):
    """Per split: mean ± std over seeds at ``x_of(variant, index)``, seeds as dots. A
    ``ylabel`` marks differences: they get a zero line."""
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names)), 3.8))
    for i, split in enumerate(RULE_SPLITS):
        xs = [x_of(n, i) for n in names]
        vals = [[v for e in runs[n].values() if (v := value(e, "splits", split, metric)) is not None] for n in names]
        # NaN where a variant has no score for the split: matplotlib leaves that bar out.
        means = [math.nan if (m := stats(v)[1]) is None else m for v in vals]
        stds = [stats(v)[2] or 0 for v in vals]
        if xlabel:  # a curve over a numeric setting
            line = ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=split)[0]
        else:
            line = ax.bar(xs, means, BAR_WIDTH, yerr=stds, capsize=2, label=split)
        for x, v in zip(xs, vals):
            ax.scatter([x] * len(v), v, s=8, color="black" if not xlabel else line.get_color(), zorder=3)
    if xlabel:
        ax.set_xlabel(xlabel)
    else:
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(ylabel or metric)
    title = "mean ± std over seeds; dots: single seeds"
    if ylabel:
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_yscale("symlog", linthresh=DIFFERENCE_LINEAR_RANGE, linscale=DIFFERENCE_LINEAR_SCALE)
        low, high = ax.get_ylim()
        ticks = [t for t in DIFFERENCE_TICKS if low <= t <= high]
        ax.set_yticks(ticks, [f"{t:+g}" if t else "0" for t in ticks])
        ax.set_yticks([], minor=True)
        title = f"linear within ±{DIFFERENCE_LINEAR_RANGE:g}, logarithmic beyond; {title}"
        ax.grid(axis="y", which="major", linewidth=0.4, alpha=0.5)
    ax.set_title(title, fontsize="medium")
    # Outside the axes: inside, the legend hides bars and seed dots.
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        runs, left_out = load_runs(args.results)
    except ValueError as e:
        print(f"study_report.py: error: {e}", file=sys.stderr)
        return 2
    runs = {n: runs[n] for n in sorted(runs, key=lambda n: n != args.reference)}  # the reference first
    if not runs:
        print(f"study_report.py: error: {args.results} holds no finished run", file=sys.stderr)
        return 2
    metrics = stored_metrics(runs)
    if args.metric not in metrics:
        print(f"study_report.py: error: --metric {args.metric}: the runs hold {sorted(metrics)}", file=sys.stderr)
        return 2
    try:
        refs, remarks = references(runs, args.reference, args.pair)
    except ValueError as e:
        print(f"study_report.py: error: {args.results}: {e}", file=sys.stderr)
        return 2
    for remark in remarks:
        print(f"study_report.py: {args.results}: {remark}", file=sys.stderr)
    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as e:
        print(f"study_report.py: error: --output {args.output}: cannot make the folder ({e.strerror or e})",
              file=sys.stderr)
        return 2
    text = render(runs, refs, args.metric, left_out)
    names, pictures = list(runs), ["variants.png"]
    plot(runs, names, side_by_side(names), args.metric, os.path.join(args.output, pictures[0]))
    ratios = sorted((n for n in runs if n == args.reference or n.startswith(RATIO_PREFIX)),
                    key=lambda n: next(iter(runs[n].values()))["ratio"])
    if len(ratios) > 1:  # the token-ratio curve: the reference and its ratio_* variants
        pictures.insert(0, "ratio_curve.png")
        plot(runs, ratios, lambda n, i: next(iter(runs[n].values()))["ratio"], args.metric,
             os.path.join(args.output, pictures[0]), xlabel="token ratio r (MODEL.VIPA.VEG.RATIO)")
    # A variant paired elsewhere is labelled with its reference.
    diffs = {name if refs[name] == args.reference else f"{name} (vs {refs[name]})": d
             for name, d in differences(runs, refs, args.metric).items()}
    if diffs:  # bars from 0 hide differences of a point; these bars start at 0 difference
        pictures.append("differences.png")
        plot(diffs, list(diffs), side_by_side(list(diffs)), args.metric, os.path.join(args.output, pictures[-1]),
             ylabel=f"{args.reference if set(refs.values()) == {args.reference} else 'reference'} "
                    f"minus variant, {args.metric}")
    text += "\n" + "\n".join(f"![{p[:-4]}]({p})" for p in pictures) + "\n"
    with atomic_open(os.path.join(args.output, "study.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
