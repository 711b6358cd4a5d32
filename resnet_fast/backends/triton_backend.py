"""The Triton backend: binds the kernels of ``resnet_fast.kernels`` to the op contract.

The kernels run on CUDA devices, and on the CPU under Triton's interpreter (TRITON_INTERPRET=1,
set before triton is first imported), which is how the test suite checks them without a GPU.
"""

from __future__ import annotations

import logging
import os

import torch

from .. import fp8_ops, ops, train_ops
from ..kernels import add_relu as _add_relu
from ..kernels import batch_norm as _bn
from ..kernels import conv_bn_act as _conv
from ..kernels import gemm_tma as _gemm
from ..kernels import layout as _layout
from ..kernels import max_pool as _max_pool
from ..kernels import scale_bias_act as _sba
from . import get, say_once
from .base import Backend

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


#: "1": 1x1 stride-1 convs (no prologue) run on the persistent TMA GEMM (kernels/gemm_tma.py,
#: Hopper). Off by default until a GPU run has checked and timed it against conv_bn_act
#: (benchmarks/NOTES.md, issue 18). Read by each call of the op; a fused module's conv reads it
#: when its call is prepared (its first call, and after anything about the call changed).
TMA_ENV_VAR = "RESNET_FAST_TRITON_TMA"


def _tma_takes(x, weight, stride, padding, dilation, groups, pre_scale) -> bool:
    return (os.environ.get(TMA_ENV_VAR) == "1" and pre_scale is None
            and _gemm.takes(x, weight, stride, padding, dilation, groups)[0])


def _conv_impl(x, weight, bias, stride, padding, dilation, groups, residual, relu, pre_scale, pre_bias):
    if groups != 1:
        raise NotImplementedError(f"the Triton conv kernel does not implement groups={groups}")
    if _tma_takes(x, weight, stride, padding, dilation, groups, pre_scale):
        return _gemm.conv1x1_bn_act(x, weight, bias, residual, relu)
    return _conv.conv_bn_act(x, weight, bias, stride, padding, dilation, residual, relu,
                             pre_scale, pre_bias)


def _add_relu_inplace_impl(a, b):
    _add_relu.add_relu_(a, b)


_conv_op, _add_relu_op, _add_relu_inplace_op = ops.define_backend_ops(
    "triton", _conv_impl, _add_relu.add_relu, _add_relu_inplace_impl)


def _max_pool_impl(x, kernel_size, stride, padding, dilation, ceil_mode):
    if not ops.is_nhwc(x) or x.dtype not in DTYPES:
        return ops.max_pool2d_reference(x, kernel_size, stride, padding, dilation, ceil_mode)
    return _max_pool.max_pool2d_nhwc(x, kernel_size, stride, padding, dilation, ceil_mode)


_max_pool_op = ops.define_max_pool_op("triton", _max_pool_impl)


# ---- training ops (resnet_fast.train_ops): the kernels read NHWC; other layouts are converted
def _nhwc(t):
    return t if t is None or ops.is_nhwc(t) else t.contiguous(memory_format=torch.channels_last)


def _f32(v):
    return None if v is None else v.to(torch.float32).contiguous()


def _conv_stats_impl(x, weight, bias, stride, padding, dilation, groups, pre_scale, pre_bias,
                     pre_mean=None, pre_invstd=None):
    if groups != 1:
        raise NotImplementedError(f"the Triton conv kernel does not implement groups={groups}")
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device)
    return _conv.conv_stats(_nhwc(x), _nhwc(weight), bias, stride, padding, dilation, pre_scale, pre_bias)


def _batch_stats_impl(x):
    if x.numel() == 0:
        return train_ops.batch_stats_reference(x)
    return _bn.batch_stats(_nhwc(x))


def _bn_finalize_impl(mean, var, weight, bias, eps):
    return _bn.finalize(mean.contiguous(), var.contiguous(), _f32(weight), _f32(bias), eps)


def _bn_update_running_impl(running_mean, running_var, num_batches_tracked, mean, var, momentum,
                            cumulative, count, unbiased_var=None):
    if not (running_mean.is_contiguous() and running_var.is_contiguous()):
        return train_ops.bn_update_running_reference(running_mean, running_var, num_batches_tracked,
                                                     mean, var, momentum, cumulative, count, unbiased_var)
    if unbiased_var is not None:  # already unbiased (its count is on the device): factor 1
        var, count = unbiased_var, None
    _bn.update_running(running_mean, running_var, num_batches_tracked, mean.contiguous(),
                       var.contiguous(), momentum, cumulative, count)


def _sba_impl(y, scale, shift, residual, res_scale, res_shift, relu, *stats):
    # stats (the batch statistics behind scale/shift) are for the backward only
    if not ops.is_nhwc(y) or (residual is not None and not ops.is_nhwc(residual)):
        return train_ops.scale_bias_act_reference(y, scale, shift, residual, res_scale, res_shift, relu)
    return _sba.scale_bias_act(y, _f32(scale), _f32(shift), residual, _f32(res_scale), _f32(res_shift), relu)


