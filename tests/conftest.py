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
