"""
Reading ``MODEL.WEIGHTS`` as data: where the file is, and ``torch.load`` weights-only.

Used by the checkpointers (vipa_d2/engine/checkpoint.py) and by the text encoder, which
reads its config and tokenizer files from the checkpoint before the weights are loaded
(the engine imports the data loaders, which import the text encoder: this module sits
below both).
"""
import os
import pickle

import torch
from detectron2.utils.file_io import PathManager

__all__ = ["UntrustedCheckpointError", "WeightsError", "local_weights_path", "read_error", "torch_load_checkpoint"]

# What the error for a refused checkpoint tells the user to do.
TRUST_HINT = (
    "if you trust this file, set MODEL.WEIGHTS_TRUSTED True (full pickle runs any code the "
    "file names)"
)


class UntrustedCheckpointError(ValueError):
    """A checkpoint needs full pickle to load and was not marked trusted."""


class WeightsError(ValueError):
    """``MODEL.WEIGHTS`` cannot be read or does not match the model."""


# What torch.load raises for a file that is not a checkpoint (garbage, empty, cut short, a
# zip of something else) besides the refusals above.
READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, AssertionError, KeyError, TypeError, pickle.UnpicklingError)


def read_error(e: BaseException) -> WeightsError:
    """The WeightsError for a file torch.load could not read (``e``: one of READ_ERRORS)."""
    # Some say little alone (an empty file: EOFError with no text), hence the type.
    return WeightsError(
        f"cannot read the checkpoint ({type(e).__name__}{': ' if str(e) else ''}{e}); expected a file "
        "written by torch.save, such as train_net.py's model_final.pth"
    )


def local_weights_path(weights: str, key: str = "MODEL.WEIGHTS") -> str:
    """
    The local file behind ``weights`` (a path, or a URL fetched by Detectron2's
    PathManager); FileNotFoundError naming ``key`` (where the value was given) and the
    value when there is none.
    """
    if "://" not in weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{key}={weights}: checkpoint file not found")
        return weights
    try:
        local = PathManager.get_local_path(weights)
    except Exception as e:  # any fetch failure (no network, bad URL) means "not there"
        raise FileNotFoundError(f"{key}={weights}: cannot fetch the checkpoint: {e}") from e
    if not os.path.isfile(local):
        raise FileNotFoundError(f"{key}={weights}: checkpoint file not found")
    return local


def torch_load_checkpoint(f, trusted: bool = False, mmap: bool = False):
    """
    ``torch.load`` of a checkpoint on the CPU, with ``weights_only=True`` unless
    ``trusted``: tensors and plain containers only, any other class or function the pickle
    names is refused (plain ``torch.load`` would call it). ``mmap`` maps the tensors
    instead of reading them (for a look at a checkpoint's non-tensor entries; zip-format
    files only, which is what ``torch.save`` writes).
    """
    kwargs = {"map_location": torch.device("cpu"), "mmap": mmap or None}
    if trusted:
        return torch.load(f, weights_only=False, **kwargs)
    try:
        return torch.load(f, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        # torch prefixes the unpickler's reason with advice to drop weights_only.
        reason = str(e).split("WeightsUnpickler error:")[-1]
        reason = " ".join(reason.split())
        raise UntrustedCheckpointError(
            f"{f}: cannot be loaded as weights only ({reason}); {TRUST_HINT}"
        ) from None