def _sba_backward_impl(grad, y, scale, shift, residual, res_scale, res_shift, relu, want_dres,
                       y_mean=None, y_invstd=None, res_mean=None, res_invstd=None):
    if not ops.is_nhwc(y) or (residual is not None and not ops.is_nhwc(residual)) or y.numel() == 0:
        return train_ops.scale_bias_act_backward_reference(grad, y, scale, shift, residual, res_scale,
                                                           res_shift, relu, want_dres, y_mean, y_invstd,
                                                           res_mean, res_invstd)
    y_stats = (_f32(y_mean), _f32(y_invstd)) if y_mean is not None else None
    res_stats = (_f32(res_mean), _f32(res_invstd)) if res_mean is not None else None
    dy, dres, sum_g, sum_gy, sum_gr = _sba.scale_bias_act_backward(
        _nhwc(grad), y, _f32(scale), _f32(shift), residual, _f32(res_scale), _f32(res_shift), relu,
        want_dres, y_stats, res_stats)
    empty = y.new_empty(0, dtype=torch.float32)
    return dy, dres if dres is not None else y.new_empty(0), sum_g, sum_gy, sum_gr if sum_gr is not None else empty


def _fp8_conv_impl(x, weight, bias, w_scale, x_scale, stride, padding, dilation, groups, residual,
                   res_scale, relu, out_scale, out_dtype):
    if groups != 1 or not fp8_ops.nhwc_ok(x, weight, residual):
        return fp8_ops.conv_bn_act_fp8_reference(x, weight, bias, w_scale, x_scale, stride, padding,
                                                 dilation, groups, residual, res_scale, relu,
                                                 out_scale, out_dtype)
    return _conv.conv_bn_act_fp8(x, weight, bias, w_scale, x_scale, stride, padding, dilation,
                                 residual, res_scale, relu, out_scale, out_dtype)


_fp8_conv_op = fp8_ops.define_fp8_op("triton", _fp8_conv_impl)


TRAINING_OPS = train_ops.define_training_ops("triton", {
    "conv_stats": _conv_stats_impl, "batch_stats": _batch_stats_impl, "bn_finalize": _bn_finalize_impl,
    "bn_update_running": _bn_update_running_impl, "scale_bias_act": _sba_impl,
    "scale_bias_act_backward": _sba_backward_impl,
})


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

    def training_ops(self, device, dtype):
        return TRAINING_OPS

    def input_channels(self, cin, groups):
        return _conv.packed_input_channels(cin, groups)

    def kernel_input(self, x, channels):
        if (channels == x.shape[1] or x.dim() != 4 or x.dtype not in DTYPES
                or channels != _conv.packed_input_channels(x.shape[1])):
            return super().kernel_input(x, channels)  # a wrong width is the checks' to refuse
        # the layout change and the zero channels in one copy (kernels/layout.py)
        return _layout.to_nhwc_padded(x, channels)

    def supports(self, x, weight, groups, pre=False):
        if groups != 1:
            return False, f"grouped convolution (groups={groups}) is not implemented in the Triton kernel"
        return True, ""

    def conv_bn_act(self, x, weight, bias, stride, padding, dilation, groups,
                    residual, relu, pre_scale, pre_bias):
        run = _conv_impl if ops.direct_call_ok(x, weight, bias, residual, pre_scale, pre_bias) else _conv_op
        return run(x, weight, bias, stride, padding, dilation, groups, residual, relu, pre_scale, pre_bias)

    def prepare_conv(self, x, weight, bias, stride, padding, dilation, groups, residual, relu,
                     pre_scale, pre_bias):
        direct = (groups == 1 and x.dtype in DTYPES
                  and not _tma_takes(x, weight, stride, padding, dilation, groups, pre_scale))
        launch = _conv.prepared_launch(x, weight, stride, padding, dilation, residual is not None, relu,
                                       pre_scale is not None) if direct else None
        if launch is None:
            return super().prepare_conv(x, weight, bias, stride, padding, dilation, groups, residual,
                                        relu, pre_scale, pre_bias)
        stride, padding, dilation = list(stride), list(padding), list(dilation)

        def run(x, weight, bias, residual, pre_scale, pre_bias):
            if ops.direct_call_ok(x, weight, bias, residual, pre_scale, pre_bias):
                return _conv.relaunch(launch, x, weight, bias, residual, pre_scale, pre_bias)
            return _conv_op(x, weight, bias, stride, padding, dilation, groups, residual, relu,
                            pre_scale, pre_bias)
        return run

    def fp8_support(self, device):
        device = torch.device(device)
        if device.type == "cpu":
            return (True, "") if _conv.INTERPRET else (False, "Triton runs on the CPU only in its interpreter")
        if device.type != "cuda" or not torch.cuda.is_available():
            return False, f"no Triton target for {device.type}"
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            return False, (f"sm_{cap[0]}{cap[1]} has no fp8 tensor cores (e4m3 MMA starts at sm_89): "
                           f"fp8 inference there runs the reference (dequantize, fp32 conv)")
        return True, ""

    def conv_bn_act_fp8(self, x, weight, bias, w_scale, x_scale, stride, padding, dilation, groups,
                        residual, res_scale, relu, out_scale, out_dtype):
        run = _fp8_conv_impl if ops.direct_call_ok(x, weight, bias, residual) else _fp8_conv_op
        return run(x, weight, bias, w_scale, x_scale, list(stride), list(padding), list(dilation), groups,
                   residual, res_scale, relu, out_scale, out_dtype)

    def max_pool2d(self, x, kernel_size, stride, padding, dilation, ceil_mode):
        run = _max_pool_impl if ops.direct_call_ok(x) else _max_pool_op
        return run(x, list(kernel_size), list(stride), list(padding), list(dilation), ceil_mode)

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
