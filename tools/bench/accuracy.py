"""
Accuracy and ablations on the synthetic benchmark: every variant trains with the same
data, schedule, budget and seed(s) as its own ``train_net.py`` process and output folder.

Runs go seed by seed (all variants for seed 0, then all for seed 1, ...) so a benchmark
stopped early still holds comparable variants. A finished run leaves ``bench_result.json``
in its folder and is skipped next time; an interrupted one is restarted with
``train_net.py --resume`` and continues from its last checkpoint.
"""

import glob
import json
import os
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from main_job import iteration_seconds, read_metrics  # tools/main_job.py
from vipa_d2 import get_vipa_cfg
from vipa_d2.data.builtin import BUILTIN_REFERRING, DATASETS_ENV
from vipa_d2.data.synthetic import REFSYNTH, SynthConfig, write_benchmark
from vipa_d2.engine import SHUFFLED_SUFFIX

from .common import BenchmarkError, machine_info, save_json, summarize

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(REPO, "train_net.py")
DEFAULT_CONFIG = os.path.join(REPO, "configs", "synthetic", "vipa_tiny_cpu.yaml")
RESULT_FILE = "bench_result.json"  # written when a run is finished and scored
SIGNATURE_FILE = "bench_signature.json"  # written when a run starts: its settings
SYNTH_STATS = "stats.json"  # written last by the generator: a finished data set has it
# Warm-up length as a share of the run when --iters shortens the schedule.
WARMUP_SHARE = 0.1
# The checkpoints are only needed to resume an unfinished run (each holds the optimizer
# state, ~340 MB for the tiny model): kept on disk while a run is going, deleted after.
CHECKPOINT_FILES = (".pth", "last_checkpoint")

VIPA, KV_LANGUAGE = "vipa", "kv_language"
METRICS = ("Prec@0.5", "Prec@0.7", "mIoU", "oIoU")  # the columns of the paper's ablations
HEADLINE_SPLIT, HEADLINE_METRIC = "val", "oIoU"


@dataclass(frozen=True)
class Variant:
    name: str
    group: str
    label: str
    opts: Tuple[str, ...]
    default: bool = True
    # Also score the final model with expressions shuffled across samples.
    shuffled_control: bool = False


VARIANTS = OrderedDict(
    (v.name, v)
    for v in (
        Variant(VIPA, "main", "VIPA (visual expression as K/V)", (), shuffled_control=True),
        Variant(
            KV_LANGUAGE,
            "kv",
            "language features as K/V (vanilla LE)",
            ("MODEL.VIPA.KV_SOURCE", "language"),
        ),
        Variant(
            "step1_only",
            "steps",
            "step 1 only (no context refinement)",
            ("MODEL.VIPA.VEG.STEP2", "False"),
        ),
        Variant(
            "step2_only",
            "steps",
            "step 2 only (no token retrieval)",
            ("MODEL.VIPA.VEG.STEP1", "False"),
        ),
        Variant(
            "global_only", "cues", "global cue only ([CLS])", ("MODEL.VIPA.VEG.LOCAL_CUES", "False")
        ),
        Variant(
            "local_only",
            "cues",
            "local cues only (words)",
            # Without [CLS] the contrastive loss can only supervise the words.
            ("MODEL.VIPA.VEG.GLOBAL_CUE", "False", "MODEL.VIPA.LOSS.CONTRASTIVE_CUES", "all"),
        ),
        Variant("ratio_0.1", "ratio", "r = 0.1", ("MODEL.VIPA.VEG.RATIO", "0.1")),
        Variant("ratio_0.8", "ratio", "r = 0.8", ("MODEL.VIPA.VEG.RATIO", "0.8")),
        Variant("fusion_none", "fusion", "no fusion, w/ VE", ("MODEL.VIPA.FUSION", "none")),
        Variant("fusion_late", "fusion", "late fusion, w/ VE", ("MODEL.VIPA.FUSION", "late")),
        # The paper's fusion table also has "w/o VE" rows; opt-in (two more runs per seed).
        Variant(
            "fusion_none_kv_language",
            "fusion",
            "no fusion, w/o VE",
            ("MODEL.VIPA.FUSION", "none", "MODEL.VIPA.KV_SOURCE", "language"),
            default=False,
        ),
        Variant(
            "fusion_late_kv_language",
            "fusion",
            "late fusion, w/o VE",
            ("MODEL.VIPA.FUSION", "late", "MODEL.VIPA.KV_SOURCE", "language"),
            default=False,
        ),
    )
)
DEFAULT_VARIANTS = [n for n, v in VARIANTS.items() if v.default]


def check_variants(names: Sequence[str]) -> List[str]:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise BenchmarkError(f"Unknown variant(s) {unknown}; expected some of {list(VARIANTS)}")
    if len(set(names)) != len(names):
        raise BenchmarkError(f"--variants lists a variant twice: {list(names)}")
    return list(names)


