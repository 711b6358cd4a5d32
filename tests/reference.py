"""What the tests share: randomized BN statistics and the relative-error measure."""

import copy
import io
import os
import subprocess
import sys

import torch
from torch import nn


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (the default init makes BN an identity,
    which would hide folding bugs)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:  # track_running_stats=False has none
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.5)
    return model


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN/inf anywhere gives inf so it never passes."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def close_or_zero(out: torch.Tensor, ref: torch.Tensor, tol: float, zero: float = 1e-10) -> bool:
    """rel_err(out, ref) < tol, or both below ``zero`` in norm where ref is zero in exact math
    (the bias of a conv that a training BatchNorm follows: rounding noise on both sides)."""
    if ref.double().norm() < zero:
        return out.double().norm() < zero
    return rel_err(out, ref) < tol


def copies_of(model: nn.Module) -> list[nn.Module]:
    """A deepcopy of model and a torch.save/torch.load round trip of it."""
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return [copy.deepcopy(model), torch.load(buf, weights_only=False)]


def run_python(code: str, timeout: int = 300, unset: tuple = ()) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported, nothing cached; environment
    variables named in ``unset`` removed); returns its stdout, and fails the calling test with
    the end of its stderr when it exits non-zero."""
    env = {k: v for k, v in os.environ.items() if k not in unset}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout
