"""
Speed and cost of VIPA on this CPU: inference latency / throughput (batch 1 and 8),
training iterations/s, peak RSS, multiply-adds and parameters per module, achieved
multiply-add rate against a matmul probe measured in the same run, share of inference
time per module.

Every measured case of a config (inference modes x batch sizes, the training step) runs
round-robin, one call at a time, with a matmul probe after each call: machine noise
(other processes, frequency changes) hits all cases and the probe alike, so their ratios
stay meaningful even on a busy machine.
"""

import argparse
import copy
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from detectron2.modeling import build_model

import model_cost  # tools/model_cost.py: params, fvcore multiply-adds, per-module timing hooks
from vipa_d2.engine import build_vipa_optimizer
from vipa_d2.modeling.attention import set_fused_attention
from vipa_d2.modeling.backbone.conv_bn_fold import set_conv_bn_folding

from .common import BenchmarkError, PeakRSS, machine_info, summarize

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class SpeedConfig:
    config_file: str
    label: str
    # Text encoder built from a generated config.json with random weights (model_cost).
    random_text_encoder: Optional[str]
    # Heavy configs skip the training step and time module shares at the smallest batch only.
    heavy: bool


SPEED_CONFIGS = {
    "tiny": SpeedConfig(
        os.path.join(REPO, "configs", "synthetic", "vipa_tiny_cpu.yaml"),
        "tiny: EfficientNet-Lite0 + MiniLM-L6",
        None,
        heavy=False,
    ),
    "paper": SpeedConfig(
        os.path.join(REPO, "configs", "refcoco", "vipa_swin_base_bert_base.yaml"),
        "paper: Swin-B + BERT-base (random weights)",
        "bert-base",
        heavy=True,
    ),
}


def _no_grad(model):
    return lambda batch: _call(model, batch, torch.no_grad)


def _inference_mode(model):
    return lambda batch: _call(model, batch, torch.inference_mode)


def _channels_last(model, adjust: Optional[Callable] = None):
    # A converted copy (NHWC weights and image batches): the other modes keep the NCHW model.
    # ``adjust`` sets the mode's switches on the copy before its first call.
    converted = copy.deepcopy(model).set_channels_last(True)
    if adjust is not None:
        adjust(converted)
    return lambda batch: _call(converted, batch, torch.no_grad)


def _channels_last_without(fold: bool, fused: bool):
    """The channels_last path with the second pass's optimisations switched off in part:
    Conv+BatchNorm folding (MODEL.TIMM.FOLD_BN) and fused attention (MODEL.VIPA.FUSED_ATTENTION)."""
    return lambda model: _channels_last(model, lambda m: set_fused_attention(set_conv_bn_folding(m, fold), fused))


def _channels_last_compiled(model):
    # MODEL.VIPA.COMPILE_BACKBONE on the channels_last path: the warm-up calls compile.
    return _channels_last(model, lambda m: setattr(m, "compile_backbone", True))


def _call(model, batch, context):
    with context():
        return model(batch)


# Inference variants compared in one interleaved run, all on the same weights in NCHW
# layout unless the mode changes it. "no_grad" is what the evaluator (detectron2's
# inference_on_dataset) and VIPAPredictor use; "channels_last" adds MODEL.VIPA.CHANNELS_LAST.
# The "channels_last_*" modes switch off the second pass's optimisations; "first_pass" is
# the config's path before it. The other modes keep the config's FOLD_BN/FUSED_ATTENTION.
# "channels_last_compiled" adds the opt-in MODEL.VIPA.COMPILE_BACKBONE.
INFERENCE_MODES: Dict[str, Callable] = {
    "no_grad": _no_grad,
    "inference_mode": _inference_mode,
    "channels_last": _channels_last,
    "channels_last_first_pass": _channels_last_without(fold=False, fused=False),
    "channels_last_unfolded": _channels_last_without(fold=False, fused=True),
    "channels_last_unfused": _channels_last_without(fold=True, fused=False),
    "channels_last_compiled": _channels_last_compiled,
}
BASELINE_MODE = "no_grad"


class MatmulProbe:
    """fp32 ``n x n`` matmuls: the machine's own attainable multiply-add rate, right now."""

    def __init__(self, n: int, calls: int):
        g = torch.Generator().manual_seed(0)
        self.n, self.calls = n, calls
        self.a = torch.randn(n, n, generator=g)
        self.b = torch.randn(n, n, generator=g)
        self.out = torch.empty(n, n)
        self.samples: List[float] = []  # GMAC/s, one per probe (median of its calls)

    def __call__(self) -> float:
        rates = []
        for _ in range(self.calls):
            start = time.perf_counter()
            torch.mm(self.a, self.b, out=self.out)
            rates.append(self.n**3 / (time.perf_counter() - start) / 1e9)
        self.samples.append(statistics.median(rates))
        return self.samples[-1]

    def summary(self) -> Dict:
        s = summarize(self.samples)
        return {
            "n": self.n,
            "calls_per_probe": self.calls,
            "gmacs_per_s": s,
            "gflops_per_s_median": None if s["median"] is None else 2 * s["median"],
        }


