"""Shared pytest fixtures: deterministic seeding, one thread, a synthetic benchmark on disk
(helpers and paths: tests/common.py)."""
import os
import random

import numpy as np
import pytest
import torch

from common import PREDICTOR_OPTS, TINY_CONFIG, make_cfg
from vipa_d2.data import load_refer_dicts
from vipa_d2.data.builtin import DATASETS_ENV
from vipa_d2.engine import share_cpu_cores
from vipa_d2.predictor import VIPAPredictor
from vipa_d2.data.synthetic import SynthConfig, write_benchmark

# Tests never touch the network: transformers/hub must resolve everything locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    # `make test` runs pytest-xdist workers side by side (one per core), which split the
    # cores as launched ranks do. `workerinput` exists only in an xdist worker.
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:
        share_cpu_cores(workers)
        # The processes a test starts (train_net.py, the demo, the study's runs) take the
        # same share: on all cores, beside the other workers, their threads spin-wait.
        os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


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


@pytest.fixture(scope="session")
def synthetic_benchmark(tmp_path_factory):
    """
    ``make(num_images, image_size=None, seed=0, workers=1) -> (root, stats)``: a synthetic
    benchmark (``<root>/refsynth``, ``<root>/grefsynth``) written once per session for each
    set of arguments (``image_size`` None: the generator's default). Shared: read, never
    write, under ``root``.
    """
    written = {}

    def make(num_images, image_size=None, seed=0, workers=1):
        key = (num_images, image_size, seed, workers)
        if key not in written:
            root = str(tmp_path_factory.mktemp("synthetic"))
            synth = SynthConfig() if image_size is None else SynthConfig(image_size=image_size)
            stats = write_benchmark(root, num_images, seed=seed, cfg=synth, workers=workers, progress=False)
            written[key] = (root, stats)
        return written[key]

    return make


@pytest.fixture(scope="module")
def synthetic_datasets_root(synthetic_benchmark):
    """
    A small synthetic benchmark (6 images of 64 px) as the built-in datasets' root
    (``$DETECTRON2_DATASETS``, which ranks spawned by ``launch`` inherit) for one module.
    """
    root, _ = synthetic_benchmark(6, image_size=64)
    patch = pytest.MonkeyPatch()
    patch.setenv(DATASETS_ENV, root)
    yield root
    patch.undo()


# A tiny random-weight predictor and one synthetic image's expressions (predictor, demo, web app tests).
@pytest.fixture(scope="module")
def records(synthetic_benchmark):
    """Expressions of one synthetic image (non-square: checks the original-size outputs)."""
    root, _ = synthetic_benchmark(4, image_size=128)
    recs = load_refer_dicts(root, "refsynth", "unc", "val", f"{root}/refsynth/images")
    recs = [r for r in recs if r["file_name"] == recs[0]["file_name"]]
    assert len(recs) >= 3 and recs[0]["height"] != recs[0]["width"]
    return recs


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return VIPAPredictor(make_cfg(*PREDICTOR_OPTS, config_file=TINY_CONFIG))
