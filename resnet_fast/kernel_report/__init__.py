"""The kernel report: every conv kernel of a model compiled for sm_80 and sm_90a on a machine
without a GPU, with resources read from the cubins and a roofline estimate per layer.

One job per module: :mod:`.layers` (the model's distinct convs), :mod:`.triton_aot` and
:mod:`.cuda_aot` (compiling), :mod:`.cubin` (reading cubins with cuobjdump), :mod:`.archs` and
:mod:`.model` (limits, occupancy, roofline), :mod:`.report` (rows and checks), :mod:`.cli`.
"""

from .archs import ARCHS, ArchSpec, get_arch
from .report import ReportOptions, build_report, check_failures, estimate_layer, estimate_layer_us

__all__ = ["ARCHS", "ArchSpec", "ReportOptions", "build_report", "check_failures", "estimate_layer",
           "estimate_layer_us", "get_arch"]
