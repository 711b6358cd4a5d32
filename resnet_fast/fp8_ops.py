"""The op contract of fp8 inference (part of :mod:`resnet_fast.ops`' contract, kept apart):

    conv_bn_act_fp8(x, weight, bias, w_scale, x_scale, stride, padding, dilation, groups,
                    residual, res_scale, relu, out_scale, out_dtype) -> y
        v = conv(x * x_scale, weight * w_scale[n]) + bias [+ residual * res_scale]   (fp32)
        v = relu(v) when relu
        y = sat(v / out_scale) in e4m3 when out_scale is given, else v in out_dtype

x: NHWC ``torch.float8_e4m3fn``; weight: the folded conv weight quantized per output channel,
e4m3 (OHWI for the kernels); bias: fp32 [Cout] (the folded BN shift); w_scale: fp32 [Cout];
x_scale, res_scale, out_scale: one-element fp32 tensors (device buffers: a recalibration changes
their values, never a compiled kernel); residual: NHWC, e4m3 with res_scale or 16-bit without.
``sat`` clamps to ±448 (no inf in e4m3fn; an overflow never becomes NaN) and keeps NaN.

Registered per backend as ``resnet_fast::conv_bn_act_fp8_<backend>`` with one schema and one
fake, so torch.compile and torch.export see one op. Inference only: no autograd formula.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .fp8 import E4M3, E4M3_MAX
from .ops import NAMESPACE, conv_output_hw, empty_nhwc, is_nhwc

FP8_CONV_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor bias, Tensor w_scale, Tensor x_scale, int[] stride, "
    "int[] padding, int[] dilation, int groups, Tensor? residual, Tensor? res_scale, bool relu, "
    "Tensor? out_scale, ScalarType out_dtype) -> Tensor"
)


def conv_bn_act_fp8_reference(x, weight, bias, w_scale, x_scale, stride, padding, dilation, groups,
                              residual, res_scale, relu, out_scale, out_dtype):
    """The contract in plain torch (any device): dequantize, fp32 conv and epilogue, requantize."""
    xf = x.float() * x_scale.float()
    wf = weight.float() * w_scale.float().view(-1, 1, 1, 1)
    v = F.conv2d(xf, wf, bias.float(), stride, padding, dilation, groups)
    if residual is not None:
        r = residual.float()
        v = v + (r * res_scale.float() if res_scale is not None else r)
    if relu:
        v = torch.relu(v)  # NaN stays NaN
    if out_scale is not None:
        y = (v / out_scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    else:
        y = v.to(out_dtype)
    return y.contiguous(memory_format=torch.channels_last)


def conv_bn_act_fp8_fake(x, weight, bias, w_scale, x_scale, stride, padding, dilation, groups,
                         residual, res_scale, relu, out_scale, out_dtype):
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = conv_output_hw(h, w, kh, kw, stride, padding, dilation)
    dtype = E4M3 if out_scale is not None else out_dtype
    return empty_nhwc(x, (n, cout, ho, wo)).to(dtype)


_libraries: dict = {}


def define_fp8_op(suffix: str, impl):
    """resnet_fast::conv_bn_act_fp8_<suffix>: the schema, the shared fake and ``impl``."""
    qual = f"conv_bn_act_fp8_{suffix}"
    if suffix not in _libraries:
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
        lib.define(qual + FP8_CONV_SCHEMA)
        torch.library.register_fake(f"{NAMESPACE}::{qual}", conv_bn_act_fp8_fake, lib=lib)
        lib.impl(qual, impl, "CompositeExplicitAutograd")
        _libraries[suffix] = lib
    return getattr(getattr(torch.ops, NAMESPACE), qual).default


REFERENCE_OP = define_fp8_op("torch", conv_bn_act_fp8_reference)


def check_fp8_args(x, weight, bias, w_scale, x_scale, residual, res_scale, out_scale, out_dtype) -> None:
    """Clear errors for what the kernels cannot read (the one copy of these checks)."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("w_scale", w_scale), ("x_scale", x_scale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"conv_bn_act_fp8: {name} must be a tensor, got {type(t).__name__}")
    if x.dtype != E4M3 or weight.dtype != E4M3:
        raise TypeError(f"conv_bn_act_fp8 takes float8_e4m3fn x and weight, got {x.dtype} and {weight.dtype}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError("conv_bn_act_fp8: x and weight must be 4-D")
    cout = weight.shape[0]
    for name, t, n in (("bias", bias, cout), ("w_scale", w_scale, cout), ("x_scale", x_scale, 1),
                       ("res_scale", res_scale, 1), ("out_scale", out_scale, 1)):
        if t is None:
            continue
        if t.dtype != torch.float32 or t.numel() != n or t.device != x.device:
            raise ValueError(f"conv_bn_act_fp8: {name} must be {n} float32 value(s) on {x.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if residual is not None:
        if res_scale is None and residual.dtype == E4M3:
            raise ValueError("conv_bn_act_fp8: an e4m3 residual needs its res_scale")
        if res_scale is not None and residual.dtype != E4M3:
            raise ValueError("conv_bn_act_fp8: res_scale is for an e4m3 residual")
    if out_scale is None and out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"conv_bn_act_fp8: out_dtype must be a float dtype, got {out_dtype}")


def conv_bn_act_fp8(x, weight, bias, w_scale, x_scale, stride=1, padding=0, dilation=1, groups: int = 1,
                    residual: Optional[torch.Tensor] = None, res_scale: Optional[torch.Tensor] = None,
                    relu: bool = True, out_scale: Optional[torch.Tensor] = None,
                    out_dtype: torch.dtype = torch.bfloat16, *, backend=None) -> torch.Tensor:
    """The fp8 fused conv (see the module doc) on the chosen backend's fp8 kernel, or the
    reference where it has none (the backend says why: :meth:`Backend.fp8_support`)."""
    from .backends import fp8_backend
    from .ops import pair

    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    check_fp8_args(x, weight, bias, w_scale, x_scale, residual, res_scale, out_scale, out_dtype)
    be = fp8_backend(backend, x.device)
    return be.conv_bn_act_fp8(x, weight, bias, w_scale, x_scale, stride, padding, dilation, groups,
                              residual, res_scale, relu, out_scale, out_dtype)


def nhwc_ok(*tensors) -> bool:
    return all(t is None or is_nhwc(t) for t in tensors)


__all__ = ["FP8_CONV_SCHEMA", "REFERENCE_OP", "check_fp8_args", "conv_bn_act_fp8",
           "conv_bn_act_fp8_reference", "define_fp8_op"]
