"""
``TEST.EXPECTED_RESULTS`` (Detectron2's end-to-end accuracy check) for referring results.

Detectron2 reads each entry as ``[task, metric, value, tolerance]`` against results keyed by
task (``{"bbox": {"AP": ...}}``). The referring trainer's results are keyed by dataset, then
section (``{"refcoco_unc_val": {"refer": {"oIoU": ...}, "rela": ...}}``, and
``<dataset>/shuffled`` for the shuffled-expression control), so a task here is the path to a
section, as ``EvalHook`` names it in the event storage: ``["refcoco_unc_val/refer", "oIoU",
72.5, 0.5]``, ``["grefcoco_unc_val/rela", "gIoU", 60.0, 1.0]``.
"""
from typing import Dict

from detectron2.evaluation import verify_results
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm

from ..data.validation import shortlist
from ..errors import ConfigError
from .process_group import raise_on_every_rank

__all__ = ["referring_tasks", "verify_on_every_rank", "verify_referring_results"]

# Tasks a refusal lists before "... (+N more)".
MAX_TASKS_LISTED = 12


def referring_tasks(results) -> Dict[str, Dict[str, float]]:
    """``{dataset: {section: {metric: value}}}`` (nested deeper for breakdowns) as
    ``{"<dataset>/<section>": {metric: value}}``, the form ``verify_results`` reads."""
    tasks: Dict[str, Dict[str, float]] = {}
    for key, value in flatten_results_dict(results or {}).items():
        task, _, metric = key.rpartition("/")
        tasks.setdefault(task, {})[metric] = value
    return tasks


def _listing(names) -> str:
    return shortlist(sorted(names), MAX_TASKS_LISTED)


def verify_referring_results(cfg, results) -> bool:
    """
    Check ``results`` (``ReferringTrainer.test``'s) against ``cfg.TEST.EXPECTED_RESULTS``;
    True when there is nothing to check. A task or metric that ``results`` lacks is a
    ConfigError naming it and what there is (train_net.py says it in one line); a value
    off by more than its tolerance ends the process with status 1 after logging both, as
    Detectron2's ``verify_results`` does.
    """
    if not len(cfg.TEST.EXPECTED_RESULTS):
        return True
    tasks = referring_tasks(results)
    for task, metric, _, _ in cfg.TEST.EXPECTED_RESULTS:
        if task not in tasks:
            raise ConfigError(
                f"TEST.EXPECTED_RESULTS: task {task!r} is not among the results; expected "
                f"'<dataset>/<section>', one of: {_listing(tasks) or 'none (nothing was evaluated)'}"
            )
        if metric not in tasks[task]:
            raise ConfigError(f"TEST.EXPECTED_RESULTS: {task!r} has no metric {metric!r}; it has {_listing(tasks[task])}")
    return verify_results(cfg, tasks)


def verify_on_every_rank(cfg, results) -> None:
    """:func:`verify_referring_results` on the main process (whose ``results`` these are),
    its outcome on every rank: its ConfigError, or its exit with status 1."""
    if not len(cfg.TEST.EXPECTED_RESULTS):  # the same on every rank: nothing to agree on
        return
    outcome = None
    if comm.is_main_process():
        try:
            verify_referring_results(cfg, results)
        except (Exception, SystemExit) as e:  # SystemExit: verify_results', after logging the values
            outcome = e
    raise_on_every_rank(outcome)
