"""Benchmarks and the correctness report for resnet_fast.

The main job is one command, ``python -m benchmarks.report [flags]`` (see report.py); the
pytest-benchmark suite for regressions is ``python -m pytest benchmarks/ --benchmark-only``.

Modules, one job each:
    config.py       the run's settings (one dataclass every section reads)
    env.py          the environment recorded with every result (versions, GPU, commit, command)
    progress.py     progress lines and heartbeats during long steps (compile, autotune)
    timing.py       median timing with CUDA events, and the input ring that keeps L2 cold
    peaks.py        the machine's ceilings measured in the same run (matmul, copy)
    metrics.py      relative error against the reference, pass/fail, derived figures
    models.py       the ResNets under test, with randomized BatchNorm
    layers.py       the distinct convolutions of a model (shape + epilogue, multiplicity)
    layer_peers.py  the per-layer section: every distinct conv on every peer
    blocks.py       the per-block section: stem and each stage, converted vs eager
    variants.py     the end-to-end section: whole forward on every variant
    table.py        plain-text tables for the console
    plot.py         the PNG (per-layer speed-up, end-to-end images/s)
    report.py       the command line: runs the sections, prints, writes JSON and PNG
"""
