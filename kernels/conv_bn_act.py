"""Fused convolution + folded BatchNorm (+ residual) (+ ReLU) as an implicit GEMM over NHWC.

    y = [relu]( conv(pre(x), w) + bias [+ residual] ),   pre(x) = relu(x * pre_scale + pre_bias)

The GEMM view, as in Triton's matmul tutorial but with the A operand gathered from the image:

    M = N * Ho * Wo   one row per output pixel, in NHWC order, so a tile of y is a row-major
                      [BLOCK_M, BLOCK_N] block of the output and stores coalesce along Cout
    N = Cout          one column per output channel
    K = kh * kw * Cin ordered (r, s, c): the weight, stored OHWI (torch.channels_last), is then
                      a row-major [Cout, K] matrix and its tiles are plain strided loads

Row m of A at K index (r, s, c) is x[n, ho*stride - pad + r*dil, wo*stride - pad + s*dil, c], or
0 where that pixel lies in the padding. Two ways to walk K (a constexpr switch):

* by taps: taps (r, s) outside, blocks of Cin inside, written as one loop over (tap, channel
  block) pairs so that the software pipeline spans the taps (a 3x3 conv over 64 channels has
  one channel block per tap: nested loops would pipeline nothing). The tap's coordinates are
  per row of the tile, not per K element: an add and four compares on BLOCK_M values, while a
  block of channels is a contiguous run of memory that loads as 16-byte vectors (cp.async).
* dense rows (DENSE_CIN): the stem. Its image is padded to 4 channels (see
  :func:`packed_input_channels`; the padding is done in the model's one NCHW->NHWC conversion,
  kernels/layout.py, and the folded weight gets a zero input channel), and then one kernel row r
  of a tap window, pixels (ih, iw0 .. iw0+kw-1) x 4 channels, is one contiguous run of kw*4
  elements of the input (56 bytes for 7x7 in 16-bit) and of the weight's OHWI row: K is walked
  one kernel row per step (ROW_K = kw*Cin rounded up to a power of two), the column offsets j and
  pixel offsets j // Cin are compile-time vectors, and loads are 4-element vectors with no
  division in the loop. The 4th channel and the row's tail (28 of 32) are wasted MMA work.
* flat (SMALL_CIN): other small channel counts (3 unpadded, 5, ...): K = kh*kw*Cin walked in
  BLOCK_K steps with (r, s, c) recovered by div/mod per K element; blocks of channels would be
  mostly padding.

Everything after the GEMM is done on the fp32 accumulator before the single store.
"""

from __future__ import annotations

import inspect
import logging
import os
import time

import torch
import triton
import triton.language as tl

# absolute imports: the kernel report loads this file again under a private name (to compile
# its kernels outside the interpreter), where a relative import has no package to resolve in
from resnet_fast.kernels.batch_norm import empty_partials, merge_partials, store_tile_stats, tile_stats
from resnet_fast.kernels.indexing import needs_int64_index
from resnet_fast.kernels.launch import TRITON_DTYPES as _TORCH_TO_TRITON
from resnet_fast.kernels.launch import TRITON_FP8_DTYPES as _FP8_TO_TRITON
from resnet_fast.kernels.launch import compile_spec, direct_launcher
from resnet_fast.ops import conv_output_hw

_log = logging.getLogger("resnet_fast")

#: kernels decorated while TRITON_INTERPRET=1 run in Triton's interpreter (CPU tensors too)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: environment variable naming one of conv_configs() to use for every launch instead of autotuning
CONFIG_ENV_VAR = "RESNET_FAST_TRITON_CONV_CONFIG"
#: channel counts below this take the flat-K path (see the module doc)
SMALL_CIN = 16
#: the input channel counts the dense-row path takes (the stem after padding to 4; 8 for
#: inputs of 5-8 channels padded by a caller): a power of two, so j // Cin is a shift
DENSE_ROW_CINS = (4, 8)
#: the widest kernel row the dense-row path takes, in elements (ROW_K)
DENSE_ROW_MAX = 64
#: how far past the last row the row indices of the last, partial tile reach (BLOCK_M of any
#: config, masked by comparing them with M): part of the largest index the kernel computes
ROW_INDEX_MARGIN = 2**16


def packed_input_channels(cin: int, groups: int = 1) -> int:
    """How many input channels the kernel wants for a conv over ``cin``: an image of 1-3
    channels is padded to 4 (zero channels in the input and the folded weight), which makes the
    stem a dense-row GEMM (module doc). Other convs keep their channel count."""
    return 4 if groups == 1 and cin < 4 else cin


def dense_rows(cin: int, kw: int, dil_w: int) -> bool:
    """Whether a conv over ``cin`` (already packed) channels takes the dense-row path."""
    return cin in DENSE_ROW_CINS and dil_w == 1 and kw * cin <= DENSE_ROW_MAX


