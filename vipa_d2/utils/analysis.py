"""
Cost of a VIPA model, for the tools (``tools/model_cost.py``): parameters and fvcore
multiply-adds (fvcore's FLOP convention: one multiply-add = one "flop") per top-level
module, and CPU inference time per module.
"""
import time
from collections import defaultdict

import torch
from detectron2.utils.analysis import FlopCountAnalysis

__all__ = ["MODULES", "HEAD_MODULES", "dummy_input", "count_params", "count_flops", "time_modules"]

# Parts of VIPA reported separately, by their short name (others are summed into "other"):
# the meta-architecture's children, and the head's.
MODULES = ("backbone", "text_encoder", "fusion", "veg", "language_proj", "pixel_decoder", "transformer_decoder")
_PATHS = {m: m if m in ("backbone", "text_encoder", "fusion") else f"head.{m}" for m in MODULES}
# The modules whose share of inference time the VIPA head budget is about.
HEAD_MODULES = ("veg", "pixel_decoder", "transformer_decoder")


def sdpa_flop_jit(inputs, outputs):
    """fvcore handle for aten::scaled_dot_product_attention (used by timm Swin and BERT):
    Q K^T and P V multiply-adds, B * H * Lq * Lk * (D + Dv)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


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
        part = next((m for m, path in _PATHS.items() if name.startswith(path + ".")), "other")
        params[part] += p.numel()
    return params


def count_flops(model, inputs):
    flops = FlopCountAnalysis(model, inputs)
    flops.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    by_module = flops.by_module()
    total = flops.total()
    # TracingAdapter wraps the model as "model".
    out = {m: by_module[f"model.{p}"] for m, p in _PATHS.items() if f"model.{p}" in by_module}
    out["other"] = total - sum(out.values())
    out["total"] = total
    return out, dict(flops.unsupported_ops())


def time_modules(model, inputs, runs: int):
    """Mean wall time per forward, total and per reported part (exclusive of nested
    parts: early fusion runs inside the backbone and is subtracted from it)."""
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

    for name, path in _PATHS.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:  # e.g. no fusion, or no VEG in the language baseline
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
