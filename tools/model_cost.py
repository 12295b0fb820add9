#!/usr/bin/env python
"""
Cost and speed of a VIPA config on this CPU: parameters and fvcore multiply-adds per
module (random weights); optionally the mean wall time per module over --time back-to-back
forwards, inference latency per batch (--batches), a training step (--train-batch) and the
real evaluation path of a checkpoint (--eval-weights: test loader, mapper, model, evaluator),
and where each case's time goes (--profile: torch.profiler's costliest ops). Every model is
built as the trainer builds it, with the config's runtime options (layout, compilation).
Those case timings are medians of --repeats calls, wall and this process's CPU time (a
data-loader worker's is not in it); every case (also under each ``--alt "KEY VALUE ..."``)
runs round-robin, one call at a time, so machine noise hits them alike.
MODEL.KEEP_FREED_HOST_MEMORY is process-wide: it is taken from the config and opts, not
from --alt (compare it across two runs).

  python tools/model_cost.py --config-file configs/synthetic/vipa_tiny_cpu.yaml --batches 1 8 --repeats 7
  python tools/model_cost.py --config-file configs/synthetic/vipa_tiny_cpu.yaml --train-batch 8 --profile 3
  python tools/model_cost.py --config-file configs/refcoco/vipa_swin_base_bert_base.yaml \\
      --random-text-encoder bert-base --image-size 480 --output cost.json
"""
import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import inference_on_dataset
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from vipa_d2 import get_vipa_cfg
from vipa_d2.config import add_config_function_option, import_config_functions
from vipa_d2.data import referring_dataset_names, register_refer_splits
from vipa_d2.data.builtin import DATASETS_ENV, builtin_root
from vipa_d2.engine import ReferringTrainer, build_vipa_optimizer, keep_freed_host_memory, load_weights
from vipa_d2.modeling.text_encoder import BUNDLED_MINILM, resolve_text_encoder_path
from vipa_d2.utils.atomic_io import atomic_open
from vipa_d2.utils.checkpoint_file import local_weights_path
from vipa_d2.utils.analysis import HEAD_MODULES, MODULES, count_flops, count_params, dummy_input, time_modules

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    add_config_function_option(p)
    p.add_argument("--image-size", type=int, default=0, help="square input side (default: INPUT.IMAGE_SIZE)")
    p.add_argument("--random-text-encoder", choices=["bert-base"], default=None,
                   help="a text encoder of this shape with random weights (no download)")
    p.add_argument("--time", type=int, default=0, help="time N inference runs per module (0 = skip)")
    p.add_argument("--batches", type=int, nargs="*", default=[], help="inference batch sizes to time")
    p.add_argument("--train-batch", type=int, default=0, help="also time a training step of this batch")
    p.add_argument("--eval-weights", default="", help="time the evaluation path of this checkpoint")
    p.add_argument("--dataset", default="refsynth_unc_val", help="split the evaluation timing reads")
    p.add_argument("--data-root", default=builtin_root(), help="dataset root of --dataset (default: $DETECTRON2_DATASETS, else datasets)")
    p.add_argument("--eval-samples", type=int, default=400, help="first N samples of --dataset")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per case first")
    p.add_argument("--alt", action="append", default=[], help='"KEY VALUE ..." overrides of another case set')
    p.add_argument("--profile", type=int, default=0,
                   help="after timing, profile N more calls per case and list its costliest ops")
    p.add_argument("--profile-top", type=int, default=12, help="ops listed per profiled case")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--output", default="", help="write the results as JSON here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    for alt in [""] + args.alt:  # a config that does not load fails here, in one line
        try:
            cfg = get_vipa_cfg(args.config_file, args.opts + alt.split(), import_config_functions(args.config_function))
            if not alt:  # --dataset may be one of the config's own (as train_net.py registers them)
                register_refer_splits(cfg.DATASETS.REFER_SPLITS)
        except ValueError as e:  # ConfigError; a REFER_SPLITS entry refused
            p.error(str(e))
    # Everything else that would fail only after minutes of timing fails here too.
    counts = {"--repeats": (args.repeats, 1), "--eval-samples": (args.eval_samples, 1), "--warmup": (args.warmup, 0),
              "--time": (args.time, 0), "--train-batch": (args.train_batch, 0), "--profile": (args.profile, 0),
              "--profile-top": (args.profile_top, 1), "--threads": (args.threads, 0), "--image-size": (args.image_size, 0),
              **{"--batches": (b, 1) for b in args.batches}}
    for option, (value, least) in counts.items():
        if value < least:
            p.error(f"{option} {value}: expected at least {least}")
    if args.eval_weights and args.random_text_encoder:  # the checkpoint's own text encoder is the one timed
        p.error("--random-text-encoder: not with --eval-weights, whose checkpoint holds its text encoder")
    if args.eval_weights:
        try:
            local_weights_path(args.eval_weights, key="--eval-weights")
        except FileNotFoundError as e:
            p.error(str(e))
        if args.dataset not in referring_dataset_names():
            p.error(f"--dataset {args.dataset}: not a registered referring dataset (have: {', '.join(referring_dataset_names())})")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        p.error(f"--output {args.output}: its folder does not exist")
    if args.output and os.path.isdir(args.output):  # written at the very end: said now
        p.error(f"--output {args.output}: a folder; expected the name of the JSON file to write")
    return args


