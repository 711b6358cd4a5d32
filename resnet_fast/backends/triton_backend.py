"""The Triton backend: binds the kernels of ``resnet_fast.kernels`` to the op contract.

The kernels run on CUDA devices, and on the CPU under Triton's interpreter (TRITON_INTERPRET=1,
set before triton is first imported), which is how the test suite checks them without a GPU.
"""

from __future__ import annotations

import logging

import torch

from .. import ops
from ..kernels import add_relu as _add_relu
from ..kernels import conv_bn_act as _conv
from . import get, say_once
from .base import Backend

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _conv_impl(x, weight, bias, stride, padding, dilation, groups, residual, relu, pre_scale, pre_bias):
    if groups != 1:
        raise NotImplementedError(f"the Triton conv kernel does not implement groups={groups}")
    return _conv.conv_bn_act(x, weight, bias, stride, padding, dilation, residual, relu,
                             pre_scale, pre_bias)


def _add_relu_inplace_impl(a, b):
    _add_relu.add_relu_(a, b)


_conv_op, _add_relu_op, _add_relu_inplace_op = ops.define_backend_ops(
    "triton", _conv_impl, _add_relu.add_relu, _add_relu_inplace_impl)


class TritonBackend(Backend):
    name = "triton"
    requires_nhwc = True

    def available(self, device, dtype):
        if dtype not in DTYPES:
            return False, f"the Triton kernels take float16, bfloat16 and float32, not {dtype}"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return False, "CUDA is not available"
            return True, ""
        if device.type == "cpu":
            # Decided when the kernels were decorated: TRITON_INTERPRET=1 at import time.
            if _conv.INTERPRET:
                return True, ""
            return False, ("Triton runs on CPU tensors only in its interpreter "
                           "(set TRITON_INTERPRET=1 before resnet_fast's Triton kernels are imported)")
        return False, f"Triton has no target for {device.type} devices"

    def supports(self, x, weight, groups, pre=False):
        if groups != 1:
            return False, f"grouped convolution (groups={groups}) is not implemented in the Triton kernel"
        return True, ""

    def conv_bn_act(self, x, weight, bias, stride, padding, dilation, groups,
                    residual, relu, pre_scale, pre_bias):
        run = _conv_impl if ops.direct_call_ok(x, weight, bias, residual, pre_scale, pre_bias) else _conv_op
        return run(x, weight, bias, stride, padding, dilation, groups, residual, relu, pre_scale, pre_bias)

    # The kernel walks a and b as flat buffers; operands in two different memory orders go to
    # the torch backend instead.
    def add_relu(self, a, b):
        if not ops.same_memory_order(a, b):
            return _fallback().add_relu(a, b)
        return (_add_relu.add_relu if ops.direct_call_ok(a, b) else _add_relu_op)(a, b)

    def add_relu_(self, a, b):
        if not ops.same_memory_order(a, b):
            return _fallback().add_relu_(a, b)
        (_add_relu_inplace_impl if ops.direct_call_ok(a, b) else _add_relu_inplace_op)(a, b)


def _fallback() -> Backend:
    say_once("resnet_fast: backend 'triton' falls back to 'torch' for add_relu: the operands are "
             "not both contiguous or both channels_last", logging.WARNING)
    return get("torch")
