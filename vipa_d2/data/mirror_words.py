"""Words a horizontal flip mirrors: an expression must stay true of the flipped image."""
import re

from detectron2.data import transforms as T

__all__ = ["is_flipped", "swap_left_right"]

_MIRRORED = {"left": "right", "right": "left"}
# "left" / "right" alone or as the stem of one word: "leftmost", "righthand(ed)", "leftside",
# "leftest", "leftish", "lefty", "rightward(s)". The tokenizer splits those into "left" /
# "right" pieces, so a compound left as written would name the wrong side. "leftover",
# "upright", "rights" are not matched.
_MIRRORED_RE = re.compile(r"\b(left|right)(most|side|hand|handed|est|ish|y|wards?)?\b", re.IGNORECASE)


def swap_left_right(sentence: str) -> str:
    """Mirror left/right words so an expression stays true for a horizontally flipped image."""

    def repl(m):
        stem, suffix = m.group(1), m.group(2) or ""
        out = _MIRRORED[stem.lower()]
        if stem.isupper():
            out = out.upper()
        elif stem[0].isupper():
            out = out.capitalize()
        return out + suffix

    return _MIRRORED_RE.sub(repl, sentence)


def is_flipped(transforms) -> bool:
    """Whether an augmentation's ``transforms`` mirror the image horizontally."""
    return any(isinstance(t, T.HFlipTransform) for t in transforms)
