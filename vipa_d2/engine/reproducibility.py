"""
Bit-exact resumable training on CPU: a resumed run sees the same batches, the same
augmentation randomness and the same model randomness (Gumbel noise, dropout) as an
uninterrupted one.

Every random draw is tied to a position in the run instead of to RNG state carried
from the start: the sampler stream is a pure function of (seed, position), each sample
is mapped under an RNG seeded by (seed, position), and each iteration starts from an RNG
seeded by (seed, rank, iteration). Resuming at iteration k therefore only needs k.
"""
import contextlib
import itertools
import logging
import random
from typing import Callable, Iterable, Iterator, Tuple

import numpy as np
import torch
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch.utils.data import Dataset, Sampler, get_worker_info

logger = logging.getLogger(__name__)


def derive_seed(*keys: int) -> int:
    """A well-mixed 31-bit seed from integer keys (e.g. base seed, position)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] >> 1)


class ResumableTrainingSampler(Sampler):
    """
    Like detectron2's ``TrainingSampler`` (an infinite stream of seeded epoch permutations,
    rank r taking every world_size-th item) but it yields ``(position, index)`` pairs and
    can start at any global ``position``, so a run resumed at iteration k continues with
    the batch an uninterrupted run would have drawn.
    """

    def __init__(self, size: int, seed: int, start_position: int = 0, shuffle: bool = True):
        if size <= 0:
            raise ValueError(f"ResumableTrainingSampler needs a non-empty dataset, got size={size}")
        if start_position < 0:
            raise ValueError(f"start_position must be >= 0, got {start_position}")
        self._size = int(size)
        self._seed = int(seed)
        self._start = int(start_position)
        self._shuffle = shuffle
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        stream = self._infinite_stream()
        yield from itertools.islice(stream, self._start + self._rank, None, self._world_size)

    def _infinite_stream(self) -> Iterator[Tuple[int, int]]:
        generator = torch.Generator()
        generator.manual_seed(self._seed)
        position = 0
        while True:
            if self._shuffle:
                order = torch.randperm(self._size, generator=generator).tolist()
            else:
                order = range(self._size)
            for index in order:
                yield position, index
                position += 1


class PositionSeededDataset(Dataset):
    """
    Maps ``records[index]`` with ``mapper`` for a ``(position, index)`` key from
    :class:`ResumableTrainingSampler`, under python/numpy/torch RNGs seeded by
    (seed, position): random augmentations depend on where the sample is in the run,
    not on which data-loader worker maps it or on what ran before.
    """

    def __init__(self, records: Dataset, mapper, seed: int):
        self._records = records
        self._mapper = mapper
        self._seed = int(seed)

    def __len__(self):
        return len(self._records)

    def __getitem__(self, key: Tuple[int, int]):
        position, index = key
        # Mapped in the training process itself (DATALOADER.NUM_WORKERS 0), the sample must
        # leave the RNGs StepSeedHook seeded for the model alone: same values as a worker.
        with _restored_rngs() if get_worker_info() is None else contextlib.nullcontext():
            seed_all_rng(derive_seed(self._seed, position))
            return self._mapper(self._records[index])


@contextlib.contextmanager
def _restored_rngs():
    """Put the python, numpy and torch (CPU and CUDA) RNG states back on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class StepSeedHook(HookBase):
    """Seeds the RNGs of each rank at the start of every iteration from (seed, rank, iter)."""

    def __init__(self, seed: int):
        self._seed = int(seed)

    def before_step(self):
        seed_all_rng(derive_seed(self._seed, comm.get_rank(), self.trainer.iter))


class ResumablePreciseBN(hooks.PreciseBN):
    """
    Detectron2's PreciseBN hook whose batches a resumed run takes where the interrupted
    run's stopped. The stock hook reads one train loader from its start through the whole
    run, so after a resume at iteration k its next pass would read the batches of its first
    pass again, and the BatchNorm statistics it checkpoints would differ from those of an
    uninterrupted run. ``build_loader(start_iter)``: the train loader starting at iteration
    ``start_iter`` of its stream.
    """

    def __init__(self, period: int, model, build_loader: Callable[[int], Iterable], num_iter: int):
        super().__init__(period, model, None, num_iter)
        self._build_loader = build_loader

    def before_train(self):
        if self._disabled:
            return
        # Passes run after each iteration i with (i + 1) % period == 0, each reading num_iter batches.
        passes_done = self.trainer.start_iter // self._period if self._period > 0 else 0
        self._data_loader = self._build_loader(passes_done * self._num_iter)
        self._data_iter = None
