"""
Read pickles that must hold plain data only (REFER ``refs(<splitBy>).p``).

``pickle.load`` runs whatever callable a file names, so a dataset downloaded from a
stranger could run code on the reader's machine. The unpickler here admits no global at
all: dicts, lists, tuples, strings, bytes, numbers, booleans and None are built by pickle
opcodes that never look up a global, and that is all the REFER format uses. Anything
else is refused before it is called.
"""

import io
import pickle
from typing import Any

__all__ = ["ForbiddenPickleError", "load_plain_pickle", "loads_plain_pickle"]


# How Python 2 byte strings are decoded, in turn until one succeeds (latin1 always does).
_PYTHON2_STRING_ENCODINGS = ("ascii", "utf-8", "latin1")


class ForbiddenPickleError(pickle.UnpicklingError):
    """The pickle names a global (a class or function), which plain data never needs."""


class _PlainUnpickler(pickle._Unpickler):
    """
    The pure-Python unpickler, not the C one: its memo is a dict, so a forged memo index
    (``LONG_BINPUT 0xffffffff``) costs one entry, where the C unpickler allocates and
    fills an array that large and can exhaust memory. Reading is a few times slower,
    which a once-per-split load affords.
    """

    def find_class(self, module: str, name: str):
        raise ForbiddenPickleError(
            f"refers to the global {module}.{name}; only plain data (dict, list, tuple, "
            "str, bytes, int, float, bool, None) is accepted"
        )

    def persistent_load(self, pid):
        raise ForbiddenPickleError("uses a persistent id; only plain data is accepted")


def loads_plain_pickle(data: bytes) -> Any:
    """
    Unpickle ``data`` admitting plain data only. Python 2 pickles (the original REFER
    files) are read too: their byte strings are decoded as ASCII, else as UTF-8 (Python 2
    code wrote its text as UTF-8 bytes, which latin1 would turn into mojibake: "café" as
    "cafÃ©"), else as latin1, which decodes any bytes.

    Raises:
        ForbiddenPickleError: the data names a global or a persistent id.
        pickle.UnpicklingError, EOFError, ValueError, ...: malformed or truncated data
            (whatever the unpickler raises; callers name the file).
    """
    for encoding in _PYTHON2_STRING_ENCODINGS[:-1]:
        try:
            return _PlainUnpickler(io.BytesIO(data), encoding=encoding).load()
        except UnicodeDecodeError:
            pass
    return _PlainUnpickler(io.BytesIO(data), encoding=_PYTHON2_STRING_ENCODINGS[-1]).load()


def load_plain_pickle(path: str) -> Any:
    """:func:`loads_plain_pickle` of the file at ``path``."""
    # Read once into memory: lengths declared inside the pickle then cannot make the
    # unpickler ask the file for more bytes than it has.
    with open(path, "rb") as f:
        data = f.read()
    return loads_plain_pickle(data)
