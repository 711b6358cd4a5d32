"""The BatchNorm apply of training, with the residual join: one pass over NHWC memory.

    out = act(y * scale + shift + r),   r = residual * res_scale + res_shift  (a projection
                                            shortcut's BN: the "dual" block tail)
                                          | residual                          (identity shortcut)
                                          | 0
    scale/shift per channel (absent: 1/0); act = ReLU or none.

Forward of a block tail (the last BN, the shortcut, the add and the ReLU in one pass), of a
stand-alone BN(+ReLU), and of the backward's dy = A * g + B * y + C (see resnet_fast.train_ops).
Its backward kernel recomputes the pre-ReLU value from the same inputs instead of reading a
stored mask, and reduces, per channel, the sums the BN backward needs (sum g, sum g * y,
sum g * residual) as per-row-block partials that the launcher adds in a fixed order.

Tensors are walked as [rows, C] with channels fastest (NHWC, or any tensor whose last memory
dimension is C); a program takes one block of rows by one block of channels, so the per-channel
vectors are loaded once per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resnet_fast.kernels.batch_norm import new_vectors
from resnet_fast.kernels.indexing import needs_int64_index

#: elements per program
BLOCK = 4096


@triton.jit
def _pre_act(y_ptr, scale_ptr, shift_ptr, res_ptr, res_scale_ptr, res_shift_ptr, offs, ok, cols, c_ok,
             HAS_AFFINE: tl.constexpr, HAS_RES: tl.constexpr, HAS_RES_AFFINE: tl.constexpr):
    # the value before the activation, in fp32: the forward and the backward both compute it
    # with this one function, so the backward's ReLU mask is the forward's
    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    z = y
    s = tl.zeros_like(cols).to(tl.float32)
    if HAS_AFFINE:
        s = tl.load(scale_ptr + cols, mask=c_ok, other=0.0)
        z = y * s[None, :] + tl.load(shift_ptr + cols, mask=c_ok, other=0.0)[None, :]
    r = tl.zeros_like(z)
    rs = tl.zeros_like(s)
    if HAS_RES:
        r = tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES_AFFINE:
            rs = tl.load(res_scale_ptr + cols, mask=c_ok, other=0.0)
            z += r * rs[None, :] + tl.load(res_shift_ptr + cols, mask=c_ok, other=0.0)[None, :]
        else:
            z += r
    return z, y, s, r, rs


@triton.jit
def _tile(R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if INT64_OFFSETS:
        rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    ok = (rows < R)[:, None] & c_ok[None, :]
    return rows[:, None] * C + cols[None, :], ok, cols, c_ok


@triton.jit
def scale_bias_act_kernel(y_ptr, scale_ptr, shift_ptr, res_ptr, res_scale_ptr, res_shift_ptr, out_ptr,
                          R, C, HAS_AFFINE: tl.constexpr, HAS_RES: tl.constexpr,
                          HAS_RES_AFFINE: tl.constexpr, RELU: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    offs, ok, cols, c_ok = _tile(R, C, BLOCK_R, BLOCK_C, INT64_OFFSETS)
    z, _, _, _, _ = _pre_act(y_ptr, scale_ptr, shift_ptr, res_ptr, res_scale_ptr, res_shift_ptr,
                             offs, ok, cols, c_ok, HAS_AFFINE, HAS_RES, HAS_RES_AFFINE)
    if RELU:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def scale_bias_act_backward_kernel(
        g_ptr, y_ptr, scale_ptr, shift_ptr, res_ptr, res_scale_ptr, res_shift_ptr,
        y_mean_ptr, res_mean_ptr, k1_ptr, k2_y_ptr, k2_res_ptr,
        dy_ptr, dres_ptr, sum_g_ptr, sum_gy_ptr, sum_gr_ptr, R, C,
        HAS_AFFINE: tl.constexpr, HAS_RES: tl.constexpr, HAS_RES_AFFINE: tl.constexpr,
        RELU: tl.constexpr, WANT_DRES: tl.constexpr, Y_STATS: tl.constexpr, RES_STATS: tl.constexpr,
        REDUCE: tl.constexpr, APPLY: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    # REDUCE: this row block's partial sums; APPLY: the input gradients. A BN normalizing with
    # batch statistics (Y_STATS / RES_STATS) needs the sums before its gradient (two launches);
    # otherwise one launch does both.
    offs, ok, cols, c_ok = _tile(R, C, BLOCK_R, BLOCK_C, INT64_OFFSETS)
    z, y, s, r, rs = _pre_act(y_ptr, scale_ptr, shift_ptr, res_ptr, res_scale_ptr, res_shift_ptr,
                              offs, ok, cols, c_ok, HAS_AFFINE, HAS_RES, HAS_RES_AFFINE)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        g = tl.where(z > 0.0, g, 0.0)  # relu'(z): 1 where z > 0 (NaN and 0 pass nothing), as torch
    # centred values: sums of g * (v - mean) do not cancel when |mean| >> std
    yc = y
    if Y_STATS:
        yc = tl.where(ok, y - tl.load(y_mean_ptr + cols, mask=c_ok, other=0.0)[None, :], 0.0)
    rc = r
    if RES_STATS:
        rc = tl.where(ok, r - tl.load(res_mean_ptr + cols, mask=c_ok, other=0.0)[None, :], 0.0)
    if REDUCE:
        part = tl.program_id(0) * C + cols  # this row block's partial sums
        tl.store(sum_g_ptr + part, tl.sum(g, axis=0), mask=c_ok)
        tl.store(sum_gy_ptr + part, tl.sum(g * yc, axis=0), mask=c_ok)
        if HAS_RES_AFFINE:
            tl.store(sum_gr_ptr + part, tl.sum(g * rc, axis=0), mask=c_ok)
    if APPLY:
        if Y_STATS or RES_STATS:
            k1 = tl.load(k1_ptr + cols, mask=c_ok, other=0.0)[None, :]  # mean of g per channel
        dy = g
        if HAS_AFFINE:
            dy = g * s[None, :]
            if Y_STATS:  # BN backward: s * (g - mean(g)) - s * invstd^2 * mean(g * (y - mean)) * (y - mean)
                dy = dy - s[None, :] * k1 - tl.load(k2_y_ptr + cols, mask=c_ok, other=0.0)[None, :] * yc
        tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=ok)
        if WANT_DRES:
            dr = g
            if HAS_RES_AFFINE:
                dr = g * rs[None, :]
                if RES_STATS:
                    dr = dr - rs[None, :] * k1 - tl.load(k2_res_ptr + cols, mask=c_ok, other=0.0)[None, :] * rc
            tl.store(dres_ptr + offs, dr.to(dres_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
def new_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised NHWC tensor like t: every output of these launchers (the tests poison it)."""
    return torch.empty_like(t, memory_format=torch.channels_last)


