"""Evaluation results as Detectron2's "copypaste:" csv lines, every metric kept."""
import logging
from collections.abc import Mapping

logger = logging.getLogger(__name__)


def print_csv_format(results: Mapping) -> None:
    """
    Log each task of ``results`` ({task: {metric: value}}) as the three "copypaste:" lines of
    ``detectron2.evaluation.print_csv_format``, but with every metric: detectron2 leaves out
    names containing "-" (its per-class "AP-<class>"), which here would drop gRefCOCO's
    N-acc and T-acc.
    """
    for task, metrics in results.items():
        if not isinstance(metrics, Mapping):
            logger.info(f"copypaste: {task}={metrics}")
            continue
        logger.info(f"copypaste: Task: {task}")
        logger.info("copypaste: " + ",".join(metrics))
        logger.info("copypaste: " + ",".join(f"{value:.4f}" for value in metrics.values()))
