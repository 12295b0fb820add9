#!/usr/bin/env python
"""
The main job (``make train``): synthetic data -> train the tiny CPU VIPA -> evaluate ->
example visualisations.

    python tools/main_job.py --data-root datasets --output output/vipa_tiny_cpu

1. generates the synthetic benchmark under ``--data-root`` unless it is already there;
2. trains ``--config-file`` with ``train_net.py`` (``--resume``: a killed job restarted
   continues from its last checkpoint; a finished one is only re-evaluated);
3. evaluates ``DATASETS.TEST`` with ``train_net.py --eval-only``, plus the
   shuffled-expression control (expressions permuted across samples);
4. writes overlays for a few val images with ``demo/demo.py``;
5. prints the metric table, the per-expression-type table and the retrieval report (when
   the data / model provide them), the timings and where everything is.

Extra ``KEY VALUE`` pairs at the end override the config (as for train_net.py).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import OrderedDict

from tabulate import tabulate

from vipa_d2 import ConfigError, get_vipa_cfg
from vipa_d2.data.builtin import DATASETS_ENV, builtin_root
from vipa_d2.data.refer import INSTANCES_FILE, refs_file_name
from vipa_d2.data.safe_pickle import load_plain_pickle
from vipa_d2.data.synthetic import (
    GREFSYNTH,
    REFSYNTH,
    SPLITS,
    SynthConfig,
    benchmark_settings,
    finished_benchmark,
    requested_settings,
    settings_differences,
    write_benchmark,
)
from vipa_d2.engine import usable_cores
from vipa_d2.evaluation import PRECISION_THRESHOLDS
from vipa_d2.evaluation.breakdown import format_sections
from vipa_d2.utils.runs import (
    RunFolderError,
    check_run_folder,
    flat_config,
    holding_run_folder,
    iteration_seconds,
    read_results,
    run_train_net,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "synthetic", "vipa_tiny_cpu.yaml")
TRAIN_NET = os.path.join(REPO, "train_net.py")
METRIC_COLUMNS = ["oIoU", "mIoU"] + [f"Prec@{t}" for t in PRECISION_THRESHOLDS]
VIS_SPLIT = "val"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=builtin_root(), help="dataset root (default: $DETECTRON2_DATASETS, else datasets)")
    parser.add_argument("--output", default="output/vipa_tiny_cpu", help="OUTPUT_DIR of the run")
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help="training config")
    parser.add_argument("--num-images", type=int, default=1000, help="synthetic images over all splits")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes (gloo on CPU)")
    parser.add_argument("--vis-images", type=int, default=3, help="val images to visualise (0: none)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.num_images < len(SPLITS):
        parser.error(f"--num-images {args.num_images}: need at least {len(SPLITS)} (one image per split)")
    if args.vis_images < 0:  # said now, not after training and evaluation
        parser.error(f"--vis-images {args.vis_images}: expected 0 (no pictures) or more")
    return args


def ensure_synthetic_data(root: str, num_images: int, seed: int) -> float:
    """Generate refsynth/grefsynth under ``root`` unless a finished copy exists; seconds spent."""
    try:
        generator = finished_benchmark(root)
    except ValueError as e:
        sys.exit(f"[main_job] {e}")
    regenerate = f"delete {root}/{REFSYNTH} and {root}/{GREFSYNTH} to regenerate"
    if generator is not None:
        # Data of another seed, size or generator would be trained on and reported silently
        # under the asked-for settings.
        differ = settings_differences(benchmark_settings(generator), requested_settings(num_images, seed),
                                      ("there", "asked"))
        if differ:
            sys.exit(f"[main_job] {root} holds a synthetic benchmark made with other settings ({'; '.join(differ)}): "
                     f"give --num-images / --seed of that benchmark, another --data-root, or {regenerate}")
        print(f"[main_job] synthetic benchmark found in {root} ({num_images} images, seed {seed}); {regenerate}")
        return 0.0
    print(f"[main_job] generating the synthetic benchmark: {num_images} images -> {root}")
    start = time.perf_counter()
    write_benchmark(root, num_images, seed=seed, cfg=SynthConfig(), workers=usable_cores())
    return time.perf_counter() - start


# Keys main_job sets per step: a run folder's config.yaml differs from the config in them only.
STEP_KEYS = ("OUTPUT_DIR", "DATASETS.TEST", "MODEL.WEIGHTS", "TEST.SHUFFLED_EXPRESSION_CONTROL")


def train_net_step(args_list, log_name: str, output: str, lock: int) -> float:
    """train_net.py with ``args_list``, console output in ``output/log_name``, holding the
    run folder's ``lock``; seconds taken."""
    try:
        return run_train_net(TRAIN_NET, args_list, os.path.join(output, log_name), os.environ,
                             lambda line: print("[main_job]", line, flush=True), pass_fds=(lock,))
    except subprocess.CalledProcessError as e:
        sys.exit(f"[main_job] train_net.py failed (exit {e.returncode}); {e.output}")


def start_iteration(output: str) -> int:
    """The iteration a --resume of ``output`` starts from: the one after its last checkpoint's
    (Detectron2 names periodic checkpoints by their last iteration; model_final is MAX_ITER)."""
    try:
        with open(os.path.join(output, "last_checkpoint")) as f:
            name = f.read().strip()
    except OSError:
        return 0
    stem = os.path.splitext(name)[0].rsplit("_", 1)[-1]
    return int(stem) + 1 if stem.isdigit() else -1  # -1: model_final, a finished run


def format_table(results) -> str:
    """The metric table of :func:`read_results`' files, one row per dataset."""
    rows = [[name, len(p["samples"])] + [p["metrics"][c] for c in METRIC_COLUMNS] for name, p in results.items()]
    return tabulate(rows, ["dataset", "samples"] + METRIC_COLUMNS, tablefmt="github", floatfmt=".2f")


