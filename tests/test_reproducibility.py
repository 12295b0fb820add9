"""The position- and iteration-keyed randomness behind bit-exact resume
(vipa_d2/engine/reproducibility.py): what the resume test alone cannot see, since a run that
drew the same numbers at every step, or for every epoch of an image, still resumes exactly."""
import types

import numpy as np
import torch

from vipa_d2.engine.reproducibility import PositionSeededDataset, StepSeedHook


def _draws_at(hook, iteration):
    hook.trainer = types.SimpleNamespace(iter=iteration)  # what the hook reads of its trainer
    hook.before_step()
    return torch.rand(3).tolist(), float(np.random.rand())


def test_each_iteration_draws_its_own_model_randomness():
    # Gumbel noise and dropout must differ between steps, and be the same at a step however
    # the run got there (a resume).
    hook = StepSeedHook(seed=7)
    first, second = _draws_at(hook, 0), _draws_at(hook, 1)
    assert first != second and _draws_at(hook, 1) == second and _draws_at(hook, 0) == first
    assert _draws_at(StepSeedHook(seed=8), 1) != second


def test_augmentation_randomness_follows_the_position_not_the_image():
    # The same image at two positions of the run (two epochs) is augmented with other draws;
    # at one position the draws are the same whichever image sits there.
    dataset = PositionSeededDataset(["a", "b"], lambda record: (record, float(np.random.rand())), seed=3)
    (_, epoch0), (_, epoch1) = dataset[(0, 1)], dataset[(2, 1)]
    assert epoch0 != epoch1
    assert dataset[(2, 0)][1] == epoch1 and dataset[(0, 1)][1] == epoch0
    # Mapped in the training process, it leaves the model's RNG where the step seeded it.
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    dataset[(5, 0)]
    assert np.random.rand() == expected
