"""The shuffled-expression control: does the model use the language at all?"""
import copy
from typing import Dict, List

import numpy as np

# Suffix of the result key of a dataset evaluated with shuffled expressions.
SHUFFLED_SUFFIX = "/shuffled"


def shuffle_expressions(records: List[Dict], seed: int) -> List[Dict]:
    """
    Copies of ``records`` in which every record's ``sentence["raw"]`` comes from another
    record (a seeded derangement: no record keeps its own text), while images, targets and
    ids stay in place. A model that reads the expression should score far lower on these;
    one that ignores it scores the same.

    Two records of the same referent (paraphrases) may still swap texts; with many
    referents per split that is rare and only makes the control conservative.
    """
    if len(records) < 2:
        raise ValueError(
            f"The shuffled-expression control needs at least 2 records, got {len(records)}"
        )
    order = np.random.default_rng(seed).permutation(len(records))
    # Each record takes the text of its successor along a random order: one big cycle,
    # so no record keeps its own text.
    donors = np.empty_like(order)
    donors[order] = np.roll(order, -1)
    shuffled = []
    for record, donor in zip(records, donors):
        new = copy.deepcopy(record)
        new["sentence"] = {**record["sentence"], "raw": records[int(donor)]["sentence"]["raw"]}
        shuffled.append(new)
    return shuffled
