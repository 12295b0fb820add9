"""
Checkpointers that read files as data (``weights_only``), load ``MODEL.WEIGHTS`` strictly
(the predictor, the demo and ``train_net.py --eval-only`` alike), and write self-contained
files that are never half-written.
"""

import logging
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

from vipa_d2.data.validation import quote, shortlist
from vipa_d2.modeling.text_encoder import CHECKPOINT_FILES_KEY, model_files_entry
from vipa_d2.utils.atomic_io import atomic_open
from vipa_d2.utils.checkpoint_file import (
    READ_ERRORS,
    TRUST_HINT,
    UntrustedCheckpointError,
    WeightsError,
    local_weights_path,
    read_error,
    torch_load_checkpoint,
)

logger = logging.getLogger(__name__)

__all__ = [
    "AtomicDetectionCheckpointer",
    "StrictCheckpointer",
    "UntrustedCheckpointError",
    "WeightsError",
    "WeightsOnlyCheckpointer",
    "load_weights",
    "model_checkpoint",
]

# Where --resume reads the checkpoint to load, as messages name it (format: OUTPUT_DIR).
LAST_CHECKPOINT_KEY = "{}/last_checkpoint"
# Keys listed per kind in a weights-mismatch message before "... (+N more)".
MAX_KEYS_REPORTED = 8


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
                + TRUST_HINT
            )
        try:
            return super()._load_file(filename)
        except UntrustedCheckpointError:
            raise
        except READ_ERRORS as e:  # not a checkpoint (empty, cut short, another format)
            raise read_error(e) from e

    def _torch_load(self, f):
        # The hook DetectionCheckpointer._load_file reads .pth files (and the rest) through.
        return torch_load_checkpoint(f, trusted=self.trusted)


def _listing(kind: str, items: List[str]) -> str:
    return f"{len(items)} {kind} [{shortlist(items, MAX_KEYS_REPORTED)}]"


def _another_config(path: str = "") -> str:
    """What to do with a checkpoint that --resume cannot continue (``path``: the file, or
    "" where the message names it already)."""
    return ("was it written by a run with another config? Resume it with that config, or start anew: "
            f"another OUTPUT_DIR, or MODEL.WEIGHTS {path or 'set to it'} without --resume")


def _describe(missing, unexpected, shapes) -> str:
    parts = []
    if missing:
        parts.append(_listing("missing keys", list(missing)))
    if unexpected:
        parts.append(_listing("unexpected keys", list(unexpected)))
    if shapes:
        parts.append(
            _listing(
                "shape mismatches",
                [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in shapes],
            )
        )
    return "; ".join(parts)


class StrictCheckpointer(WeightsOnlyCheckpointer):
    """
    A weights-only checkpointer that refuses a checkpoint whose weights do not match the
    model exactly (missing, unexpected or shape-mismatched keys, all listed), checked
    before any weight is copied, so a wrong file never leaves a half-loaded model behind.
    Detectron2's own loading only logs such keys, and a wrong file gives bad numbers.
    """

    def _load_file(self, filename):
        try:
            loaded = super()._load_file(filename)
        except UntrustedCheckpointError as e:  # load_weights names the file
            raise WeightsError(str(e).removeprefix(f"{filename}: ")) from e
        state = loaded.get("model")  # Detectron2 puts whatever a file holds without "model" there
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise WeightsError(
                "expected the checkpoint's weights as a mapping of parameter names to tensors "
                f"(under 'model'), got {quote(state)}"
            )
        return loaded

    def _load_model(self, checkpoint):
        if checkpoint.get("matching_heuristics", False):
            # Caffe2/pycls files are renamed by heuristics: check what actually loaded.
            incompatible = super()._load_model(checkpoint)
            problems = _describe(
                incompatible.missing_keys,
                incompatible.unexpected_keys,
                incompatible.incorrect_shapes,
            )
        else:
            state = checkpoint["model"]
            if state and all(k.startswith("module.") for k in state):  # saved from (D)DP
                state = {k[len("module.") :]: v for k, v in state.items()}
                checkpoint["model"] = state
            # Older layouts (e.g. VIPA before its head existed) are renamed first, so they
            # are compared, and loaded, in the model's current layout.
            upgrade = getattr(self.model, "upgrade_state_dict", None)
            if upgrade is not None:
                state = checkpoint["model"] = upgrade(dict(state))
            expected = self.model.state_dict()
            problems = _describe(
                [k for k in expected if k not in state],
                [k for k in state if k not in expected],
                [
                    (k, tuple(np.shape(v)), tuple(expected[k].shape))
                    for k, v in state.items()
                    if k in expected and tuple(np.shape(v)) != tuple(expected[k].shape)
                ],
            )
            if not problems:
                incompatible = super()._load_model(checkpoint)
        if problems:
            raise WeightsError(f"does not match the model: {problems}")
        return incompatible


