#!/usr/bin/env python
"""
VIPA benchmark: speed & cost on this CPU, accuracy & ablations on the synthetic data.
Writes <output>/benchmark.json (every number) and <output>/benchmark.md (the tables of
BENCHMARKS.md, rendered from the JSON) and prints the tables.

  python tools/benchmark.py all --quick                    # smoke run of everything (~2 min)
  python tools/benchmark.py speed --output output/benchmark
  python tools/benchmark.py accuracy --output output/benchmark --seeds 0 1
  python tools/benchmark.py evaluation --output output/benchmark  # after 'make train'
  python tools/benchmark.py report --output output/benchmark   # re-render from the JSON

speed: tiny config at 320 px and paper config (Swin-B + BERT-base, random weights) at
  480 px; batch 1 and 8 latency / images/s (median, warm-up excluded, CPU/wall ratio),
  peak RSS, training iterations/s (tiny, batch 8), params and multiply-adds per module,
  achieved multiply-add rate vs a fp32 matmul probe run between the model calls, share of
  time per module; inference variants (no_grad; channels_last with and without the second
  pass's Conv+BN folding and fused attention; inference_mode on request) interleaved.
accuracy: every variant (VIPA, language K/V, step 1/2 only, global/local cues only,
  r in {0.1, 0.3, 0.8}, fusion none/late/early; shuffled-expression control of VIPA)
  trained by its own train_net.py process with the same data, schedule and budget, all
  variants of seed 0 before seed 1; finished runs are skipped when re-invoked, interrupted
  ones resume from their last checkpoint. Reports oIoU, mIoU, Prec@0.5, Prec@0.7 per split,
  mean ± std over seeds, and whether VIPA beats language K/V beyond the seed spread.
evaluation: the real evaluation path (loader, mapper, model, evaluator) of a trained
  checkpoint before/after the optimisation passes (text padding trimmed, channels-last
  layout, batched evaluation; Conv+BN folding, fused attention), switched on one at a time
  and interleaved.
Speed, evaluation and accuracy can run at different times into the same --output: each updates its
own section of benchmark.json. Other processes on the machine distort speed numbers:
run it on a quiet machine (the JSON records the load average).
"""

import argparse
import logging
import os
import sys

from bench import accuracy as acc
from bench import evaluation, report, speed
from bench.common import BENCHMARK_JSON, BENCHMARK_MD, BenchmarkError, load_benchmark, save_json

# Defaults of the full benchmark and of --quick (a smoke run, numbers meaningless).
# None = take it from the config file.
FULL = {
    "output": "output/benchmark",
    "seeds": [0, 1],
    "variants": acc.DEFAULT_VARIANTS,
    "iters": None,
    "image_size": None,
    "num_images": 1500,
    "synth_image_size": 256,
    "speed_configs": ["tiny", "paper"],
    "tiny_size": 320,
    "paper_size": 480,
    "modes": [
        "no_grad",
        "channels_last_first_pass",
        "channels_last_unfolded",
        "channels_last_unfused",
        "channels_last",
        "channels_last_compiled",
    ],
    "paper_modes": [speed.BASELINE_MODE],
    "batches": [1, 8],
    "train_batch": 8,
    "repeats": 7,
    "warmup": 2,
    "share_runs": 3,
    "probe_size": 1024,
    "probe_calls": 5,
}
QUICK = {
    **FULL,
    "output": "output/benchmark_quick",
    "seeds": [0],
    "variants": [acc.VIPA, acc.KV_LANGUAGE],
    "iters": 3,
    "image_size": 96,
    "num_images": 10,
    "synth_image_size": 96,
    "tiny_size": 96,
    "paper_size": 64,
    "modes": ["no_grad", "channels_last"],
    "batches": [1, 2],
    "train_batch": 2,
    "repeats": 2,
    "warmup": 1,
    "share_runs": 1,
    "probe_size": 256,
    "probe_calls": 3,
}

