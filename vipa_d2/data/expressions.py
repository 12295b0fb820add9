"""Tokens of a dataset record's sentence."""

from typing import Dict, Optional, Sequence

import torch

from ..modeling.text_encoder import tokenize
from .validation import quote

__all__ = ["text_fit_notes", "tokenize_expression"]


def tokenize_expression(tokenizer, sentence: str, max_len: int) -> Dict[str, torch.Tensor]:
    """
    :func:`vipa_d2.modeling.text_encoder.tokenize` of one record's sentence. A blank
    sentence, which the official readers keep (so the loaders keep it too), becomes the
    empty expression [CLS] [SEP] + padding, as LAVT's and ReLA's ``tokenizer.encode("")``
    give; ``tokenize`` itself refuses blank text, a mistake in user input.
    """
    if sentence.strip():
        return tokenize(tokenizer, [sentence], max_len)
    enc = tokenizer(
        [""], padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def text_fit_notes(tokenizer, sentences: Sequence[str], max_len: int) -> Dict[str, Optional[str]]:
    """
    What a dataset's expressions lose to the tokenizer, for the log: ``"cut"``, how many
    are longer than ``max_len`` tokens ([CLS] and [SEP] included), of which the model reads
    only the beginning, and ``"unknown"``, how many are mostly unknown tokens (words the
    vocabulary lacks: another script than an English tokenizer's), each with an example;
    None where there are none. Training and evaluation cut without a word otherwise.
    """
    texts = [s for s in sentences if s.strip()]
    if not texts:
        return {"cut": None, "unknown": None}
    # Not truncated, to count: verbose=False keeps the tokenizer from warning of the length.
    ids = tokenizer(list(texts), verbose=False)["input_ids"]
    lengths = [len(x) for x in ids]
    cut = [i for i, n in enumerate(lengths) if n > max_len]
    specials = tokenizer.num_special_tokens_to_add()
    unk = tokenizer.unk_token_id
    unknown = [] if unk is None else [i for i, x in enumerate(ids) if 2 * x.count(unk) > len(x) - specials]
    n = len(texts)
    return {
        "cut": f"{len(cut)} of {n} expressions are longer than INPUT.MAX_TEXT_LEN={max_len} tokens ([CLS] and [SEP] "
        f"included; the longest {max(lengths[i] for i in cut)}): the model reads only their beginning, e.g. "
        f"{quote(texts[cut[0]])}" if cut else None,
        "unknown": f"{len(unknown)} of {n} expressions are mostly unknown tokens ({tokenizer.unk_token}: words the "
        f"text encoder's vocabulary lacks), e.g. {quote(texts[unknown[0]])}" if unknown else None,
    }
