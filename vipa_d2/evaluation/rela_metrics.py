"""
ReLA's generalized referring-segmentation metrics, under ReLA's names and definitions,
computed from :class:`ReferringEvaluator`'s per-sample results so they can be put beside
the GRES / ReLA tables.

Definitions (henghuiding/ReLA, ``gres_model/evaluation/refer_evaluation.py``, after its
"fix eval metrics" commit). A sample is a *no-target* sample when its record says so
(``empty``); *predicted no-target* when the model's no-target score is above the
threshold (ReLA: its no-target classifier), or, for outputs without a score, when the
predicted mask is empty. With no-target as the positive class:

* TP (no-target, predicted no-target): IoU 1, adds nothing to the cIoU sums;
* FN (no-target, predicted target): IoU 0, its union (the predicted pixels) adds to cIoU's;
* FP (target, predicted no-target): intersection taken as 0, union that of the mask as
  predicted before the verdict emptied it (``union_before_veto``; ReLA's model never
  empties it);
* TN (target, predicted target): intersection and union as scored.

* ``gIoU``: mean of those per-sample IoUs over all samples (an empty union of a target
  sample counts 0), in percent;
* ``cIoU``: sum of intersections / sum of unions, in percent;
* ``N-acc`` = TP / (TP + FN), ``T-acc`` = TN / (TN + FP), in percent (ReLA's code returns
  fractions; its paper prints percent). Both are 0 when there is no no-target sample, as
  in ReLA;
* ``Pr@0.7``, ``Pr@0.8``, ``Pr@0.9``: share of *target* samples with IoU >= X.

A ratio whose denominator is 0 (ReLA's code divides by zero there) is NaN.
"""

import math
from collections import OrderedDict
from typing import Dict, Iterable

__all__ = ["RELA_PRECISION_THRESHOLDS", "rela_metrics"]

# ReLA reports precision at these IoU thresholds only.
RELA_PRECISION_THRESHOLDS = (0.7, 0.8, 0.9)


def _percent(num: float, den: float) -> float:
    return 100.0 * num / den if den > 0 else float("nan")


def rela_metrics(samples: Iterable[Dict]) -> "OrderedDict[str, float]":
    """
    ReLA's metrics of per-sample results: dicts with ``intersection``, ``union``,
    ``no_target`` (the record is a no-target one), ``pred_no_target`` and, where that
    is true, optionally ``union_before_veto`` (else ``union`` is used).
    """
    counts = {"TP": 0, "FN": 0, "FP": 0, "TN": 0}
    ious, target_ious = [], []
    total_i = total_u = 0
    for s in samples:
        if s["no_target"]:
            if s["pred_no_target"]:
                counts["TP"] += 1
                ious.append(1.0)
            else:
                counts["FN"] += 1
                ious.append(0.0)
                total_u += s["union"]
            continue
        counts["FP" if s["pred_no_target"] else "TN"] += 1
        inter = 0 if s["pred_no_target"] else s["intersection"]
        union = s.get("union_before_veto", s["union"]) if s["pred_no_target"] else s["union"]
        iou = inter / union if union > 0 else 0.0
        ious.append(iou)
        target_ious.append(iou)
        total_i += inter
        total_u += union

    metrics = OrderedDict()
    metrics["cIoU"] = _percent(total_i, total_u)
    # fsum is exactly rounded, so the result does not depend on the gather order.
    metrics["gIoU"] = _percent(math.fsum(ious), len(ious))
    if counts["TP"] + counts["FN"] > 0:
        metrics["N-acc"] = _percent(counts["TP"], counts["TP"] + counts["FN"])
        metrics["T-acc"] = _percent(counts["TN"], counts["TN"] + counts["FP"])
    else:
        metrics["N-acc"] = metrics["T-acc"] = 0.0
    for thr in RELA_PRECISION_THRESHOLDS:
        metrics[f"Pr@{thr}"] = _percent(sum(iou >= thr for iou in target_ious), len(target_ious))
    return metrics
