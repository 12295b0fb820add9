"""
Breakdowns of referring results, computed by :class:`ReferringEvaluator` when the data or
the model provide what they need (otherwise nothing changes):

* **per expression type** (records with a ``type``, e.g. the synthetic benchmark):
  oIoU / mIoU / Prec@0.5 of each type, under the ``refer_by_type`` results key (the
  expressions without one, where others have one, as ``UNTYPED``);
* **retrieval report** (model outputs with ``retrieved`` / ``cue_valid``, i.e. a VEG with
  step 1): how much the cues' retrieved visual tokens overlap (mean pairwise Jaccard); for
  expressions naming their target's category (``target_tokens``), the share of the
  retrieved area of that name's cues on the target, beside the same share for the
  expression's other words; and, for expressions with a landmark (``landmark_mask`` /
  ``landmark_tokens``), where the landmark phrase's cues look: the share of their
  retrieved area on the landmark object and on the target. Under the ``retrieval`` results
  key.

All values are percentages; a mean over no sample is left out (its count is 0). The
per-sample numbers are computed in :func:`sample_fields` (no mask is kept), the rest
from the gathered samples.
"""
import logging
import math
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import torch
from tabulate import tabulate

from vipa_d2.modeling.veg import word_cue_mask

logger = logging.getLogger(__name__)

__all__ = [
    "BY_TYPE_KEY",
    "RETRIEVAL_KEY",
    "TYPE_METRICS",
    "sample_fields",
    "cue_jaccard",
    "area_share",
    "landmark_shares",
    "summarize",
    "flatten_sections",
    "format_by_type",
    "format_retrieval",
    "format_sections",
    "log_sections",
]

BY_TYPE_KEY = "refer_by_type"
# The per-type row of the expressions without a type, where others have one (a record's
# type is a non-empty string, so this one is no type's name).
UNTYPED = "(no type)"
RETRIEVAL_KEY = "retrieval"
# Per-type columns: the headline metrics; a type holds too few samples for finer Prec@X.
TYPE_METRICS = ("oIoU", "mIoU", "Prec@0.5")
# What the retrieval report's numbers are (the caption of its tables).
RETRIEVAL_CAPTION = (
    "percent; cue Jaccard: mean pairwise Jaccard of the cues' retrieved tokens; target name: share "
    "of the retrieved area of the words naming the target's category on the target / the same for "
    "the expression's other words; landmark cues: share of the landmark phrase's retrieved area on "
    "the landmark object / on the target"
)
# The paired shares of the retrieval report: (the per-sample field saying a sample has the
# phrase, the two shares averaged over the samples where both are defined, their count),
# each key with its column header.
_SHARE_PAIRS = (
    ("target_cues",
     (("target_name_on_target", "target name on target"), ("other_words_on_target", "other words")),
     ("target_samples", "target samples")),
    ("landmark_cues",
     (("landmark_on_landmark", "landmark cues on landmark"), ("landmark_on_target", "on target")),
     ("landmark_samples", "landmark samples")),
)
# Column groups of the retrieval table; a group shows when any dataset has its count.
_RETRIEVAL_GROUPS = ((("cue_jaccard", "cue Jaccard"), ("cue_jaccard_samples", "samples")),) + tuple(
    (*shares, count) for _, shares, count in _SHARE_PAIRS
)


def cue_jaccard(retrieved: torch.Tensor) -> Optional[float]:
    """Mean pairwise Jaccard index of the C retrieved sets ``retrieved`` (bool C x ...);
    two empty sets count as identical (1). None for fewer than 2 sets."""
    c = retrieved.shape[0]
    if c < 2:
        return None
    sets = retrieved.reshape(c, -1)
    # Pixel counts must stay exact: float32 holds integers up to 2**24, larger images need
    # float64 (slower, so only then).
    sets = sets.to(torch.float32 if sets.shape[1] <= 2**24 else torch.float64)
    inter = sets @ sets.T
    area = inter.diagonal()
    union = area[:, None] + area[None, :] - inter
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    i, j = torch.triu_indices(c, c, offset=1, device=jaccard.device)
    return float(jaccard[i, j].mean())


def area_share(retrieved: torch.Tensor, region: torch.Tensor) -> Optional[float]:
    """
    The share of the area retrieved by the K cues ``retrieved`` (bool K x H x W), pooled
    over the cues (sum of their areas), that lies in ``region`` (bool H x W); None when
    nothing is retrieved.
    """
    total = int(retrieved.sum())
    return int((retrieved & region).sum()) / total if total else None


