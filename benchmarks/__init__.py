"""Benchmarks of the pipeline: training, metrics, orchestration, memory, generation.

    .venv/bin/python -m benchmarks.run [--quick] [--only NAME ...]

Every figure is the median of several repeats; every comparison is a ratio of two
timings taken interleaved (A B A B ...) in the same run. Results go to
``benchmarks/results/results.json`` and ``results.md``.
"""
