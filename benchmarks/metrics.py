"""Correctness and derived figures: relative error against the reference forward, whether it
passes, and throughput as a share of the ceilings measured in the same run."""

from __future__ import annotations

import math
from typing import Optional

import torch

#: relative-error floor per dtype under which a result passes whatever the baseline did
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 6e-3}
#: a variant may be this many times worse than eager in the same dtype before it fails
BASELINE_FACTOR = 4.0


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; NaN when out is not finite (never a pass).

    Computed in float32 (float64 when either side is float64): the norms' own rounding is
    ~1e-6 relative, far below any error a bf16/fp16/fp32 variant can have, and a float64 copy
    of a batch-256 activation would cost gigabytes."""
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the reference {tuple(ref.shape)}")
    acc = torch.float64 if torch.float64 in (out.dtype, ref.dtype) else torch.float32
    o = out.detach().to(acc)
    r = ref.detach().to(acc)
    if not torch.isfinite(o).all():
        return float("nan")
    den = r.norm().item()
    num = (o - r).norm().item()
    return num / den if den > 0 else num


def verdict(err: Optional[float], dtype: torch.dtype, baseline: Optional[float] = None) -> str:
    """'ok', 'FAIL' (too far from the reference) or 'NaN' (non-finite output: a failure)."""
    if err is None:
        return "n/a"
    if math.isnan(err) or math.isinf(err):
        return "NaN"
    tol = TOLERANCE.get(dtype, 1e-2)
    if baseline is not None and math.isfinite(baseline):
        tol = max(tol, BASELINE_FACTOR * baseline)
    return "ok" if err <= tol else "FAIL"


def derived(time_ms: float, flops: float, nbytes: float, peaks: dict,
            baseline_ms: Optional[float]) -> dict:
    """TFLOP/s, its share of the measured matmul peak, achieved share of the copy bandwidth
    (compulsory bytes / time), and speed-up over the baseline."""
    s = time_ms / 1e3
    tflops = flops / s / 1e12 if s > 0 else float("nan")
    gbps = nbytes / s / 1e9 if s > 0 else float("nan")
    mm = peaks.get("matmul_tflops")
    bw = peaks.get("copy_gbps")
    return {
        "tflops": tflops,
        "pct_matmul_peak": 100 * tflops / mm if mm else None,
        "pct_copy_bw": 100 * gbps / bw if bw else None,
        "speedup_vs_eager_cl": baseline_ms / time_ms if baseline_ms and time_ms > 0 else None,
    }


def json_safe(x):
    """NaN/inf as strings in the JSON ('NaN' must stay visible, and JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    if isinstance(x, torch.device):
        return str(x)
    if isinstance(x, set):
        return sorted(x)
    return x
