"""Referring image segmentation metrics (oIoU, mIoU, Prec@X, N-acc/T-acc) for Detectron2."""
import itertools
import json
import logging
import math
import os
from collections import OrderedDict
from typing import Optional

import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from vipa_d2.data.eval_resolution import check_eval_resolution
from vipa_d2.modeling.meta_arch import REF_SEG_BEFORE_VETO
from vipa_d2.utils.atomic_io import atomic_open

from . import breakdown
from .rela_metrics import rela_metrics
from .sample_results import sample_details, target_mask

logger = logging.getLogger(__name__)

# IoU thresholds of the Prec@X columns every RIS paper prints.
PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


class ReferringEvaluator(DatasetEvaluator):
    """
    Scores one predicted mask per expression against the union of its target masks,
    at the ORIGINAL image resolution (the input's ``height`` x ``width``), or with
    ``resolution="input"`` at the model's input resolution (see
    :mod:`vipa_d2.data.eval_resolution`).

    Only per-sample intersection/union counts, ids and the sentence are kept (masks only
    as compact RLE, and only with ``save_prediction_rle``), so memory is O(#samples) and
    the cross-process gather is small. Metrics are in percent:

    * ``oIoU``: sum of intersections / sum of unions over all samples;
    * ``mIoU``: mean per-sample IoU; an empty union (empty prediction and empty target)
      counts as IoU 1 for a no-target sample (its record's ``empty``; without the flag,
      an empty target) and 0 for a target sample, as LAVT counts it;
    * ``Prec@X``: share of samples with IoU >= X;
    * ``N-acc`` / ``T-acc`` (generalized data, or when any sample is a no-target one):
      share of no-target samples predicted empty / of target samples predicted non-empty.
      A plain set's masks are scored before the no-target verdict, so the trainer refuses
      to evaluate a set with no-target samples unless its metadata says ``generalized``.

    On generalized data ReLA's metrics (cIoU, gIoU, N-acc, T-acc, Pr@0.7/0.8/0.9, as ReLA
    defines them: :mod:`.rela_metrics`) are reported beside these, under ``"rela"``.
    Inputs with a ``type`` add the same metrics per type, outputs with ``retrieved`` a
    report on the cues' retrieved tokens (see :mod:`vipa_d2.evaluation.breakdown`).
    """

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        mask_threshold: float = 0.5,
        no_target_threshold: float = 0.5,
        resolution: str = "original",
        save_prediction_rle: bool = False,
        name: Optional[str] = None,
    ):
        """
        Args:
            dataset_name: a registered dataset; its metadata's ``generalized`` flag turns on
                N-acc/T-acc, ReLA's metrics and the no-target verdict (``no_target_score``).
                On other datasets the verdict is recorded, not scored: each mask is scored as
                predicted before the verdict emptied it.
            distributed: gather the per-sample counts of all ranks on the main process.
            output_dir: where ``referring_results_<dataset>.json`` (per-sample results)
                is written; None writes nothing.
            mask_threshold: foreground probability above which a pixel of ``ref_seg`` is
                predicted (pass ``cfg.MODEL.VIPA.MASK_THRESHOLD``).
            no_target_threshold: on generalized datasets, a ``no_target_score`` above this
                predicts an empty mask (pass ``vipa_d2.modeling.no_target_threshold(cfg)``);
                inf: no verdict, an empty mask is the no-target answer.
            resolution: "original" or "input" (``cfg.TEST.EVAL_RESOLUTION``).
            save_prediction_rle: keep each scored prediction as COCO RLE in the per-sample
                results (``cfg.TEST.SAVE_PREDICTION_RLE``).
            name: what its log lines and errors call these results (default
                ``dataset_name``; the trainer's are "<dataset>_TTA" and "<dataset>/shuffled").
        """
        self._dataset_name = dataset_name
        self._name = name or dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._mask_threshold = float(mask_threshold)
        self._no_target_threshold = float(no_target_threshold)
        self._resolution = check_eval_resolution(resolution)
        self._save_prediction_rle = bool(save_prediction_rle)
        self._generalized = bool(
            getattr(MetadataCatalog.get(dataset_name), "generalized", False)
        )
        self._samples = []

    def reset(self):
        self._samples = []

    def process(self, inputs, outputs):
        if len(inputs) != len(outputs):  # zip would score the first ones and drop the rest
            raise ValueError(
                f"ReferringEvaluator on {self._name}: {len(inputs)} inputs but {len(outputs)} outputs; "
                "the model must return one output per expression"
            )
        for inp, out in zip(inputs, outputs):
            self._samples.append(self._score_sample(inp, out))

    def _score_sample(self, inp, out) -> dict:
        sample_name = "{} (image_id={}, ref_id={}, sent_id={})".format(
            self._name, inp.get("image_id"), inp.get("ref_id"), inp.get("sent_id")
        )
        height, width = int(inp["height"]), int(inp["width"])
        ref_seg = out["ref_seg"]
        if tuple(ref_seg.shape) != (height, width):
            raise ValueError(
                f"ReferringEvaluator: 'ref_seg' of {sample_name} has shape "
                f"{tuple(ref_seg.shape)}, expected the {self._resolution} (height, width) = "
                f"{(height, width)}."
            )
        # An infinite threshold is no verdict (an untrained head: LOSS.NO_TARGET_WEIGHT 0):
        # an empty mask answers "no target", as for a model without a no-target head.
        has_verdict = "no_target_score" in out and self._no_target_threshold != math.inf
        said_no_target = has_verdict and float(out["no_target_score"]) > self._no_target_threshold
        # The model empties "ref_seg" on its own no-target verdict and keeps the mask under
        # REF_SEG_BEFORE_VETO. Every expression of a plain dataset has a target: its mask is
        # scored, as for models without a no-target head, and the verdict only recorded.
        scored = ref_seg if self._generalized else out.get(REF_SEG_BEFORE_VETO, ref_seg)
        pred = scored > self._mask_threshold
        vetoed = self._generalized and said_no_target
        if vetoed:
            pred = torch.zeros_like(pred)
        gt = target_mask(inp, self._resolution, sample_name).to(device=pred.device)
        # Three reductions (the union and emptiness follow from them), read in one transfer:
        # each is a pass over a full-resolution mask, per sample (scale review, session 60).
        gt_area, pred_area, intersection = torch.stack([gt.sum(), pred.sum(), (pred & gt).sum()]).tolist()
        row = {
            "image_id": _plain_id(inp.get("image_id")),
            "ref_id": _plain_id(inp.get("ref_id")),
            "sent_id": _plain_id(inp.get("sent_id")),
            "gt_empty": gt_area == 0,
            "pred_empty": pred_area == 0,
            "intersection": intersection,
            "union": gt_area + pred_area - intersection,
            **breakdown.sample_fields(inp, out, gt, sample_name),
        }
        pred_no_target = said_no_target if has_verdict else row["pred_empty"]
        if self._generalized and pred_no_target:
            # ReLA never empties the mask of a no-target verdict: a wrong one (a target
            # sample) adds the union of the mask as predicted to cIoU's sum.
            before = out.get(REF_SEG_BEFORE_VETO, ref_seg) > self._mask_threshold
            row["union_before_veto"] = int((before | gt).sum())
        row.update(
            sample_details(inp, pred, pred_no_target, row["gt_empty"], self._save_prediction_rle)
        )
        return row

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(self._samples, dst=0)
            if not comm.is_main_process():
                return {}
            samples = list(itertools.chain(*gathered))
        else:
            samples = self._samples
        if not samples:
            logger.warning(f"ReferringEvaluator on {self._name}: no samples processed.")
            return {}

        for s in samples:
            # Empty union: a correct "nothing" answer for a no-target sample; for a target
            # whose mask has no pixels at the scored resolution, a miss (as LAVT counts it).
            s["iou"] = s["intersection"] / s["union"] if s["union"] > 0 else float(s["no_target"])
        metrics = self._compute_metrics(samples)
        results = OrderedDict(refer=metrics)
        if self._generalized:
            results["rela"] = rela_metrics(samples)
        for task, values in results.items():
            logger.info(
                "Referring segmentation on {} ({} samples, {} resolution), {} metrics:\n{}".format(
                    self._name,
                    len(samples),
                    self._resolution,
                    task,
                    create_small_table(values),
                )
            )
        # Per expression type / retrieval report, only when the data and model support them.
        sections = breakdown.summarize(samples, self._compute_metrics)
        results.update(breakdown.flatten_sections(sections))
        breakdown.log_sections(self._name, sections)
        if self._output_dir:
            self._write_samples(samples, metrics, sections, results.get("rela"))
        return results

    def _compute_metrics(self, samples) -> "OrderedDict[str, float]":
        n = len(samples)
        ious = [s["iou"] for s in samples]
        total_i = sum(s["intersection"] for s in samples)
        total_u = sum(s["union"] for s in samples)
        metrics = OrderedDict()
        # No union at all (every mask empty): no overall IoU, as ReLA's cIoU, not a perfect one.
        metrics["oIoU"] = 100.0 * total_i / total_u if total_u > 0 else float("nan")
        # fsum is exactly rounded, so the result does not depend on the gather order.
        metrics["mIoU"] = 100.0 * math.fsum(ious) / n
        for thr in PRECISION_THRESHOLDS:
            metrics[f"Prec@{thr}"] = 100.0 * sum(iou >= thr for iou in ious) / n
        no_target = [s for s in samples if s["no_target"]]
        if self._generalized or no_target:
            target = [s for s in samples if not s["no_target"]]
            metrics["N-acc"] = _share(no_target, lambda s: s["pred_empty"])
            metrics["T-acc"] = _share(target, lambda s: not s["pred_empty"])
        return metrics

    def _write_samples(self, samples, metrics, sections, rela=None):
        PathManager.mkdirs(self._output_dir)
        path = os.path.join(self._output_dir, results_file_name(self._dataset_name))
        payload = {
            "dataset": self._dataset_name,
            "resolution": self._resolution,
            "mask_threshold": self._mask_threshold,
            "metrics": _json_numbers(metrics),
            **_json_numbers(sections),  # a type can have no union too (no-target expressions)
            "samples": samples,
        }
        if rela is not None:
            payload["rela_metrics"] = _json_numbers(rela)
        # Atomic: a killed job never leaves a half-written results file behind.
        with atomic_open(path, "w") as f:
            json.dump(payload, f, allow_nan=False)
        logger.info(f"Per-sample referring results written to {path}")


def _json_numbers(value):
    """``value`` with NaN (a ratio over no sample) as None, in nested dicts too: JSON has no
    NaN, and strict readers refuse Python's ``NaN`` token."""
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def results_file_name(dataset_name: str) -> str:
    """The per-sample results file of ``dataset_name`` (a "/" in the name becomes "_")."""
    return "referring_results_{}.json".format(dataset_name.replace("/", "_"))


def _plain_id(value):
    """Ids as JSON-serialisable Python scalars (datasets may hand out numpy integers)."""
    return value.item() if hasattr(value, "item") else value


def _share(samples, predicate) -> float:
    """Percentage of ``samples`` satisfying ``predicate`` (NaN when there are none)."""
    if not samples:
        return float("nan")
    return 100.0 * sum(bool(predicate(s)) for s in samples) / len(samples)