def visualise(root: str, cfg_file: str, weights: str, opts, out_dir: str, num_images: int):
    """Prediction beside target for the first ``num_images`` val images (demo.py --manifest)."""
    refs_path = os.path.join(root, REFSYNTH, refs_file_name("unc", False))
    refs = [r for r in load_plain_pickle(refs_path) if r["split"] == VIS_SPLIT]
    with open(os.path.join(root, REFSYNTH, INSTANCES_FILE)) as f:
        instances = json.load(f)
    files = {img["id"]: img["file_name"] for img in instances["images"]}
    segmentations = {ann["id"]: ann["segmentation"] for ann in instances["annotations"]}
    by_image = OrderedDict()
    for ref in refs:
        by_image.setdefault(ref["image_id"], []).append((ref["sentences"][0]["raw"], segmentations[ref["ann_id"]]))
    manifest = [
        {
            "image": os.path.join(root, REFSYNTH, "images", files[image_id]),
            "expressions": [text for text, _ in pairs[:3]],
            "targets": [segm for _, segm in pairs[:3]],
        }
        for image_id, pairs in list(by_image.items())[:num_images]
    ]
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, "manifest.json")
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    cmd = [sys.executable, os.path.join(REPO, "demo", "demo.py"), "--config-file", cfg_file,
           "--manifest", manifest_path, "--output", out_dir, "--show-relevance",
           "--opts", *opts, "MODEL.WEIGHTS", weights]
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
    if done.returncode:  # demo.py's own error line is on stderr, just above
        sys.exit(f"[main_job] demo.py failed (exit {done.returncode}): {' '.join(cmd)}")


def main(argv=None):
    args = parse_args(argv)
    root, output = os.path.abspath(args.data_root), os.path.abspath(args.output)
    # Read here from the working directory, and by train_net.py and the demo, run from the
    # repository: the same file for all (another checkout's copy was trained instead).
    args.config_file = os.path.abspath(args.config_file)
    try:
        cfg = get_vipa_cfg(args.config_file, args.opts)
        # A folder holding another config's run: --resume would go on from (or only
        # re-evaluate) its weights and report them under this config.
        check_run_folder(output, flat_config(cfg), ignored=STEP_KEYS)
        with holding_run_folder(output) as lock:
            run(args, cfg, root, output, lock)
    except (ConfigError, RunFolderError) as e:
        sys.exit(f"[main_job] {e}")
    except OSError as e:  # a full or read-only disk: the file and the reason, in one line
        sys.exit(f"[main_job] {e.filename}: {e.strerror}" if e.filename else f"[main_job] {e}")


def run(args, cfg, root: str, output: str, lock: int) -> None:
    # train_net.py, its ranks and data-loader workers find the built-in datasets here.
    os.environ[DATASETS_ENV] = root
    total_start = time.perf_counter()

    data_s = ensure_synthetic_data(root, args.num_images, args.seed)

    common = ["--config-file", args.config_file, "--num-gpus", str(args.num_gpus), "--dist-url", "auto"]
    first = start_iteration(output)
    # Evaluation is a separate step below (timed on its own), so training evaluates nothing.
    # Each step's own keys after the overrides: an override (e.g. MODEL.WEIGHTS, to start from
    # a checkpoint) must not replace what the step is about (the weights it evaluates).
    train_s = train_net_step(common + ["--resume"] + args.opts + ["OUTPUT_DIR", output, "DATASETS.TEST", "()"],
                             "train_console.log", output, lock)
    trained = 0 if first < 0 else max(0, cfg.SOLVER.MAX_ITER - first)
    weights = os.path.join(output, "model_final.pth")
    eval_opts = ["OUTPUT_DIR", output, "MODEL.WEIGHTS", weights, "TEST.SHUFFLED_EXPRESSION_CONTROL", "True"]
    # Only this evaluation's files are read back below (a control left by an earlier run is not).
    shutil.rmtree(os.path.join(output, "inference"), ignore_errors=True)
    eval_s = train_net_step(common + ["--eval-only"] + args.opts + eval_opts, "eval_console.log", output, lock)

    vis_dir, vis_start = os.path.join(output, "visualizations"), time.perf_counter()
    if args.vis_images:
        visualise(root, args.config_file, weights, args.opts, vis_dir, args.vis_images)
    vis_s = time.perf_counter() - vis_start

    results, it_s = read_results(output, cfg.DATASETS.TEST), iteration_seconds(output)
    print("\nVIPA tiny CPU: referring segmentation, scored at the original image resolution")
    print(format_table(results))
    breakdowns = format_sections(results)
    if breakdowns:
        print("\n" + breakdowns)
    resumed = "" if trained == cfg.SOLVER.MAX_ITER else f" of the model's {cfg.SOLVER.MAX_ITER}"
    print(f"\nTimings: data {data_s:.0f} s, training {train_s:.0f} s "
          f"({trained} iterations{resumed} in this run, {it_s if it_s is None else round(it_s, 3)} s/iter median), "
          f"evaluation {eval_s:.0f} s, visualisation {vis_s:.0f} s, total {time.perf_counter() - total_start:.0f} s")
    print(f"Checkpoint:      {weights}")
    print(f"Metrics:         {os.path.join(output, 'inference')} (per-sample results, "
          f"shuffled control in inference/shuffled), training curves in {output}/metrics.json")
    print(f"Visualisations:  {vis_dir if args.vis_images else 'none (--vis-images 0)'}")
    print(f"Logs:            {output}/log.txt, {output}/train_console.log, {output}/eval_console.log")


if __name__ == "__main__":
    main()
