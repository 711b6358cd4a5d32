"""resnet_fast: fused GPU kernels for ResNet blocks.

conv + BatchNorm (folded) + residual add + ReLU in one kernel pass, on Triton or CUDA
(CUTLASS) backends, behind drop-in modules with torchvision's names and semantics.
"""

from . import backends, ops
from .convert import FUSED_KINDS, convert, fusion_summary, set_backend
from .fold import FoldCache, StaleFoldError, fold_conv_bn, refresh, verify_folds
from .modules import BasicBlock, Bottleneck, ConvBNAct, ReferencePathWarning
from . import distributed, fp8, graphs, quantize, train_graphs
from .graphs import CudaGraphRunner, StaleGraphError
from .quantize import quantize_fp8
from .train_graphs import TrainingStep, capture_training_step
from .ops import add_relu, add_relu_, conv_bn_act, max_pool2d

__version__ = "0.1.0"

__all__ = [
    "BasicBlock", "Bottleneck", "ConvBNAct", "CudaGraphRunner", "FUSED_KINDS", "FoldCache",
    "ReferencePathWarning", "StaleFoldError", "StaleGraphError", "TrainingStep", "add_relu", "add_relu_",
    "backends", "capture_training_step", "conv_bn_act", "convert", "distributed", "fold_conv_bn", "fp8",
    "fusion_summary", "graphs", "max_pool2d", "ops", "quantize", "quantize_fp8", "refresh", "set_backend",
    "train_graphs", "verify_folds",
]