# --quick also trains on small batches without data-loader worker processes.
QUICK_OPTS = ["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"]


def _common(p):
    p.add_argument(
        "--output",
        default=None,
        help=f"folder of benchmark.json / benchmark.md "
        f"(default {FULL['output']}, with --quick {QUICK['output']})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny data, 3 iterations, 2 variants, "
        "1 seed, small images, 2 timing repeats (explicit options still win)",
    )


def _accuracy_args(p):
    g = p.add_argument_group("accuracy")
    g.add_argument(
        "--config-file", default=acc.DEFAULT_CONFIG, help="training config (default: tiny CPU)"
    )
    g.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help=f"subset, in this order (default: {' '.join(acc.DEFAULT_VARIANTS)}; "
        f"also: {' '.join(n for n in acc.VARIANTS if n not in acc.DEFAULT_VARIANTS)})",
    )
    g.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="training seeds (default: 0 1)"
    )
    g.add_argument(
        "--iters", type=int, default=None, help="SOLVER.MAX_ITER of every run (default: config)"
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="INPUT.IMAGE_SIZE for training/eval (default: config)",
    )
    g.add_argument(
        "--num-images",
        type=int,
        default=None,
        help=f"synthetic images, all splits (default {FULL['num_images']})",
    )
    g.add_argument(
        "--synth-image-size",
        type=int,
        default=None,
        help=f"long side of the generated images (default {FULL['synth_image_size']})",
    )
    g.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="seed of the synthetic data, same for every run (default 0)",
    )
    g.add_argument(
        "--data-root",
        default=None,
        help="synthetic data root, generated once (default: <output>/datasets)",
    )
    g.add_argument(
        "--keep-checkpoints", action="store_true", help="keep each finished run's .pth files"
    )
    g.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... for every run"
    )


def _speed_args(p):
    g = p.add_argument_group("speed")
    g.add_argument(
        "--speed-configs",
        nargs="+",
        choices=sorted(speed.SPEED_CONFIGS),
        default=None,
        help="configs to measure (default: tiny paper)",
    )
    g.add_argument("--tiny-size", type=int, default=None, help=f"default {FULL['tiny_size']}")
    g.add_argument("--paper-size", type=int, default=None, help=f"default {FULL['paper_size']}")
    g.add_argument(
        "--modes",
        nargs="+",
        choices=sorted(speed.INFERENCE_MODES),
        default=None,
        help=f"inference variants of the tiny config, interleaved (default: {' '.join(FULL['modes'])})",
    )
    g.add_argument(
        "--paper-modes",
        nargs="+",
        choices=sorted(speed.INFERENCE_MODES),
        default=None,
        help=f"inference variants of the paper config (default: {speed.BASELINE_MODE})",
    )
    g.add_argument(
        "--batches", nargs="+", type=int, default=None, help="inference batch sizes (default: 1 8)"
    )
    g.add_argument(
        "--train-batch",
        type=int,
        default=None,
        help="tiny training-step batch (default 8; 0 = skip)",
    )
    g.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 7)")
    g.add_argument(
        "--warmup", type=int, default=None, help="untimed calls per case first (default 2)"
    )
    g.add_argument(
        "--share-runs", type=int, default=None, help="runs of the per-module timing (default 3)"
    )
    g.add_argument("--probe-size", type=int, default=None, help="matmul probe side (default 1024)")
    g.add_argument("--probe-calls", type=int, default=None, help="matmuls per probe (default 5)")
    g.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads for speed (default 2, what the targets assume; 0 = torch's default)",
    )


