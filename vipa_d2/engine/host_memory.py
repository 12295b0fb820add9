"""How the C allocator hands large freed blocks of host memory back to the system."""
import ctypes
import logging
import platform

logger = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from (and return to) the heap instead of their own mmap: a
# training step's largest activations (~50 MB at 256 px, batch 8) fit with room to spare.
_HEAP_BLOCK_LIMIT = 1 << 30
# Freed heap memory is never trimmed back below this (mallopt takes an int).
_NEVER_TRIM = (1 << 31) - 1


def keep_freed_host_memory() -> bool:
    """
    Make glibc keep freed large blocks for reuse instead of unmapping them. By default every
    block over ~32 MB is mmap-ed on allocation and unmapped on free, so each CPU training
    step faults its largest activations back in page by page: in this VM padding a 50 MB
    tensor took 16 ms instead of 3.6, and the whole step ran ~12 % slower (BENCHMARKS.md). Values are
    unchanged. The process keeps its peak footprint instead of returning it between steps.
    Returns whether the setting took (False, with a log line, off glibc or when refused).
    """
    if platform.libc_ver()[0] != "glibc":
        logger.info("Host allocator left as is: not glibc (%s).", platform.libc_ver()[0] or "unknown")
        return False
    libc = ctypes.CDLL(None)
    took = bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_HEAP_BLOCK_LIMIT))) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_NEVER_TRIM))
    )
    if not took:
        logger.info("Host allocator left as is: glibc refused mallopt.")
    return took