def _channels_last_view(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def _blocks(rows: int, c: int) -> tuple[int, int]:
    block_c = min(128, triton.next_power_of_2(max(c, 1)))
    return BLOCK // block_c, block_c


def _geometry(y: torch.Tensor):
    if not _channels_last_view(y):
        raise ValueError("scale_bias_act walks NHWC memory: pass channels_last-contiguous 4-D tensors")
    c = y.shape[1]
    rows = y.numel() // max(c, 1)
    block_r, block_c = _blocks(rows, c)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(c, block_c))
    return rows, c, block_r, block_c, grid, needs_int64_index((rows + block_r) * c)


def scale_bias_act(y, scale, shift, residual, res_scale, res_shift, relu: bool) -> torch.Tensor:
    """act(y * scale + shift + r) (see the module doc), a new NHWC tensor of y's dtype."""
    out = new_like(y)
    if y.numel() == 0:
        return out
    rows, c, block_r, block_c, grid, wide = _geometry(y)
    scale_bias_act_kernel[grid](
        y, scale, shift, residual, res_scale, res_shift, out, rows, c,
        HAS_AFFINE=scale is not None, HAS_RES=residual is not None,
        HAS_RES_AFFINE=res_scale is not None, RELU=relu,
        BLOCK_R=block_r, BLOCK_C=block_c, INT64_OFFSETS=wide, num_warps=8)
    return out


def scale_bias_act_backward(grad, y, scale, shift, residual, res_scale, res_shift, relu: bool,
                            want_dres: bool, y_stats=None, res_stats=None):
    """Gradients of :func:`scale_bias_act` for the upstream gradient ``grad`` (NHWC like y):
    (dy, dres or None, sum_g, sum_gy, sum_gr or None), the sums per channel in fp32: the
    gradients of shift, scale and res_scale (sum g, sum g*y, sum g*residual, g after the ReLU).

    ``y_stats`` / ``res_stats``: (mean, invstd) when y's (the residual's) scale and shift come
    from a BatchNorm's batch statistics of that same tensor: dy (dres) is then the whole
    BatchNorm backward, s * (g - mean(g) - xhat * mean(g * xhat)), written once in fp32 math.
    """
    rows, c, block_r, block_c, grid, wide = _geometry(y)
    dy = new_like(y)
    dres = new_like(residual) if want_dres else None
    part = new_vectors((3 if res_scale is not None else 2, grid[0], c), y.device)
    stats = y_stats is not None or res_stats is not None
    y_mean = y_stats[0] if y_stats is not None else None
    res_mean = res_stats[0] if res_stats is not None else None
    args = [grad, y, scale, shift, residual, res_scale, res_shift, y_mean, res_mean]
    outs = [dy, dres, part[0], part[1], part[2] if res_scale is not None else None, rows, c]
    flags = dict(HAS_AFFINE=scale is not None, HAS_RES=residual is not None,
                 HAS_RES_AFFINE=res_scale is not None, RELU=relu, WANT_DRES=want_dres,
                 Y_STATS=y_stats is not None, RES_STATS=res_stats is not None,
                 BLOCK_R=block_r, BLOCK_C=block_c, INT64_OFFSETS=wide, num_warps=8)
    scale_bias_act_backward_kernel[grid](*args, None, None, None, *outs, REDUCE=True, APPLY=not stats, **flags)
    # partials added in one fixed order: the same bits every run; one tensor per sum (outputs
    # of an op may not alias)
    sum_g, sum_gy, *rest = (s.clone() for s in part.sum(1))
    sum_gr = rest[0] if res_scale is not None else None
    if stats:
        k1 = sum_g / rows
        k2_y = scale * y_stats[1].square() * (sum_gy / rows) if y_stats is not None else None
        k2_res = res_scale * res_stats[1].square() * (sum_gr / rows) if res_stats is not None else None
        scale_bias_act_backward_kernel[grid](*args, k1, k2_y, k2_res, *outs, REDUCE=False, APPLY=True, **flags)
        # the gradient of scale is sum g * y: back from the centred sum
        if y_stats is not None:
            sum_gy = sum_gy + y_stats[0] * sum_g
        if res_stats is not None:
            sum_gr = sum_gr + res_stats[0] * sum_g
    return dy, dres, sum_g, sum_gy, sum_gr
