"""BatchNorm's training arithmetic on per-channel vectors and NHWC tensors: batch statistics as a
two-level reduction, their finalize into the normalizing scale/shift, and the running-statistic
update.

Statistics are never raw sums of y and y^2 in fp32 (those cancel when |mean| >> std): every tile
of rows reduces to (mean, M2) by two passes over its values while they sit in registers, and the
tiles' partials are merged Chan-style by :func:`merge_partials` in a fixed order, so the batch
mean and variance are the same bits run to run (no float atomics). The conv kernel writes the
same partials from its epilogue (``conv_bn_act.conv_stats``); :func:`batch_stats` is the
stand-alone form for tensors no conv of ours produced (a pre-activation block's input).

Partials layout: ``mean`` and ``m2`` are [tiles, C] fp32; tile t covers rows
[t * rows_per_tile, min((t + 1) * rows_per_tile, M)) of the [M, C] NHWC view.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resnet_fast.kernels.indexing import needs_int64_index

#: rows x channels of one tile of batch_stats
STATS_ROWS, STATS_CHANNELS = 64, 64
#: tiles x channels a merge program folds in per step
MERGE_TILES, MERGE_CHANNELS = 32, 64
VECTOR_BLOCK = 256


@triton.jit
def tile_mean_m2(v, rows_ok, count):
    """(mean, M2) per column of the [rows, C] fp32 tile v over its valid rows (count of them):
    two passes over values already in registers, so nothing cancels."""
    mean = tl.sum(tl.where(rows_ok, v, 0.0), axis=0) / count
    d = tl.where(rows_ok, v - mean[None, :], 0.0)
    return mean, tl.sum(d * d, axis=0)


@triton.jit
def _tile_stats_kernel(x_ptr, mean_ptr, m2_ptr, M, C,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    if INT64_OFFSETS:
        rows = rows.to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = rows < M
    c_ok = cols < C
    v = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=r_ok[:, None] & c_ok[None, :],
                other=0.0).to(tl.float32)
    count = tl.minimum(M - pid_r * BLOCK_R, BLOCK_R).to(tl.float32)
    mean, m2 = tile_mean_m2(v, r_ok[:, None], count)
    tl.store(mean_ptr + pid_r * C + cols, mean, mask=c_ok)
    tl.store(m2_ptr + pid_r * C + cols, m2, mask=c_ok)


@triton.jit
def _merge_kernel(part_mean_ptr, part_m2_ptr, mean_ptr, var_ptr, T, M, C, ROWS_PER_TILE,
                  BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # one program per block of channels, walking the tiles in order: deterministic
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    n_a = tl.zeros((BLOCK_C,), dtype=tl.float32)  # a vector so the loop carries one type
    mean_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < T
        cnt = tl.where(t_ok, tl.minimum(M - t * ROWS_PER_TILE, ROWS_PER_TILE), 0).to(tl.float32)
        ok = t_ok[:, None] & c_ok[None, :]
        pm = tl.load(part_mean_ptr + t[:, None] * C + cols[None, :], mask=ok, other=0.0)
        pm2 = tl.load(part_m2_ptr + t[:, None] * C + cols[None, :], mask=ok, other=0.0)
        n_b = tl.sum(cnt, axis=0)
        mean_b = tl.sum(cnt[:, None] * pm, axis=0) / n_b
        d = pm - mean_b[None, :]
        m2_b = tl.sum(pm2 + cnt[:, None] * d * d, axis=0)
        # Chan's merge of (n_a, mean_a, m2_a) with the block's (n_b, mean_b, m2_b)
        n = n_a + n_b
        delta = mean_b - mean_a
        mean_a = mean_a + delta * (n_b / n)
        m2_a = m2_a + m2_b + delta * delta * (n_a * n_b / n)
        n_a = n
    tl.store(mean_ptr + cols, mean_a, mask=c_ok)
    tl.store(var_ptr + cols, m2_a / n_a, mask=c_ok)


@triton.jit
def _finalize_kernel(mean_ptr, var_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, invstd_ptr, C, eps,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < C
    mean = tl.load(mean_ptr + offs, mask=ok, other=0.0)
    var = tl.load(var_ptr + offs, mask=ok, other=0.0)
    invstd = 1.0 / tl.sqrt(var + eps)  # not rsqrt: its approximation costs ~2 ulp
    tl.store(invstd_ptr + offs, invstd, mask=ok)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    shift = -mean * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(scale_ptr + offs, scale, mask=ok)
    tl.store(shift_ptr + offs, shift, mask=ok)


@triton.jit
def _running_update_kernel(rm_ptr, rv_ptr, nbt_ptr, mean_ptr, var_ptr, C, momentum, unbias,
                           CUMULATIVE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < C
    if CUMULATIVE:  # momentum=None: the cumulative average, 1 / num_batches_tracked (read on device)
        m = 1.0 / tl.load(nbt_ptr).to(tl.float32)
    else:
        m = momentum
    rm = tl.load(rm_ptr + offs, mask=ok)
    rv = tl.load(rv_ptr + offs, mask=ok)
    mean = tl.load(mean_ptr + offs, mask=ok)
    var = tl.load(var_ptr + offs, mask=ok)
    new_rm = (1.0 - m) * rm.to(tl.float32) + m * mean
    new_rv = (1.0 - m) * rv.to(tl.float32) + m * (var * unbias)
    tl.store(rm_ptr + offs, new_rm.to(rm.dtype), mask=ok)
    tl.store(rv_ptr + offs, new_rv.to(rv.dtype), mask=ok)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
def empty_partials(tiles: int, channels: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((tiles, channels), dtype=torch.float32, device=device),
            torch.empty((tiles, channels), dtype=torch.float32, device=device))


def merge_partials(part_mean: torch.Tensor, part_m2: torch.Tensor, tiles: int, rows: int,
                   rows_per_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of ``rows`` rows from the first ``tiles`` partials."""
    c = part_mean.shape[1]
    mean = torch.empty(c, dtype=torch.float32, device=part_mean.device)
    var = torch.empty_like(mean)
    _merge_kernel[(triton.cdiv(c, MERGE_CHANNELS),)](
        part_mean, part_m2, mean, var, tiles, rows, c, rows_per_tile,
        BLOCK_T=MERGE_TILES, BLOCK_C=MERGE_CHANNELS, num_warps=4)
    return mean, var


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of an NHWC tensor x (N, C, H, W), in fp32."""
    if not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError("batch_stats reads x as NHWC: pass a channels_last-contiguous 4-D tensor")
    n, c, h, w = x.shape
    m = n * h * w
    tiles = triton.cdiv(m, STATS_ROWS)
    part_mean, part_m2 = empty_partials(tiles, c, x.device)
    _tile_stats_kernel[(tiles, triton.cdiv(c, STATS_CHANNELS))](
        x, part_mean, part_m2, m, c, BLOCK_R=STATS_ROWS, BLOCK_C=STATS_CHANNELS,
        INT64_OFFSETS=needs_int64_index((m + STATS_ROWS) * c), num_warps=4)
    return merge_partials(part_mean, part_m2, tiles, m, STATS_ROWS)


def finalize(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
             bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, shift, invstd): invstd = rsqrt(var + eps), scale = gamma * invstd,
    shift = beta - mean * scale, fp32; weight/bias None for a BatchNorm without affine parameters."""
    c = mean.shape[0]
    scale = torch.empty(c, dtype=torch.float32, device=mean.device)
    shift = torch.empty_like(scale)
    invstd = torch.empty_like(scale)
    _finalize_kernel[(triton.cdiv(c, VECTOR_BLOCK),)](
        mean, var, weight, bias, scale, shift, invstd, c, eps, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, BLOCK=VECTOR_BLOCK, num_warps=4)
    return scale, shift, invstd


def update_running(running_mean: torch.Tensor, running_var: torch.Tensor,
                   num_batches_tracked: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
                   momentum: float, cumulative: bool, count: int) -> None:
    """running <- (1 - m) * running + m * batch, in place, the variance unbiased by count/(count-1);
    m = momentum, or 1/num_batches_tracked when ``cumulative`` (momentum=None)."""
    c = mean.shape[0]
    _running_update_kernel[(triton.cdiv(c, VECTOR_BLOCK),)](
        running_mean, running_var, num_batches_tracked, mean, var, c, float(momentum),
        count / (count - 1), CUMULATIVE=cumulative, BLOCK=VECTOR_BLOCK, num_warps=4)
