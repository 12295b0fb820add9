"""
Checkpointers that read files as data (``weights_only``) and whose files are never
half-written.
"""

import os
import pickle

import torch
from detectron2.checkpoint import DetectionCheckpointer

from vipa_d2.utils.atomic_io import atomic_open

__all__ = ["AtomicDetectionCheckpointer", "UntrustedCheckpointError", "WeightsOnlyCheckpointer"]

# What the error for a refused checkpoint tells the user to do.
_TRUST_HINT = (
    "if you trust this file, set MODEL.WEIGHTS_TRUSTED True (full pickle runs any code the "
    "file names)"
)


class UntrustedCheckpointError(ValueError):
    """A checkpoint needs full pickle to load and was not marked trusted."""


class WeightsOnlyCheckpointer(DetectionCheckpointer):
    """
    A ``DetectionCheckpointer`` that reads checkpoints as data: ``torch.load`` with
    ``weights_only=True``, which builds tensors and plain containers and refuses any other
    class or function a pickle names (plain ``torch.load`` calls them, so a checkpoint from
    a stranger could run code). The trainer's own checkpoints (model, optimizer, scheduler,
    iteration, hook state) hold nothing else. ``.pkl`` / ``.pyth`` files (Detectron2 /
    pycls model zoo formats) are read with full pickle by Detectron2, so they are refused.

    ``trusted=True`` (``MODEL.WEIGHTS_TRUSTED``) restores Detectron2's full-pickle loading
    for files the user trusts.
    """

    def __init__(self, model, save_dir="", *, trusted: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.trusted = bool(trusted)

    def _load_file(self, filename):
        if not self.trusted and filename.endswith((".pkl", ".pyth")):
            raise UntrustedCheckpointError(
                f"{filename}: .pkl / .pyth checkpoints can only be read with full pickle; "
                + _TRUST_HINT
            )
        return super()._load_file(filename)

    def _torch_load(self, f):
        # The hook DetectionCheckpointer._load_file reads .pth files (and the rest) through.
        if self.trusted:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=False)
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            # torch prefixes the unpickler's reason with advice to drop weights_only.
            reason = str(e).split("WeightsUnpickler error:")[-1]
            reason = " ".join(reason.split())
            raise UntrustedCheckpointError(
                f"{f}: cannot be loaded as weights only ({reason}); {_TRUST_HINT}"
            ) from None


class AtomicDetectionCheckpointer(WeightsOnlyCheckpointer):
    """
    fvcore's ``Checkpointer.save`` and ``tag_last_checkpoint`` write straight into the final
    files, so a job killed mid-save leaves a truncated ``model_*.pth`` and/or a
    ``last_checkpoint`` pointing at it, and ``--resume`` then fails. Here both go through a
    temporary file and ``os.replace``: the checkpoint is complete before it is tagged.
    Loading is weights-only unless ``trusted`` (see :class:`WeightsOnlyCheckpointer`).
    """

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)

        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        with atomic_open(save_file, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_open(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)