def _evaluation_args(p):
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--eval-config", default=acc.DEFAULT_CONFIG, help="config of the checkpoint (default: tiny CPU)"
    )
    g.add_argument(
        "--weights",
        default=os.path.join(acc.REPO, "output", "vipa_tiny_cpu", "model_final.pth"),
        help="trained checkpoint (default: the one 'make train' writes)",
    )
    g.add_argument("--dataset", default="refsynth_unc_val", help="split to evaluate")
    g.add_argument(
        "--eval-data-root",
        default=os.path.join(acc.REPO, "datasets"),
        help="$DETECTRON2_DATASETS of --dataset (default: datasets/, what 'make train' writes)",
    )
    g.add_argument("--eval-samples", type=int, default=400, help="first N samples of the split")
    g.add_argument("--eval-repeats", type=int, default=3, help="timed evaluations per step")
    g.add_argument("--eval-threads", type=int, default=2, help="torch threads (0 = torch's default)")
    g.add_argument("eval_opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="task", required=True)
    for name, adders, help_ in (
        ("accuracy", (_accuracy_args,), "train + evaluate every variant (resumable)"),
        ("speed", (_speed_args,), "latency, throughput, memory, cost, module shares"),
        ("all", (_speed_args, _accuracy_args), "speed, then accuracy"),
        ("evaluation", (_evaluation_args,), "evaluation speed before/after the optimisation pass"),
        ("report", (), "re-render benchmark.md and the targets from benchmark.json"),
    ):
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p)
        for add in adders:
            add(p)
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _write(data, output):
    data["targets"] = report.evaluate_targets(data)
    if "accuracy" in data:
        data["claims"] = report.claim_readings(data["accuracy"])
    save_json(os.path.join(output, BENCHMARK_JSON), data)
    with open(os.path.join(output, BENCHMARK_MD), "w") as f:
        f.write(report.render_markdown(data))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _run(args)
    except BenchmarkError as e:  # bad settings / mismatched earlier results: say what, no traceback
        print(f"benchmark.py: error: {e}", file=sys.stderr)
        return 2


def _overrides(raw) -> list:
    """Trailing KEY VALUE config overrides (an optional "--" before them is dropped)."""
    opts = [o for o in raw if o != "--"]
    if len(opts) % 2:
        raise BenchmarkError(f"Config overrides must be KEY VALUE pairs, got {opts}")
    return opts


def _run(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    data = load_benchmark(output)
    if args.task == "report" and not any(k in data for k in report.SECTIONS):
        raise BenchmarkError(
            f"No measurements in {output}/{BENCHMARK_JSON}; run 'speed', 'evaluation' or "
            "'accuracy' first"
        )
    failed = 0

    if args.task in ("speed", "all"):
        sizes = {"tiny": args.tiny_size, "paper": args.paper_size}
        modes = {"tiny": args.modes, "paper": args.paper_modes}
        data["speed"] = speed.run_speed(
            {name: sizes[name] for name in args.speed_configs},
            modes,
            args.batches,
            args.train_batch,
            args.repeats,
            args.warmup,
            args.share_runs,
            args.threads,
            args.probe_size,
            args.probe_calls,
        )
        _write(data, output)

    if args.task == "evaluation":
        opts = _overrides(args.eval_opts)
        data["evaluation"] = evaluation.run_evaluation(
            os.path.abspath(args.eval_config),
            os.path.abspath(args.weights),
            args.dataset,
            args.eval_data_root,
            args.eval_samples,
            args.eval_repeats,
            args.eval_threads,
            opts,
        )
        _write(data, output)

    if args.task in ("accuracy", "all"):
        opts = (QUICK_OPTS if args.quick else []) + _overrides(args.opts)

        def on_update(section):
            data["accuracy"] = section
            _write(data, output)

        section = acc.run_accuracy(
            args.config_file,
            args.variants,
            args.seeds,
            args.iters,
            args.image_size,
            args.data_root or os.path.join(output, "datasets"),
            args.num_images,
            args.synth_image_size,
            args.data_seed,
            output,
            opts,
            args.keep_checkpoints,
            on_update,
        )
        failed = len(section["failed"])

    _write(data, output)
    print(report.render_markdown(data))
    print(f"wrote {os.path.join(output, BENCHMARK_JSON)} and {os.path.join(output, BENCHMARK_MD)}")
    if failed:
        print(f"{failed} run(s) failed; re-run the same command to retry them", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
