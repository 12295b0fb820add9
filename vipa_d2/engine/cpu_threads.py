"""Processes that share one machine's CPU: each takes its share of the cores."""
import os

import torch


def share_cpu_cores(processes: int) -> None:
    """
    Give torch's intra-op pool this process's share of the cores when ``processes`` run side
    by side (launched CPU ranks, test workers): with every process on all cores, the
    oversubscribed threads spin-wait on each other and can make every step many times slower.
    """
    torch.set_num_threads(max(1, usable_cores() // processes))


def usable_cores() -> int:
    """The cores this process may run on: its affinity (taskset, SLURM, cgroup cpusets),
    where the system tells it, else all of the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