class _BatchCall:
    """
    ``model_cost.time_modules`` calls ``model([inputs])`` for one input; this stand-in
    forwards attribute access to the model and runs the whole ``batch`` instead, so the
    same hooks time a batch.
    """

    def __init__(self, model, batch):
        self._model, self._batch = model, batch

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, _ignored):
        return self._model(self._batch)


def _train_input(cfg, vocab_size: int) -> Dict:
    """model_cost's dummy input plus a centred square target, for a training step."""
    x = model_cost.dummy_input(cfg, vocab_size)
    size = cfg.INPUT.IMAGE_SIZE
    mask = torch.zeros(size, size, dtype=torch.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return {**x, "gt_mask": mask, "empty": False}


# Training steps timed side by side: name -> (MODEL.VIPA.CHANNELS_LAST, Conv+BN folding,
# fused attention). Folding acts in training only where BatchNorm is frozen
# (MODEL.TIMM.FREEZE_BN).
TRAIN_LAYOUTS = {
    "train": (False, True, True),
    "train_channels_last_first_pass": (True, False, False),
    "train_channels_last": (True, True, True),
}


def _train_step(cfg, model, inputs) -> Callable[[], None]:
    optimizer = build_vipa_optimizer(cfg, model)

    def step():
        optimizer.zero_grad(set_to_none=True)
        losses = model(inputs)
        sum(losses.values()).backward()
        optimizer.step()

    return step


def _time_once(fn, peak: PeakRSS):
    peak.reset()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    fn()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return wall, cpu, peak.peak_mib()


def _case_result(kind, mode, batch, samples, gmacs_per_image, probe_median) -> Dict:
    walls = [s[0] for s in samples]
    lat = summarize(walls)
    med = lat["median"]
    res = {
        "kind": kind,
        "mode": mode,
        "batch": batch,
        "latency_s": lat,
        "per_image_ms": 1e3 * med / batch,
        "cpu_wall_ratio": sum(s[1] for s in samples) / sum(walls),
        "peak_rss_mib": max(s[2] for s in samples),
    }
    if kind == "inference":
        res["images_per_s"] = batch / med
        achieved = gmacs_per_image * batch / med
        res["achieved_gmacs_per_s"] = achieved
        res["matmul_fraction"] = achieved / probe_median if probe_median else None
    else:
        res["iters_per_s"] = 1.0 / med
        res["images_per_s"] = batch / med
    return res


def measure_config(
    name: str,
    spec: SpeedConfig,
    image_size: int,
    modes: Sequence[str],
    batches: Sequence[int],
    train_batch: int,
    repeats: int,
    warmup: int,
    share_runs: int,
    probe: MatmulProbe,
    log=print,
) -> Dict:
    """All measurements of one config (see the module docstring for the interleaving)."""
    peak = PeakRSS()
    args = argparse.Namespace(
        config_file=spec.config_file,
        opts=[],
        image_size=image_size,
        random_text_encoder=spec.random_text_encoder,
    )
    build_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:  # holds the random text encoder's config.json
        cfg = model_cost.setup_cfg(args, tmpdir)
        # The modes set their own layout: start every one from NCHW, whatever the config says.
        model = build_model(cfg).eval().set_channels_last(False)
        train_model = None if spec.heavy or not train_batch else build_model(cfg).train()
    build_s = time.perf_counter() - build_start
    vocab = model.text_encoder.model.config.vocab_size
    one = model_cost.dummy_input(cfg, vocab)

    log(f"[speed] {name}: counting multiply-adds at {image_size}x{image_size} ...")
    params = dict(model_cost.count_params(model))
    params["total"] = sum(params.values())
    flops, uncounted = model_cost.count_flops(model, [one])
    gmacs = {k: v / 1e9 for k, v in flops.items()}

    cases = []  # (kind, mode, batch, fn)
    for mode in modes:
        run = INFERENCE_MODES[mode](model)
        for b in batches:
            batch = [one] * b
            cases.append(("inference", mode, b, lambda run=run, batch=batch: run(batch)))
    if train_model is not None:
        train_batch_inputs = [_train_input(cfg, vocab)] * train_batch
        # Every TRAIN_LAYOUTS variant, each with its own weights and optimizer state (the
        # first one reuses the built model instead of holding an idle copy in memory).
        for i, (layout, (channels_last, fold, fused)) in enumerate(TRAIN_LAYOUTS.items()):
            net = (copy.deepcopy(train_model) if i else train_model).set_channels_last(channels_last)
            set_fused_attention(set_conv_bn_folding(net, fold), fused)
            cases.append(("train", layout, train_batch, _train_step(cfg, net, train_batch_inputs)))

    log(f"[speed] {name}: warm-up ({warmup} call(s) per case, {len(cases)} cases) ...")
    for _, _, _, fn in cases:
        for _ in range(warmup):
            fn()
    rss_models = peak.current_mib()
    samples = {i: [] for i in range(len(cases))}
    first_probe = len(probe.samples)
    for r in range(repeats):
        # Rotate the order each round: no case always runs right after the same neighbour.
        order = [(r + i) % len(cases) for i in range(len(cases))]
        for i in order:
            samples[i].append(_time_once(cases[i][3], peak))
            probe()
        log(f"[speed] {name}: round {r + 1}/{repeats} done")
    probe_median = statistics.median(probe.samples[first_probe:])

    results = [
        _case_result(kind, mode, b, samples[i], gmacs["total"], probe_median)
        for i, (kind, mode, b, _) in enumerate(cases)
    ]
    # The config's own inference path (the evaluator's and predictor's) for the shares and
    # the targets.
    default_mode = "channels_last" if cfg.MODEL.VIPA.CHANNELS_LAST else BASELINE_MODE
    # ``model`` is NCHW already: copy it only when the config asks for NHWC.
    configured = (
        copy.deepcopy(model).set_channels_last(True) if cfg.MODEL.VIPA.CHANNELS_LAST else model
    )
    share_batches = [min(batches)] if spec.heavy else sorted(set(batches))
    shares = {}
    for b in share_batches:
        log(f"[speed] {name}: module time shares at batch {b} ({share_runs} runs) ...")
        times = model_cost.time_modules(_BatchCall(configured, [one] * b), one, share_runs)
        head = sum(times.get(m, 0.0) for m in model_cost.HEAD_MODULES)
        shares[str(b)] = {
            "time_s": times,
            "share": {k: v / times["total"] for k, v in times.items() if k != "total"},
            "head_share": head / times["total"],
        }
    return {
        "label": spec.label,
        "config_file": os.path.relpath(spec.config_file, REPO),
        "image_size": image_size,
        "text_len": cfg.INPUT.MAX_TEXT_LEN,
        "default_mode": default_mode,
        "build_s": build_s,
        "params": params,
        "gmacs_per_image": gmacs,
        "uncounted_ops": uncounted,
        "rss_with_models_mib": rss_models,
        "probe_gmacs_per_s_median": probe_median,
        "cases": results,
        "module_time": shares,
        "head_modules": list(model_cost.HEAD_MODULES),
    }


def run_speed(
    configs: Dict[str, int],
    modes: Dict[str, Sequence[str]],
    batches: Sequence[int],
    train_batch: int,
    repeats: int,
    warmup: int,
    share_runs: int,
    threads: int,
    probe_n: int,
    probe_calls: int,
    log=print,
) -> Dict:
    """``configs``: name in SPEED_CONFIGS -> square input size; ``modes``: name -> modes."""
    if threads > 0:
        torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    probe = MatmulProbe(probe_n, probe_calls)
    probe()  # first call pays one-time setup; keep it out of the statistics
    probe.samples.clear()
    started = time.perf_counter()
    section = {
        "machine": machine_info(),
        "memory_method": PeakRSS().method,
        "settings": {
            "configs": dict(configs),
            "modes": {k: list(v) for k, v in modes.items()},
            "batches": list(batches),
            "train_batch": train_batch,
            "repeats": repeats,
            "warmup": warmup,
            "share_runs": share_runs,
            "threads": torch.get_num_threads(),
            "timer": "median of perf_counter per call; CPU time via process_time",
        },
        "configs": {},
    }
    for name, size in configs.items():
        if name not in SPEED_CONFIGS:
            raise BenchmarkError(
                f"Unknown speed config {name!r}; expected one of {sorted(SPEED_CONFIGS)}"
            )
        unknown = [m for m in modes[name] if m not in INFERENCE_MODES]
        if unknown:
            raise BenchmarkError(
                f"Unknown inference mode(s) {unknown}; expected some of {sorted(INFERENCE_MODES)}"
            )
        section["configs"][name] = measure_config(
            name,
            SPEED_CONFIGS[name],
            size,
            modes[name],
            batches,
            train_batch,
            repeats,
            warmup,
            share_runs,
            probe,
            log,
        )
    section["matmul"] = probe.summary()
    section["seconds"] = time.perf_counter() - started
    section["machine"]["load_avg_1m_end"] = (
        os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    )
    return section
