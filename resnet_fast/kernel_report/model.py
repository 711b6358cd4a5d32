"""The occupancy and roofline model: from one compiled kernel's resources and one layer's shape
to CTAs per SM, waves, tile efficiency and an estimated time.

    estimate_us = max(FLOPs / peak, bytes / bandwidth) / (wave_efficiency * tile_efficiency)

FLOPs are the useful multiply-adds of the conv (2 * M * N * K, M = N*Ho*Wo output pixels,
N = Cout, K = kh*kw*Cin/groups); bytes the compulsory traffic of the fused op (input, weight,
output, residual when fused, the fp32 bias and pre-activation vectors), each moved once. The two
efficiencies charge what the roofline cannot see: a last, partial wave of CTAs that leaves SMs
idle, and tile padding where M or N is not a multiple of the tile.
"""

from __future__ import annotations

import math
from typing import Optional

from .archs import ArchSpec


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def ctas_per_sm(spec: ArchSpec, *, registers: int, shared_bytes: int, threads: int) -> tuple[int, str]:
    """Resident CTAs per SM and what limits them ("registers", "shared", "threads", "ctas"), as
    CUDA's occupancy calculator computes it (registers allocated per warp in units of
    ``reg_alloc_unit``, warps placed per scheduler partition; shared memory per CTA plus the
    driver's reservation, in units of ``smem_alloc_unit``). 0 when one CTA does not fit."""
    warps = -(-threads // 32)
    limits: dict[str, int] = {}
    limits["threads"] = spec.max_threads_per_sm // (warps * 32) if threads <= 1024 else 0
    limits["ctas"] = spec.max_ctas_per_sm
    if registers > spec.max_regs_per_thread:
        limits["registers"] = 0
    elif registers > 0:
        regs_per_warp = _round_up(registers * 32, spec.reg_alloc_unit)
        warps_per_part = (spec.regs_per_sm // spec.subpartitions) // regs_per_warp
        limits["registers"] = (warps_per_part * spec.subpartitions) // warps
    if shared_bytes > spec.smem_per_block_max:
        limits["shared"] = 0
    else:
        per_cta = _round_up(shared_bytes + spec.smem_reserved_per_block, spec.smem_alloc_unit)
        limits["shared"] = spec.smem_per_sm // per_cta
    # ties: name the resource a change would have to relieve first (shared, then registers)
    order = ("shared", "registers", "threads", "ctas")
    limiter = min(order, key=lambda k: (limits.get(k, 1 << 30), order.index(k)))
    return max(0, limits[limiter]), limiter


def conv_gemm(layer: dict) -> tuple[int, int, int]:
    """(M, N, K) of the implicit GEMM of one conv layer dict."""
    kh, kw = layer["kernel"]
    return (layer["batch"] * layer["ho"] * layer["wo"], layer["cout"],
            kh * kw * layer["cin"] // layer.get("groups", 1))


def conv_flops(layer: dict) -> float:
    m, n, k = conv_gemm(layer)
    return 2.0 * m * n * k


def conv_bytes(layer: dict, itemsize: int) -> float:
    """Compulsory DRAM traffic of the fused op, in bytes.

    The input counts only the rows and columns some tap reads: a 1x1 conv with stride 2 reads a
    quarter of its input (charging all of it put a measured layer at 0.77 of its estimate on an
    H100, 2026-11-25).
    """
    b, cin, cout = layer["batch"], layer["cin"], layer["cout"]
    kh, kw = layer["kernel"]
    n_in = b * cin * min(layer["h"], layer["ho"] * kh) * min(layer["w"], layer["wo"] * kw)
    n_out = b * cout * layer["ho"] * layer["wo"]
    n_w = cout * (cin // layer.get("groups", 1)) * kh * kw
    epi = layer.get("epilogue", "")
    n = n_in + n_w + n_out + (n_out if "residual" in epi else 0)
    vec = 4 * cout + (8 * cin if "pre" in epi else 0)
    return float(n * itemsize + vec)


def tile_efficiency(m: int, n: int, block_m: int, block_n: int) -> float:
    """Useful share of the padded M x N tiles."""
    return (m * n) / (_round_up(m, block_m) * _round_up(n, block_n))


def grid_ctas(m: int, n: int, block_m: int, block_n: int) -> int:
    return -(-m // block_m) * -(-n // block_n)


def waves(ctas: int, per_sm: int, sms: int) -> Optional[float]:
    if per_sm <= 0:
        return None
    return ctas / (per_sm * sms)


def wave_efficiency(w: Optional[float]) -> Optional[float]:
    """Share of the SM-time the CTAs use: waves / ceil(waves) (a 1.1-wave grid runs at 55%)."""
    if w is None or w <= 0:
        return None
    return w / math.ceil(w)


def estimate(layer: dict, *, block_m: int, block_n: int, registers: int, shared_bytes: int,
             threads: int, spec: ArchSpec, peak_tflops: float, itemsize: int) -> dict:
    """Every derived figure of one (layer, kernel config) pair; estimate_us is None when a CTA
    does not fit on an SM."""
    m, n, k = conv_gemm(layer)
    per_sm, limiter = ctas_per_sm(spec, registers=registers, shared_bytes=shared_bytes, threads=threads)
    ctas = grid_ctas(m, n, block_m, block_n)
    w = waves(ctas, per_sm, spec.sms)
    we = wave_efficiency(w)
    te = tile_efficiency(m, n, block_m, block_n)
    flops = conv_flops(layer)
    nbytes = conv_bytes(layer, itemsize)
    t_compute = flops / (peak_tflops * 1e12) * 1e6
    t_memory = nbytes / (spec.bandwidth_tbs * 1e12) * 1e6
    est = None if we is None else max(t_compute, t_memory) / (we * te)
    return {
        "gemm": [m, n, k], "ctas": ctas, "ctas_per_sm": per_sm, "occupancy_limiter": limiter,
        "threads": threads, "waves": None if w is None else round(w, 4),
        "wave_efficiency": None if we is None else round(we, 4), "tile_efficiency": round(te, 4),
        "flops": flops, "bytes": nbytes, "arithmetic_intensity": round(flops / nbytes, 2),
        "compute_us": round(t_compute, 3), "memory_us": round(t_memory, 3),
        "bound": "compute" if t_compute >= t_memory else "memory",
        "peak_tflops": peak_tflops, "bandwidth_tbs": spec.bandwidth_tbs,
        "estimate_us": None if est is None else round(est, 3),
    }
