"""2-D max pooling over NHWC memory, without indices: the pool after a ResNet stem.

    y[n, ho, wo, c] = max over (r, s) of x[n, ho*stride - pad + r*dil, wo*stride - pad + s*dil, c]

with taps in the padding counting as -inf, exactly as F.max_pool2d (output size, ceil_mode rule,
dilation, NaN propagation). Eager torch on CUDA computes this with max_pool2d_with_indices and
writes an int64 index per output element that inference then drops: for the stem pool of
ResNet-50 at batch 256 in bf16 (64 x 112 x 112 -> 64 x 56 x 56) that is 411 MB of index writes
beside 103 MB of output. Here only the values are written, so the kernel moves the input once
and the output once and runs at memory-copy speed.

The tile is [BLOCK_P output pixels, BLOCK_C channels], channels innermost: NHWC puts the channels
of one pixel in one contiguous run, so with C a multiple of 8 (16-bit) or 4 (fp32) every tap load
and the store are 128-bit vectors. The kh * kw taps are unrolled at compile time (constexpr
window); each tap's validity is per pixel (four compares on BLOCK_P values) and its offset from
the window's (0, 0) tap is one scalar, so a tap costs a load and a max per vector. Neighbouring
windows overlap (a 3x3/s2 window reads 9 pixels, 2.25 of them its own): the re-reads along a row
of output hit L1 within a program, those across rows hit L2, and DRAM sees each input byte once.

The max is taken in the input dtype (it is exact in any dtype, and 16-bit values take half the
registers of fp32), with NaN propagating (tl.maximum's default drops NaN).
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

# absolute import: the kernel report loads this file again under a private name (to compile its
# kernels outside the interpreter), where a relative import has no package to resolve in
from resnet_fast.kernels.indexing import needs_int64_index
from resnet_fast.kernels.launch import TRITON_DTYPES as _TORCH_TO_TRITON, compile_spec

#: kernels decorated while TRITON_INTERPRET=1 run in Triton's interpreter (CPU tensors too)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: bytes of one pixel's channels a program takes at most (128 bf16 / 64 fp32 channels, 16 lanes
#: of 128-bit vectors); wider C is split over program_id(1). C = 64, the stem's, is one block.
MAX_ROW_BYTES = 256
#: bytes of output a program writes: 8 KB is 64 pixels x 64 bf16 channels, so each of 4 warps'
#: threads holds 4 output vectors and issues 4 x kh*kw independent 128-bit loads. For the stem
#: pool ptxas hoists most of the 36 ahead of the maxes: sm_90a takes 136 registers (3 CTAs, 12
#: warps an SM), which still leaves over 100 KB of loads in flight per SM, some 3x the ~40 KB
#: that covers DRAM latency at 4.8 TB/s; sm_80 takes 72. No spills on either (the tests check).
TILE_BYTES = 8192
#: the most output pixels of one program: below 8 channels the loads are scalar, and 128 pixels
#: of 4 channels keep them at the stem's 4 x kh*kw per thread (512 pixels took ~200 registers)
MAX_BLOCK_P = 128
NUM_WARPS = 4
#: no loop to pipeline (the taps are unrolled): one stage, passed to the JIT and the spec alike
NUM_STAGES = 1
#: under the interpreter: small tiles, so that the tests' small channel counts and images cross
#: block edges in both dimensions
INTERPRETER_BLOCKS = (32, 32)


IntPair = Union[int, Sequence[int]]


@triton.jit
def max_pool2d_nhwc_kernel(
    x_ptr, y_ptr,
    P, H, W, C, Ho, Wo,  # P = N * Ho * Wo output pixels
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_pitch = W * C  # elements between vertically adjacent taps (per unit of dilation)
    if INT64_OFFSETS:
        # every offset below derives from offs_p or row_pitch: these casts make it all 64-bit
        offs_p = offs_p.to(tl.int64)
        row_pitch = row_pitch.to(tl.int64)
    p_ok = offs_p < P
    c_ok = offs_c < C

    # Output pixel (img, ho, wo) of each row of the tile, and the input pixel its (0, 0) tap reads
    wo = offs_p % Wo
    t = offs_p // Wo
    ho = t % Ho
    img = t // Ho
    ih0 = ho * STRIDE_H - PAD_H
    iw0 = wo * STRIDE_W - PAD_W
    # pointers of each lane's (0, 0) tap (before x where the window starts in the padding:
    # only masked taps are formed there); tap (r, s) lies a scalar offset further
    x_tile = x_ptr + ((((img * H + ih0) * W + iw0) * C)[:, None] + offs_c[None, :])
    c_ok_tile = c_ok[None, :]

    # The max starts at the first tap itself, not at a -inf tile (one max fewer, and the
    # interpreter has no bf16 constants)
    for r in tl.static_range(KH):
        ih = ih0 + r * DIL_H
        h_ok = p_ok & (ih >= 0) & (ih < H)
        for s in tl.static_range(KW):
            iw = iw0 + s * DIL_W
            ok = h_ok & (iw >= 0) & (iw < W)
            # a tap in the padding, or a channel past C, loads -inf: the max over a window that
            # straddles the border is the max over its pixels inside, as in torch
            v = tl.load(x_tile + (r * DIL_H * row_pitch + s * DIL_W * C),
                        mask=ok[:, None] & c_ok_tile, other=float("-inf"))
            if r + s == 0:
                acc = v
            else:
                acc = tl.maximum(acc, v, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + (offs_p[:, None] * C + offs_c[None, :]), acc, mask=p_ok[:, None] & c_ok[None, :])


# --------------------------------------------------------------------------------------------
# Arguments: torch's rules, one derivation for the launcher and the compile spec
# --------------------------------------------------------------------------------------------
def _pair(v, name: str, *, allow_none: bool = False) -> Optional[tuple[int, int]]:
    if allow_none and (v is None or (isinstance(v, (tuple, list)) and len(v) == 0)):
        return None
    if isinstance(v, bool) or not isinstance(v, (int, tuple, list, torch.Size)):
        raise TypeError(f"max_pool2d {name} must be an int or a pair of ints, got {v!r}")
    vals = [v] if isinstance(v, int) else list(v)
    if not 1 <= len(vals) <= 2 or any(isinstance(e, bool) or not isinstance(e, int) for e in vals):
        raise TypeError(f"max_pool2d {name} must be an int or a pair of ints, got {v!r}")
    return (vals[0], vals[-1])


def pool_output_size(size: int, kernel: int, pad: int, stride: int, dilation: int, ceil_mode: bool) -> int:
    """One output dimension, as torch's pooling_output_shape (ATen/native/Pool.h): floor
    division, and in ceil mode one output fewer when the last window would start past the input
    and its left padding."""
    out = (size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def normalize_args(kernel_size: IntPair, stride: Optional[IntPair], padding: IntPair,
                   dilation: IntPair, ceil_mode: bool):
    """(kernel, stride, padding, dilation) as pairs, checked as torch checks them (stride None
    or empty means the kernel size, as in F.max_pool2d)."""
    kernel = _pair(kernel_size, "kernel_size")
    stride = _pair(stride, "stride", allow_none=True) or kernel
    padding = _pair(padding, "padding")
    dilation = _pair(dilation, "dilation")
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"max_pool2d ceil_mode must be a bool, got {ceil_mode!r}")
    if min(kernel) <= 0:
        raise ValueError(f"max_pool2d kernel_size must be positive, got {kernel}")
    if min(stride) <= 0:
        raise ValueError(f"max_pool2d stride must be positive, got {stride}")
    if min(dilation) <= 0:
        raise ValueError(f"max_pool2d dilation must be positive, got {dilation}")
    if min(padding) < 0:
        raise ValueError(f"max_pool2d padding must be non-negative, got {padding}")
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"max_pool2d padding must be at most half the kernel size, got "
                         f"padding={padding} for kernel_size={kernel}")
    return kernel, stride, padding, dilation


def block_sizes(channels: int, dtype: torch.dtype, interpreter: bool = False) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) for C channels of dtype: the channel block is C rounded up to a power
    of two, at most MAX_ROW_BYTES wide, and the pixel block fills TILE_BYTES of output."""
    if interpreter:
        return INTERPRETER_BLOCKS
    elem = torch.empty((), dtype=dtype).element_size()
    block_c = min(triton.next_power_of_2(channels), MAX_ROW_BYTES // elem)
    block_p = max(16, min(MAX_BLOCK_P, TILE_BYTES // (block_c * elem)))
    return block_p, block_c


@functools.lru_cache(maxsize=1024)
def _pool_args(x_shape: tuple, dtype: torch.dtype, kernel, stride, padding, dilation, ceil_mode: bool,
               interpreter: bool):
    """(output shape, grid, scalar arguments, constexpr arguments) of one pool: what the
    launcher passes and what the compile spec compiles."""
    n, c, h, w = x_shape
    if c == 0 or h == 0 or w == 0:  # torch: "allow 0-dim only for N"
        raise ValueError(f"max_pool2d takes an empty batch but no empty channel or spatial "
                         f"dimension, got input of shape {tuple(x_shape)}")
    ho = pool_output_size(h, kernel[0], padding[0], stride[0], dilation[0], ceil_mode)
    wo = pool_output_size(w, kernel[1], padding[1], stride[1], dilation[1], ceil_mode)
    if ho < 1 or wo < 1:
        raise ValueError(f"max_pool2d output of {ho}x{wo} is too small: input {h}x{w}, kernel_size "
                         f"{kernel}, stride {stride}, padding {padding}, dilation {dilation}")
    block_p, block_c = block_sizes(c, dtype, interpreter)
    p = n * ho * wo
    grid = (triton.cdiv(p, block_p), triton.cdiv(c, block_c))
    # The largest offset any lane forms, masked ones included: the output offsets of the last,
    # partial pixel block, and the input offset of the bottom-right tap of that block's windows
    # (its rows past P still decode to an image index and a window position, one image beyond
    # the last at most, and in ceil mode a window may reach past the bottom and right edges).
    rows = grid[0] * block_p
    c_end = grid[1] * block_c
    img_end = triton.cdiv(rows, ho * wo)
    ih_end = max(h, (ho - 1) * stride[0] - padding[0] + (kernel[0] - 1) * dilation[0] + 1)
    iw_end = max(w, (wo - 1) * stride[1] - padding[1] + (kernel[1] - 1) * dilation[1] + 1)
    largest = max(rows * c + c_end, ((img_end * h + ih_end) * w + iw_end) * c + c_end)
    scalars = dict(P=p, H=h, W=w, C=c, Ho=ho, Wo=wo)
    constexprs = dict(KH=kernel[0], KW=kernel[1], STRIDE_H=stride[0], STRIDE_W=stride[1],
                      PAD_H=padding[0], PAD_W=padding[1], DIL_H=dilation[0], DIL_W=dilation[1],
                      INT64_OFFSETS=needs_int64_index(largest), BLOCK_P=block_p, BLOCK_C=block_c)
    return (n, c, ho, wo), grid, scalars, constexprs


def _check_tensor(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"max_pool2d_nhwc {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"max_pool2d_nhwc {name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
    if t.dtype not in _TORCH_TO_TRITON:
        raise TypeError(f"the Triton max pool takes float16, bfloat16 or float32, not {t.dtype} ({name})")
    if not t.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"max_pool2d_nhwc {name} must be channels_last-contiguous (NHWC in memory), "
                         f"got strides {t.stride()} for shape {tuple(t.shape)}")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def max_pool2d_nhwc(x: torch.Tensor, kernel_size: IntPair, stride: Optional[IntPair] = None,
                    padding: IntPair = 0, dilation: IntPair = (1, 1), ceil_mode: bool = False, *,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode) for a channels_last x
    (fp16/bf16/fp32), without indices; the result is channels_last in x's dtype, written into
    ``out`` when given (a channels_last tensor of the output's shape and dtype, not overlapping
    x). Empty batches return an empty result without a launch.
    """
    _check_tensor(x, "x")
    kernel, stride, padding, dilation = normalize_args(kernel_size, stride, padding, dilation, ceil_mode)
    out_shape, grid, scalars, constexprs = _pool_args(tuple(x.shape), x.dtype, kernel, stride, padding,
                                                      dilation, ceil_mode, INTERPRET)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    else:
        _check_tensor(out, "out")
        if tuple(out.shape) != out_shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"out must be a {x.dtype} tensor of shape {out_shape} on {x.device}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        if _overlap(x, out):  # other programs still read the input a program writes over
            raise ValueError("out must not overlap x")
    if out.numel():
        max_pool2d_nhwc_kernel[grid](x, out, **scalars, **constexprs, num_warps=NUM_WARPS,
                                     num_stages=NUM_STAGES)
    return out


def max_pool_compile_spec(dtype: torch.dtype, x_shape, kernel_size: IntPair, stride: Optional[IntPair],
                          padding: IntPair, dilation: IntPair = (1, 1), ceil_mode: bool = False) -> dict:
    """What ``triton.compile`` needs to build, ahead of time and without a GPU, the kernel that
    :func:`max_pool2d_nhwc` launches on a GPU for an input of ``x_shape`` (N, C, H, W)::

        spec = max_pool_compile_spec(torch.bfloat16, (256, 64, 112, 112), 3, 2, 1)
        src = ASTSource(fn=spec["fn"], signature=spec["signature"],
                        constexprs=spec["constexprs"], attrs=spec["attrs"])
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=spec["options"])

    As kernels.conv_bn_act.conv_compile_spec: pointers 16-byte aligned, ints marked divisible by
    16 where they are, ints equal to 1 folded into constants, as the JIT specializes them.
    """
    if dtype not in _TORCH_TO_TRITON:
        raise TypeError(f"the Triton max pool takes float16, bfloat16 or float32, not {dtype}")
    kernel, stride, padding, dilation = normalize_args(kernel_size, stride, padding, dilation, ceil_mode)
    _, _, scalars, constexprs = _pool_args(tuple(x_shape), dtype, kernel, stride, padding, dilation,
                                           ceil_mode, False)
    constexprs = dict(constexprs)
    elem = "*" + _TORCH_TO_TRITON[dtype]
    pointers = dict(x_ptr=elem, y_ptr=elem)
    return compile_spec(max_pool2d_nhwc_kernel, pointers, scalars, constexprs,
                        {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES})
