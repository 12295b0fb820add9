"""The shuffled-expression control: does the model use the language at all?"""
import collections
import copy
import logging
from typing import Dict, List

import numpy as np

logger = logging.getLogger(__name__)

# Suffix of the result key of a dataset evaluated with shuffled expressions.
SHUFFLED_SUFFIX = "/shuffled"
# Per-expression fields that describe the text and so move with it (the evaluator's
# per-type table reads "type"); the landmark and target fields describe the image.
TEXT_FIELDS = ("type",)


def check_shufflable(records: List[Dict], name: str = "") -> None:
    """ValueError unless ``records`` (of the dataset ``name``) are enough to shuffle: two."""
    if len(records) < 2:
        of = f" of {name}" if name else ""
        raise ValueError(f"The shuffled-expression control{of} needs at least 2 records, got {len(records)}")


def shuffle_expressions(records: List[Dict], seed: int) -> List[Dict]:
    """
    Copies of ``records`` in which every record's ``sentence["raw"]`` (with its expression
    ``type``, when records carry one) comes from a record of another image, seeded, while
    images, targets and ids stay in place. A model that reads the expression should score
    far lower on these; one that ignores it scores the same.

    Each record takes the text of the record ``m`` places on along a random order that keeps
    each image's records together, ``m`` being the most records any image has (at most all
    but one): no record keeps its own text, and none gets its own image's unless one image
    holds more than half of the records (then a warning counts them). A text naming an
    object that this image happens to have too (another "blue circle") is the control's
    chance level.
    """
    check_shufflable(records)
    image_of = [record.get("image_id", record.get("file_name", i)) for i, record in enumerate(records)]
    images = collections.defaultdict(list)
    for i, image in enumerate(image_of):
        images[image].append(i)
    rng = np.random.default_rng(seed)
    groups = list(images.values())
    order = np.concatenate([rng.permutation(groups[g]) for g in rng.permutation(len(groups))])
    largest = max(len(g) for g in groups)
    donors = np.empty_like(order)
    donors[order] = np.roll(order, -min(largest, len(records) - 1))
    same = sum(image_of[i] == image_of[d] for i, d in enumerate(donors))
    if same:
        logger.warning(f"Shuffled-expression control: {same} of {len(records)} records got a text of their own "
                       f"image (one image holds {largest}, more than half)")
    shuffled = []
    for record, donor in zip(records, donors):
        source = records[int(donor)]
        new = copy.deepcopy(record)
        new["sentence"] = {**record["sentence"], "raw": source["sentence"]["raw"]}
        for key in TEXT_FIELDS:
            new.pop(key, None)
            if key in source:
                new[key] = source[key]
        shuffled.append(new)
    return shuffled