def setup_cfg(args, opts, tmpdir):
    cfg = get_vipa_cfg(args.config_file, args.opts + opts, import_config_functions(args.config_function))
    cfg.MODEL.DEVICE = "cpu"  # a CPU cost tool: the timers do not synchronise with a GPU
    cfg.MODEL.TIMM.WEIGHTS = ""  # random backbone; --eval-weights loads the trained one
    if args.eval_weights:  # the text encoder and tokenizer rebuilt from its own files, offline (as the demo does)
        cfg.MODEL.WEIGHTS = args.eval_weights
    if args.random_text_encoder:
        from transformers import AutoTokenizer, BertConfig, BertModel

        path = os.path.join(tmpdir, args.random_text_encoder)
        if not os.path.isdir(path):  # BertConfig() defaults are BERT-base
            BertModel(BertConfig(), add_pooling_layer=False).save_pretrained(path)
            # The text encoder keeps its tokenizer's files (checkpoints carry them): the
            # bundled MiniLM's, BERT-base-uncased's own vocabulary.
            AutoTokenizer.from_pretrained(resolve_text_encoder_path(BUNDLED_MINILM)).save_pretrained(path)
        cfg.MODEL.TEXT_ENCODER.NAME = path
    cfg.INPUT.IMAGE_SIZE = args.image_size or cfg.INPUT.IMAGE_SIZE
    cfg.freeze()
    return cfg


def build_as_trained(cfg):
    """The model as the trainer, evaluator and predictor run it: ``build_model`` leaves the
    runtime options (``MODEL.CHANNELS_LAST``, ``TEST.COMPILE_BACKBONE``) unapplied, and
    the tiny config's NHWC layout changes which parts of a step cost the most."""
    return ReferringTrainer.build_model(cfg)


def interleaved(cases, repeats, warmup):
    """{label: medians of wall and CPU seconds} of ``cases`` ({label: fn}) run round-robin."""
    # Updated between calls, outside the timed spans; shown on a terminal only (not in a saved log).
    with tqdm(total=len(cases) * (warmup + repeats), desc="calls (warm-up and timed)", unit="call",
              file=sys.stderr, disable=None) as bar:
        for fn in list(cases.values()) * warmup:
            fn()
            bar.update()
        samples = {label: [] for label in cases}
        for r in range(repeats):
            labels = list(cases)
            for label in labels[r % len(labels):] + labels[: r % len(labels)]:  # rotated: no case always first
                cpu, wall = time.process_time(), time.perf_counter()
                cases[label]()
                samples[label].append((time.perf_counter() - wall, time.process_time() - cpu))
                bar.update()
    return {label: {"wall_s": statistics.median(w for w, _ in s), "cpu_s": statistics.median(c for _, c in s),
                    "walls": [w for w, _ in s]} for label, s in samples.items()}