def load_weights(
    model: torch.nn.Module, weights: str, trusted: bool = False, resume_dir: str = "", key: str = "MODEL.WEIGHTS"
) -> None:
    """
    Load ``weights`` (the option ``key`` of messages, ``MODEL.WEIGHTS`` by default) into
    ``model`` with a :class:`StrictCheckpointer`, refusing missing files and any key/shape
    mismatch (WeightsError / FileNotFoundError naming the file). The file is read
    weights-only unless ``trusted`` (``MODEL.WEIGHTS_TRUSTED``). With ``resume_dir``
    (``--resume``), the last checkpoint recorded there, if any, is loaded instead. An empty
    string keeps the random initialisation and logs a warning saying so.
    """
    checkpointer = StrictCheckpointer(model, save_dir=resume_dir, trusted=trusted)
    if resume_dir and checkpointer.has_checkpoint():
        weights, key = checkpointer.get_checkpoint_file(), LAST_CHECKPOINT_KEY.format(resume_dir)
    if not weights:
        logger.warning(
            "%s is empty: the model keeps its RANDOM initialisation, "
            "so its predictions are meaningless (give %s path/to/model_final.pth).", key, key
        )
        return
    local_weights_path(weights, key)  # FileNotFoundError naming where the file name came from
    try:
        checkpointer.load(weights, checkpointables=[])
    except WeightsError as e:
        raise WeightsError(f"{key}={weights}: {e}") from e


def model_checkpoint(model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> Dict:
    """
    What every checkpoint holds for ``model``: its weights (floating-point tensors cast to
    ``dtype`` if given) and its text encoder's config and tokenizer files, so that the
    file alone rebuilds the model offline (see vipa_d2/modeling/text_encoder.py).
    """
    state = model.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    data = {"model": state}
    files = model_files_entry(model)
    if files is not None:
        data[CHECKPOINT_FILES_KEY] = files
    return data


def save_checkpoint_file(data: Dict, path: str) -> None:
    """``torch.save`` through a temporary file: ``path`` is complete or untouched."""
    with atomic_open(path, "wb") as f:
        torch.save(data, f)


class AtomicDetectionCheckpointer(WeightsOnlyCheckpointer):
    """
    fvcore's ``Checkpointer.save`` and ``tag_last_checkpoint`` write straight into the final
    files, so a job killed mid-save leaves a truncated ``model_*.pth`` and/or a
    ``last_checkpoint`` pointing at it, and ``--resume`` then fails. Here both go through a
    temporary file and ``os.replace``: the checkpoint is complete before it is tagged.
    Files also hold the text encoder's config and tokenizer (:func:`model_checkpoint`).
    Loading is weights-only unless ``trusted`` (see :class:`WeightsOnlyCheckpointer`).
    ``MODEL.WEIGHTS`` loads what matches (fine-tuning from a part of a model); a resumed
    run's checkpoint must match the model key for key (the file is refused after loading,
    so the model it leaves half-loaded is not trained).
    """

    _resuming = False  # set by each load

    def load(self, path: str, checkpointables: Optional[List[str]] = None):
        # Detectron2 resumes with checkpointables None (the trainer's state too) and loads
        # MODEL.WEIGHTS with []: only a resumed run must match the model key for key.
        self._resuming = checkpointables is None or bool(checkpointables)
        try:
            return super().load(path, checkpointables)
        except WeightsError as e:
            raise WeightsError(f"{path}: {e}") from e
        except UntrustedCheckpointError:  # names the file already
            raise
        except ValueError as e:  # e.g. the optimizer's state (--resume) has other parameter groups
            raise WeightsError(f"{path}: cannot be loaded into this model and its optimizer ({e}); "
                               + _another_config(path)) from e

    def _load_model(self, checkpoint):
        # Detectron2 loads what matches and logs the rest, which suits fine-tuning from a
        # part of a model (a backbone), not a resumed run; a file of which nothing matches
        # would leave the whole model at its random initialisation, with only a long log.
        state, names = checkpoint["model"], list(checkpoint["model"])
        heuristics = checkpoint.get("matching_heuristics", False)  # Caffe2 names: Detectron2 renames and reports
        incompatible = super()._load_model(checkpoint)
        if self._resuming and not heuristics:
            # A run continues with the weights it stopped at: a layer of another width
            # would stay random, and AdamW's moments of its old shape fail deep in torch.
            # fvcore drops a mismatched weight before loading, so it is also "missing".
            mismatched = {k for k, _, _ in incompatible.incorrect_shapes}
            problems = _describe([k for k in incompatible.missing_keys if k not in mismatched],
                                 incompatible.unexpected_keys, incompatible.incorrect_shapes)
            if problems:
                raise WeightsError(f"does not match the model to resume ({problems}); " + _another_config())
        # fvcore strips a "module." prefix and drops shape mismatches from ``state`` in place.
        expected = self.model.state_dict()
        if not heuristics and expected and not any(k in expected for k in state):
            raise WeightsError(
                f"none of its {len(names)} weights loaded into the model ({_listing('names', names)}; "
                f"the model's: {_listing('names', list(expected))}); expected a checkpoint of this model "
                "or of a part of it (e.g. 'backbone.' weights)"
            )
        return incompatible

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = model_checkpoint(self.model)
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)

        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        save_checkpoint_file(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_open(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)
