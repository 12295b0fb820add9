"""
The DatasetCatalog loader of a REFER split, which keeps what it loaded while the files are
unchanged.

A run reads each split several times: the checks before training, and every evaluation
(each test set, its shuffled-expression control, test-time augmentation). Each read parsed
the whole refs file again: at RefCOCO's size (142k expressions, a 25 MB refs pickle read by
the safe, pure-Python unpickler) 10-15 s per read, about 35 s before the first iteration
and again at every evaluation (scale review, session 60).
"""
import os
import pickle
from typing import Callable, Dict, List, Optional, Tuple

from .refer import INSTANCES_FILE, load_refer_dicts, refs_file_name

__all__ = ["CachedReferSplit"]


def _stamps(paths: List[str]) -> Optional[Tuple]:
    """What identifies the files' contents without reading them (None if one is missing):
    a rewrite changes the size or the modification time, a replacement the inode."""
    try:
        stats = [(os.path.realpath(p), os.stat(p)) for p in paths]
    except OSError:  # the loader says what is missing
        return None
    return tuple((real, s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for real, s in stats)


class CachedReferSplit:
    """
    ``load_refer_dicts(**arguments())`` as a DatasetCatalog loader. The records are kept as
    one pickled bytes object (not a Python list, which the garbage collector walks and forked
    data-loader workers would then copy page by page), and a call while the refs file and
    ``instances.json`` are the same files, unchanged, unpickles them: a fresh list each time,
    as the catalog's callers may change what they get. The pickle is this process's own, made
    from records it built, so the fast unpickler reads it safely. ``arguments`` is called
    each time: a built-in's root follows $DETECTRON2_DATASETS.
    """

    def __init__(self, arguments: Callable[[], Dict]):
        self._arguments = arguments
        self._key = None
        self._records = b""

    def __call__(self) -> List[Dict]:
        arguments = self._arguments()
        folder = os.path.join(arguments["refer_root"], arguments["dataset"])
        refs = refs_file_name(arguments["split_by"], arguments.get("generalized", False))
        stamps = _stamps([os.path.join(folder, refs), os.path.join(folder, INSTANCES_FILE)])
        key = (sorted(arguments.items()), stamps)
        if stamps is not None and key == self._key:
            return pickle.loads(self._records)
        records = load_refer_dicts(**arguments)
        if stamps is not None:
            self._key, self._records = key, pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL)
        return records
