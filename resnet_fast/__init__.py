"""resnet_fast: fused GPU kernels for ResNet blocks.

conv + BatchNorm (folded) + residual add + ReLU in one kernel pass, on Triton or CUDA
(CUTLASS) backends, behind drop-in modules with torchvision's names and semantics.
"""

from . import backends, ops
from .convert import FUSED_KINDS, convert, fusion_summary, set_backend
from .fold import FoldCache, fold_conv_bn
from .modules import BasicBlock, Bottleneck, ConvBNAct
from .ops import add_relu, add_relu_, conv_bn_act

__version__ = "0.1.0"

__all__ = [
    "BasicBlock", "Bottleneck", "ConvBNAct", "FUSED_KINDS", "FoldCache", "add_relu", "add_relu_",
    "backends", "conv_bn_act", "convert", "fold_conv_bn", "fusion_summary", "ops", "set_backend",
]
