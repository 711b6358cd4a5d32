"""The op contract of training: BatchNorm with batch statistics, split where the kernels fuse it.

One conv unit of a training forward is, with s/t a BatchNorm's per-channel scale and shift::

    y, mean, var = conv_stats(x, w, bias, ..., pre_scale, pre_bias)   # conv(pre(x)) + stats of y
    bn_update_running_(running_mean, running_var, nbt, mean, var, momentum, cumulative, count[, unbiased_var])
    s, t = bn_finalize(mean, var, gamma, beta, eps)                    # s = gamma*rsqrt(var+eps)
    ... the next conv takes (y, s, t) as its pre_scale/pre_bias prologue, or
    out = scale_bias_act(y, s, t, residual, res_scale, res_shift, relu)  # the block tail

so no normalized activation is written between convs, and a block's last BN, its shortcut (or
the projection's BN), the add and the ReLU are one pass. ``batch_stats(x)`` is the statistics
of a tensor no conv of ours produced (a pre-activation block's input).

Each op is registered once per backend (``resnet_fast::<op>_<backend>``) with one schema, one
fake and one autograd formula shared by all backends; the formulas call the same backend's ops,
so a backward runs on the kernels its forward ran on. Gradients are torch's BatchNorm gradients
exactly (the derivation is in ../shared/TRAINING.md): ``bn_finalize``'s backward turns the
gradients of s and t into those of mean and var, and ``conv_stats``' backward folds them into
its output gradient as g = dy + B*y + C per channel before the conv's dgrad and wgrad (cuDNN,
through ``aten.convolution_backward``). Saved for backward: conv inputs and outputs as they
are (raw, pre-BN) and per-channel vectors; a prologue's relu(x*s + t) is recomputed.

Statistics are fp32 (fp64 for fp64 inputs), of y as stored (rounded to its dtype): the tensor
the next op normalizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .ops import NAMESPACE, conv_backward, conv_bn_act_reference, conv_output_hw, empty_nhwc, is_nhwc

#: (mean, invstd) of y and of the residual when their scale/shift are a BatchNorm's batch
#: statistics of that same tensor: the backward is then the whole BatchNorm backward
_STATS_ARGS = "Tensor? y_mean=None, Tensor? y_invstd=None, Tensor? res_mean=None, Tensor? res_invstd=None"

SCHEMAS = {
    "conv_stats": ("(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
                   "int[] dilation, int groups, Tensor? pre_scale, Tensor? pre_bias, "
                   "Tensor? pre_mean=None, Tensor? pre_invstd=None) -> (Tensor, Tensor, Tensor)"),
    "batch_stats": "(Tensor x) -> (Tensor, Tensor)",
    "bn_finalize": ("(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) "
                    "-> (Tensor, Tensor, Tensor)"),
    "bn_update_running": ("(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor? num_batches_tracked, "
                          "Tensor mean, Tensor var, float momentum, bool cumulative, int count, "
                          "Tensor? unbiased_var=None) -> ()"),
    "scale_bias_act": ("(Tensor y, Tensor? scale, Tensor? shift, Tensor? residual, Tensor? res_scale, "
                       "Tensor? res_shift, bool relu, " + _STATS_ARGS + ") -> Tensor"),
    "scale_bias_act_backward": (
        "(Tensor grad, Tensor y, Tensor? scale, Tensor? shift, Tensor? residual, Tensor? res_scale, "
        "Tensor? res_shift, bool relu, bool want_dres, " + _STATS_ARGS + ") "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"),
}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ch(v: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if v is None else v.view(1, -1, 1, 1)


def like_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t in ref's memory format (NHWC or contiguous): the layout every impl and fake promises."""
    if is_nhwc(ref) and not ref.is_contiguous():
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


# --------------------------------------------------------------------------------------
# Reference implementations (plain torch, any device and float dtype: the `torch` backend)
# --------------------------------------------------------------------------------------
def conv_stats_reference(x, weight, bias, stride, padding, dilation, groups, pre_scale, pre_bias,
                         pre_mean=None, pre_invstd=None):
    acc = _acc(x.dtype)
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=acc, device=x.device)
    y = conv_bn_act_reference(x, weight, bias, stride, padding, dilation, groups, None, False,
                              pre_scale, pre_bias).contiguous(memory_format=torch.channels_last)
    var, mean = torch.var_mean(y.to(acc), dim=(0, 2, 3), correction=0)
    return y, mean, var


