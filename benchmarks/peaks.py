"""The machine's ceilings, measured in the same run as the figures they divide: a large matmul
(the tensor-core peak a conv could reach) and a large device-to-device copy (the memory
bandwidth, counting bytes read + written). A datasheet number would flatter or shame every
figure; these are what this GPU, at this clock, in this run, actually did."""

from __future__ import annotations

import torch

from .timing import bench


def measure(device: torch.device, dtype: torch.dtype, *, quick: bool = False) -> dict:
    gen = torch.Generator(device=device).manual_seed(1234)
    if device.type == "cuda":
        n = 8192
        mm_dtype = dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        copy_bytes = 2**30
    else:
        # The CPU path: small enough for two shared cores, still the CPU's own ceiling.
        n = 512 if quick else 1024
        mm_dtype = torch.float32 if dtype not in (torch.float32, torch.float64) else dtype
        copy_bytes = 64 * 2**20
    a = torch.randn(n, n, device=device, dtype=mm_dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=mm_dtype, generator=gen)
    c = torch.empty(n, n, device=device, dtype=mm_dtype)
    t_mm = bench(lambda x, y: torch.matmul(x, y, out=c), [(a, b)], device=device,
                 target_ms=300 if device.type == "cuda" else 100, min_reps=5, max_reps=100)
    del a, b, c
    src = torch.empty(copy_bytes // 2, device=device, dtype=torch.bfloat16).normal_(generator=gen)
    dst = torch.empty_like(src)
    t_cp = bench(lambda s: dst.copy_(s), [(src,)], device=device,
                 target_ms=300 if device.type == "cuda" else 100, min_reps=5, max_reps=100)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "matmul_shape": [n, n, n],
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "matmul_ms": t_mm.median_ms,
        "matmul_tflops": 2 * n**3 / (t_mm.median_ms / 1e3) / 1e12,
        "copy_bytes_moved": 2 * copy_bytes,     # read + written
        "copy_ms": t_cp.median_ms,
        "copy_gbps": 2 * copy_bytes / (t_cp.median_ms / 1e3) / 1e9,
    }
