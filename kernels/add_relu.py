"""out = relu(a + b) in one pass over memory, out of place or written into a.

A flat elementwise kernel: a and b must share one memory order (both contiguous, or both
channels_last), so that element i of the flat buffer is the same logical element in each.
Each program takes BLOCK elements; the compiler turns the contiguous, 16-byte aligned runs into
128-bit loads and stores, and the tail of the last block is masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resnet_fast.kernels.indexing import needs_int64_index
from resnet_fast.ops import same_memory_order

BLOCK = 4096
NUM_WARPS = 8  # 256 threads x 16 elements: two 128-bit accesses per thread per operand in 16-bit dtypes


@triton.jit
def add_relu_kernel(a_ptr, b_ptr, out_ptr, numel,
                    BLOCK: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    pid = tl.program_id(0)
    if INT64_OFFSETS:
        pid = pid.to(tl.int64)  # pid * BLOCK overflows int32 past 2**31 elements
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    a = tl.load(a_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    # NaN propagates, as in torch.relu (the default maximum would turn NaN into 0).
    out = tl.maximum(a + b, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"add_relu needs a and b of one shape, dtype and device, got "
                         f"{tuple(a.shape)} {a.dtype} {a.device} and {tuple(b.shape)} {b.dtype} {b.device}")
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton add_relu takes float16, bfloat16 or float32, not {a.dtype}")
    if not same_memory_order(a, b):
        raise ValueError("add_relu needs a and b both contiguous or both channels_last-contiguous; "
                         f"got strides {a.stride()} and {b.stride()}")


def _launch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    n = a.numel()
    if n:
        add_relu_kernel[(triton.cdiv(n, BLOCK),)](a, b, out, n, BLOCK=BLOCK,
                                                  # the last block's offsets reach BLOCK past n
                                                  INT64_OFFSETS=needs_int64_index(n + BLOCK),
                                                  num_warps=NUM_WARPS)


def add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """relu(a + b), in a new tensor with a's memory format."""
    _check(a, b)
    out = torch.empty_like(a)
    _launch(a, b, out)
    return out


def add_relu_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a <- relu(a + b); returns a. Each element is read and written by the same thread, so
    writing into a (or b being a itself) is safe."""
    _check(a, b)
    _launch(a, b, a)
    return a
