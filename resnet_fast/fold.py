"""BatchNorm folding, and the cache of folded weights that can never go stale.

In eval() a BatchNorm that follows a conv is an affine map per output channel:
    bn(conv(x)) = conv(x) * s + t,   s = gamma / sqrt(running_var + eps),  t = beta - mean * s
so the conv weight absorbs s and the fused kernel adds t (plus the conv's own bias times s).
A BatchNorm *before* a conv (pre-activation blocks) becomes the per-input-channel prologue
relu(x * s + t) of the kernel.

The folded tensors are cached per conv. The cache key holds, for every tensor the fold reads,
its identity (a weak reference), its storage address, its version counter, dtype and device,
and BN's eps: an optimizer step or any in-place edit bumps the version, ``load_state_dict``
copies in place (version), ``.to()``/``.half()`` and ``param.data = ...`` change dtype, device
or storage, and assigning a new Parameter changes identity. Any of them refolds on the next
forward.
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


def _tensor_key(t: Optional[torch.Tensor]):
    if t is None:
        return None
    try:
        version = t._version
    except RuntimeError:  # inference tensors carry no version counter: never cache them
        return _UNCACHEABLE
    return (id(t), t.data_ptr(), version, t.dtype, t.device)


_UNCACHEABLE = object()


def _module_tensors(m: Optional[nn.Module]):
    if m is None:
        return ()
    return tuple(getattr(m, n, None) for n in ("weight", "bias", "running_mean", "running_var"))


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

    def get(self, conv: nn.Conv2d, bn, pre_bn, dtype: torch.dtype, backend):
        if torch.compiler.is_compiling():
            return _fold(conv, bn, pre_bn, dtype, backend)
        tensors = _module_tensors(conv) + _module_tensors(bn) + _module_tensors(pre_bn)
        key = (tuple(_tensor_key(t) for t in tensors), getattr(bn, "eps", None),
               getattr(pre_bn, "eps", None), dtype, backend.name)
        if _UNCACHEABLE in key[0]:
            return _fold(conv, bn, pre_bn, dtype, backend)
        live = [t for t in tensors if t is not None]
        if key != self._key or any(r() is not t for r, t in zip(self._refs, live)):
            self._value = _fold(conv, bn, pre_bn, dtype, backend)
            self._key = key
            self._refs = tuple(weakref.ref(t) for t in live)
        return self._value

    # A copy or a pickle starts empty: the folded tensors are derived state, and weak
    # references cannot be pickled anyway.
    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def clear(self):
        self._key = self._value = None
        self._refs = ()


@torch.no_grad()
def _fold(conv, bn, pre_bn, dtype, backend):
    w, b = fold_conv_bn(conv, bn, dtype)
    w = backend.pack_weight(w)
    if pre_bn is None:
        return w, b, None, None
    pre_scale, pre_bias = bn_scale_shift(pre_bn, accumulate_dtype(dtype))
    return w, b, pre_scale, pre_bias