def landmark_shares(retrieved: torch.Tensor, landmark: torch.Tensor, target: torch.Tensor):
    """(share on ``landmark``, share on ``target``) of ``retrieved`` (:func:`area_share`);
    None when nothing is retrieved."""
    on_landmark = area_share(retrieved, landmark)
    return None if on_landmark is None else (on_landmark, area_share(retrieved, target))


def _check_shape(name: str, value: torch.Tensor, shape, sample_name: str) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"ReferringEvaluator: {name!r} of {sample_name} has shape {tuple(value.shape)}, "
            f"expected {tuple(shape)}"
        )


def sample_fields(inp: Dict, out: Dict, gt: torch.Tensor, sample_name: str) -> Dict:
    """
    The per-sample values of the breakdowns, for the evaluator's sample dict: ``type``;
    with ``out["retrieved"]``: ``cues``, ``cue_jaccard`` (None below 2 cues); with a target
    name, ``target_cues`` (its tokens that are cues), ``target_name_on_target`` and
    ``other_words_on_target`` (fractions, both None unless both kinds of word retrieve
    something); with a landmark, ``landmark_cues`` (landmark-phrase tokens that are cues),
    ``landmark_on_landmark`` / ``landmark_on_target`` (fractions, None without such cues).
    ``gt``: the bool target mask at the resolution of ``retrieved``.
    """
    fields = {}
    if "type" in inp:
        fields["type"] = str(inp["type"])
    retrieved = out.get("retrieved")
    if retrieved is None:
        return fields
    height, width = gt.shape
    cue_valid = out["cue_valid"].to(device=retrieved.device, dtype=torch.bool)
    t = cue_valid.shape[0]
    _check_shape("retrieved", retrieved, (t, height, width), sample_name)
    retrieved = retrieved.bool()
    target = gt.to(device=retrieved.device, dtype=torch.bool)
    fields["cues"] = int(cue_valid.sum())
    fields["cue_jaccard"] = cue_jaccard(retrieved[cue_valid])
    if "target_tokens" in inp:
        named = _phrase_cues(inp["target_tokens"], cue_valid)
        others = word_cue_mask(cue_valid[None])[0] & ~named
        fields["target_cues"] = int(named.sum())
        shares = (area_share(retrieved[named], target), area_share(retrieved[others], target))
        if None in shares:
            shares = (None, None)  # a pair or nothing: the two means cover the same samples
        fields["target_name_on_target"], fields["other_words_on_target"] = shares
    if "landmark_tokens" in inp:
        landmark_mask = inp["landmark_mask"]
        _check_shape("landmark_mask", landmark_mask, (height, width), sample_name)
        tokens = _phrase_cues(inp["landmark_tokens"], cue_valid)
        fields["landmark_cues"] = int(tokens.sum())
        shares = None
        if fields["landmark_cues"]:
            landmark = landmark_mask.to(device=retrieved.device, dtype=torch.bool)
            shares = landmark_shares(retrieved[tokens], landmark, target)
        fields["landmark_on_landmark"], fields["landmark_on_target"] = shares or (None, None)
    return fields


def _phrase_cues(given: torch.Tensor, cue_valid: torch.Tensor) -> torch.Tensor:
    """The cues among a phrase's tokens ``given`` (bool, the mapper's MAX_TEXT_LEN)."""
    # The model may drop trailing padding columns (T <= the mapper's MAX_TEXT_LEN): the
    # positions it kept are the first T.
    tokens = torch.zeros_like(cue_valid)
    given = given[: cue_valid.shape[0]].to(device=tokens.device, dtype=torch.bool)
    tokens[: given.shape[0]] = given
    return tokens & cue_valid


def _mean_percent(values: List[float]) -> float:
    # fsum: exactly rounded, so the result does not depend on the gather order.
    return 100.0 * math.fsum(values) / len(values)


def _by_type(samples: List[Dict], compute_metrics: Callable) -> "OrderedDict":
    groups = OrderedDict()
    for s in samples:
        if "type" in s:
            groups.setdefault(s["type"], []).append(s)
    names = sorted(groups)
    untyped = [s for s in samples if "type" not in s]
    if untyped:  # a dataset typing some expressions only: the rest get a row of their own
        groups[UNTYPED] = untyped
        names.append(UNTYPED)
    out = OrderedDict()
    for name in names:
        metrics = compute_metrics(groups[name])
        out[name] = OrderedDict(samples=len(groups[name]))
        out[name].update((k, metrics[k]) for k in TYPE_METRICS)
    return out


