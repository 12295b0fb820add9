"""A DetectionCheckpointer whose files are never half-written."""
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

from vipa_d2.utils.atomic_io import atomic_open


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """
    fvcore's ``Checkpointer.save`` and ``tag_last_checkpoint`` write straight into the final
    files, so a job killed mid-save leaves a truncated ``model_*.pth`` and/or a
    ``last_checkpoint`` pointing at it, and ``--resume`` then fails. Here both go through a
    temporary file and ``os.replace``: the checkpoint is complete before it is tagged.
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
