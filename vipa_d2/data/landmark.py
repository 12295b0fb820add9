"""
Optional per-expression annotations used to break results down (training reads the
landmark only under ``MODEL.VIPA.LOSS.LANDMARK_WEIGHT`` > 0): an expression ``type``
("relation", "colour", ...); the words naming the target's category (``target_phrase``,
e.g. "circle"); and, for a relation, its landmark: the object the target is described
relative to and the phrase naming it, e.g. "the circle above the red star" -> landmark
phrase "red star".
"""

import re
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .masks import annotations_to_mask, augmented_mask
from .mirror_words import is_flipped, swap_left_right

__all__ = ["find_phrase", "phrase_token_mask", "breakdown_inputs", "landmark_training_inputs"]


def find_phrase(
    text: str, phrase: str, first: bool = False, outside: Optional[Tuple[int, int]] = None
) -> Optional[Tuple[int, int]]:
    """
    Character span [start, end) of the LAST (``first``: the first) whole-word,
    case-insensitive occurrence of ``phrase`` in ``text`` that does not overlap the span
    ``outside``, or None. A relation names its target before its landmark ("the cup left of
    the cup"): the landmark phrase is the last occurrence, the target's name the first.
    """
    if not phrase.strip():
        return None
    pattern = r"(?<!\w)" + re.escape(phrase) + r"(?!\w)"
    spans = [m.span() for m in re.finditer(pattern, text, flags=re.IGNORECASE)]
    if outside is not None:
        spans = [(a, b) for a, b in spans if b <= outside[0] or a >= outside[1]]
    return spans[0 if first else -1] if spans else None


def phrase_token_mask(tokenizer, text: str, span: Tuple[int, int], max_len: int) -> torch.Tensor:
    """
    bool (max_len,): the tokens of ``text`` (tokenized exactly as
    :func:`vipa_d2.modeling.text_encoder.tokenize` does) overlapping the character
    ``span``. Special and padding tokens, and words cut off by truncation, are never marked.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: locating a phrase's tokens "
            "needs its offsets mapping (use a tokenizer with a tokenizer.json)"
        )
    enc = tokenizer(
        text,
        padding="max_length",
        truncation=True,
        max_length=max_len,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    start, end = span
    offsets = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
    special = np.asarray(enc["special_tokens_mask"], dtype=bool)
    inside = (offsets[:, 0] < end) & (offsets[:, 1] > start) & ~special
    return torch.from_numpy(inside)


def breakdown_inputs(record: Dict, sentence: str, tokenizer, max_len: int) -> Dict:
    """
    The test mapper's extra fields for a record carrying them: ``type``; for a
    ``target_phrase`` (the words naming the target's category) ``target_tokens`` (bool,
    max_len, their first occurrence outside the landmark phrase: in "the object above the
    blue triangle" the only "triangle" is the landmark's); for a landmark ``landmark_mask`` (uint8, original
    height x width, rasterized like the target) and ``landmark_tokens`` (bool, max_len).
    Phrases are looked up in ``sentence`` as the model reads it: a text from elsewhere (the
    shuffled-expression control) that does not contain one marks no token.
    """
    out = {}
    if "type" in record:
        out["type"] = record["type"]
    landmark = record.get("landmark")
    landmark_span = None if landmark is None else find_phrase(sentence, landmark["phrase"])
    if "target_phrase" in record:
        out["target_tokens"] = _phrase_tokens(
            tokenizer, sentence, record["target_phrase"], max_len, first=True, outside=landmark_span
        )
    if landmark is not None:
        h, w = record["height"], record["width"]
        out["landmark_mask"] = torch.as_tensor(annotations_to_mask([landmark["annotation"]], h, w))
        out["landmark_tokens"] = _phrase_tokens(tokenizer, sentence, landmark["phrase"], max_len)
    return out


def _phrase_tokens(tokenizer, sentence: str, phrase: str, max_len: int, first: bool = False, outside=None) -> torch.Tensor:
    """bool (max_len,): the tokens of ``phrase`` in ``sentence`` (its last occurrence, or the
    first with ``first``, outside the span ``outside``); none when it is not there."""
    span = find_phrase(sentence, phrase, first=first, outside=outside)
    if span is None:
        return torch.zeros(max_len, dtype=torch.bool)
    return phrase_token_mask(tokenizer, sentence, span, max_len)


def landmark_training_inputs(record: Dict, transforms, out_hw, sentence: str, tokenizer, max_len: int) -> Dict:
    """
    The training mapper's landmark fields (``MODEL.VIPA.LOSS.LANDMARK_WEIGHT`` > 0), present
    on every record so batches stack: ``landmark_mask`` (uint8, ``out_hw``, the landmark
    after the image's augmentation; zeros without one) and ``landmark_tokens`` (bool,
    max_len; none without one). ``sentence`` is the expression as augmented: a flip swapped
    its left/right words, so the phrase is looked up with its own swapped too.
    """
    landmark = record.get("landmark")
    if landmark is None:
        return {"landmark_mask": torch.zeros(out_hw, dtype=torch.uint8),
                "landmark_tokens": torch.zeros(max_len, dtype=torch.bool)}
    phrase = swap_left_right(landmark["phrase"]) if is_flipped(transforms) else landmark["phrase"]
    return {"landmark_mask": torch.as_tensor(augmented_mask([landmark["annotation"]], transforms, out_hw)),
            "landmark_tokens": _phrase_tokens(tokenizer, sentence, phrase, max_len)}
