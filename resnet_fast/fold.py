"""BatchNorm folding, and the cache of folded weights that can never go stale.

In eval() a BatchNorm that follows a conv is an affine map per output channel:
    bn(conv(x)) = conv(x) * s + t,   s = gamma / sqrt(running_var + eps),  t = beta - mean * s
so the conv weight absorbs s and the fused kernel adds t (plus the conv's own bias times s).
A BatchNorm *before* a conv (pre-activation blocks) becomes the per-input-channel prologue
relu(x * s + t) of the kernel.

The folded tensors are cached per conv. The cache key holds, for every tensor the fold reads,
its identity (a weak reference), its storage address and its version counter, and BN's eps:
an optimizer step or any in-place edit bumps the version, ``load_state_dict`` copies in place
(version), ``.to()``/``.half()`` and ``param.data = ...`` put the tensor on new storage (address;
the cache pins the storages it folded from, so no new storage can reuse their address), and
assigning a new Parameter changes identity. Any of them refolds on the next forward.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of folded biases and of the kernels' epilogue math for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm, dtype: torch.dtype = torch.float32):
    """(s, t) with bn(y) == y * s + t per channel in eval(), computed in ``dtype``."""
    mean = bn.running_mean.to(dtype)
    var = bn.running_var.to(dtype)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    return scale, shift


def fold_conv_bn(conv: nn.Conv2d, bn: Optional[nn.modules.batchnorm._BatchNorm],
                 dtype: Optional[torch.dtype] = None):
    """The conv weight with BN folded in (in ``dtype``, default the conv's) and the fp32 bias.

    The bias is float64 when ``dtype`` is float64, so the float64 reference path stays exact.
    """
    dtype = dtype or conv.weight.dtype
    acc = accumulate_dtype(dtype)
    # Fold in (at least) fp32 and round once at the end: a bf16 weight times a bf16 scale
    # would round twice.
    w = conv.weight.to(torch.promote_types(acc, conv.weight.dtype))
    b = conv.bias.to(acc) if conv.bias is not None else torch.zeros(
        conv.out_channels, dtype=acc, device=conv.weight.device)
    if bn is not None:
        scale, shift = bn_scale_shift(bn, acc)
        w = w * scale.to(w.dtype).view(-1, 1, 1, 1)
        b = b * scale + shift
    return w.to(dtype), b


_FOLDED_NAMES = ("weight", "bias", "running_mean", "running_var")


def _module_tensors(m: Optional[nn.Module]) -> list:
    """The tensors a fold reads from m. Read from the parameter and buffer dicts (module
    __getattr__ costs ~1 us a name and this runs for every conv call); torchvision's
    FrozenBatchNorm2d keeps weight/bias as buffers, and a plain tensor attribute still counts."""
    if m is None:
        return []
    params, buffers = m._parameters, m._buffers
    out = []
    for n in _FOLDED_NAMES:
        if n in params:
            out.append(params[n])
        elif n in buffers:
            out.append(buffers[n])
        else:
            t = m.__dict__.get(n)
            out.append(t if isinstance(t, torch.Tensor) else None)
    return out


def _cache_key(tensors: list):
    """(storage address, version counter) of each tensor, flat; None when one of them cannot be
    cached (inference tensors carry no version counter). Identity is checked apart (weak
    references), and the cache pins the storages it folded from, so an address seen here again
    is the same storage: dtype or device changes always show as a new address."""
    key = []
    try:
        for t in tensors:
            key += (None, None) if t is None else (t.data_ptr(), t._version)
    except RuntimeError:
        return None
    return tuple(key)


class FoldCache:
    """The folded (packed weight, bias, pre_scale, pre_bias) of one conv, kept while valid.

    ``get`` recomputes whenever anything the fold reads has changed (see the module doc).
    Under ``torch.compile`` the fold is traced inline instead (no Python-side state), which
    inductor constant-folds with ``freezing`` on.
    """

    def __init__(self):
        self._key = None
        self._value = None
        # ids can be reused once a tensor dies: weak references prove the keyed tensors are
        # still the same objects
        self._refs: tuple = ()
        self._pins: tuple = ()
        #: (call signature, output shape) of the last call through this conv that passed the
        #: argument checks, kept by modules.fused_conv so a repeated call skips them
        self.checked = None

    def get(self, conv: nn.Conv2d, bn, pre_bn, dtype: torch.dtype, backend):
        if torch.compiler.is_compiling():
            return _fold(conv, bn, pre_bn, dtype, backend)
        tensors = _module_tensors(conv) + _module_tensors(bn) + _module_tensors(pre_bn)
        tkey = _cache_key(tensors)
        if tkey is None:
            return _fold(conv, bn, pre_bn, dtype, backend)
        key = (tkey, getattr(bn, "eps", None), getattr(pre_bn, "eps", None), dtype, backend.name)
        live = [t for t in tensors if t is not None]
        if key != self._key or any(r() is not t for r, t in zip(self._refs, live)):
            self._value = _fold(conv, bn, pre_bn, dtype, backend)
            self._key = key
            self._refs = tuple(weakref.ref(t) for t in live)
            # Holding the storages keeps their addresses from being reused by a later tensor
            # (``param.data = ...`` swaps storage without bumping the version counter, so a
            # reused address with an unchanged version would look like the folded data).
            self._pins = tuple(t.untyped_storage() for t in live)
            self.checked = None
        return self._value

    # A copy or a pickle starts empty: the folded tensors are derived state, and weak
    # references cannot be pickled anyway.
    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def clear(self):
        self._key = self._value = self.checked = None
        self._refs = self._pins = ()


@torch.no_grad()
def _fold(conv, bn, pre_bn, dtype, backend):
    w, b = fold_conv_bn(conv, bn, dtype)
    w = backend.pack_weight(w)
    if pre_bn is None:
        return w, b, None, None
    pre_scale, pre_bias = bn_scale_shift(pre_bn, accumulate_dtype(dtype))
    return w, b, pre_scale, pre_bias
