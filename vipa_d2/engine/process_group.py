"""Leaving torch.distributed cleanly at the end of a launched process."""
import torch
from detectron2.utils import comm


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