def costliest_ops(fn, calls: int, top: int) -> list:
    """The ``top`` ops of ``calls`` calls of ``fn`` by self CPU time (aten ops, and Python-side
    records such as the optimizer's step): name, ms and calls per call of ``fn``, share of the
    profiled time. Self times exclude an op's children, so they add up to the whole."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    ops = list(prof.key_averages())
    total_us = sum(e.self_cpu_time_total for e in ops)
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "ms_per_call": e.self_cpu_time_total / 1e3 / calls,
             "calls_per_call": e.count / calls, "share": e.self_cpu_time_total / total_us} for e in ops[:top]]


def speed_cases(label, cfg, model, batches, train_batch):
    one = dummy_input(cfg, model.text_encoder.model.config.vocab_size)
    # no_grad: what the evaluator and VIPAPredictor use.
    cases = {f"{label} | inference | batch {b}": torch.no_grad()(lambda b=b: model([one] * b)) for b in batches}
    if train_batch:
        size = cfg.INPUT.IMAGE_SIZE
        mask = torch.zeros(size, size, dtype=torch.uint8)
        mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1  # a centred square target
        box = torch.tensor([[size / 4, size / 4, 3 * size / 4, 3 * size / 4]])  # the image's one object
        net = build_as_trained(cfg).train()
        # ... which is in the referent's group (what the object choice trains on), with its
        # area (what the size ranks' area head trains on).
        target = {"gt_mask": mask, "empty": False, "object_boxes": box, "object_in_group": torch.tensor([True]),
                  "object_areas": mask.sum(dtype=torch.float32).reshape(1)}
        optimizer, batch = build_vipa_optimizer(cfg, net), [{**one, **target}] * train_batch

        def step():
            optimizer.zero_grad(set_to_none=True)
            sum(net(batch).values()).backward()
            optimizer.step()

        cases[f"{label} | train | batch {train_batch}"] = step
    return cases


def eval_case(label, cfg, model, dataset, samples, results):
    """The evaluation path on the first ``samples`` records of ``dataset`` (a registered subset)."""
    subset = f"{dataset}__first{samples}"
    if subset not in DatasetCatalog.list():
        records = DatasetCatalog.get(dataset)[:samples]
        DatasetCatalog.register(subset, lambda: records)
        meta = MetadataCatalog.get(dataset).as_dict()
        MetadataCatalog.get(subset).set(**{k: v for k, v in meta.items() if k != "name"})

    def run():
        loader = ReferringTrainer.build_test_loader(cfg, subset)
        with tempfile.TemporaryDirectory() as out:
            evaluator = ReferringTrainer.build_evaluator(cfg, subset, output_folder=out)
            results[f"{label} | evaluation"] = dict(inference_on_dataset(model, loader, evaluator)["refer"])

    return {f"{label} | evaluation": run}


def refuse(message: str) -> int:
    print(f"model_cost.py: error: {message}", file=sys.stderr)
    return 2


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    os.environ[DATASETS_ENV] = os.path.abspath(args.data_root)
    result = {"config_file": args.config_file, "opts": args.opts, "threads": torch.get_num_threads()}
    cases, metrics = {}, {}
    if args.eval_weights:  # said now in one line, not as a traceback after the cost work
        try:
            DatasetCatalog.get(args.dataset)
        except (OSError, ValueError) as e:
            return refuse(f"--dataset {args.dataset} (--data-root {args.data_root}): {e}")
    with tempfile.TemporaryDirectory() as tmpdir:
        for alt in [""] + args.alt:
            cfg = setup_cfg(args, alt.split(), tmpdir)
            try:
                model = build_as_trained(cfg).eval()
            # ConfigError (a text encoder not available offline, keys that do not fit), a
            # checkpoint refused or missing: named in one line.
            except (ValueError, OSError) as e:
                return refuse(f"cannot build --config-file {args.config_file}{' with ' + alt if alt else ''}: {e}")
            if args.eval_weights:
                try:
                    load_weights(model, args.eval_weights, key="--eval-weights")  # weights-only and strict
                except ValueError as e:  # WeightsError, UntrustedCheckpointError
                    return refuse(f"--eval-weights does not load into --config-file "
                                  f"{args.config_file}{' with ' + alt if alt else ''}: {e}")
            label = alt or "config"
            if not alt:  # the cost table and the process settings are the config's own
                result["keep_freed_host_memory"] = cfg.MODEL.KEEP_FREED_HOST_MEMORY and keep_freed_host_memory()
                one = dummy_input(cfg, model.text_encoder.model.config.vocab_size)
                result.update(image_size=cfg.INPUT.IMAGE_SIZE, text_len=cfg.INPUT.MAX_TEXT_LEN,
                              params=dict(count_params(model)))
                flops, result["uncounted_ops"] = count_flops(model, [one])
                result["gmacs"] = {k: v / 1e9 for k, v in flops.items()}
                if args.time:
                    result["time_ms"] = {k: v * 1e3 for k, v in time_modules(model, one, args.time).items()}
            cases.update(speed_cases(label, cfg, model, args.batches, args.train_batch))
            if args.eval_weights:
                cases.update(eval_case(label, cfg, model, args.dataset, args.eval_samples, metrics))
        result["timings"] = interleaved(cases, args.repeats, args.warmup) if cases else {}
        if args.profile:
            result["profile"] = {label: costliest_ops(fn, args.profile, args.profile_top) for label, fn in cases.items()}
    for label, t in result["timings"].items():
        t["cpu_wall_ratio"], t["metrics"] = t["cpu_s"] / t["wall_s"], metrics.get(label)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    params, gmacs, times = result["params"], result["gmacs"], result.get("time_ms", {})
    params["total"] = sum(params.values())
    rows = [m for m in MODULES if m in gmacs or params.get(m)] + ["other", "total"]
    print(f"{args.config_file} at {result['image_size']}px, {result['text_len']} text tokens, "
          f"{result['threads']} threads, peak RSS {result['peak_rss_mib']:.0f} MiB")
    print(tabulate([[m, params.get(m, 0) / 1e6, gmacs.get(m, 0)] + ([times.get(m, 0.0), 100 * times.get(m, 0.0)
                     / times["total"]] if times else []) for m in rows],
                   ["module", "params (M)", "GMACs"] + (["ms", "time %"] if times else []), floatfmt=".2f"))
    if times:
        result["head_time_share"] = sum(times.get(m, 0.0) for m in HEAD_MODULES) / times["total"]
        print(f"{' + '.join(HEAD_MODULES)}: {100 * result['head_time_share']:.1f}% of inference time")
    if result["timings"]:
        print(tabulate([[label, 1e3 * t["wall_s"], 1e3 * t["cpu_s"], t["cpu_wall_ratio"]]
                        for label, t in result["timings"].items()],
                       [f"case (median of {args.repeats})", "wall ms", "CPU ms", "CPU/wall"], floatfmt=".1f"))
    for label, ops in result.get("profile", {}).items():
        print(tabulate([[o["op"], o["ms_per_call"], o["calls_per_call"], 100 * o["share"]] for o in ops],
                       [f"{label}: costliest ops ({args.profile} calls)", "self ms / call", "calls / call", "% of self"],
                       floatfmt=".1f"))
    if args.output:
        with atomic_open(args.output, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", args.output)


if __name__ == "__main__":
    sys.exit(main())
