"""Timing: the median of many calls, measured with CUDA events on a GPU (perf_counter on CPU).

Inputs come from a ring of several distinct batches, used in turn, so that no timed call finds
its operands in L2 from the call before (H100: 50 MB of L2); every variant is timed on the same
ring. Each call gets its own pair of events, as triton.testing.do_bench does, and the median is
reported (robust to the odd clock or scheduling hiccup); p20/p80 show the spread.

Launch overhead: with ``hide_launch=True`` (per-layer figures) a GPU sleep is queued before the
timed calls so the CPU runs ahead and the events time the kernels alone; the CPU time to
enqueue one call is reported next to it (``host_ms``). End-to-end figures do not hide launch:
what a user's loop would see is the figure (CUDA-graph variants are how launch is removed).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

DEFAULT_L2_BYTES = 50 * 2**20


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int
    host_ms: Optional[float]   # CPU time to enqueue one call (Python + dispatch + launch)
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or DEFAULT_L2_BYTES


def ring_size(bytes_per_item: int, device: torch.device, *, lo: int = 2, hi: int = 16) -> int:
    """How many input sets to rotate so that the ring holds > 2x L2 (at least lo, at most hi).

    Two sets at least: the same tensor twice in a row is the easiest case for a cache."""
    l2 = l2_bytes(device)
    if l2 == 0 or bytes_per_item <= 0:
        return lo
    return max(lo, min(hi, math.ceil(2 * l2 / bytes_per_item) + 1))


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    i = int(pos)
    j = min(i + 1, len(xs) - 1)
    return xs[i] + (xs[j] - xs[i]) * (pos - i)


def _summary(times_ms: list[float], host_ms: Optional[float], method: str) -> Timing:
    return Timing(median_ms=statistics.median(times_ms), p20_ms=_quantile(times_ms, 0.2),
                  p80_ms=_quantile(times_ms, 0.8), min_ms=min(times_ms), reps=len(times_ms),
                  host_ms=host_ms, method=method)


_sleep_cycles_per_ms: Optional[float] = None


def _gpu_sleep(ms: float) -> None:
    """Queue a kernel that spins for about ms (torch.cuda._sleep takes cycles: calibrated once)."""
    global _sleep_cycles_per_ms
    if not hasattr(torch.cuda, "_sleep") or ms <= 0:
        return
    if _sleep_cycles_per_ms is None:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)      # warm the kernel up once
        s.record()
        torch.cuda._sleep(10_000_000)
        e.record()
        e.synchronize()
        _sleep_cycles_per_ms = 10_000_000 / max(s.elapsed_time(e), 1e-3)
    torch.cuda._sleep(int(min(ms, 2000.0) * _sleep_cycles_per_ms))


def bench(fn: Callable, ring: Sequence[tuple], *, device: torch.device, warmup: int = 3,
          target_ms: float = 100.0, min_reps: int = 5, max_reps: int = 200,
          hide_launch: bool = False) -> Timing:
    """Median time of fn(*ring[i % len(ring)]) over enough calls to fill about target_ms.

    Warm-up covers every ring entry at least once (first touch, lazy init, autotune caches)."""
    k = len(ring)
    n_warm = max(warmup, k)
    if device.type != "cuda":
        # CPU: one warm-up call (callers have made the first call already), then calls until
        # target_ms is filled: a call that takes seconds (the Triton interpreter) runs min 3 times.
        fn(*ring[0])
        times: list[float] = []
        while len(times) < max_reps and (len(times) < 3 or sum(times) < target_ms):
            t0 = time.perf_counter()
            fn(*ring[len(times) % k])
            times.append((time.perf_counter() - t0) * 1e3)
        return _summary(times, None, "perf_counter")

    for i in range(n_warm):
        fn(*ring[i % k])
    torch.cuda.synchronize(device)
    # Estimate the GPU time per call and the CPU time to enqueue one (a few calls).
    n_est = min(5, max(2, k))
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    t0 = time.perf_counter()
    for i in range(n_est):
        fn(*ring[i % k])
    host_ms = (time.perf_counter() - t0) * 1e3 / n_est
    e.record()
    e.synchronize()
    est = s.elapsed_time(e) / n_est
    reps = max(min_reps, min(max_reps, int(target_ms / max(est, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    if hide_launch:
        _gpu_sleep(reps * host_ms * 1.5 + 1.0)
    for i in range(reps):
        starts[i].record()
        fn(*ring[i % k])
        ends[i].record()
    torch.cuda.synchronize(device)
    times = [a.elapsed_time(b) for a, b in zip(starts, ends)]
    return _summary(times, host_ms, "cuda_events" + ("+hidden_launch" if hide_launch else ""))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable, *args, device: torch.device):
    """(result, seconds) of one call, synchronized: for setup_s (compile, autotune, first call)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    sync(device)
    return out, time.perf_counter() - t0
