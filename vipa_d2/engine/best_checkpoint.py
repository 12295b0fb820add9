"""Keep the weights of the best validation score seen so far (``model_best.pth``)."""
import logging
import math

from detectron2.engine import hooks

logger = logging.getLogger(__name__)

# The metric ReferringEvaluator reports (under its "refer" section) that picks the best model.
BEST_METRIC = "oIoU"
BEST_METRIC_SECTION = "refer"


def best_metric_name(dataset_name: str) -> str:
    """The storage key ``EvalHook`` gives ``dataset_name``'s oIoU (results flattened with "/")."""
    return f"{dataset_name}/{BEST_METRIC_SECTION}/{BEST_METRIC}"


class BestMetricCheckpointer(hooks.BestCheckpointer):
    """
    Detectron2's ``BestCheckpointer`` (run after ``EvalHook``, same period), plus:

    * the best value and its iteration are hook state, so they are saved with every
      checkpoint and restored by ``--resume`` (the stock hook starts again from None and
      would overwrite ``model_best.pth`` with a worse model after a restart);
    * ``model_best.pth`` records ``best_metric: {name, value, iteration}``.
    """

    def _best_checking(self):
        latest = self.trainer.storage.latest().get(self._val_metric)
        if latest is not None:
            value, iteration = latest
            improved = self.best_metric is None or self._compare(value, self.best_metric)
            if math.isfinite(value) and improved:
                # Update before saving: the saved trainer state must hold the new best.
                self.best_metric, self.best_iter = value, iteration
                self._checkpointer.save(
                    self._file_prefix,
                    iteration=iteration,
                    best_metric={"name": self._val_metric, "value": value, "iteration": iteration},
                )
                logger.info(f"Saved {self._file_prefix}: {self._val_metric} = {value:.4f} @ iteration {iteration}")
                return
        # Not better, not finite or not computed: the stock hook logs why and saves nothing.
        super()._best_checking()

    def state_dict(self):
        return {"best_metric": self.best_metric, "best_iter": self.best_iter}

    def load_state_dict(self, state_dict):
        self.best_metric = state_dict["best_metric"]
        self.best_iter = state_dict["best_iter"]
