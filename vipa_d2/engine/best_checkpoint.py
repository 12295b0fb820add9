"""Keep the weights of the best validation score seen so far (``model_best.pth``)."""
import logging
import math
import operator
import os
import uuid
from typing import Optional

from detectron2.engine import hooks
from detectron2.utils import comm

from ..config import ConfigError
from ..data.validation import shortlist
from ..utils.checkpoint_file import WeightsError, torch_load_checkpoint
from .process_group import raise_on_every_rank

logger = logging.getLogger(__name__)

# The metric ReferringEvaluator reports (under its "refer" section) that picks the best model.
BEST_METRIC = "oIoU"
BEST_METRIC_SECTION = "refer"
# Computed metrics a refusal of TEST.BEST_METRIC lists before "... (+N more)".
MAX_METRICS_LISTED = 20


def best_metric_name(dataset_name: str) -> str:
    """The storage key ``EvalHook`` gives ``dataset_name``'s oIoU (results flattened with "/")."""
    return f"{dataset_name}/{BEST_METRIC_SECTION}/{BEST_METRIC}"


class BestMetricCheckpointer(hooks.BestCheckpointer):
    """
    Detectron2's ``BestCheckpointer`` (run after ``EvalHook``, same period), plus:

    * the best value and its iteration are hook state, so they are saved with every
      checkpoint and restored by ``--resume`` (the stock hook starts again from None and
      would overwrite ``model_best.pth`` with a worse model after a restart);
    * ``model_best.pth`` records ``best_metric: {name, mode, value, iteration, run}``;
      a run resumed with another metric or mode starts its best anew;
    * saving it leaves ``last_checkpoint`` where it was (``--resume`` continues training),
      and a resumed run takes the best from ``model_best.pth`` when that is better than
      the state it resumed (evaluations after its last checkpoint, the one after training
      among them) and was written by the same run (``run``: an id the hook state keeps).
    * a ``TEST.BEST_METRIC`` that an evaluation of its set did not compute (a typo in its
      section or metric) is a ConfigError listing what it did, on every rank, at that first
      evaluation: the stock hook warns at each one and never saves.
    """

    def __init__(self, *args, evaluated_set: Optional[str] = None, **kwargs):
        """``evaluated_set``: the evaluated set the metric belongs to ("<set>" of
        "<set>/<section>/<metric>"), whose results say whether the metric is missing; None:
        not checked (Detectron2's warning)."""
        super().__init__(*args, **kwargs)
        # Which run this is, kept across --resume: a model_best.pth record of another run (one
        # started anew in this OUTPUT_DIR) is not this run's best. Drawn from the system, not
        # from the seeded generators.
        self._run = uuid.uuid4().hex
        self._evaluated_set = evaluated_set

    def _missing_metric(self, stored) -> Optional[str]:
        """Why the metric is not among the results ``stored`` of its set, or None (it is, or
        that set was not evaluated)."""
        if self._val_metric in stored:
            return None
        prefix = self._evaluated_set + "/"
        computed = [k[len(prefix) :] for k in stored if k.startswith(prefix)]
        if not computed:
            return None
        section, metric = self._val_metric[len(prefix) :].split("/", 1)
        metrics = sorted(k[len(section) + 1 :] for k in computed if k.startswith(section + "/"))
        if metrics:
            return (f"TEST.BEST_METRIC: {prefix + section!r} has no metric {metric!r}; it has "
                    f"{shortlist(metrics, MAX_METRICS_LISTED)}")
        sections = sorted({k.split("/", 1)[0] for k in computed})
        return (f"TEST.BEST_METRIC: {self._evaluated_set!r} has no section {section!r}; it has "
                f"{shortlist(sections, MAX_METRICS_LISTED)}")

    def _check_computed(self) -> None:
        # Found on the main process, whose storage alone holds the results, and raised on
        # every rank: a rank that stopped alone would leave the others waiting in the next
        # collective until its timeout.
        problem = self._missing_metric(self.trainer.storage.latest()) if comm.is_main_process() else None
        raise_on_every_rank(ConfigError(problem) if problem else None)

    def _best_checking(self):
        if self._evaluated_set is not None:
            self._check_computed()
        if not comm.is_main_process():
            # Evaluation results reach the main process's storage only; the others would
            # warn at every evaluation that the metric is missing (and never save anyway).
            return
        latest = self.trainer.storage.latest().get(self._val_metric)
        if latest is not None:
            value, iteration = latest
            improved = self.best_metric is None or self._compare(value, self.best_metric)
            if math.isfinite(value) and improved:
                # Update before saving: the saved trainer state must hold the new best.
                self.best_metric, self.best_iter = value, iteration
                # model_best is no resume point: saving tags it as the last checkpoint, and
                # the evaluation after training counts MAX_ITER where model_final.pth holds
                # MAX_ITER - 1, so --resume from it would skip an iteration. Keep the tag.
                resume_from = self._checkpointer.get_checkpoint_file() if self._checkpointer.has_checkpoint() else None
                self._checkpointer.save(
                    self._file_prefix,
                    iteration=iteration,
                    best_metric={"name": self._val_metric, "mode": self._mode, "value": value, "iteration": iteration,
                                 "run": self._run},
                )
                if resume_from:
                    self._checkpointer.tag_last_checkpoint(os.path.basename(resume_from))
                logger.info(f"Saved {self._file_prefix}: {self._val_metric} = {value:.4f} @ iteration {iteration}")
                return
        # Not better, not finite or not computed: the stock hook logs why and saves nothing.
        super()._best_checking()

    @property
    def _mode(self) -> str:
        return "max" if self._compare is operator.gt else "min"

    def state_dict(self):
        return {"best_metric": self.best_metric, "best_iter": self.best_iter, "name": self._val_metric,
                "mode": self._mode, "run": self._run}

    def load_state_dict(self, state_dict):
        # A run resumed with another TEST.BEST_METRIC or BEST_METRIC_MODE starts its best
        # anew: another metric's best (oIoU ~90 for Prec@0.9 ~70) would never be beaten,
        # or always. States saved before the name was kept are taken as this metric's.
        self._run = state_dict.get("run", self._run)
        kept = (state_dict.get("name", self._val_metric), state_dict.get("mode", self._mode))
        if kept == (self._val_metric, self._mode):
            self.best_metric, self.best_iter = state_dict["best_metric"], state_dict["best_iter"]
        else:
            logger.info("The resumed run kept the best of %s (%s); this one keeps %s (%s): its best starts anew",
                        *kept, self._val_metric, self._mode)
            self.best_metric = self.best_iter = None
        # --resume continues from the last periodic checkpoint, saved before the evaluation
        # after training: a best found there is recorded only in model_best.pth.
        path = os.path.join(self._checkpointer.save_dir, f"{self._file_prefix}.pth")
        if os.path.isfile(path):
            try:
                # Mapped, not read: only the record is needed, not the weights.
                recorded = torch_load_checkpoint(path, mmap=True).get("best_metric") or {}
            except Exception as e:
                raise WeightsError(
                    f"{path}: cannot read its best_metric record to resume ({type(e).__name__}: {e}); "
                    "move the file away to resume without it"
                ) from e
            value = recorded.get("value")
            # Records written before runs had an id are taken as this run's.
            ours = recorded.get("run", self._run) == self._run
            if (ours and recorded.get("name") == self._val_metric and recorded.get("mode", self._mode) == self._mode
                    and value is not None and math.isfinite(value)):
                if self.best_metric is None or self._compare(value, self.best_metric):
                    self.best_metric, self.best_iter = value, recorded.get("iteration")
