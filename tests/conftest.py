"""Shared pytest fixtures: deterministic seeding and small real assets on disk."""
import os
import random

import numpy as np
import pytest
import torch

# Tests never touch the network: transformers/hub must resolve everything locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def single_thread():
    # Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription
    # stalls when other processes are busy (and is no slower when they are not).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
