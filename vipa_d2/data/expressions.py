"""Tokens of a dataset record's sentence."""

from typing import Dict

import torch

from ..modeling.text_encoder import tokenize

__all__ = ["tokenize_expression"]


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
