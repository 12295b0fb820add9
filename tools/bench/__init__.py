"""Building blocks of ``tools/benchmark.py``: speed/cost, accuracy/ablations, report."""
