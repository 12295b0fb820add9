"""
The DatasetCatalog loader of a REFER split, which keeps what it loaded while the files are
unchanged.

A run reads each split several times: the checks before training, and every evaluation
(each test set, its shuffled-expression control, test-time augmentation). Each read parsed
the whole refs file again: at RefCOCO's size (142k expressions, a 24 MB refs pickle read by
the safe, pure-Python unpickler) 10-20 s per read: 64 s at every evaluation of three test
sets and their shuffled controls, 7 s with the records kept (scale review, session 60;
tools/data_scale.py).
"""
import hashlib
import os
import pickle
from typing import Callable, Dict, List, Optional, Tuple

from .refer import load_refer_dicts, refer_paths

__all__ = ["CachedReferSplit"]

# Bytes hashed at a time: the files are read in pieces, never whole into memory.
_HASH_CHUNK = 1 << 20


def _fingerprints(paths: Tuple[str, ...]) -> Optional[Tuple]:
    """Each file's real path, size and content hash (None if one cannot be read: the loader
    says what is wrong). The content, not the modification time: a file rewritten in place
    within the clock's granularity, or by a copy that keeps times (``rsync -t``), is new."""
    out = []
    try:
        for path in paths:
            digest = hashlib.blake2b(digest_size=16)
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
                    digest.update(chunk)
            out.append((os.path.realpath(path), os.path.getsize(path), digest.hexdigest()))
    except OSError:
        return None
    return tuple(out)


class CachedReferSplit:
    """
    ``load_refer_dicts(**arguments())`` as a DatasetCatalog loader. The records are kept as
    one pickled bytes object (not a Python list, which the garbage collector walks and forked
    data-loader workers would then copy page by page), and a call while the refs file and
    ``instances.json`` have the same contents unpickles them (hashing 50 MB takes well under
    a second; parsing them 10-20 s): a fresh list each time, as the catalog's callers may
    change what they get. The pickle is this process's own, made from records it built, so
    the fast unpickler reads it safely. ``arguments`` is called each time: a built-in's root
    follows $DETECTRON2_DATASETS. A later call does not log the first one's notes again.
    """

    def __init__(self, arguments: Callable[[], Dict]):
        self._arguments = arguments
        self._kept = None  # (key, pickled records), replaced as one

    def __call__(self) -> List[Dict]:
        arguments = self._arguments()
        files = refer_paths(arguments["refer_root"], arguments["dataset"], arguments["split_by"],
                            arguments.get("generalized", False))
        fingerprints = _fingerprints(files)
        key = (sorted(arguments.items()), fingerprints)
        kept = self._kept
        if fingerprints is not None and kept is not None and kept[0] == key:
            return pickle.loads(kept[1])
        records = load_refer_dicts(**arguments)
        if fingerprints is not None:
            self._kept = (key, pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL))
        return records
