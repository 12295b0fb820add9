"""Starting the ranks of a run (Detectron2's ``launch``), and leaving torch.distributed
cleanly at the end of a launched process."""
import os
from typing import Callable, Sequence

import torch
from detectron2.engine.launch import DEFAULT_TIMEOUT, launch
from detectron2.utils import comm

# The variable that hides the GPUs from a process (CUDA's own).
CUDA_DEVICES_ENV = "CUDA_VISIBLE_DEVICES"


def launch_ranks(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url=None,
    args: Sequence = (),
    device: str = "cuda",
    timeout=DEFAULT_TIMEOUT,
) -> None:
    """
    Detectron2's ``launch`` for a model on ``device`` (``MODEL.DEVICE``). Its ranks take
    NCCL whenever CUDA is visible, and assert a GPU per rank; NCCL reduces no CPU tensor.
    So the ranks of a CPU model (``--num-gpus 2`` of the tiny config on a machine that has
    GPUs) start with the GPUs hidden, and take gloo as on a machine without them. The
    variable is set while they start (spawned processes copy the environment) and restored.
    """
    hide = torch.device(device).type == "cpu" and num_gpus_per_machine * num_machines > 1
    before = os.environ.get(CUDA_DEVICES_ENV)
    if hide:
        os.environ[CUDA_DEVICES_ENV] = ""
    try:
        launch(main_func, num_gpus_per_machine, num_machines=num_machines, machine_rank=machine_rank,
               dist_url=dist_url, args=tuple(args), timeout=timeout)
    finally:
        if hide and before is None:
            del os.environ[CUDA_DEVICES_ENV]
        elif hide:
            os.environ[CUDA_DEVICES_ENV] = before


def leave_process_group() -> None:
    """
    Wait for every rank, then take the default process group down. A rank that exits while
    gloo's threads still run can abort at interpreter exit ("terminate called without an
    active exception", SIGABRT; seen in CI at ceddac4) after finishing its work, and
    Detectron2's ``launch`` does not destroy the group it created. No-op without one.
    """
    if comm.get_world_size() > 1:
        comm.synchronize()
        torch.distributed.destroy_process_group()
