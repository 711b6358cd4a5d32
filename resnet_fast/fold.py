"""BatchNorm folding, and the cache of folded weights that can never go stale.

In eval() a BatchNorm that follows a conv is an affine map per output channel:
    bn(conv(x)) = conv(x) * s + t,   s = gamma / sqrt(running_var + eps),  t = beta - mean * s
so the conv weight absorbs s and the fused kernel adds t (plus the conv's own bias times s).
A BatchNorm *before* a conv (pre-activation blocks) becomes the per-input-channel prologue
relu(x * s + t) of the kernel.

The folded tensors are cached per conv, and refolded on the next forward after anything they
were folded from changes. What tells the cache, for every kind of change:

* in-place ops (an optimizer step with ``foreach`` or a loop, ``torch.no_grad()`` edits,
  ``nn.init``, ``load_state_dict``, which copies in place): the tensor's version counter;
* a train() forward of a BatchNorm, which updates ``running_mean``/``running_var`` without
  bumping their version counters: ``num_batches_tracked``, which it increments in place (a
  BatchNorm that tracks running statistics but has no ``num_batches_tracked`` is never cached);
* ``fused=True`` optimizers, whose kernels bump no version counter: a global optimizer step
  hook (``register_optimizer_step_post_hook``) that invalidates every cache after any
  optimizer's step;
* ``.to()``/``.half()``/``param.data = other``: a new storage (the cache pins the storages it
  folded from, so no new storage can reuse their address); a new Parameter or a swapped-in
  tensor: identity (held strongly: weak references would block ``torch.utils.swap_tensors``);
* ``torch.nn.utils.parametrize``: a parametrized module's tensor is computed on every access,
  so such a module is never cached; BN's ``eps``: part of the key.

The one kind of write that cannot be seen is one PyTorch itself does not record: in place
through ``.data`` (its version counter is a fresh one), through ``.numpy()``, DLPack or
``untyped_storage()``, or by replaying a CUDA graph. After such writes call
:func:`refresh`; ``RESNET_FAST_VERIFY_FOLDS=1`` (or :func:`verify_folds`) refolds on every
call and raises :class:`StaleFoldError` where a cached fold differs from the live tensors.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook


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


# num_batches_tracked is not folded, but a train() forward increments it in place while it
# updates the running statistics without bumping their version counters
_FOLDED_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_BN = nn.modules.batchnorm._BatchNorm


class StaleFoldError(RuntimeError):
    """A cached fold no longer matches the live tensors (raised only while verify_folds is on)."""


# --------------------------------------------------------------------------------------
# Invalidation that no version counter carries: a process-wide generation every cache keys on
# --------------------------------------------------------------------------------------
_generation = 0
#: calls of refresh() alone: a captured training step's graph reads live parameters, so only
#: these (writes nobody else can see) make it stale, not the optimizer steps that bump _generation
_refreshes = 0
_verify = os.environ.get("RESNET_FAST_VERIFY_FOLDS", "") not in ("", "0")


def refresh(model: Optional[nn.Module] = None) -> None:
    """Refold every cached fold on its next use. Needed only after writes PyTorch does not
    record (in place through ``.data``, ``.numpy()``, DLPack, ``untyped_storage()`` or a CUDA
    graph replay); ``model`` is accepted for readability: every cache of the process is
    invalidated, which costs one refold per conv."""
    global _refreshes
    _refreshes += 1
    invalidate()


def invalidate() -> None:
    """Refold every cached fold on its next use (what :func:`refresh` does, without counting as
    a user's refresh): after optimizer steps and training-graph replays, which write
    parameters without version bumps."""
    global _generation
    _generation += 1


def verify_folds(enabled: bool = True) -> None:
    """Debug switch: refold on every call and raise :class:`StaleFoldError` where the cached
    fold differs from the live tensors (the environment variable RESNET_FAST_VERIFY_FOLDS=1
    turns it on at import). Costs a full fold per conv call."""
    global _verify
    _verify = bool(enabled)


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    # fused optimizers write parameters without bumping their version counters
    invalidate()


register_optimizer_step_post_hook(_after_optimizer_step)


def _module_tensors(m: Optional[nn.Module]) -> Optional[list]:
    """The tensors a fold reads from m, or None when m's tensors cannot be cached (see the
    module doc). Read from the parameter and buffer dicts (module __getattr__ costs ~1 us a
    name and this runs for every conv call); torchvision's FrozenBatchNorm2d keeps weight/bias
    as buffers, and a plain tensor attribute still counts."""
    if m is None:
        return []
    if "parametrizations" in m._modules:
        return None
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
    if out[4] is None and out[2] is not None and isinstance(m, _BN):
        return None  # its running statistics could change unseen
    return out


def _cache_key(tensors: list):
    """(storage address, version counter) of each tensor, flat; None when one of them cannot be
    cached (inference tensors carry no version counter). Identity is checked apart, and the
    cache pins the storages it folded from, so an address seen here again is the same storage:
    dtype or device changes always show as a new address."""
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

    def __init__(self, compute=None):
        #: what a refold computes: ``compute(conv, bn, pre_bn, dtype, backend)`` -> the cached
        #: tuple (default: the folded weight, bias, pre_scale, pre_bias; fp8: fold_fp8)
        self._compute = compute
        self._key = None
        self._value = None
        # the keyed tensors themselves (an id can be reused once a tensor dies); strong
        # references, since torch.utils.swap_tensors refuses tensors with weak references
        self._refs: tuple = ()
        self._pins: tuple = ()

    def get(self, conv: nn.Conv2d, bn, pre_bn, dtype: torch.dtype, backend):
        compute = self._compute or _fold  # read at each call (the tests count folds)
        if torch.compiler.is_compiling():
            return compute(conv, bn, pre_bn, dtype, backend)
        parts = (_module_tensors(conv), _module_tensors(bn), _module_tensors(pre_bn))
        if None in parts:
            return compute(conv, bn, pre_bn, dtype, backend)
        tensors = parts[0] + parts[1] + parts[2]
        tkey = _cache_key(tensors)
        if tkey is None:
            return compute(conv, bn, pre_bn, dtype, backend)
        key = (tkey, _generation, getattr(bn, "eps", None), getattr(pre_bn, "eps", None), dtype,
               backend.name)
        live = [t for t in tensors if t is not None]
        if key != self._key or any(r is not t for r, t in zip(self._refs, live)):
            self._value = compute(conv, bn, pre_bn, dtype, backend)
            self._key = key
            self._refs = tuple(live)
            # Holding the storages keeps their addresses from being reused by a later tensor
            # (``param.data = ...`` swaps storage without bumping the version counter, so a
            # reused address with an unchanged version would look like the folded data).
            self._pins = tuple(t.untyped_storage() for t in live)
        elif _verify:
            _check_fold(self._value, compute(conv, bn, pre_bn, dtype, backend), conv)
        return self._value

    # A copy or a pickle starts empty: the folded tensors are derived state, and weak
    # references cannot be pickled anyway.
    def __getstate__(self):
        return {"compute": self._compute}

    def __setstate__(self, state):
        self.__init__(state.get("compute"))

    def clear(self):
        self._key = self._value = None
        self._refs = self._pins = ()


def _check_fold(cached, fresh, conv) -> None:
    for name, a, b in zip(("weight", "bias", "pre_scale", "pre_bias"), cached, fresh):
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
            raise StaleFoldError(
                f"resnet_fast: the cached folded {name} of a conv {tuple(conv.weight.shape)} no longer "
                f"matches its module's tensors: something wrote them without PyTorch recording it "
                f"(in place through .data, .numpy(), DLPack or untyped_storage(), or a CUDA graph "
                f"replay). Call resnet_fast.refresh(model) after such writes.")


def pack_folded(backend, w: torch.Tensor, groups: int, pre: bool = False) -> torch.Tensor:
    """A folded weight as ``backend``'s inference kernel reads it: packed (its layout) and, where
    the backend wants a wider input (Backend.input_channels: the Triton stem, 3 -> 4 channels),
    with zero input channels appended; the caller passes its input through
    ``backend.kernel_input(x, w.shape[1] * groups)``. Not with a pre-activation prologue, whose
    per-channel vectors have the conv's own channel count."""
    w = backend.pack_weight(w)
    cin = w.shape[1] * groups
    want = cin if pre else backend.input_channels(cin, groups)
    if want != cin:
        wide = w.new_zeros((w.shape[0], want // groups, *w.shape[2:]))
        wide[:, :w.shape[1]] = w
        w = backend.pack_weight(wide)
    return w


@torch.no_grad()
def fold_fp8(conv, bn, pre_bn, dtype, backend):
    """The fp8 fold of one conv (resnet_fast.fp8): (e4m3 weight, OHWI, quantized per output
    channel; fp32 bias; fp32 per-channel weight scales; None), from the fp32 fold of conv and
    bn. A FoldCache(compute=fold_fp8) keeps it never stale like every other fold."""
    from .fp8 import quantize_weight, weight_scales
    if pre_bn is not None:
        raise ValueError("fp8 convs take no pre-activation prologue")
    w, b = fold_conv_bn(conv, bn, torch.float32)
    scales = weight_scales(w)
    wq = quantize_weight(w, scales).contiguous(memory_format=torch.channels_last)
    return wq, b.float().contiguous(), scales.contiguous(), None


@torch.no_grad()
def _fold(conv, bn, pre_bn, dtype, backend):
    w, b = fold_conv_bn(conv, bn, dtype)
    w = pack_folded(backend, w, conv.groups, pre_bn is not None)
    if pre_bn is None:
        return w, b, None, None
    pre_scale, pre_bias = bn_scale_shift(pre_bn, accumulate_dtype(dtype))
    return w, b, pre_scale, pre_bias