def split_label(dataset_name: str) -> str:
    """'refsynth_unc_val' -> 'val', 'refsynth_unc_val/shuffled' -> 'val/shuffled'."""
    shuffled = dataset_name.endswith(SHUFFLED_SUFFIX)
    base = dataset_name[: -len(SHUFFLED_SUFFIX)] if shuffled else dataset_name
    label = BUILTIN_REFERRING[base][2] if base in BUILTIN_REFERRING else base
    return label + SHUFFLED_SUFFIX if shuffled else label


def ensure_data(
    root: str, num_images: int, image_size: int, seed: int, workers: int, log=print
) -> Dict:
    """Generate the synthetic benchmark into ``root`` once; refuse a different one there."""
    stats_path = os.path.join(root, REFSYNTH, SYNTH_STATS)
    wanted = {"num_images": num_images, "seed": seed, "image_size": image_size}
    if os.path.isfile(stats_path):
        with open(stats_path) as f:
            gen = json.load(f)["generator"]
        found = {
            "num_images": gen["num_images"],
            "seed": gen["seed"],
            "image_size": gen["config"]["image_size"],
        }
        if found != wanted:
            raise BenchmarkError(
                f"--data-root {root} holds a synthetic benchmark with {found}, but {wanted} was "
                "asked for; pass another --data-root (or matching --num-images/--synth-image-size)"
            )
        log(f"[accuracy] using the synthetic benchmark in {root} ({num_images} images)")
        return wanted
    log(f"[accuracy] generating {num_images} synthetic images ({image_size} px) into {root} ...")
    write_benchmark(
        root, num_images, seed=seed, cfg=SynthConfig(image_size=image_size), workers=workers
    )
    return wanted


def schedule_opts(cfg, iters: Optional[int], image_size: Optional[int]) -> List[str]:
    """
    Overrides shared by every run: budget, input size, final-only evaluation, one periodic
    checkpoint kept (SOLVER.CHECKPOINT_PERIOD from the config: what a killed run resumes from).
    """
    opts = ["TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_MAX_KEEP", "1"]
    if iters is not None:
        warmup = min(cfg.SOLVER.WARMUP_ITERS, max(1, int(WARMUP_SHARE * iters)))
        opts += ["SOLVER.MAX_ITER", str(iters), "SOLVER.WARMUP_ITERS", str(warmup)]
    if image_size is not None:
        opts += ["INPUT.IMAGE_SIZE", str(image_size)]
    return opts


def _remove_checkpoints(run_dir: str) -> None:
    for name in os.listdir(run_dir):
        if name.endswith(CHECKPOINT_FILES):
            os.remove(os.path.join(run_dir, name))


def run_one(
    run_dir: str,
    config_file: str,
    opts: List[str],
    signature: Dict,
    data_root: str,
    test_sets: Sequence[str],
    keep_checkpoints: bool,
) -> Dict:
    """Train + evaluate one variant/seed (or read its finished result)."""
    result_path = os.path.join(run_dir, RESULT_FILE)
    signature_path = os.path.join(run_dir, SIGNATURE_FILE)
    if os.path.isfile(signature_path):
        with open(signature_path) as f:
            previous = json.load(f)
        if previous != signature:
            diff = sorted(k for k in signature if previous.get(k) != signature[k])
            raise BenchmarkError(
                f"{run_dir} was started with other settings ({', '.join(diff)} differ: "
                f"{[previous.get(k) for k in diff]} vs {[signature[k] for k in diff]}); "
                "use another --output or delete that run folder"
            )
        if os.path.isfile(result_path):
            with open(result_path) as f:
                return {**json.load(f), "skipped": True}
    os.makedirs(run_dir, exist_ok=True)
    save_json(signature_path, signature)
    cmd = (
        [sys.executable, TRAIN_NET, "--config-file", config_file, "--resume"]
        + opts
        + ["OUTPUT_DIR", run_dir]
    )
    env = dict(os.environ, **{DATASETS_ENV: data_root})
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    log_path = os.path.join(run_dir, "train_net_console.log")
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        return {
            "status": "failed",
            "returncode": proc.returncode,
            "log": log_path,
            "log_tail": tail,
            "wall_s": wall,
        }
    rows = read_metrics(run_dir, test_sets)
    result = {
        "status": "done",
        "command": cmd,
        "wall_s": wall,  # this invocation only (a resumed run spent more in total)
        "sec_per_iter_median": iteration_seconds(run_dir),
        "metrics": {split_label(name): metrics for name, (metrics, _) in rows.items()},
        "samples": {split_label(name): n for name, (_, n) in rows.items()},
    }
    missing = [split_label(n) for n in test_sets if split_label(n) not in result["metrics"]]
    if missing:
        return {
            "status": "failed",
            "returncode": 0,
            "log": log_path,
            "log_tail": f"train_net.py exited 0 but wrote no results for {missing}",
            "wall_s": wall,
        }
    save_json(result_path, result)
    if not keep_checkpoints:
        _remove_checkpoints(run_dir)
    return result


