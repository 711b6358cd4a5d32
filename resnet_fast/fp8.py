"""FP8 (e4m3) quantization arithmetic: scales, saturating casts, calibration observers, SQNR.

``torch.float8_e4m3fn`` holds ±448 at most, with 3 mantissa bits (relative step 2^-3 near the
top of each binade) and subnormals down to 2^-9. A tensor is stored as ``q = sat(x / scale)``
and read as ``q * scale``:

* weights: one scale per output channel, ``amax(|w[n]|) / 448`` of the *folded* weight (the
  BatchNorm scale is in it), computed where the fold is (resnet_fast.fold), so never stale;
* activations: one scale per tensor, from a calibration pass over batches the user gives
  (:class:`Observer`): the largest |x| seen (``"max"``), a percentile of |x| (``"percentile"``),
  or the clipping threshold minimizing the mean squared quantization error over the values seen
  (``"mse"``, the default: e4m3's relative precision is the same across its range, so the only
  error a threshold trades is the clipping of the largest values against the underflow of the
  smallest, and the MSE search weighs both on the data itself rather than guessing a percentile).

Saturation: values beyond ±448 after scaling clamp to ±448 (never inf, which e4m3fn does not
have, and never NaN, which a plain cast of an out-of-range value gives); NaN stays NaN.
"""

from __future__ import annotations

import math
import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
#: the methods :class:`Observer` chooses an activation scale by
METHODS = ("mse", "max", "percentile")
#: values an observer keeps per tensor (a uniform sample of every batch it sees, so percentile
#: and MSE choices read the whole calibration set, not only its last batch)
SAMPLE = 1 << 18


def saturate_cast(t: torch.Tensor) -> torch.Tensor:
    """t (already divided by its scale) to e4m3, clamped to ±448; NaN stays NaN."""
    return t.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def weight_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scales (fp32, [Cout]) of a conv weight [Cout, ...]: amax / 448; a
    channel of zeros gets scale 1 (anything represents it)."""
    amax = w.detach().abs().amax(dim=tuple(range(1, w.dim()))).float()
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def quantize_weight(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The e4m3 weight whose per-channel dequantization is ``q * scales[n]``."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    return saturate_cast(w.float() / scales.view(shape))


def quantize(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A per-tensor quantization of t (``scale``: a one-element fp32 tensor)."""
    return saturate_cast(t.float() / scale)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def fake_quantize(t: torch.Tensor, scale) -> torch.Tensor:
    """t through e4m3 and back (fp32): what a tensor stored in fp8 reads as."""
    return saturate_cast(t.float() / scale).float() * scale


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref``, in dB (inf when equal;
    NaN anywhere in ``out`` gives -inf: a NaN never passes a threshold)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return -math.inf
    noise = (out - ref).square().sum().item()
    signal = ref.square().sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


class Observer:
    """The |x| statistics of one activation tensor over a calibration pass, and the scale they
    choose (see the module doc). ``update`` takes each batch's tensor; ``scale()`` the choice."""

    def __init__(self, method: str = "mse", percentile: float = 99.99, sample: int = SAMPLE):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.method, self.percentile, self.sample = method, percentile, sample
        self.amax = 0.0
        self.batches = 0
        self._values: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(0)

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float().flatten()
        if a.numel() == 0:
            return
        if not torch.isfinite(a).all():
            raise ValueError("calibration saw a non-finite activation (inf or NaN): the model or "
                             "the calibration data is broken, and no scale can be chosen")
        self.amax = max(self.amax, a.max().item())
        self.batches += 1
        if self.method == "max":
            return
        if a.numel() > self.sample:
            idx = torch.randint(0, a.numel(), (self.sample,), generator=self._gen).to(a.device)
            a = a[idx]
        self._values.append(a.cpu())
        kept = sum(v.numel() for v in self._values)
        if kept > 4 * self.sample:  # keep the sample uniform over the batches seen
            allv = torch.cat(self._values)
            idx = torch.randint(0, allv.numel(), (2 * self.sample,), generator=self._gen)
            self._values = [allv[idx]]

    def threshold(self) -> float:
        """The |x| that maps to 448."""
        if self.batches == 0:
            raise RuntimeError("this observer saw no calibration batch")
        if self.amax == 0:
            return 1.0
        if self.method == "max":
            return self.amax
        values = torch.cat(self._values)
        if self.method == "percentile":
            # kthvalue: torch.quantile refuses inputs over 16M elements
            k = max(1, min(values.numel(), math.ceil(values.numel() * self.percentile / 100)))
            return max(values.kthvalue(k).values.item(), self.amax * 1e-6)
        return _mse_threshold(values, self.amax)

    def scale(self) -> torch.Tensor:
        """The activation scale (a one-element fp32 tensor): threshold / 448."""
        return torch.tensor([self.threshold() / E4M3_MAX], dtype=torch.float32)


def _mse_threshold(values: torch.Tensor, amax: float, candidates: int = 64) -> float:
    """The clipping threshold in [amax / 64, amax] (log-spaced) minimizing the mean squared
    error of the values through e4m3 at that threshold."""
    v = values.float()
    best, best_err = amax, math.inf
    for i in range(candidates):
        t = amax * 2.0 ** (-6.0 * i / (candidates - 1))
        err = (fake_quantize(v, t / E4M3_MAX) - v).square().mean().item()
        if err < best_err:
            best, best_err = t, err
    return best


def choose_scales(observers: dict) -> dict:
    """name -> scale for a dict of name -> Observer."""
    return {k: o.scale() for k, o in observers.items()}


__all__ = ["E4M3", "E4M3_MAX", "METHODS", "Observer", "dequantize", "fake_quantize", "quantize",
           "quantize_weight", "saturate_cast", "sqnr_db", "weight_scales"]
