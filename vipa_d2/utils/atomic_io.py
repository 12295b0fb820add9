"""Crash-safe file writes: a reader sees the old file or the complete new one, never half."""
import contextlib
import os

from detectron2.utils.file_io import PathManager


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
    """
    Open a temporary file beside ``path`` for writing; on a clean exit it replaces
    ``path`` with ``os.replace`` (atomic on POSIX within one directory), on an error it
    is removed and ``path`` is left untouched. ``path`` must be a local file.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing; got mode {mode!r} for {path}")
    # The temp file lives in the same directory so the rename never crosses filesystems.
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        handle = PathManager.open(tmp_path, mode)
    except OSError as e:
        # Name the file the caller asked for: the temporary name means nothing to a user.
        raise OSError(e.errno, e.strerror, path) from e
    try:
        with handle as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