def compare(
    runs: Dict,
    a: str,
    b: str,
    split: str = HEADLINE_SPLIT,
    metric: str = HEADLINE_METRIC,
    split_b: Optional[str] = None,
) -> Dict:
    """
    ``a`` minus ``b`` in ``split``/``metric`` (``split_b`` for ``b``, default the same),
    paired by seed, with a verdict. ``a`` beats ``b`` when the mean difference is positive,
    every seed agrees, and the mean exceeds the noise: the std of the paired differences and
    each variant's own std across seeds. One seed gives no spread: only the sign is said.
    """
    per_a = {
        s: r["metrics"][split][metric] for s, r in runs.get(a, {}).items() if split in r["metrics"]
    }
    split_b = split_b or split
    per_b = {
        s: r["metrics"][split_b][metric]
        for s, r in runs.get(b, {}).items()
        if split_b in r["metrics"]
    }
    seeds = sorted(set(per_a) & set(per_b), key=int)
    diffs = [per_a[s] - per_b[s] for s in seeds]
    d = summarize(diffs)
    if split_b != split:
        a, b = f"{a} ({split})", f"{b} ({split_b})"
    out = {
        "a": a,
        "b": b,
        "split": split,
        "metric": metric,
        "seeds": seeds,
        "per_seed": dict(zip(seeds, diffs)),
        "difference": d,
        "a_spread": summarize(per_a[s] for s in seeds),
        "b_spread": summarize(per_b[s] for s in seeds),
    }
    if not diffs:
        out.update(outcome="not measured", verdict=f"{a} vs {b}: not measured")
        return out
    mean = d["mean"]
    if len(diffs) == 1:
        word = "beats" if mean > 0 else "trails"
        out.update(
            outcome="single seed",
            verdict=(
                f"{a} {word} {b} by {abs(mean):.2f} {metric} ({split}) on ONE seed: no spread, "
                "cannot be told from noise (run --seeds 0 1 or more)"
            ),
        )
        return out
    noise = max(d["std"], out["a_spread"]["std"], out["b_spread"]["std"])
    out["noise"] = noise
    where = f"{metric} ({split}, {len(seeds)} seeds; per seed {d['min']:+.2f} .. {d['max']:+.2f})"
    if mean > 0 and min(diffs) > 0 and mean > noise:
        out.update(outcome="beats", verdict=f"{a} beats {b} by {mean:.2f} ± {d['std']:.2f} {where}")
    elif mean < 0 and max(diffs) < 0 and -mean > noise:
        out.update(
            outcome="loses", verdict=f"{a} loses to {b} by {-mean:.2f} ± {d['std']:.2f} {where}"
        )
    else:
        out.update(
            outcome="noise",
            verdict=(
                f"{a} vs {b}: {mean:+.2f} ± {d['std']:.2f} {where}: not distinguishable from noise "
                f"(seed noise {noise:.2f}: largest std of the difference and of either variant)"
            ),
        )
    return out


def aggregate(runs: Dict) -> Dict:
    """Per variant, per split, per metric: mean/std/min/max over seeds (+ the values)."""
    out = OrderedDict()
    for variant, by_seed in runs.items():
        splits = OrderedDict()
        for seed, r in sorted(by_seed.items(), key=lambda kv: int(kv[0])):
            for split, metrics in r["metrics"].items():
                for metric, value in metrics.items():
                    splits.setdefault(split, OrderedDict()).setdefault(metric, {})[seed] = value
        out[variant] = {
            split: {m: {**summarize(vals.values()), "values": vals} for m, vals in metrics.items()}
            for split, metrics in splits.items()
        }
    return out


