"""
Optional per-expression annotations used to break results down (they never change
training): an expression ``type`` ("relation", "colour", ...) and, for a relation, its
landmark: the object the target is described relative to and the phrase naming it, e.g.
"the circle above the red star" -> landmark phrase "red star".
"""

import re
from typing import Optional, Tuple

__all__ = ["find_phrase"]


def find_phrase(text: str, phrase: str) -> Optional[Tuple[int, int]]:
    """
    Character span [start, end) of the LAST whole-word, case-insensitive occurrence of
    ``phrase`` in ``text``, or None. The last one because a relation names its landmark
    after the target ("the cup left of the cup" -> the second "cup").
    """
    if not phrase.strip():
        return None
    pattern = r"(?<!\w)" + re.escape(phrase) + r"(?!\w)"
    matches = list(re.finditer(pattern, text, flags=re.IGNORECASE))
    return matches[-1].span() if matches else None
