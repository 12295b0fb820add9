"""Processes that share one machine's CPU: each takes its share of the cores."""
import os

import torch


def share_cpu_cores(processes: int) -> None:
    """
    Give torch's intra-op pool this process's share of the cores when ``processes`` run side
    by side (launched CPU ranks, test workers): with every process on all cores, the
    oversubscribed threads spin-wait on each other and can make every step many times slower.
    """
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