def run_accuracy(
    config_file: str,
    variants: Sequence[str],
    seeds: Sequence[int],
    iters: Optional[int],
    image_size: Optional[int],
    data_root: str,
    num_images: int,
    synth_image_size: int,
    data_seed: int,
    output_dir: str,
    opts: Sequence[str],
    keep_checkpoints: bool,
    on_update: Callable[[Dict], None],
    log=print,
) -> Dict:
    """Run (or resume) every variant for every seed; ``on_update(section)`` after each run."""
    variants = check_variants(variants)
    config_file = os.path.abspath(config_file)  # train_net.py runs from the repository root
    if not os.path.isfile(config_file):
        raise BenchmarkError(f"--config-file {config_file}: no such file")
    data_root = os.path.abspath(data_root)
    data = ensure_data(
        data_root, num_images, synth_image_size, data_seed, workers=os.cpu_count() or 1, log=log
    )
    base_cfg = get_vipa_cfg(config_file, list(opts))
    shared = schedule_opts(base_cfg, iters, image_size) + list(opts)
    cfg = get_vipa_cfg(config_file, shared)
    test_sets = list(cfg.DATASETS.TEST)
    if not test_sets:
        raise BenchmarkError(
            f"{config_file}: DATASETS.TEST is empty; the accuracy benchmark needs test sets"
        )
    section = {
        "machine": machine_info(),
        "settings": {
            "config_file": os.path.relpath(config_file, REPO),
            "variants": variants,
            "seeds": list(seeds),
            "iters": cfg.SOLVER.MAX_ITER,
            "image_size": cfg.INPUT.IMAGE_SIZE,
            "batch": cfg.SOLVER.IMS_PER_BATCH,
            "base_lr": cfg.SOLVER.BASE_LR,
            "test_sets": test_sets,
            "data": {**data, "root": data_root},
            "shared_opts": shared,
            "variant_opts": {v: list(VARIANTS[v].opts) for v in variants},
            "base": {
                "ratio": cfg.MODEL.VIPA.VEG.RATIO,
                "fusion": cfg.MODEL.VIPA.FUSION,
                "kv_source": cfg.MODEL.VIPA.KV_SOURCE,
            },
            "scored_at": "original image resolution (ReferringEvaluator)",
        },
        "runs": OrderedDict(),
        "failed": [],
    }
    common = {
        "config_file": section["settings"]["config_file"],
        "shared_opts": shared,
        "data": data,
    }
    # Finished runs of other invocations with the same data and schedule belong in the
    # tables too (e.g. a third seed of the headline pair run separately).
    runs = collect_finished(output_dir, common)
    total = len(seeds) * len(variants)
    spent = []
    for i, (seed, variant) in enumerate((s, v) for s in seeds for v in variants):
        # Interleaved by seed: all variants of a seed before the next seed.
        v = VARIANTS[variant]
        run_dir = os.path.join(os.path.abspath(output_dir), "runs", f"seed{seed}", variant)
        run_opts = (
            shared
            + list(v.opts)
            + ["SEED", str(seed), "TEST.SHUFFLED_EXPRESSION_CONTROL", str(v.shuffled_control)]
        )
        signature = {**common, "opts": run_opts, "variant": variant, "seed": seed}
        eta = f", about {(total - i) * sum(spent) / len(spent) / 60:.0f} min left" if spent else ""
        log(f"[accuracy] ({i + 1}/{total}) seed {seed}, {variant}: {run_dir}{eta}")
        result = run_one(
            run_dir, config_file, run_opts, signature, data_root, test_sets, keep_checkpoints
        )
        if result["status"] != "done":
            log(
                f"[accuracy]   FAILED (exit {result['returncode']}), see {result['log']}:\n{result['log_tail'][-800:]}"
            )
            section["failed"].append({"variant": variant, "seed": seed, **result})
        else:
            if not result.get("skipped"):
                spent.append(result["wall_s"])
            val = result["metrics"].get(HEADLINE_SPLIT, {}).get(HEADLINE_METRIC)
            log(
                f"[accuracy]   {'skipped (done before)' if result.get('skipped') else 'done'}: "
                f"{HEADLINE_SPLIT} {HEADLINE_METRIC} {val if val is None else round(val, 2)}"
            )
            runs.setdefault(variant, {})[str(seed)] = result
        section["runs"] = _ordered(runs)
        section["variants"] = aggregate(section["runs"])
        section["headline"] = compare(section["runs"], VIPA, KV_LANGUAGE)
        on_update(section)
    return section


def collect_finished(output_dir: str, common: Dict) -> Dict:
    """{variant: {seed: result}} of the finished runs under ``output_dir`` made with ``common``."""
    runs = {}
    for sig_path in glob.glob(
        os.path.join(os.path.abspath(output_dir), "runs", "seed*", "*", SIGNATURE_FILE)
    ):
        result_path = os.path.join(os.path.dirname(sig_path), RESULT_FILE)
        if not os.path.isfile(result_path):
            continue
        with open(sig_path) as f:
            sig = json.load(f)
        if sig.get("variant") in VARIANTS and all(sig.get(k) == common[k] for k in common):
            with open(result_path) as f:
                runs.setdefault(sig["variant"], {})[str(sig["seed"])] = {
                    **json.load(f),
                    "skipped": True,
                }
    return runs


def _ordered(runs: Dict) -> "OrderedDict":
    """Variants in VARIANTS order, seeds in numeric order."""
    return OrderedDict(
        (name, OrderedDict(sorted(runs[name].items(), key=lambda kv: int(kv[0]))))
        for name in VARIANTS
        if name in runs
    )
