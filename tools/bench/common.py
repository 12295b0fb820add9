"""Shared helpers of the benchmark: statistics, machine description, memory, JSON, tables."""

import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from vipa_d2.utils.atomic_io import atomic_open

BENCHMARK_JSON = "benchmark.json"
BENCHMARK_MD = "benchmark.md"
# Version of the benchmark.json layout; bump when a reader would misread an old file.
SCHEMA_VERSION = 1


class BenchmarkError(ValueError):
    """Bad benchmark settings or earlier results that do not match them (no traceback)."""


def summarize(values: Iterable[float]) -> Dict:
    """n, mean, sample std (None below 2 values: a spread needs two), min, max, median."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "median": None}
    return {
        "n": len(vals),
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "min": min(vals),
        "max": max(vals),
        "median": statistics.median(vals),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> Dict:
    """What the numbers were measured on (CPU, cores, threads, library versions, load)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        # Other processes on the machine distort timings: the 1-minute load says how busy it was.
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "argv": list(sys.argv),
    }


class PeakRSS:
    """
    Peak resident set size of this process over a stretch of code.

    Linux lets a process reset its RSS high-water mark (``echo 5 > /proc/self/clear_refs``),
    so each measured case gets its own peak (``VmHWM`` in ``/proc/self/status``). Where that
    is not possible the fallback is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the peak
    over the whole process lifetime (an upper bound); ``method`` says which one was used.
    """

    def __init__(self):
        self.method = "VmHWM after clear_refs reset (per case)"
        try:
            self.reset()
        except OSError:
            self.method = "getrusage ru_maxrss (process lifetime peak)"

    def reset(self) -> None:
        if self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    @staticmethod
    def _status_kib(key: str) -> Optional[float]:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
        return None

    def current_mib(self) -> float:
        kib = self._status_kib("VmRSS") if os.path.exists("/proc/self/status") else None
        return kib / 1024.0 if kib is not None else float("nan")

    def peak_mib(self) -> float:
        if self.method.startswith("VmHWM"):
            return self._status_kib("VmHWM") / 1024.0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def load_benchmark(output_dir: str) -> Dict:
    """The benchmark.json of ``output_dir`` (an empty skeleton when there is none yet)."""
    path = os.path.join(output_dir, BENCHMARK_JSON)
    if not os.path.isfile(path):
        return {"schema": SCHEMA_VERSION}
    with open(path) as f:
        data = json.load(f)
    if data.get("schema") != SCHEMA_VERSION:
        raise BenchmarkError(
            f"{path}: schema {data.get('schema')!r}, expected {SCHEMA_VERSION}; "
            "use another --output or delete the file"
        )
    return data


def save_json(path: str, data) -> None:
    """Atomic JSON write: a killed benchmark never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=1, allow_nan=True)


def fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def fmt_spread(s: Dict, digits: int = 2) -> str:
    """'mean ± std' (just the value for a single run, '-' for none)."""
    if not s or not s.get("n"):
        return "-"
    if s["std"] is None:
        return fmt(s["mean"], digits)
    return f"{fmt(s['mean'], digits)} ± {fmt(s['std'], digits)}"


def markdown_table(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    """A GitHub markdown table whose columns are padded to line up in a terminal too."""
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
