"""Starting the ranks of a run (Detectron2's ``launch``), raising a problem one rank found on
all of them, and leaving torch.distributed cleanly at the end of a launched process."""
import gc
import os
from typing import Callable, Optional, Sequence

import torch
from detectron2.engine.launch import DEFAULT_TIMEOUT, launch
from detectron2.utils import comm

from .devices import check_device

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
    A ``device`` this machine lacks for its ``num_gpus_per_machine`` ranks is a ConfigError,
    before any rank starts.
    """
    check_device(device, num_gpus_per_machine)
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
        release_process_groups()


def release_process_groups() -> None:
    """Destroy the process groups (no waiting for the other ranks), and tear them down now."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Detectron2 keeps groups in its module (the machine's local group, the cached gloo
    # group): referenced there, their gloo threads outlived the group and met the
    # interpreter's exit (the abort again in session 58's suite run). Released here, and
    # torn down now, while the process is whole.
    if hasattr(comm, "_LOCAL_PROCESS_GROUP"):
        comm._LOCAL_PROCESS_GROUP = None
    for cached in ("_get_global_gloo_group", "create_local_process_group"):  # a later launch makes them anew
        getattr(getattr(comm, cached, None), "cache_clear", lambda: None)()
    gc.collect()


def raise_on_every_rank(problem: Optional[BaseException]) -> None:
    """
    Raise ``problem`` (this rank's, or None), or the first other rank's, on every rank. A
    problem found on one rank (the main process's results, one machine's files) and raised
    there alone leaves the others in their next collective: on one machine until ``launch``
    ends them, on several until the process group's timeout.
    """
    if comm.get_world_size() > 1:
        gathered = comm.all_gather(problem)  # every rank takes part, with or without one
        if problem is None:  # this rank's own keeps its traceback
            problem = next((p for p in gathered if p is not None), None)
    if problem is not None:
        raise problem
