#!/usr/bin/env python
"""
Parameters, multiply-adds (fvcore's FLOP convention: one multiply-add = one "flop") and,
optionally, CPU inference time per VIPA module, for a config and an input size.

Runs on CPU with random weights: MODEL.TIMM.WEIGHTS is forced to "" and, with
``--random-text-encoder bert-base``, the text encoder is built from a generated BERT-base
config.json (transformers' ``BertConfig()`` defaults) so the paper config needs no download.

  python tools/model_cost.py --config-file configs/synthetic/vipa_tiny_cpu.yaml --time 5
  python tools/model_cost.py --config-file configs/refcoco/vipa_swin_base_bert_base.yaml \
      --random-text-encoder bert-base --image-size 480 --output cost.json
"""
import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections import defaultdict

import torch

from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis

from vipa_d2 import get_vipa_cfg

logger = logging.getLogger("vipa_d2.model_cost")

# Top-level children of VIPA reported separately (others are summed into "other").
MODULES = ("backbone", "text_encoder", "fusion", "veg", "language_proj", "pixel_decoder", "transformer_decoder")
# The modules whose share of inference time the VIPA head budget is about.
HEAD_MODULES = ("veg", "pixel_decoder", "transformer_decoder")
RANDOM_TEXT_ENCODERS = ("bert-base",)


def sdpa_flop_jit(inputs, outputs):
    """fvcore handle for aten::scaled_dot_product_attention (used by timm Swin and BERT):
    Q K^T and P V multiply-adds, B * H * Lq * Lk * (D + Dv)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def setup_cfg(args, tmpdir):
    cfg = get_vipa_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.TIMM.WEIGHTS = ""
    if args.random_text_encoder:
        from transformers import BertConfig

        path = os.path.join(tmpdir, args.random_text_encoder)
        os.makedirs(path)
        BertConfig().to_json_file(os.path.join(path, "config.json"))  # defaults = BERT-base
        cfg.MODEL.TEXT_ENCODER.NAME = path
        cfg.MODEL.TEXT_ENCODER.RANDOM_INIT = True
    if args.image_size:
        cfg.INPUT.IMAGE_SIZE = args.image_size
    cfg.freeze()
    return cfg


def dummy_input(cfg, vocab_size: int):
    """One square image and one full-length expression (all MAX_TEXT_LEN tokens valid)."""
    g = torch.Generator().manual_seed(0)
    size = cfg.INPUT.IMAGE_SIZE
    t = cfg.INPUT.MAX_TEXT_LEN
    return {
        "image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
        "input_ids": torch.randint(1000, vocab_size, (t,), generator=g),
        "attention_mask": torch.ones(t, dtype=torch.long),
        "height": size,
        "width": size,
    }


def count_params(model):
    params = defaultdict(int)
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        params[top if top in MODULES else "other"] += p.numel()
    return params


def count_flops(model, inputs):
    flops = FlopCountAnalysis(model, inputs)
    flops.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    by_module = flops.by_module()
    total = flops.total()
    # TracingAdapter wraps the model as "model".
    out = {m: by_module.get(f"model.{m}", 0) for m in MODULES if f"model.{m}" in by_module}
    out["other"] = total - sum(out.values())
    out["total"] = total
    return out, dict(flops.unsupported_ops())


def time_modules(model, inputs, runs: int):
    """Mean wall time per forward, total and per top-level module (exclusive of nested
    top-level modules: early fusion runs inside the backbone and is subtracted from it)."""
    spent = defaultdict(float)
    stack = []
    handles = []

    def pre(_m, _i, name):
        # Only the outermost call of each top-level module's hooked parts is timed.
        stack.append((name, time.perf_counter(), bool(stack) and stack[-1][0] == name))

    def post(_m, _i, _o):
        name, start, inner = stack.pop()
        if inner:
            return
        elapsed = time.perf_counter() - start
        spent[name] += elapsed
        outer = [s for s in stack if not s[2]]
        if outer:  # nested inside another top-level module: not that module's own time
            spent[outer[-1][0]] -= elapsed

    for name in MODULES:
        module = getattr(model, name, None)
        if module is None:
            continue
        # Hook descendants too (depth <= 2): early fusion calls its per-stage modules
        # (fusion.stages.<name>), never ``fusion`` itself.
        parts = [m for n, m in module.named_modules() if n.count(".") <= 1]
        for part in parts:
            handles += [
                part.register_forward_pre_hook(lambda m, i, name=name: pre(m, i, name)),
                part.register_forward_hook(post),
            ]
    with torch.no_grad():
        model([inputs])  # warm-up
        spent.clear()
        start = time.perf_counter()
        for _ in range(runs):
            model([inputs])
        total = time.perf_counter() - start
    for h in handles:
        h.remove()
    times = {k: v / runs for k, v in spent.items()}
    times["other"] = total / runs - sum(times.values())
    times["total"] = total / runs
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--image-size", type=int, default=0, help="square input side (default: INPUT.IMAGE_SIZE)")
    parser.add_argument(
        "--random-text-encoder",
        choices=RANDOM_TEXT_ENCODERS,
        default=None,
        help="build this text encoder from a generated config.json, random weights (no download)",
    )
    parser.add_argument("--time", type=int, default=0, help="also time N CPU inference runs (0 = skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads for timing (0 = default)")
    parser.add_argument("--output", default="", help="write the results as JSON here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmpdir:
        cfg = setup_cfg(args, tmpdir)
        model = build_model(cfg).eval()
    inputs = dummy_input(cfg, model.text_encoder.model.config.vocab_size)
    params = count_params(model)
    flops, unsupported = count_flops(model, [inputs])
    times = time_modules(model, inputs, args.time) if args.time > 0 else {}

    size = cfg.INPUT.IMAGE_SIZE
    print(f"{args.config_file} at {size}x{size}, {cfg.INPUT.MAX_TEXT_LEN} text tokens")
    print(f"{'module':<22}{'params (M)':>12}{'GMACs':>10}" + (f"{'ms':>10}{'time %':>8}" if times else ""))
    rows = [m for m in MODULES if m in flops or params.get(m)] + ["other", "total"]
    params["total"] = sum(v for k, v in params.items() if k != "total")
    for m in rows:
        line = f"{m:<22}{params.get(m, 0) / 1e6:>12.2f}{flops.get(m, 0) / 1e9:>10.2f}"
        if times:
            line += f"{times.get(m, 0.0) * 1e3:>10.1f}{100 * times.get(m, 0.0) / times['total']:>7.1f}%"
        print(line)
    head_share = None
    if times:
        head_share = sum(times.get(m, 0.0) for m in HEAD_MODULES) / times["total"]
        print(f"VEG + pixel decoder + transformer decoder: {100 * head_share:.1f}% of inference time "
              f"({args.time} runs, {torch.get_num_threads()} threads)")
    if unsupported:
        print("ops fvcore does not count:", ", ".join(f"{k} x{v}" for k, v in sorted(unsupported.items())))
    if args.output:
        result = {
            "config_file": args.config_file,
            "image_size": size,
            "text_len": cfg.INPUT.MAX_TEXT_LEN,
            "params": dict(params),
            "gmacs": {k: v / 1e9 for k, v in flops.items()},
            "time_ms": {k: v * 1e3 for k, v in times.items()},
            "head_time_share": head_share,
            "uncounted_ops": unsupported,
        }
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
        print("wrote", args.output)


if __name__ == "__main__":
    sys.exit(main())
