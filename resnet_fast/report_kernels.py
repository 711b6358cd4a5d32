"""``python -m resnet_fast.report_kernels``: compile every conv kernel of a model for sm_80 and
sm_90a without a GPU; report registers, spills, shared memory, the tensor-core instructions of the
main loop, occupancy, waves and a roofline estimate per layer (``--help`` for the options).

The implementation lives in :mod:`resnet_fast.kernel_report`; this module is the command and
re-exports :func:`estimate_layer_us` for benchmarks/.
"""

from __future__ import annotations

from .kernel_report import ReportOptions, build_report, check_failures, estimate_layer, estimate_layer_us
from .kernel_report.cli import main

__all__ = ["ReportOptions", "build_report", "check_failures", "estimate_layer", "estimate_layer_us", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
