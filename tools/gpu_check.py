#!/usr/bin/env python
"""
GPU readiness in a few minutes, one table out: on a CUDA machine, train the tiny config
with AMP for a few hundred iterations, evaluate it, and time the paper config's inference
at 480x480, batch 1 and 8, fp32 and fp16 autocast. It also profiles a few fp32 training
steps of the tiny config (torch.profiler), with gradient clipping and without: kernel
launches, GPU events and GPU time per step, because on an H200 that step was bound by its
~10,600 kernel launches, not by arithmetic (BENCHMARKS.md, section 3).

    python tools/gpu_check.py [--iters 300] [--data-root datasets] [--text-encoder bert-base-uncased]

The paper config is timed with random weights (speed does not depend on them): Swin-B is
built without fetching, the text encoder is ``--text-encoder`` (BERT-base needs the hub
once or a local copy; ``bundled-minilm`` works offline, and the table says which ran).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from detectron2.engine import HookBase
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from tabulate import tabulate

from vipa_d2 import get_vipa_cfg
from vipa_d2.data.builtin import DATASETS_ENV, builtin_root
from vipa_d2.data.synthetic import finished_benchmark, write_benchmark
from vipa_d2.engine import ReferringTrainer
from vipa_d2.modeling.text_encoder import build_tokenizer, tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "synthetic", "vipa_tiny_cpu.yaml")
PAPER = os.path.join(REPO, "configs", "refcoco", "vipa_swin_base_bert_base.yaml")
PAPER_SIZE = 480
BATCHES = (1, 8)
# Synthetic benchmark written when --data-root has none (the size `make train` uses).
SYNTH_IMAGES = 1000
WARMUP, TIMED = 3, 10
# The training step time is the median over this last share of the iterations: on an H200
# the first ~20 AMP steps took over a second each (autotuning, loss-scale search), the
# later ones ~0.28 s, so a mean over the whole run says little about the steady speed.
STEADY_SHARE = 0.5
NO_CUDA_EXIT = 2
# The profiled fp32 steps come after these many untimed ones (first steps: cuDNN autotuning,
# allocator growth); their own median time is the unprofiled step time.
PROFILE_WARMUP, PROFILE_STEPS = 12, 5
# The first steps of the warm-up are slow for the reasons above: left out of its median.
PROFILE_SKIP = 4
# CUDA runtime calls that each launch one kernel (CPU-side profiler events).
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300, help="training iterations of the tiny config")
    parser.add_argument("--data-root", default=builtin_root(),
                        help="where refsynth is, written if missing (default: $DETECTRON2_DATASETS, else datasets)")
    parser.add_argument("--text-encoder", default="bert-base-uncased", help="paper config's MODEL.TEXT_ENCODER.NAME")
    parser.add_argument("--output", default=None, help="training output folder (default: a temporary one)")
    return parser


def tiny_cfg(output_dir, iters, opts):
    """The tiny config on CUDA for ``iters`` iterations, one checkpoint (at the end), plus ``opts``."""
    return get_vipa_cfg(TINY, [
        "MODEL.DEVICE", "cuda", "SOLVER.MAX_ITER", iters, "SOLVER.CHECKPOINT_PERIOD", iters,
        "DATALOADER.NUM_WORKERS", 4, "OUTPUT_DIR", output_dir, *opts,
    ])


def tiny_train_cfg(args, output_dir):
    return tiny_cfg(output_dir, args.iters, ["SOLVER.AMP.ENABLED", True, "DATASETS.TEST", ("refsynth_unc_val",)])


def profile_cfg(output_dir, clip):
    """fp32 steps of the tiny config, no evaluation; ``clip``: SOLVER.CLIP_GRADIENTS.ENABLED."""
    return tiny_cfg(output_dir, PROFILE_WARMUP + PROFILE_STEPS,
                    ["SOLVER.CLIP_GRADIENTS.ENABLED", clip, "DATASETS.TEST", ()])


def paper_cfg(args):
    return get_vipa_cfg(PAPER, [
        "MODEL.DEVICE", "cuda", "MODEL.TIMM.WEIGHTS", "", "MODEL.TEXT_ENCODER.NAME", args.text_encoder,
        "INPUT.IMAGE_SIZE", PAPER_SIZE,
    ])


def train_tiny(args, have_data: bool):
    if not have_data:  # none yet, or a generation stopped midway: made again
        write_benchmark(args.data_root, SYNTH_IMAGES, seed=0)
    os.environ[DATASETS_ENV] = args.data_root  # Detectron2's own dataset-root variable
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ReferringTrainer(tiny_train_cfg(args, args.output or tmp))
        trainer.resume_or_load(resume=False)
        start = time.perf_counter()
        results = trainer.train()
        seconds = time.perf_counter() - start
    return seconds, steady_step_seconds(trainer.storage, args.iters), results["refsynth_unc_val"]["refer"]["oIoU"]


def steady_step_seconds(storage, iters: int) -> float:
    """Median training-step time (IterationTimer's "time") over the last STEADY_SHARE of ``iters``."""
    return storage.history("time").median(max(1, int(iters * STEADY_SHARE)))


class StepProfiler(HookBase):
    """torch.profiler over training iterations [start, start + steps); ``summary`` after them."""

    def __init__(self, start: int, steps: int):
        self.start, self.steps = start, steps
        self.summary = None
        self._profile = None

    def before_step(self):
        if self.trainer.iter == self.start:
            cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            self._profile = profile(activities=[ProfilerActivity.CPU] + cuda)
            self._profile.__enter__()

    def after_step(self):
        if self.trainer.iter == self.start + self.steps - 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._profile.__exit__(None, None, None)
            self.summary = summarize_profile(self._profile.key_averages(), self.steps)


def summarize_profile(averages, steps: int) -> dict:
    """Per step: kernel launches (runtime calls), device-side events (kernels and copies) and
    GPU time (the summed self device time, in ms)."""
    launches = sum(e.count for e in averages if e.key in LAUNCH_CALLS)
    device = [e for e in averages if e.device_type == DeviceType.CUDA]
    device_events = sum(e.count for e in device)
    # Device rows only: a CPU op's row also carries the time of the kernels it launched (so
    # torch's own table sums CUDA rows alone). torch >= 2.4 names it self_device_time_total,
    # 2.3 (this project's CPU lock) self_cuda_time_total.
    device_us = sum(e.self_device_time_total if hasattr(e, "self_device_time_total") else e.self_cuda_time_total
                    for e in device)
    return {"launches": launches / steps, "device_events": device_events / steps, "kernel_ms": device_us / 1000 / steps}


def profile_tiny(clip: bool) -> dict:
    """Kernel launches, GPU kernel time and the unprofiled step time of fp32 tiny-config steps."""
    profiler = StepProfiler(PROFILE_WARMUP, PROFILE_STEPS)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ReferringTrainer(profile_cfg(tmp, clip))
        trainer.register_hooks([profiler])
        trainer.resume_or_load(resume=False)
        trainer.train()
    times = [t for t, it in trainer.storage.history("time").values() if PROFILE_SKIP <= it < PROFILE_WARMUP]
    return {**profiler.summary, "step_s": statistics.median(times)}


@torch.no_grad()
def time_paper(args, batch, amp):
    cfg = paper_cfg(args)
    model = ReferringTrainer.build_model(cfg).eval()
    tokens = tokenize(build_tokenizer(cfg), ["the man in the black suit on the right"], cfg.INPUT.MAX_TEXT_LEN)
    image = torch.randint(0, 256, (3, PAPER_SIZE, PAPER_SIZE), dtype=torch.uint8)
    sample = {"image": image, "height": PAPER_SIZE, "width": PAPER_SIZE,
              "input_ids": tokens["input_ids"][0], "attention_mask": tokens["attention_mask"][0]}
    inputs = [sample] * batch
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        for i in range(WARMUP + TIMED):
            if i == WARMUP:
                torch.cuda.synchronize()
                start = time.perf_counter()
            model(inputs)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / TIMED


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error(f"--iters must be >= 1, got {args.iters}")
    held = sorted(n for n in os.listdir(args.output) if n == "last_checkpoint" or n.endswith(".pth")) \
        if args.output and os.path.isdir(args.output) else []
    if held:  # e.g. make train's folder: its 30-minute model would become a 300-iteration AMP one
        parser.error(f"--output {args.output} holds a run's checkpoints ({', '.join(held)}), which the AMP training "
                     "would write over; give a new folder")
    try:  # an unreadable stats file is the user's to delete: say so before any GPU work
        have_data = finished_benchmark(args.data_root) is not None
    except ValueError as e:
        parser.error(str(e))
    if not torch.cuda.is_available():
        print(f"gpu_check.py: no CUDA device (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda or 'none'}): nothing to check on this machine.", file=sys.stderr)
        return NO_CUDA_EXIT
    try:  # the hub's BERT-base needs network or a local copy: said now, not after the GPU work
        build_tokenizer(paper_cfg(args))
    except (OSError, ValueError) as e:
        parser.error(f"--text-encoder {args.text_encoder}: cannot load its tokenizer ({' '.join(str(e).split())[:300]}); "
                     "without the hub or a local copy, use --text-encoder bundled-minilm")
    seconds, step, oiou = train_tiny(args, have_data)
    rows = [["tiny config, AMP train + eval", f"{args.iters} iterations",
             f"{seconds:.0f} s in all, {step:.3f} s/iter (median, last {STEADY_SHARE:.0%}), val oIoU {oiou:.2f}"]]
    for clip in (True, False):
        cost = profile_tiny(clip)
        rows.append([f"tiny config, fp32 step, gradient clipping {'on' if clip else 'off'}",
                     f"profiler, {PROFILE_STEPS} steps after {PROFILE_WARMUP}",
                     f"{cost['launches']:.0f} kernel launches/step, {cost['device_events']:.0f} GPU events/step, "
                     f"{cost['kernel_ms']:.1f} ms GPU time/step, "
                     f"{cost['step_s']:.3f} s/step unprofiled (median, steps {PROFILE_SKIP}-{PROFILE_WARMUP - 1})"])
    for amp in (False, True):
        for batch in BATCHES:
            per_batch = time_paper(args, batch, amp)
            rows.append([f"paper config ({args.text_encoder}), {'fp16' if amp else 'fp32'}",
                         f"{PAPER_SIZE}x{PAPER_SIZE}, batch {batch}",
                         f"{per_batch * 1000:.1f} ms/batch, {batch / per_batch:.1f} img/s"])
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(tabulate(rows, headers=["check", "setting", "result"], tablefmt="pipe"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