def _config(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


def config_name(cfg: triton.Config) -> str:
    k = cfg.kwargs
    return f"m{k['BLOCK_M']}n{k['BLOCK_N']}k{k['BLOCK_K']}w{cfg.num_warps}s{cfg.num_stages}"


def conv_configs(small_cin: bool = False) -> dict[str, triton.Config]:
    """The autotuning candidates by name, for the tap path or the small-Cin paths (flat and
    dense rows: the dense-row path reads BLOCK_K as nothing, its K step is one kernel row).

    Chosen for ResNet-50 at batch 256 on H100. Tap path: M (output pixels) runs from 0.8M rows
    (layer1) down to 12.5K (layer4), so BLOCK_M is 128 but for two 64-row tiles for the late
    layers; BLOCK_N spans Cout = 64..2048; BLOCK_K = 64 is one 128-byte row of 16-bit channels.
    Shared memory per stage is (BLOCK_M + BLOCK_N) * BLOCK_K * element size, so some fp32
    candidates do not fit; the autotuner skips those (OutOfResources).
    Flat path (the stem, K = 147): its gathers are scalar loads held in registers, so tiles are
    smaller; BLOCK_K = 32 wastes 13 of 160 K slots where 64 would waste 45. Dense rows (the
    padded stem, Cout = 64): its A tile is 4-element vector loads, so it also gets the 128x64
    tile with 8 warps and a deeper pipeline (7 K steps of one kernel row each).
    """
    if small_cin:
        cfgs = [
            _config(128, 64, 32, 4, 3),
            _config(256, 64, 32, 8, 3),
            _config(64, 64, 32, 4, 3),
            _config(128, 128, 32, 8, 3),
            _config(128, 64, 32, 8, 4),
        ]
    else:
        cfgs = [
            _config(128, 256, 64, 8, 3),
            _config(128, 128, 64, 8, 4),
            _config(128, 128, 64, 4, 4),
            _config(128, 128, 32, 4, 4),
            _config(128, 64, 64, 4, 4),
            _config(128, 64, 32, 4, 4),
            _config(64, 128, 64, 4, 4),
            _config(64, 64, 64, 4, 4),
        ]
    return {config_name(c): c for c in cfgs}


#: the one config used under TRITON_INTERPRET=1: small tiles, so that the tests' small channel
#: counts and sizes still cross block edges
INTERPRETER_CONFIG = _config(32, 16, 16, 4, 1)


@triton.jit
def _pre_activation(a, ok, c, c_ok, pre_scale_ptr, pre_bias_ptr, PADDED: tl.constexpr):
    # relu(x * scale + shift) on the loaded tile, rounded back to the input dtype as the
    # reference does. (Packed bf16 math measured no faster on an H100: the prologue's cost is
    # registers, and with them CTAs per SM, not ALU; benchmarks/NOTES.md.)
    # Padding taps must stay 0 after the transform (the conv pads pre(x), not x), hence the
    # select: relu(0 * scale + shift) is not 0 when shift > 0. Without padding the only masked
    # elements are channels past Cin (scale = shift = 0 there, so they stay 0) and rows past M
    # (never stored), so the select is compiled out.
    scale = tl.load(pre_scale_ptr + c, mask=c_ok, other=0.0)
    shift = tl.load(pre_bias_ptr + c, mask=c_ok, other=0.0)
    t = tl.maximum(a.to(tl.float32) * scale[None, :] + shift[None, :], 0.0)
    if PADDED:
        t = tl.where(ok, t, 0.0)
    return t.to(a.dtype)


# Triton's interpreter converts e4m3 wrongly (checked with triton 3.8): fp32 -> fp8e4nv truncates
# and can drop a value near the top of its binade to half of it (7.76 -> 4.0), NaN encodes as
# 384, and the NaN pattern 0x7f decodes as 480. A GPU converts exactly (cvt.rn.satfinite, and
# e4m3fn's NaN), so the two helpers below run only where the launcher asks (EXACT_FP8, set
# under the interpreter): the CPU tests then check the kernel's own arithmetic, not the
# interpreter's conversions.
@triton.jit
def _load_fp8_exact(ptr, offs, mask):
    # an e4m3 operand as fp32, its NaNs read as NaN (fp32 products of e4m3 values are exact)
    v = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bits = tl.load(ptr.to(tl.pointer_type(tl.uint8)) + offs, mask=mask, other=0)
    return tl.where((bits & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def _load_tiles(x_ptr, a_offs, a_ok, w_ptr, b_offs, b_ok, c, c_ok, pre_scale_ptr, pre_bias_ptr,
                HAS_PRE: tl.constexpr, PADDED: tl.constexpr, EXACT_FP8: tl.constexpr):
    # One K step's input tile (with the prologue applied) and weight tile, as the gather and the
    # (tap, channel block) loops address them
    if EXACT_FP8:
        return _load_fp8_exact(x_ptr, a_offs, a_ok), _load_fp8_exact(w_ptr, b_offs, b_ok)
    a = tl.load(x_ptr + a_offs, mask=a_ok, other=0.0)
    if HAS_PRE:
        a = _pre_activation(a, a_ok, c, c_ok, pre_scale_ptr, pre_bias_ptr, PADDED)
    return a, tl.load(w_ptr + b_offs, mask=b_ok, other=0.0)


@triton.jit
def _round_to_e4m3(v):
    # v rounded to the nearest e4m3 value (ties to even), still fp32, so the cast is exact
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # keep 3 of 23 mantissa bits
    normal = bits.to(tl.float32, bitcast=True)
    tiny = tl.floor(v * 512.0 + 0.5) / 512.0  # below 2^-6 e4m3 is subnormal: steps of 2^-9
    r = tl.where(tl.abs(v) < 0.015625, tiny, normal)
    return tl.where(v != v, v, r)  # NaN stays NaN


@triton.jit
def conv_bn_act_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, pre_scale_ptr, pre_bias_ptr, y_ptr, part_ptr,
    w_scale_ptr, x_scale_ptr, res_scale_ptr, out_scale_ptr,
    M, H, W, Cin, Ho, Wo, Cout, PART_TILES,
    M_BUCKET,  # not read: an autotuning key, M rounded up so that each layer shape tunes once
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, HAS_PRE: tl.constexpr, STATS: tl.constexpr,
    SMALL_CIN: tl.constexpr, DENSE_CIN: tl.constexpr, ROW_K: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DEQUANT: tl.constexpr, RES_SCALED: tl.constexpr, QUANT_OUT: tl.constexpr,
    EXACT_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # FP8 (resnet_fast.fp8): DEQUANT - x and w are e4m3, the product of the tile dequantizes by
    # w_scale[n] * x_scale; RES_SCALED - the residual reads as residual * res_scale (an e4m3
    # block input or projection); QUANT_OUT - y is stored as e4m3 of y / out_scale, saturated
    # at +-448 (NaN stays NaN). Scales are device tensors (one element, or Cout for w_scale),
    # read here: nothing of a calibration is baked into the binary.
    # Grouped tile order (matmul tutorial): GROUP_M row-tiles sweep all of Cout together, so their
    # input rows are read from DRAM once and reused from L2 by every column tile.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(Cout, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if INT64_OFFSETS:
        # Every offset below derives from offs_m, so this one cast makes all index math 64-bit.
        offs_m = offs_m.to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < Cout

    # Output pixel (img, ho, wo) of each row, and the input pixel its (0, 0) tap reads.
    wo = offs_m % Wo
    ho = (offs_m // Wo) % Ho
    img = offs_m // (Wo * Ho)
    ih0 = ho * STRIDE_H - PAD_H
    iw0 = wo * STRIDE_W - PAD_W
    K = KH * KW * Cin
    w_rows = offs_n * K  # start of each output channel's row of the [Cout, K] weight

    # The accumulator starts at the folded-BN shift: adding it here rather than in the epilogue
    # frees its registers (one per accumulator column a thread holds) before the residual tile
    # is loaded, which keeps 128x256 tiles with a residual from spilling.
    bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)
    if DEQUANT:  # the accumulator is in units of w_scale * x_scale until the epilogue
        bias = bias / (tl.load(w_scale_ptr + offs_n, mask=n_ok, other=1.0) * tl.load(x_scale_ptr))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + bias[None, :]
    if DENSE_CIN > 0:
        # One kernel row per step (module doc): column j of the step is pixel j // DENSE_CIN of
        # the row, channel j % DENSE_CIN; both are compile-time vectors, so the only per-element
        # work is the left/right image-edge test (constant over each pixel's 4 channels, which
        # keeps the loads 4-element vectors). Offsets of a row's first pixel are multiples of
        # DENSE_CIN elements: 8-byte aligned in 16-bit types.
        ROW: tl.constexpr = KW * DENSE_CIN
        j = tl.arange(0, ROW_K)
        j_ok = j < ROW
        iw = iw0[:, None] + (j // DENSE_CIN)[None, :]
        col_ok = m_ok[:, None] & j_ok[None, :] & (iw >= 0) & (iw < W)
        x_rows = ((img * H + ih0) * W + iw0) * DENSE_CIN
        w_rows = offs_n * (KH * ROW)
        for r in range(KH):
            ih = ih0 + r * DIL_H
            a_ok = col_ok & ((ih >= 0) & (ih < H))[:, None]
            a = tl.load(x_ptr + ((x_rows + r * DIL_H * W * DENSE_CIN)[:, None] + j[None, :]),
                        mask=a_ok, other=0.0)
            if HAS_PRE:
                a = _pre_activation(a, a_ok, j % DENSE_CIN, j_ok, pre_scale_ptr, pre_bias_ptr,
                                    PAD_H + PAD_W > 0)
            b = tl.load(w_ptr + (w_rows[None, :] + (r * ROW + j)[:, None]),
                        mask=j_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    elif SMALL_CIN:
        # Every element of this gather has its own tap. (Per-column tap offsets, a per-row pixel
        # base and unsigned bound checks cut the sm_90a loop by 13-20 % of its instructions but
        # measured 1546 us against 1298 us for this form on an H100: benchmarks/NOTES.md.)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K
            c = k % Cin
            tap = k // Cin
            ih = ih0[:, None] + (tap // KW * DIL_H)[None, :]
            iw = iw0[:, None] + (tap % KW * DIL_W)[None, :]
            a_ok = (m_ok[:, None] & k_ok[None, :]
                    & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            a, b = _load_tiles(x_ptr, ((img[:, None] * H + ih) * W + iw) * Cin + c[None, :], a_ok,
                               w_ptr, w_rows[None, :] + k[:, None], k_ok[:, None] & n_ok[None, :],
                               c, k_ok, pre_scale_ptr, pre_bias_ptr, HAS_PRE, PAD_H + PAD_W > 0, EXACT_FP8)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        # One loop over (tap, channel block) pairs (see the module doc), tracked by two
        # counters rather than by dividing the loop index (an integer division by a runtime
        # value is some twenty instructions per iteration).
        x_rows = ((img * H + ih0) * W + iw0) * Cin  # offset of each row's (0, 0) tap pixel
        tap = 0
        c0 = 0
        for _ in range(KH * KW * tl.cdiv(Cin, BLOCK_K)):
            dh = tap // KW * DIL_H
            dw = tap % KW * DIL_W
            ih = ih0 + dh
            iw = iw0 + dw
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            c = c0 + offs_k
            c_ok = c < Cin
            a_ok = row_ok[:, None] & c_ok[None, :]
            a, b = _load_tiles(x_ptr, (x_rows + (dh * W + dw) * Cin)[:, None] + c[None, :], a_ok,
                               w_ptr, w_rows[None, :] + (tap * Cin + c)[:, None], c_ok[:, None] & n_ok[None, :],
                               c, c_ok, pre_scale_ptr, pre_bias_ptr, HAS_PRE, PAD_H + PAD_W > 0, EXACT_FP8)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            # Next channel block, or the next tap's first. Branch-free: an `if` here stops the
            # compiler from software-pipelining the loop. A 1x1 conv keeps tap = 0, so its row
            # masks and offsets are loop-invariant and hoisted out.
            c0 += BLOCK_K
            if KH * KW > 1:
                next_tap = c0 >= Cin
                tap += next_tap.to(tl.int32)
                c0 = tl.where(next_tap, 0, c0)

    # Epilogue in fp32: residual, ReLU; one cast and one masked store.
    y_offs = offs_m[:, None] * Cout + offs_n[None, :]
    y_ok = m_ok[:, None] & n_ok[None, :]
    if DEQUANT:
        acc = acc * (tl.load(w_scale_ptr + offs_n, mask=n_ok, other=1.0) * tl.load(x_scale_ptr))[None, :]
    if HAS_RESIDUAL:
        if EXACT_FP8 and RES_SCALED:
            r = _load_fp8_exact(res_ptr, y_offs, y_ok)
        else:
            r = tl.load(res_ptr + y_offs, mask=y_ok, other=0.0).to(tl.float32)
        if RES_SCALED:
            r = r * tl.load(res_scale_ptr)
        acc += r
    if RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if QUANT_OUT:
        acc = acc / tl.load(out_scale_ptr)
        acc = tl.minimum(tl.maximum(acc, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                         propagate_nan=tl.PropagateNan.ALL)
        if EXACT_FP8:
            acc = _round_to_e4m3(acc)
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + y_offs, y, mask=y_ok)
    if EXACT_FP8 and QUANT_OUT:  # NaN as e4m3fn's pattern (see _load_fp8_exact)
        tl.store(y_ptr.to(tl.pointer_type(tl.uint8)) + y_offs, tl.full((BLOCK_M, BLOCK_N), 0x7F, tl.uint8),
                 mask=y_ok & (acc != acc))
    if STATS:
        # Training: this tile's statistics per channel of y as stored (rounded), those the next
        # layer normalizes exactly this tensor with; merged by batch_norm.merge_partials
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        shift, mean, m2 = tile_stats(y.to(tl.float32), m_ok[:, None], count, BLOCK_M)
        store_tile_stats(part_ptr, pid_m, PART_TILES, Cout, offs_n, n_ok, shift, mean, m2)


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for inputs of ``dtype`` (fp16/bf16 ignore it).

    fp32 follows torch's cuDNN switch (TF32 tensor cores by default) but as tf32x3: plain tf32 in
    tl.dot truncates the operands, and a converted ResNet-50 in fp32 then landed at 1.6e-2
    relative error on an H100 against 8e-4 for cuDNN (2026-11-25).
    """
    return "tf32x3" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def prune_configs(configs, named_args, **kwargs):
    """The autotuner's early pruning (``prune_configs_by={"early_config_prune": ...}``): drops the
    candidates that cannot win for this launch, so tuning time goes to the others. Triton passes
    the positional arguments as named_args and the keyword ones as kwargs; only Cout is required
    (tools may call ``prune_configs(configs, {"Cout": 256})``).
    """
    args = {**named_args, **kwargs}
    # A BLOCK_N far wider than Cout is wasted work.
    widest = max(64, triton.next_power_of_2(args["Cout"]))
    # An fp32 residual tile takes as many registers as the fp32 accumulator: at 128 accumulator
    # values per thread the two together spill.
    fp32_residual = args.get("HAS_RESIDUAL") and args["res_ptr"].dtype == torch.float32
    # tf32x3 holds each fp32 operand as two tf32 halves in registers: beyond 64 accumulator
    # values per thread at BLOCK_K 32 (or 32 at BLOCK_K 64) the sm_90a tiles spill 136-400 bytes
    # (cuobjdump of the kernel report's fp32 run); those tiles never win.
    split_operands = args.get("INPUT_PRECISION") == "tf32x3"
    # The training conv with the prologue and the statistics epilogue at 128 accumulators per
    # thread sits at 255 registers on sm_90a and spills 24 bytes on sm_80 (kernel report,
    # m128n256k64w8s3 on ResNet-50's 64->256 and 128->512 1x1s): those tiles never win.
    stats_with_prologue = bool(args.get("STATS") and args.get("HAS_PRE"))

    def keep(c):
        acc_per_thread = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)
        return (c.kwargs["BLOCK_N"] <= widest
                and not (fp32_residual and acc_per_thread >= 128)
                and not (split_operands and acc_per_thread * c.kwargs["BLOCK_K"] > 64 * 32)
                and not (stats_with_prologue and acc_per_thread >= 128))

    kept = [c for c in configs if keep(c)]
    return kept or configs


def _autotuned(configs):
    # cache_results keeps the choice on disk across processes where triton supports it.
    extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=list(configs.values()),
                           # STATS: the statistics epilogue changes what fits in registers
                           key=["Cin", "Cout", "KH", "KW", "STRIDE_H", "M_BUCKET", "STATS"],
                           prune_configs_by={"early_config_prune": prune_configs},
                           **extra)(conv_bn_act_kernel)


# One autotuner per K path, each with its own candidates. Autotuning in the interpreter would
# time numpy, so there the one small config is used instead.
_tuned_kernels = None if INTERPRET else {small: _autotuned(conv_configs(small)) for small in (False, True)}



def _layer_args(x_shape, w_shape, stride, padding, dilation, dtype, *, residual, relu, pre, stats=False,
                quant=(False, False, False)):
    """The scalar and constexpr kernel arguments of one layer (shared by the launcher and the
    ahead-of-time compile spec, so the report compiles exactly what runs)."""
    n, cin, h, w = x_shape
    cout, _, kh, kw = w_shape
    ho, wo = conv_output_hw(h, w, kh, kw, stride, padding, dilation)
    m = n * ho * wo
    dense = dense_rows(cin, kw, dilation[1])
    # 32-bit math must hold every element's offset and the last tile's row indices: only
    # tensors near 2**31 elements pay for 64-bit math
    int64_offsets = needs_int64_index(max(n * cin * h * w, m * cout) + ROW_INDEX_MARGIN)
    scalars = dict(M=m, H=h, W=w, Cin=cin, Ho=ho, Wo=wo, Cout=cout,
                   M_BUCKET=triton.next_power_of_2(m))
    constexprs = dict(
        KH=kh, KW=kw, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1], HAS_RESIDUAL=residual, RELU=relu, HAS_PRE=pre,
        STATS=stats, SMALL_CIN=cin < SMALL_CIN,
        DENSE_CIN=cin if dense else 0, ROW_K=triton.next_power_of_2(max(kw * cin, 16)) if dense else 16,
        INT64_OFFSETS=int64_offsets,
        INPUT_PRECISION=input_precision(dtype),
        DEQUANT=quant[0], RES_SCALED=quant[1], QUANT_OUT=quant[2],
        EXACT_FP8=quant[0] and INTERPRET,
    )
    return (n, cout, ho, wo), scalars, constexprs


def _asked_config(config):
    """The config a caller asked for: ``config``, else the one RESNET_FAST_TRITON_CONV_CONFIG names."""
    return config if config is not None else (os.environ.get(CONFIG_ENV_VAR) or None)


def _resolve_config(config):
    config = _asked_config(config)
    if isinstance(config, str):
        configs = {**conv_configs(False), **conv_configs(True)}
        if config not in configs:
            raise ValueError(f"unknown conv config {config!r}; choose one of {list(configs)}")
        config = configs[config]
    if config is None and INTERPRET:
        config = INTERPRETER_CONFIG
    return config


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride, padding, dilation,
                residual: torch.Tensor | None = None, relu: bool = True,
                pre_scale: torch.Tensor | None = None, pre_bias: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, config: triton.Config | str | None = None) -> torch.Tensor:
    """Launch the fused conv (see the module doc); groups = 1.

    x, residual, out: NHWC (channels_last) of one dtype among fp16/bf16/fp32; weight: (Cout, Cin,
    kh, kw) in channels_last memory (OHWI); bias, pre_scale, pre_bias: contiguous fp32.
    ``out`` receives y when given (else it is allocated channels_last). ``config`` (a
    triton.Config or a name from :func:`conv_configs`) skips autotuning; so does setting
    RESNET_FAST_TRITON_CONV_CONFIG to a name.
    """
    out, _ = _run(x, weight, bias, stride, padding, dilation, residual, relu, pre_scale, pre_bias,
                  out=out, config=config, stats=False)
    return out


def conv_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride, padding, dilation,
               pre_scale: torch.Tensor | None = None, pre_bias: torch.Tensor | None = None, *,
               out: torch.Tensor | None = None, config: triton.Config | str | None = None):
    """The training conv: (y, mean, var) with y = conv(pre(x), weight) + bias (no activation) and
    the batch mean and biased variance of y per output channel (fp32), from per-tile partials the
    epilogue writes and one merge kernel (see kernels/batch_norm.py). Arguments as conv_bn_act."""
    y, launch = _run(x, weight, bias, stride, padding, dilation, None, False, pre_scale, pre_bias,
                     out=out, config=config, stats=True)
    m, cout = launch.scalars["M"], launch.scalars["Cout"]
    if m == 0:
        nan = torch.full((cout,), float("nan"), dtype=torch.float32, device=x.device)
        return y, nan, nan.clone()
    rows_per_tile = launch.config.kwargs["BLOCK_M"]
    mean, var = merge_partials(launch.partials, triton.cdiv(m, rows_per_tile), m, rows_per_tile)
    launch.partials = None
    return y, mean, var


def conv_bn_act_fp8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, w_scale: torch.Tensor,
                    x_scale: torch.Tensor, stride, padding, dilation,
                    residual: torch.Tensor | None = None, res_scale: torch.Tensor | None = None,
                    relu: bool = True, out_scale: torch.Tensor | None = None,
                    out_dtype: torch.dtype = torch.bfloat16, *, out: torch.Tensor | None = None,
                    config: triton.Config | str | None = None) -> torch.Tensor:
    """The fused conv on e4m3 operands (see resnet_fast.fp8): y = act(conv(x, w) * w_scale[n] *
    x_scale + bias [+ residual * res_scale]), fp32 accumulation and epilogue, stored as e4m3 of
    y / out_scale (saturated) when ``out_scale`` is given, else in ``out_dtype``. x, residual:
    NHWC; weight: OHWI e4m3; w_scale [Cout], x_scale/res_scale/out_scale one-element fp32."""
    if out_scale is not None:
        out_dtype = x.dtype
    y, _ = _run(x, weight, bias, stride, padding, dilation, residual, relu, None, None, out=out,
                config=config, stats=False, scales=(w_scale, x_scale, res_scale, out_scale),
                out_dtype=out_dtype)
    return y


#: the smallest BLOCK_M of any config: the most tiles a layer's statistics can have
_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in [INTERPRETER_CONFIG, *conv_configs(False).values(),
                                                   *conv_configs(True).values()])


def _run(x, weight, bias, stride, padding, dilation, residual, relu, pre_scale, pre_bias, *,
         out, config, stats: bool, scales=(None, None, None, None), out_dtype=None):
    w_scale, x_scale, res_scale, out_scale = scales
    quant = (w_scale is not None, res_scale is not None, out_scale is not None)
    if x.dtype not in _TORCH_TO_TRITON and not (quant[0] and x.dtype in _FP8_TO_TRITON):
        raise TypeError(f"the Triton conv takes float16, bfloat16 or float32 (float8_e4m3fn with "
                        f"scales: conv_bn_act_fp8), not {x.dtype}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    for name, t in (("x", x), ("weight", weight), ("residual", residual), ("out", out)):
        if t is not None and not t.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"{name} must be 4-D and channels_last-contiguous (NHWC / OHWI in memory)")
    config = _asked_config(config)  # part of the launch key
    launch = _launch_for(x, weight, stride, padding, dilation, residual is not None, relu, pre_scale is not None,
                         stats, config, quant, out_dtype)
    if out is None:
        out = torch.empty(launch.out_shape, dtype=out_dtype, device=x.device, memory_format=torch.channels_last)
    elif out.shape != launch.out_shape or out.dtype != out_dtype:
        raise ValueError(f"out must be a {out_dtype} tensor of shape {launch.out_shape}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    if out.numel() == 0:
        return out, launch
    part = None
    if stats:  # room for the most tiles any config makes; the merge reads those the launch wrote
        part = empty_partials(triton.cdiv(launch.scalars["M"], _MIN_BLOCK_M), launch.scalars["Cout"], x.device)
        launch.partials = part
    part_tiles = part.shape[1] if part is not None else 1
    if launch.kwargs is not None:  # config known: straight to the kernel
        conv_bn_act_kernel[launch.grid](x, weight, bias, residual, pre_scale, pre_bias, out,
                                        part, *scales, PART_TILES=part_tiles, **launch.kwargs)
        return out, launch
    # First launch of this layer without a fixed config: the autotuner picks one (or finds its
    # earlier pick), and the launch keeps it so later launches skip the autotuner's per-call work.
    # (The autotuner's final run is with the config it picked, so the partials are that config's.)
    tuner = _tuned_kernels[launch.constexprs["SMALL_CIN"]]
    start = time.perf_counter()
    tuner[launch.grid_fn](x, weight, bias, residual, pre_scale, pre_bias, out, part, *scales,
                          PART_TILES=part_tiles, **launch.scalars, **launch.constexprs)
    launch.set_config(tuner.best_config)
    # a first forward autotunes every new layer shape (seconds each): say so, one line a layer
    _log.info("resnet_fast: Triton conv %s->%s %sx%s/s%s on %s %s%s tuned in %.1f s (%s)",
              x.shape[1], weight.shape[0], weight.shape[2], weight.shape[3], stride[0],
              "x".join(map(str, x.shape[2:])), str(x.dtype).replace("torch.", ""),
              (" with statistics" if stats else "") + (" fp8" if quant[0] else ""), time.perf_counter() - start,
              config_name(tuner.best_config))
    return out, launch


def prepared_launch(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, residual: bool,
                    relu: bool, pre: bool):
    """The launch record of an inference call that has run (config known), for
    :func:`relaunch`; None when there is none (the call has not run, or it autotunes still)."""
    config = _asked_config(None)
    launch = _launch_for(x, weight, stride, padding, dilation, residual, relu, pre, False, config)
    return launch if launch.kwargs is not None and launch.partials is None else None


def relaunch(launch: "_Launch", x, weight, bias, residual, pre_scale, pre_bias) -> torch.Tensor:
    """conv_bn_act again for tensors of the same shapes, dtypes and layouts as the call that
    made ``launch`` (:func:`prepared_launch`): straight to the kernel, no checks or lookups."""
    out = torch.empty(launch.out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    args = (x, weight, bias, residual, pre_scale, pre_bias, out, None, None, None, None, None)
    if launch.relaunch is None:  # the first repeat launches through run and keeps the binary
        launch.relaunch = direct_launcher(conv_bn_act_kernel, launch.grid, args,
                                          {"PART_TILES": 1, **launch.kwargs})
    else:
        launch.relaunch(*args)
    return out


class _Launch:
    """What one layer's launches share: output shape, kernel arguments other than the tensors,
    and, once known, the config and grid. Keyed by everything it is derived from."""

    __slots__ = ("out_shape", "scalars", "constexprs", "config", "kwargs", "grid", "partials", "relaunch")

    def __init__(self, out_shape, scalars, constexprs, config):
        self.out_shape = torch.Size(out_shape)
        self.scalars, self.constexprs = scalars, constexprs
        self.config = self.kwargs = self.grid = None
        self.relaunch = None  # kernels/launch.py's direct launcher, after the first relaunch
        self.partials = None  # the statistics buffers of the launch in flight (conv_stats)
        if config is not None:
            self.set_config(config)

    def grid_fn(self, meta):
        return (triton.cdiv(self.scalars["M"], meta["BLOCK_M"]) * triton.cdiv(self.scalars["Cout"], meta["BLOCK_N"]),)

    def set_config(self, config: triton.Config):
        self.config = config
        self.grid = self.grid_fn(config.kwargs)
        self.kwargs = {**self.scalars, **self.constexprs, **config.all_kwargs()}
        self.relaunch = None


_launches: dict = {}


def _launch_for(x, weight, stride, padding, dilation, residual: bool, relu: bool, pre: bool, stats: bool,
                config, quant=(False, False, False), out_dtype=None) -> _Launch:
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    # input_precision reads torch's TF32 switch at every call: it is part of the key
    key = (tuple(x.shape), tuple(weight.shape), stride, padding, dilation, x.dtype, residual, relu, pre,
           stats, input_precision(x.dtype), config if config is None or isinstance(config, str) else id(config),
           quant, out_dtype or x.dtype)
    launch = _launches.get(key)
    if launch is None:
        out_shape, scalars, constexprs = _layer_args(tuple(x.shape), tuple(weight.shape), stride, padding,
                                                     dilation, x.dtype, residual=residual, relu=relu, pre=pre,
                                                     stats=stats, quant=quant)
        launch = _Launch(out_shape, scalars, constexprs, _resolve_config(config))
        if config is None or isinstance(config, str):  # a Config object may be a one-off: not kept
            if len(_launches) >= _MAX_LAUNCHES:
                _launches.clear()
            _launches[key] = launch
    return launch


#: launch records kept (one per distinct layer call; a ResNet-50 at one batch size has 24)
_MAX_LAUNCHES = 4096


def chosen_configs() -> list[dict]:
    """The config each layer call of this process launched with (autotuned or fixed): for
    reports, so that a timing can be read together with the tile that produced it."""
    out = []
    for key, launch in _launches.items():
        x_shape, w_shape, stride, padding, dilation, dtype, residual, relu, pre, stats, precision, _, quant, out_dt = key
        cfg = None if launch.config is None else config_name(launch.config)
        out.append({"x": list(x_shape), "weight": list(w_shape), "stride": list(stride),
                    "padding": list(padding), "dilation": list(dilation),
                    "dtype": str(dtype).replace("torch.", ""), "residual": residual, "relu": relu,
                    "pre": pre, "stats": stats, "input_precision": precision, "config": cfg,
                    "fp8": quant[0], "out_dtype": str(out_dt).replace("torch.", "")})
    return out


def conv_compile_spec(dtype: torch.dtype, x_shape, w_shape, stride=(1, 1), padding=(0, 0),
                      dilation=(1, 1), *, residual=False, relu=True, pre=False, stats=False,
                      fp8_out: bool = False, config: triton.Config | str) -> dict:
    """What ``triton.compile`` needs to build one layer's kernel ahead of time, no GPU required::

        spec = conv_compile_spec(torch.bfloat16, (256, 64, 56, 56), (64, 64, 3, 3), (1, 1), (1, 1),
                                 config="m128n128k64w8s4")
        src = ASTSource(fn=spec["fn"], signature=spec["signature"],
                        constexprs=spec["constexprs"], attrs=spec["attrs"])
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=spec["options"])

    The signature and attributes follow what the JIT derives from real arguments of these
    shapes: pointers 16-byte aligned, ints marked divisible by 16 where they are, ints equal
    to 1 and absent (None) pointers folded into constants.
    """
    config = _resolve_config(config)
    _, scalars, constexprs = _layer_args(
        tuple(x_shape), tuple(w_shape), tuple(stride), tuple(padding), tuple(dilation), dtype,
        residual=residual, relu=relu, pre=pre, stats=stats,
        quant=(dtype in _FP8_TO_TRITON, residual and dtype in _FP8_TO_TRITON, fp8_out))
    constexprs.update(config.kwargs)
    # the statistics buffer's tile count (room for the smallest BLOCK_M's tiles; 1: no buffer)
    scalars["PART_TILES"] = triton.cdiv(scalars["M"], _MIN_BLOCK_M) if stats else 1
    fp8 = dtype in _FP8_TO_TRITON
    elem = "*" + {**_TORCH_TO_TRITON, **_FP8_TO_TRITON}[dtype]
    # an fp8 conv (e4m3 operands) writes e4m3 (fp8_out) or bf16 (the last layer before the head)
    out_elem = elem if not fp8 or fp8_out else "*bf16"
    pointers = dict(x_ptr=elem, w_ptr=elem, bias_ptr="*fp32", res_ptr=elem if residual else None,
                    pre_scale_ptr="*fp32" if pre else None, pre_bias_ptr="*fp32" if pre else None,
                    y_ptr=out_elem, part_ptr="*fp32" if stats else None,
                    w_scale_ptr="*fp32" if fp8 else None, x_scale_ptr="*fp32" if fp8 else None,
                    res_scale_ptr="*fp32" if fp8 and residual else None,
                    out_scale_ptr="*fp32" if fp8_out else None)
    return compile_spec(conv_bn_act_kernel, pointers, scalars, constexprs,
                        {"num_warps": config.num_warps, "num_stages": config.num_stages})