def batch_stats_reference(x):
    var, mean = torch.var_mean(x.to(_acc(x.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def bn_finalize_reference(mean, var, weight, bias, eps):
    invstd = torch.rsqrt(var + eps)
    scale = invstd
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(scale.dtype)
    return scale, shift, invstd.clone()


def bn_update_running_reference(running_mean, running_var, num_batches_tracked, mean, var,
                                momentum, cumulative, count, unbiased_var=None):
    # unbiased_var: given where the count is on the device, not ``count`` (a BatchNorm
    # synchronized over ranks whose batch sizes only the collective knows)
    m = (1.0 / num_batches_tracked.to(mean.dtype)) if cumulative else momentum
    unbiased = var * (count / (count - 1)) if unbiased_var is None else unbiased_var
    running_mean.copy_((1 - m) * running_mean.to(mean.dtype) + m * mean)
    running_var.copy_((1 - m) * running_var.to(var.dtype) + m * unbiased)


def _pre_act_reference(y, scale, shift, residual, res_scale, res_shift):
    acc = _acc(y.dtype)
    z = y.to(acc)
    if scale is not None:
        z = z * _ch(scale) + _ch(shift)
    if residual is not None:
        r = residual.to(acc)
        z = z + (r * _ch(res_scale) + _ch(res_shift) if res_scale is not None else r)
    return z


def scale_bias_act_reference(y, scale, shift, residual, res_scale, res_shift, relu,
                             y_mean=None, y_invstd=None, res_mean=None, res_invstd=None):
    z = _pre_act_reference(y, scale, shift, residual, res_scale, res_shift)
    return like_layout((torch.relu(z) if relu else z).to(y.dtype), y)


def scale_bias_act_backward_reference(grad, y, scale, shift, residual, res_scale, res_shift, relu,
                                      want_dres, y_mean=None, y_invstd=None, res_mean=None,
                                      res_invstd=None):
    acc = _acc(y.dtype)
    g = grad.to(acc)
    if relu:
        g = g * (_pre_act_reference(y, scale, shift, residual, res_scale, res_shift) > 0)
    dims = (0, 2, 3)
    count = y.numel() // max(y.shape[1], 1)
    sum_g = g.sum(dims)

    def branch(v, s, mean, invstd):
        # (input gradient, sum g * v) of one BN branch: with batch statistics the whole BN
        # backward s * (g - mean(g) - xhat * mean(g * xhat)), on centred values
        if mean is None:
            return (g * _ch(s) if s is not None else g), (g * v).sum(dims)
        vc = v - _ch(mean)
        sum_gc = (g * vc).sum(dims)
        dv = _ch(s) * (g - _ch(sum_g / count) - vc * _ch(invstd.square() * sum_gc / count))
        return dv, sum_gc + mean * sum_g

    dy, sum_gy = branch(y.to(acc), scale, y_mean, y_invstd)
    dres, sum_gr = y.new_empty(0), y.new_empty(0, dtype=acc)  # absent outputs: distinct, empty
    if residual is not None:
        d, sgr = branch(residual.to(acc), res_scale, res_mean, res_invstd)
        if want_dres:
            dres = like_layout(d.to(residual.dtype), residual)
        if res_scale is not None:
            sum_gr = sgr
    return like_layout(dy.to(y.dtype), y), dres, sum_g, sum_gy, sum_gr


REFERENCE = {
    "conv_stats": conv_stats_reference, "batch_stats": batch_stats_reference,
    "bn_finalize": bn_finalize_reference, "bn_update_running": bn_update_running_reference,
    "scale_bias_act": scale_bias_act_reference,
    "scale_bias_act_backward": scale_bias_act_backward_reference,
}


# --------------------------------------------------------------------------------------
# Fakes (shapes, dtypes and layouts every backend's impl produces)
# --------------------------------------------------------------------------------------
def _conv_stats_fake(x, weight, bias, stride, padding, dilation, groups, pre_scale, pre_bias,
                     pre_mean=None, pre_invstd=None):
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = conv_output_hw(h, w, kh, kw, stride, padding, dilation)
    vec = x.new_empty(cout, dtype=_acc(x.dtype))
    return empty_nhwc(x, (n, cout, ho, wo)), vec, torch.empty_like(vec)


def _batch_stats_fake(x):
    vec = x.new_empty(x.shape[1], dtype=_acc(x.dtype))
    return vec, torch.empty_like(vec)


def _bn_finalize_fake(mean, var, weight, bias, eps):
    return torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean)


def _bn_update_running_fake(running_mean, running_var, num_batches_tracked, mean, var, momentum,
                            cumulative, count, unbiased_var=None):
    return None


def _scale_bias_act_fake(y, scale, shift, residual, res_scale, res_shift, relu, *stats):
    return like_layout(torch.empty_like(y), y)


def _scale_bias_act_backward_fake(grad, y, scale, shift, residual, res_scale, res_shift, relu, want_dres,
                                  *stats):
    acc = _acc(y.dtype)
    c = y.shape[1]
    dres = like_layout(torch.empty_like(residual), residual) if want_dres else y.new_empty(0)
    vec = y.new_empty(c, dtype=acc)
    sum_gr = torch.empty_like(vec) if res_scale is not None else y.new_empty(0, dtype=acc)
    return like_layout(torch.empty_like(y), y), dres, vec, torch.empty_like(vec), sum_gr


FAKES = {
    "conv_stats": _conv_stats_fake, "batch_stats": _batch_stats_fake,
    "bn_finalize": _bn_finalize_fake, "bn_update_running": _bn_update_running_fake,
    "scale_bias_act": _scale_bias_act_fake, "scale_bias_act_backward": _scale_bias_act_backward_fake,
}


# --------------------------------------------------------------------------------------
# One backend's ops, and their autograd formulas (shared; they call the same backend's ops)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingOps:
    """The training ops of one backend, as torch.ops overloads (what the modules call)."""

    name: str
    conv_stats: Callable
    batch_stats: Callable
    bn_finalize: Callable
    bn_update_running: Callable
    scale_bias_act: Callable
    scale_bias_act_backward: Callable


_defined: dict[str, TrainingOps] = {}
_libraries: dict[str, torch.library.Library] = {}


def define_training_ops(suffix: str, impls: dict, dispatch_key: str = "CompositeExplicitAutograd") -> TrainingOps:
    """Define resnet_fast::<op>_<suffix> for every op of SCHEMAS, with the shared fakes and
    autograd formulas, and register ``impls`` (op name -> Python function; missing ops take the
    reference). Idempotent per suffix."""
    if suffix in _defined:
        return _defined[suffix]
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    for op, schema in SCHEMAS.items():
        qual = f"{op}_{suffix}"
        lib.define(qual + schema)
        torch.library.register_fake(f"{NAMESPACE}::{qual}", FAKES[op], lib=lib)
        lib.impl(qual, impls.get(op, REFERENCE[op]), dispatch_key)
    ns = getattr(torch.ops, NAMESPACE)
    t = TrainingOps(suffix, *(getattr(ns, f"{op}_{suffix}").default for op in SCHEMAS))
    _register_autograd(t, lib)
    _libraries[suffix] = lib
    _defined[suffix] = t
    return t


def defined(suffix: str) -> TrainingOps:
    return _defined[suffix]


def _register_autograd(t: TrainingOps, lib) -> None:
    q = f"{NAMESPACE}::{{}}_{t.name}".format

    # ---- conv_stats -------------------------------------------------------------------
    def conv_stats_setup(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, groups, pre_scale, pre_bias, pre_mean, pre_invstd = inputs
        y, mean, _ = output
        ctx.conv = (list(stride), list(padding), list(dilation), groups, bias is not None)
        ctx.save_for_backward(x, weight, pre_scale, pre_bias, pre_mean, pre_invstd, y, mean)

    def conv_stats_backward(ctx, gy, gmean, gvar):
        x, weight, pre_scale, pre_bias, pre_mean, pre_invstd, y, mean = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conv
        need = ctx.needs_input_grad
        g = _stats_grad(t, y, mean, gy, gmean, gvar)  # the statistics' share folded into dy
        grads = [None] * 11
        if g is None:
            return tuple(grads)
        if has_bias and need[2]:
            grads[2] = g.to(_acc(g.dtype)).sum((0, 2, 3))
        pre = pre_scale is not None
        want_x = need[0] or (pre and (need[7] or need[8]))
        if not (want_x or need[1]):
            return tuple(grads)
        # the conv read relu(x * s + t): recomputed here, never stored
        x_in = t.scale_bias_act(x, pre_scale, pre_bias, None, None, None, True) if pre else x
        gx, gw = conv_backward(g, x_in, weight, stride, padding, dilation, groups, (want_x, need[1]))
        del x_in
        grads[1] = gw
        if pre and gx is not None:
            # with the prologue BN's batch statistics (pre_mean/pre_invstd) this is its whole
            # backward: dx written once, in fp32 math, from the dgrad output
            dx, _, sum_g, sum_gx, _ = t.scale_bias_act_backward(
                like_layout(gx, x), x, pre_scale, pre_bias, None, None, None, True, False,
                pre_mean, pre_invstd)
            grads[0] = dx if need[0] else None
            grads[7] = sum_gx if need[7] else None
            grads[8] = sum_g if need[8] else None
        else:
            grads[0] = gx
        return tuple(grads)

    torch.library.register_autograd(q("conv_stats"), conv_stats_backward,
                                    setup_context=conv_stats_setup, lib=lib)

    # ---- batch_stats --------------------------------------------------------------------
    def batch_stats_setup(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x, output[0])

    def batch_stats_backward(ctx, gmean, gvar):
        x, mean = ctx.saved_tensors
        return _stats_grad(t, x, mean, None, gmean, gvar)

    torch.library.register_autograd(q("batch_stats"), batch_stats_backward,
                                    setup_context=batch_stats_setup, lib=lib)

    # ---- bn_finalize ----------------------------------------------------------------------
    def finalize_setup(ctx, inputs, output):
        mean, var, weight, bias, eps = inputs
        ctx.eps = eps
        ctx.has = (weight is not None, bias is not None)
        ctx.save_for_backward(mean, var, weight)
        ctx.mark_non_differentiable(output[2])  # invstd: read by backward passes, not differentiated

    def finalize_backward(ctx, gscale, gshift, ginvstd):
        mean, var, weight = ctx.saved_tensors
        r = torch.rsqrt(var + ctx.eps)
        gamma = weight.to(r.dtype) if weight is not None else torch.ones_like(r)
        gscale = torch.zeros_like(r) if gscale is None else gscale
        gshift = torch.zeros_like(r) if gshift is None else gshift
        # s = gamma * r, t = beta - mean * s
        gs_total = gscale - gshift * mean        # d/ds of (s*gscale + t*gshift) holding mean
        d_gamma = gs_total * r
        d_mean = -gshift * gamma * r
        d_var = gs_total * gamma * (-0.5) * r * r * r
        return (d_mean, d_var, d_gamma.to(weight.dtype) if ctx.has[0] else None,
                gshift.to(weight.dtype if weight is not None else gshift.dtype) if ctx.has[1] else None, None)

    torch.library.register_autograd(q("bn_finalize"), finalize_backward,
                                    setup_context=finalize_setup, lib=lib)

    # ---- scale_bias_act -------------------------------------------------------------------
    def sba_setup(ctx, inputs, output):
        y, scale, shift, residual, res_scale, res_shift, relu, *stats = inputs
        ctx.relu = relu
        ctx.has = (scale is not None, residual is not None, res_scale is not None)
        ctx.save_for_backward(y, scale, shift, residual, res_scale, res_shift, *stats)

    def sba_backward(ctx, grad):
        y, scale, shift, residual, res_scale, res_shift, *stats = ctx.saved_tensors
        need = ctx.needs_input_grad
        has_affine, has_res, has_res_affine = ctx.has
        dy, dres, sum_g, sum_gy, sum_gr = t.scale_bias_act_backward(
            like_layout(grad, y), y, scale, shift, residual, res_scale, res_shift, ctx.relu,
            bool(has_res and need[3]), *stats)
        grads = [dy if need[0] else None] + [None] * 10
        if has_affine:
            grads[1] = sum_gy if need[1] else None
            grads[2] = sum_g if need[2] else None
        if has_res and need[3]:
            grads[3] = dres
        if has_res_affine:
            grads[4] = sum_gr if need[4] else None
            grads[5] = sum_g if need[5] else None
        return tuple(grads)

    torch.library.register_autograd(q("scale_bias_act"), sba_backward, setup_context=sba_setup, lib=lib)


def _stats_grad(t: TrainingOps, v, mean, gv_direct, gmean, gvar):
    """dL/dv for mean = E[v], var = E[(v - mean)^2] per channel (plus ``gv_direct``, the gradient
    v receives from elsewhere): gv_direct + B*v + C with B = 2*gvar/M, C = gmean/M - mean*B."""
    if gmean is None and gvar is None:
        return gv_direct
    count = v.numel() // v.shape[1]
    # tensor / int, not a Python float of count: a symbolic count must stay an int under
    # dynamic shapes (torch's tensorify pass fails on float(SymInt), torch 2.14)
    b = (gvar * 2) / count if gvar is not None else torch.zeros_like(mean)
    c = -mean * b
    if gmean is not None:
        c = c + gmean / count
    res = like_layout(gv_direct, v) if gv_direct is not None else None
    return t.scale_bias_act(v, b, c, res, None, None, False)


# --------------------------------------------------------------------------------------
# The reference backend's registration (the other backends register theirs on import)
# --------------------------------------------------------------------------------------
REFERENCE_OPS = define_training_ops("torch", REFERENCE)

__all__ = ["REFERENCE_OPS", "TrainingOps", "define_training_ops", "defined"]