def _retrieval(samples: List[Dict]) -> "OrderedDict":
    # A mean over no sample is left out (its count says 0) rather than NaN: NaN breaks
    # equality checks of results and is not valid JSON.
    out = OrderedDict()
    jaccards = [s["cue_jaccard"] for s in samples if s.get("cue_jaccard") is not None]
    if jaccards:
        out["cue_jaccard"] = _mean_percent(jaccards)
    out["cue_jaccard_samples"] = len(jaccards)
    for present, shares, (count, _) in _SHARE_PAIRS:
        if not any(present in s for s in samples):
            continue
        scored = [s for s in samples if s.get(shares[0][0]) is not None]
        if scored:
            for key, _ in shares:
                out[key] = _mean_percent([s[key] for s in scored])
        out[count] = len(scored)
    return out


def summarize(samples: List[Dict], compute_metrics: Callable) -> "OrderedDict":
    """
    The breakdown sections the samples support: {BY_TYPE_KEY: {type: {"samples",
    *TYPE_METRICS}}} when any sample has a type (``compute_metrics`` scores a list of
    samples, so a type is scored exactly like the whole set), {RETRIEVAL_KEY: {...}} when
    any has retrieval values. Empty when neither: the evaluator's results stay as they were.
    """
    sections = OrderedDict()
    if any("type" in s for s in samples):
        sections[BY_TYPE_KEY] = _by_type(samples, compute_metrics)
    if any("cues" in s for s in samples):
        sections[RETRIEVAL_KEY] = _retrieval(samples)
    return sections


def flatten_sections(sections: Dict) -> "OrderedDict":
    """The sections as Detectron2 results entries: one level of metrics per task (nested
    dicts would break ``print_csv_format``), e.g. ``refer_by_type/relation/oIoU``."""
    out = OrderedDict()
    for key, section in sections.items():
        if key == BY_TYPE_KEY:
            section = OrderedDict(
                (f"{name}/{metric}", float(value))
                for name, metrics in section.items()
                for metric, value in metrics.items()
            )
        out[key] = section
    return out


def format_by_type(by_dataset: Dict[str, Dict]) -> str:
    """A table of the per-type metrics, {dataset name: by-type section}; each dataset
    is named on its first row only."""
    rows = [
        [dataset if k == 0 else "", name, metrics["samples"]] + [metrics[m] for m in TYPE_METRICS]
        for dataset, section in by_dataset.items()
        for k, (name, metrics) in enumerate(section.items())
    ]
    headers = ["dataset", "type", "samples", *TYPE_METRICS]
    return tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".2f")


def format_retrieval(by_dataset: Dict[str, Dict]) -> str:
    """A table of the retrieval reports, {dataset name: retrieval section}."""
    columns = [
        column
        for group in _RETRIEVAL_GROUPS
        if any(group[-1][0] in section for section in by_dataset.values())
        for column in group
    ]
    # A blank cell: no sample to average over (see _retrieval).
    rows = [[name] + [section.get(k, "") for k, _ in columns] for name, section in by_dataset.items()]
    headers = ["dataset"] + [header for _, header in columns]
    return tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".2f")


def format_sections(results: Dict[str, Dict]) -> str:
    """The per-type table and the retrieval report of {dataset name: results holding the
    sections} (an evaluator's results file or entry), "" when none has them."""
    parts = []
    by_type = OrderedDict((name, r[BY_TYPE_KEY]) for name, r in results.items() if BY_TYPE_KEY in r)
    if by_type:
        parts.append("Per expression type (percent):\n" + format_by_type(by_type))
    retrieval = OrderedDict((name, r[RETRIEVAL_KEY]) for name, r in results.items() if RETRIEVAL_KEY in r)
    if retrieval:
        parts.append(f"Retrieval report ({RETRIEVAL_CAPTION}):\n" + format_retrieval(retrieval))
    return "\n\n".join(parts)


def log_sections(dataset_name: str, sections: Dict) -> None:
    """Log the tables of the sections :func:`summarize` returned (if any)."""
    if BY_TYPE_KEY in sections:
        table = format_by_type({dataset_name: sections[BY_TYPE_KEY]})
        logger.info(f"Referring segmentation on {dataset_name} per expression type:\n{table}")
    if RETRIEVAL_KEY in sections:
        table = format_retrieval({dataset_name: sections[RETRIEVAL_KEY]})
        logger.info(f"Retrieval report on {dataset_name} ({RETRIEVAL_CAPTION}):\n{table}")
