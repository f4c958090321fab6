"""Operator tools behind the ``alignfl`` command (local runs, comparisons, benchmarks, sweeps)."""
