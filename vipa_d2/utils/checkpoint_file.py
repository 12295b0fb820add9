"""
Reading ``MODEL.WEIGHTS`` as data: where the file is, and ``torch.load`` weights-only.

Used by the checkpointers (vipa_d2/engine/checkpoint.py) and by the text encoder, which
reads its config and tokenizer files from the checkpoint before the weights are loaded
(the engine imports the data loaders, which import the text encoder: this module sits
below both).
"""
import functools
import logging
import os
import pickle
import zipfile
from typing import FrozenSet, NamedTuple, Optional

import torch
from detectron2.utils.file_io import PathManager

__all__ = [
    "CheckpointOutline",
    "UntrustedCheckpointError",
    "WeightsError",
    "checkpoint_outline",
    "local_weights_path",
    "read_error",
    "torch_load_checkpoint",
]

logger = logging.getLogger(__name__)

# Checkpoint entry with the text encoder's config.json and tokenizer files:
# {file name: uint8 tensor of its bytes} (see vipa_d2.modeling.text_encoder.files_entry).
CHECKPOINT_FILES_KEY = "text_encoder_files"
# The prefix DistributedDataParallel adds to the weights' names (fvcore strips it on load).
DDP_PREFIX = "module."

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


def _starts_as_checkpoint(f) -> bool:
    """Whether ``f`` (a path or a seekable file) begins as torch.save's zip archive or as a
    pickle (protocol 2 and up, as torch.save's legacy format and Detectron2's .pkl are)."""
    if isinstance(f, (str, os.PathLike)):
        with open(f, "rb") as opened:
            head = opened.read(2)
    else:
        f.seek(0)
        head = f.read(2)
    return head == b"PK" or head[:1] == pickle.PROTO


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
        if not _starts_as_checkpoint(f):  # an HTML error page, a JSON file: trust would not help
            raise pickle.UnpicklingError(f"neither a zip archive nor a pickle ({reason})") from None
        raise UntrustedCheckpointError(
            f"{f}: cannot be loaded as weights only ({reason}); {TRUST_HINT}"
        ) from None


class CheckpointOutline(NamedTuple):
    """What a checkpoint holds, short of its weights' values."""

    # First parts of its weights' names ("backbone", "text_encoder", ...): the modules it has
    # weights for.
    modules: FrozenSet[str]
    # Its CHECKPOINT_FILES_KEY entry with each 1-D uint8 tensor as bytes (None without one).
    text_encoder_files: object


def _as_bytes(entry):
    """A {name: 1-D uint8 tensor} entry with each such tensor as bytes; anything else is
    left for the reader's checks to name."""
    if not isinstance(entry, dict):
        return entry
    is_bytes = lambda t: isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1  # noqa: E731
    return {name: t.numpy().tobytes() if is_bytes(t) else t for name, t in entry.items()}


# One model build asks several times (the backbone, the text encoder, its tokenizer, each
# test loader's mapper, TTA), and each read unpickles the checkpoint's every tensor record
# (about 0.5 s for the tiny model's). Keyed by the file's identity: a rewritten checkpoint
# is read anew.
@functools.lru_cache(maxsize=4)
def _read_outline(weights: str, identity, trusted: bool) -> Optional[CheckpointOutline]:
    path = identity[0]
    if not zipfile.is_zipfile(path):  # Detectron2 zoo / legacy formats: not looked into
        # A file that is no pickle either (empty, cut short, text) fails to load with its own
        # message: this warning would only come first and mislead.
        if _starts_as_checkpoint(path):
            logger.warning(f"MODEL.WEIGHTS={weights} is not in torch.save's zip format, so which modules it holds "
                           "is not read: the encoders are built for it to fill; a backbone-only file would leave "
                           "the text encoder random (re-save it with torch.save to have that checked)")
        return None
    # Memory-mapped: the weights are not read here, only the records that name them.
    try:
        checkpoint = torch_load_checkpoint(path, trusted=trusted, mmap=True)
    except UntrustedCheckpointError:
        raise
    except READ_ERRORS as e:  # a zip that torch.save did not write, say
        raise WeightsError(f"MODEL.WEIGHTS={weights}: {read_error(e)}") from e
    if not isinstance(checkpoint, dict):
        return CheckpointOutline(frozenset(), None)
    # Detectron2 reads a file without "model" (a bare state dict) as the weights.
    state = checkpoint.get("model", checkpoint)
    names = [k for k in state if isinstance(k, str)] if isinstance(state, dict) else []
    names = [k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k for k in names]
    return CheckpointOutline(frozenset(k.split(".")[0] for k in names), _as_bytes(checkpoint.get(CHECKPOINT_FILES_KEY)))


def checkpoint_outline(weights: str, trusted: bool = False) -> Optional[CheckpointOutline]:
    """
    The outline of checkpoint ``weights`` (``MODEL.WEIGHTS``; ``trusted``:
    ``MODEL.WEIGHTS_TRUSTED``), or None for a file not in torch.save's zip format (a
    Detectron2 model zoo ``.pkl``, say), which is not looked into. Read once per version
    of the file; FileNotFoundError / WeightsError naming ``weights`` when it cannot be.
    """
    path = local_weights_path(weights)
    stat = os.stat(path)
    identity = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return _read_outline(weights, identity, trusted)
