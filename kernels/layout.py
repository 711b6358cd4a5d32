"""An image into the stem's layout in one pass: any memory order -> NHWC with zero channels added.

    y[n, h, w, c] = x[n, c, h, w] for c < C, 0 for C <= c < C_out      (y channels_last)

A converted model changes its input's memory format once, at its entry, and the stem conv
wants 4 channels rather than 3 (kernels/conv_bn_act.py, dense rows): both are this one copy.
Each program moves BLOCK_P pixels of one image: it reads every channel plane of x (each a
contiguous run along W when x is NCHW) and writes the [BLOCK_P, C_out] block of y, one
contiguous run of BLOCK_P * C_out elements; the compiler transposes through shared memory.
x's strides are arguments, so an NCHW, channels_last or strided view all take the same path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resnet_fast.kernels.indexing import needs_int64_index
from resnet_fast.kernels.launch import TRITON_DTYPES, compile_spec

BLOCK_P = 256  # pixels per program: 256 x 4 channels x 2 bytes = 2 KB written, 1.5 KB read
NUM_WARPS = 4
DTYPES = tuple(TRITON_DTYPES)


@triton.jit
def to_nhwc_padded_kernel(x_ptr, y_ptr, HW, W, C,
                          stride_n, stride_c, stride_h, stride_w,
                          C_OUT: tl.constexpr, BLOCK_P: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    img = tl.program_id(1)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    if INT64_OFFSETS:
        img = img.to(tl.int64)
        p = p.to(tl.int64)
    c = tl.arange(0, C_OUT)
    p_ok = p < HW
    h = p // W
    w = p % W
    src = img * stride_n + h * stride_h + w * stride_w
    v = tl.load(x_ptr + (src[:, None] + c[None, :] * stride_c),
                mask=p_ok[:, None] & (c < C)[None, :], other=0.0)
    dst = (img * HW + p)[:, None] * C_OUT + c[None, :]
    tl.store(y_ptr + dst, v.to(y_ptr.dtype.element_ty), mask=p_ok[:, None])


def to_nhwc_padded(x: torch.Tensor, channels: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, C, H, W) in any memory order as a channels_last (N, channels, H, W) tensor of x's
    dtype whose channels past C are zero. ``channels``: a power of two, at least C."""
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"to_nhwc_padded takes float16, bfloat16 or float32, not {x.dtype}")
    n, c, h, w = x.shape
    if channels < c or channels & (channels - 1):
        raise ValueError(f"channels must be a power of two of at least {c}, got {channels}")
    shape = (n, channels, h, w)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    elif (out.shape != shape or out.dtype != x.dtype or out.device != x.device
          or not out.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"out must be a channels_last {x.dtype} tensor of shape {shape} on {x.device}")
    if out.numel() == 0:
        return out
    hw = h * w
    # the last block's pixel indices reach BLOCK_P past H*W; strides can be anything (a view)
    largest = max(out.numel() + BLOCK_P * channels,
                  sum((d - 1) * abs(s) for d, s in zip(x.shape, x.stride())) + BLOCK_P * max(map(abs, x.stride())))
    to_nhwc_padded_kernel[(triton.cdiv(hw, BLOCK_P), n)](
        x, out, hw, w, c, *x.stride(), C_OUT=channels, BLOCK_P=BLOCK_P,
        INT64_OFFSETS=needs_int64_index(largest), num_warps=NUM_WARPS)
    return out


def layout_compile_spec(dtype: torch.dtype, x_shape, channels: int) -> dict:
    """What ``triton.compile`` needs to build the conversion of an NCHW input of ``x_shape``
    ahead of time (as kernels.conv_bn_act.conv_compile_spec; for the kernel report)."""
    n, c, h, w = x_shape
    elem = "*" + TRITON_DTYPES[dtype]
    stride = (c * h * w, h * w, w, 1)
    ints = dict(HW=h * w, W=w, C=c, stride_n=stride[0], stride_c=stride[1], stride_h=stride[2],
                stride_w=stride[3])
    constexprs = dict(C_OUT=channels, BLOCK_P=BLOCK_P,
                      INT64_OFFSETS=needs_int64_index(n * channels * h * w + BLOCK_P * channels))
    return compile_spec(to_nhwc_padded_kernel, {"x_ptr": elem, "y_ptr": elem}, ints, constexprs,
                        {"num_warps": NUM_WARPS, "num_stages": 1})
