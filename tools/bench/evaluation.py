"""
End-to-end evaluation speed before/after the optimisation passes: the real evaluation
path (test loader, mapper, model, ReferringEvaluator) of a trained checkpoint on the first
samples of a split, with the optimisations switched on one at a time. The steps run
round-robin, one evaluation at a time, so machine noise hits them alike; every step must
give (nearly) the same metrics, since none of them changes the model's values.
"""

import os
import statistics
import tempfile
import time
from typing import Dict, List, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import inference_on_dataset

from vipa_d2 import get_vipa_cfg
from vipa_d2.data.builtin import DATASETS_ENV
from vipa_d2.engine import ReferringTrainer

from .common import BenchmarkError, machine_info, summarize

# Cumulative steps: overrides on top of the config (which holds the optimised settings).
# "before" is the evaluation path of the previous release.
_UNFUSED = ["MODEL.VIPA.FUSED_ATTENTION", "False"]
_SECOND_PASS_OFF = ["MODEL.TIMM.FOLD_BN", "False"] + _UNFUSED
STEPS = (
    (
        "before",
        ["MODEL.VIPA.TRIM_TEXT_PADDING", "False", "MODEL.VIPA.CHANNELS_LAST", "False", "TEST.IMS_PER_BATCH", "1"]
        + _SECOND_PASS_OFF,
    ),
    (
        "+ text padding trimmed",
        ["MODEL.VIPA.CHANNELS_LAST", "False", "TEST.IMS_PER_BATCH", "1"] + _SECOND_PASS_OFF,
    ),
    ("+ channels last", ["TEST.IMS_PER_BATCH", "1"] + _SECOND_PASS_OFF),
    ("+ batched (first pass)", _SECOND_PASS_OFF),
    ("+ Conv+BN folded", _UNFUSED),
    ("+ fused attention (the config as is)", []),
    # Opt-in: the untimed first round pays the compilation (first_round_s shows it).
    ("+ compiled backbone (opt-in)", ["MODEL.VIPA.COMPILE_BACKBONE", "True"]),
)
REPORTED_METRICS = ("oIoU", "mIoU", "Prec@0.5")


def _subset(name: str, n: int) -> str:
    """Register (once) the first ``n`` records of ``name`` under a new name, same metadata."""
    subset = f"{name}__first{n}"
    if subset not in DatasetCatalog.list():
        records = DatasetCatalog.get(name)
        if not records:
            raise BenchmarkError(f"Dataset {name} has no records")
        DatasetCatalog.register(subset, lambda: records[:n])
        meta = {k: v for k, v in MetadataCatalog.get(name).as_dict().items() if k != "name"}
        MetadataCatalog.get(subset).set(**meta)
    return subset


def run_evaluation(
    config_file: str,
    weights: str,
    dataset: str,
    data_root: str,
    max_samples: int,
    repeats: int,
    threads: int,
    opts: Sequence[str] = (),
    log=print,
) -> Dict:
    if not os.path.isfile(weights):
        raise BenchmarkError(
            f"--weights {weights}: no such file (train one with 'make train', or pass a checkpoint)"
        )
    if not os.path.isdir(data_root):
        raise BenchmarkError(f"--data-root {data_root}: no such folder ('make train' writes 'datasets/')")
    if threads > 0:
        torch.set_num_threads(threads)
    os.environ[DATASETS_ENV] = os.path.abspath(data_root)
    if dataset not in DatasetCatalog.list():
        raise BenchmarkError(f"Unknown dataset {dataset!r}; expected a registered referring dataset")
    name = _subset(dataset, max_samples)
    samples = len(DatasetCatalog.get(name))

    steps = []
    for label, overrides in STEPS:
        cfg = get_vipa_cfg(config_file, list(opts) + overrides + ["MODEL.WEIGHTS", weights])
        model = ReferringTrainer.build_model(cfg).eval()
        DetectionCheckpointer(model).load(weights)
        steps.append((label, cfg, model))

    walls: Dict[str, List[float]] = {label: [] for label, _, _ in steps}
    first_round: Dict[str, float] = {}
    cpus: Dict[str, List[float]] = {label: [] for label, _, _ in steps}
    metrics: Dict[str, Dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Round 0 is untimed: data-loader start-up, oneDNN kernel selection.
        for r in range(repeats + 1):
            order = steps[r % len(steps) :] + steps[: r % len(steps)]
            for label, cfg, model in order:
                loader = ReferringTrainer.build_test_loader(cfg, name)
                evaluator = ReferringTrainer.build_evaluator(cfg, name, output_folder=tmp)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                result = inference_on_dataset(model, loader, evaluator)
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                if r > 0:
                    walls[label].append(wall)
                    cpus[label].append(cpu)
                else:
                    first_round[label] = wall
                metrics[label] = {k: result["refer"][k] for k in REPORTED_METRICS}
            log(f"[evaluation] {'warm-up' if r == 0 else f'round {r}/{repeats}'} done")

    before = statistics.median(walls[STEPS[0][0]])
    rows = []
    for label, cfg, _ in steps:
        wall = summarize(walls[label])
        rows.append(
            {
                "step": label,
                "trim_text_padding": cfg.MODEL.VIPA.TRIM_TEXT_PADDING,
                "channels_last": cfg.MODEL.VIPA.CHANNELS_LAST,
                "fold_bn": cfg.MODEL.TIMM.FOLD_BN,
                "fused_attention": cfg.MODEL.VIPA.FUSED_ATTENTION,
                "compile_backbone": cfg.MODEL.VIPA.COMPILE_BACKBONE,
                "batch": cfg.TEST.IMS_PER_BATCH,
                "first_round_s": first_round[label],
                "wall_s": wall,
                "samples_per_s": samples / wall["median"],
                "speedup_vs_before": before / wall["median"],
                # Main process only: the data-loader worker's CPU time is not included.
                "cpu_wall_ratio": sum(cpus[label]) / sum(walls[label]),
                "metrics": metrics[label],
            }
        )
    return {
        "machine": machine_info(),
        "settings": {
            "config_file": config_file,
            "opts": list(opts),
            "weights": weights,
            "dataset": dataset,
            "samples": samples,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "num_workers": steps[0][1].DATALOADER.NUM_WORKERS,
        },
        "steps": rows,
    }


def check_steps(rows: Sequence[Dict], tolerance: float = 0.5) -> List[str]:
    """Steps whose metrics differ from "before" by more than ``tolerance`` points."""
    base = rows[0]["metrics"]
    return [
        r["step"]
        for r in rows[1:]
        if any(abs(r["metrics"][k] - base[k]) > tolerance for k in REPORTED_METRICS)
    ]
