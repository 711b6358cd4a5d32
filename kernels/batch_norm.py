"""BatchNorm's training arithmetic on per-channel vectors and NHWC tensors: batch statistics as a
two-level reduction, their finalize into the normalizing scale/shift, and the running-statistic
update.

Statistics are never raw sums of y and y^2 in fp32 (those cancel when |mean| >> std): every tile
of rows reduces, per channel, to a shift (its first row's value, exact), the mean of the shifted
values and their M2, by passes over values already in registers; the tiles' partials are merged
Chan-style in fp64 by :func:`merge_partials` in a fixed order, so the batch mean and variance are
the same bits run to run (no float atomics) and hold ~1e-7 relative at a mean 1e3 std away. The conv kernel writes the
same partials from its epilogue (``conv_bn_act.conv_stats``); :func:`batch_stats` is the
stand-alone form for tensors no conv of ours produced (a pre-activation block's input).

Partials layout: ``shift``, ``mean`` (of the shifted values) and ``m2``, each [tiles, C] fp32, in
one [3, tiles, C] buffer; tile t covers rows [t * rows_per_tile, min((t + 1) * rows_per_tile, M))
of the [M, C] NHWC view.
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
def tile_stats(v, rows_ok, count, BLOCK_ROWS: tl.constexpr):
    """(shift, mean of v - shift, M2) per column of the [rows, C] fp32 tile v over its valid rows
    (count of them; row 0 is always valid): passes over values already in registers, shifted by
    the first row's value, so nothing cancels."""
    first = (tl.arange(0, BLOCK_ROWS) == 0)[:, None]
    shift = tl.sum(tl.where(first, v, 0.0), axis=0)
    d = tl.where(rows_ok, v - shift[None, :], 0.0)
    mean = tl.sum(d, axis=0) / count
    e = tl.where(rows_ok, d - mean[None, :], 0.0)
    return shift, mean, tl.sum(e * e, axis=0)


@triton.jit
def store_tile_stats(part_ptr, tile, T, C, cols, c_ok, shift, mean, m2):
    base = part_ptr + tile * C + cols
    tl.store(base, shift, mask=c_ok)
    tl.store(base + T * C, mean, mask=c_ok)
    tl.store(base + 2 * T * C, m2, mask=c_ok)


@triton.jit
def _tile_stats_kernel(x_ptr, part_ptr, T, M, C,
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
    shift, mean, m2 = tile_stats(v, r_ok[:, None], count, BLOCK_R)
    store_tile_stats(part_ptr, pid_r, T, C, cols, c_ok, shift, mean, m2)


@triton.jit
def _merge_kernel(part_ptr, mean_ptr, var_ptr, T, T_STRIDE, M, C, ROWS_PER_TILE,
                  BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # one program per block of channels, walking the tiles in order: deterministic. In fp64:
    # a tile's mean is its exact shift plus a small mean, added here without rounding to fp32
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    n_a = tl.zeros((BLOCK_C,), dtype=tl.float64)  # a vector so the loop carries one type
    mean_a = tl.zeros((BLOCK_C,), dtype=tl.float64)
    m2_a = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < T
        cnt = tl.where(t_ok, tl.minimum(M - t * ROWS_PER_TILE, ROWS_PER_TILE), 0).to(tl.float64)
        ok = t_ok[:, None] & c_ok[None, :]
        offs = t[:, None] * C + cols[None, :]
        pm = (tl.load(part_ptr + offs, mask=ok, other=0.0).to(tl.float64)
              + tl.load(part_ptr + T_STRIDE * C + offs, mask=ok, other=0.0).to(tl.float64))
        pm2 = tl.load(part_ptr + 2 * T_STRIDE * C + offs, mask=ok, other=0.0).to(tl.float64)
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
    tl.store(mean_ptr + cols, mean_a.to(tl.float32), mask=c_ok)
    tl.store(var_ptr + cols, (m2_a / n_a).to(tl.float32), mask=c_ok)


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
def new_vectors(shape, device) -> torch.Tensor:
    """An uninitialised fp32 buffer: every per-channel output and partials buffer of the training
    kernels' launchers (the tests poison it)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def empty_partials(tiles: int, channels: int, device) -> torch.Tensor:
    """The [3, tiles, channels] fp32 partials buffer (see the module doc)."""
    return new_vectors((3, tiles, channels), device)


def merge_partials(part: torch.Tensor, tiles: int, rows: int,
                   rows_per_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of ``rows`` rows from the first ``tiles`` partials."""
    c = part.shape[2]
    mean, var = new_vectors(c, part.device), new_vectors(c, part.device)
    _merge_kernel[(triton.cdiv(c, MERGE_CHANNELS),)](
        part, mean, var, tiles, part.shape[1], rows, c, rows_per_tile,
        BLOCK_T=MERGE_TILES, BLOCK_C=MERGE_CHANNELS, num_warps=4)
    return mean, var


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of an NHWC tensor x (N, C, H, W), in fp32."""
    if not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError("batch_stats reads x as NHWC: pass a channels_last-contiguous 4-D tensor")
    n, c, h, w = x.shape
    m = n * h * w
    tiles = triton.cdiv(m, STATS_ROWS)
    part = empty_partials(tiles, c, x.device)
    _tile_stats_kernel[(tiles, triton.cdiv(c, STATS_CHANNELS))](
        x, part, tiles, m, c, BLOCK_R=STATS_ROWS, BLOCK_C=STATS_CHANNELS,
        INT64_OFFSETS=needs_int64_index((m + STATS_ROWS) * c), num_warps=4)
    return merge_partials(part, tiles, m, STATS_ROWS)


def finalize(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
             bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, shift, invstd): invstd = rsqrt(var + eps), scale = gamma * invstd,
    shift = beta - mean * scale, fp32; weight/bias None for a BatchNorm without affine parameters."""
    c = mean.shape[0]
    scale, shift, invstd = (new_vectors(c, mean.device) for _ in range(3))
    _finalize_kernel[(triton.cdiv(c, VECTOR_BLOCK),)](
        mean, var, weight, bias, scale, shift, invstd, c, eps, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, BLOCK=VECTOR_BLOCK, num_warps=4)
    return scale, shift, invstd


def update_running(running_mean: torch.Tensor, running_var: torch.Tensor,
                   num_batches_tracked: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
                   momentum: float, cumulative: bool, count: int | None) -> None:
    """running <- (1 - m) * running + m * batch, in place, the variance unbiased by count/(count-1)
    (``count`` None: ``var`` is unbiased already); m = momentum, or 1/num_batches_tracked when
    ``cumulative`` (momentum=None)."""
    c = mean.shape[0]
    _running_update_kernel[(triton.cdiv(c, VECTOR_BLOCK),)](
        running_mean, running_var, num_batches_tracked, mean, var, c, float(momentum),
        1.0 if count is None else count / (count - 1), CUMULATIVE=cumulative, BLOCK=VECTOR_BLOCK, num_warps=4)
