"""Training/evaluation machinery for VIPA on Detectron2 (used by train_net.py)."""
from .best_checkpoint import BestMetricCheckpointer, best_metric_name
from .checkpoint import (
    AtomicDetectionCheckpointer,
    StrictCheckpointer,
    UntrustedCheckpointError,
    WeightsError,
    WeightsOnlyCheckpointer,
    load_weights,
    model_checkpoint,
)
from .cpu_threads import share_cpu_cores, usable_cores
from .devices import check_device
from .expected_results import referring_tasks, verify_on_every_rank, verify_referring_results
from .expression_control import SHUFFLED_SUFFIX, shuffle_expressions
from .host_memory import keep_freed_host_memory
from .optimizer import build_vipa_optimizer, get_vipa_optimizer_params
from .process_group import launch_ranks, leave_process_group, raise_on_every_rank, release_process_groups
from .reproducibility import PositionSeededDataset, ResumableTrainingSampler, StepSeedHook
from .test_time_augmentation import TTA_RESULTS_FOLDER, TTA_SUFFIX, VIPAWithTTA
from .trainer import ReferringTrainer, check_referring_datasets

__all__ = [
    "AtomicDetectionCheckpointer",
    "BestMetricCheckpointer",
    "best_metric_name",
    "PositionSeededDataset",
    "ReferringTrainer",
    "ResumableTrainingSampler",
    "SHUFFLED_SUFFIX",
    "StepSeedHook",
    "build_vipa_optimizer",
    "check_device",
    "check_referring_datasets",
    "get_vipa_optimizer_params",
    "keep_freed_host_memory",
    "launch_ranks",
    "leave_process_group",
    "raise_on_every_rank",
    "release_process_groups",
    "share_cpu_cores",
    "usable_cores",
    "shuffle_expressions",
    "StrictCheckpointer",
    "UntrustedCheckpointError",
    "WeightsError",
    "WeightsOnlyCheckpointer",
    "load_weights",
    "model_checkpoint",
    "TTA_RESULTS_FOLDER",
    "TTA_SUFFIX",
    "VIPAWithTTA",
    "referring_tasks",
    "verify_on_every_rank",
    "verify_referring_results",
]
