"""Drop-in modules: the fused conv unit, BasicBlock and Bottleneck.

The blocks have torchvision's constructor arguments and its submodule, parameter and buffer
names, so a ``state_dict`` moves both ways unchanged. In eval() without autograd each conv runs
as one fused op (conv + folded BN [+ residual] [+ ReLU]) on the module's backend, with the
folded weights from a never-stale :class:`FoldCache` (each unit's :class:`UnitState` holds
one). In train(), with autograd or under autocast they run the training ops
(:mod:`resnet_fast.training`) with torch's BatchNorm semantics and gradients; with hooks on a
module the fused path would skip, torchvision's own code.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from . import backends, ops, training
from .backends import measured
from .fold import FoldCache, fold_fp8
from .fusion_rules import conv_refusal, fusable_downsample, has_hooks, pool_refusal
from .plan import FusedUnit, unit_of

_BN = nn.modules.batchnorm._BatchNorm


# --------------------------------------------------------------------------------------
# The fused unit (the one piece of code every converted module runs its convs through)
# --------------------------------------------------------------------------------------
def _needs_reference(tensors, modules) -> Optional[str]:
    """Why a call on ``tensors`` through ``modules`` must run the modules' own forward instead
    of the fused ops, or None. ``modules``: every module the fused path would not call (their
    hooks, and global module hooks, would not fire). Non-tensors (and None) among ``tensors``
    are ignored. (train(), autograd and autocast run fused too: :mod:`resnet_fast.training`.)"""
    for m in modules:
        if m is not None and has_hooks(m):
            return "hooks"
    if global_hooks():
        return "global hooks"
    if torch.jit.is_tracing():
        # the trace records the modules' own ops on their live parameters, the same graph
        # whatever the grad mode, so the trace checker's rerun matches and nothing is frozen
        return "jit trace"
    if not training.ENABLED:
        return training.reason(tensors, modules)
    return None


class ReferencePathWarning(UserWarning):
    """A converted model ran the unfused reference math where it could have run its fused
    kernels, for a reason the caller can act on (given once per reason, device and backend)."""


_WHY_REFERENCE = {
    "global hooks": ("resnet_fast: global module hooks are registered "
                     "(torch.nn.modules.module.register_module_forward_hook and the like), which "
                     "the fused path would skip: converted models run the reference math while "
                     "they are"),
}
_warned: set = set()


def reference_reason(tensors, modules, backend=None) -> Optional[str]:
    """:func:`_needs_reference`, warning once (:class:`ReferencePathWarning`) when the reason is
    one the user can act on and a kernel backend would otherwise have run the call.

    The one rule every fused module follows to choose between its fused and its exact path.
    """
    why = _needs_reference(tensors, modules)
    if why in _WHY_REFERENCE and not torch.compiler.is_compiling():
        x = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
        seen = (why, None if x is None else x.device.type, backend)
        if x is not None and seen not in _warned:  # asked once per reason, device and backend
            _warned.add(seen)
            if _kernel_backend_for(backend, x):
                warnings.warn(_WHY_REFERENCE[why], ReferencePathWarning, stacklevel=4)
    return why


def _kernel_backend_for(backend, x: torch.Tensor) -> bool:
    """Whether a fused call on x would run on a kernel backend (not the reference math)."""
    try:
        return backends.resolve(backend, x).name != "torch"
    except Exception:  # noqa: BLE001 - no backend at all: nothing faster was missed
        return False


def global_hooks() -> bool:
    """Whether module hooks are registered for every module (the fused path would skip them)."""
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
                or _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks)


def to_nhwc(t: torch.Tensor) -> torch.Tensor:
    return t if ops.is_nhwc(t) else t.contiguous(memory_format=torch.channels_last)


class UnitState:
    """What one fused unit keeps between calls: its folded tensors (a never-stale FoldCache)
    and its last eval() call, ready to repeat (:class:`_ReadyCall`)."""

    __slots__ = ("fold", "ready", "fp8")

    def __init__(self):
        self.fold = FoldCache()
        self.ready = None
        #: the e4m3 fold of a quantized model's unit (resnet_fast.quantize), filled on first use
        self.fp8 = FoldCache(compute=fold_fp8)

    # derived state: a copy or a pickle starts empty
    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def fused_conv(x: torch.Tensor, conv: nn.Conv2d, bn: Optional[_BN], state: UnitState, *,
               relu: bool, residual: Optional[torch.Tensor] = None, pre_bn: Optional[_BN] = None,
               backend=None, shared: Optional[dict] = None, inference: bool = False) -> torch.Tensor:
    """act(bn(conv(pre(x))) [+ residual]) with pre(x) = relu(pre_bn(x)) when pre_bn is given.
    ``shared``: a per-forward dict in which training keeps pre-activations computed once
    (see fx_fusion.fused_unit). ``inference``: the caller (a block's eval() forward) has found
    no reason for the reference or the training path for every module of this call and for
    its inputs, so neither is asked again here.

    eval() without autograd: one fused op on the backend with folded weights (cached). train(),
    autograd or autocast: the training ops (:func:`resnet_fast.training.unit_forward`). Hooks on
    the modules (see _needs_reference): the modules' own forward, so hooks fire as in torch.
    """
    if not inference and reference_reason((x, residual), (conv, bn, pre_bn), backend) is not None:
        if pre_bn is not None:
            x = torch.relu(pre_bn(x))
        y = conv(x)
        if bn is not None:
            y = bn(y)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y
    if not inference and training.reason((x, residual), (conv, bn, pre_bn)) is not None:
        _check_input(x, conv)
        return training.unit_forward(x, conv, bn, relu=relu, residual=residual, pre_bn=pre_bn,
                                     backend=backend, state=state, shared=shared)

    # The host path. A conv called again like last time (same call signature: _ReadyCall.key)
    # with the same folded tensors (the fold cache refolds, into new objects, whenever a
    # parameter or buffer changes) repeats the last call as its backend prepared it: no backend
    # resolution, argument checks or launch-record lookup, which together cost more than a
    # small conv's kernel. Anything else takes the full path below, which prepares the next.
    ready = state.ready
    if ready is not None and not torch.compiler.is_compiling():
        key = _ReadyCall.key_of(x, residual, conv, relu, backend)
        if key == ready.key:
            w, b, pre_scale, pre_bias = state.fold.get(conv, bn, pre_bn, x.dtype, ready.backend)
            if w is ready.weight:
                x = ready.backend.kernel_input(x, ready.in_channels)
                if residual is not None and ready.backend.requires_nhwc:
                    residual = to_nhwc(residual)
                return ready.run(x, w, b, residual, pre_scale, pre_bias)

    _check_input(x, conv)
    be = backends.resolve(backend, x, weight=conv.weight, groups=conv.groups, pre=pre_bn is not None,
                          call=(conv.stride, conv.padding, conv.dilation, residual is not None, relu))
    w, b, pre_scale, pre_bias = state.fold.get(conv, bn, pre_bn, x.dtype, be)
    key = None if torch.compiler.is_compiling() else _ReadyCall.key_of(x, residual, conv, relu, backend)
    # NHWC where the backend needs it, and zero channels where its packed weight has them (the
    # Triton stem): one pass, which for a model's stem is its one layout conversion
    x = be.kernel_input(x, w.shape[1] * conv.groups)
    if be.requires_nhwc and residual is not None:
        residual = to_nhwc(residual)
    stride, padding, dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
    out_shape = ops.check_conv_bn_act_args(x, w, b, stride, padding, dilation, conv.groups,
                                           residual, pre_scale, pre_bias, require_nhwc=be.requires_nhwc)
    y = ops.run_checked_conv_bn_act(be, out_shape, x, w, b, stride, padding, dilation, conv.groups,
                                    residual, relu, pre_scale, pre_bias)
    if key is not None and out_shape[0] > 0:
        state.ready = _ReadyCall(key, be, w, w.shape[1] * conv.groups,
                                 be.prepare_conv(x, w, b, stride, padding, dilation, conv.groups,
                                                 residual, relu, pre_scale, pre_bias))
    return y


class _ReadyCall:
    """A unit's last eval() call, prepared by its backend to run again (fused_conv's host
    path). ``key`` holds everything besides the folded tensors that decided the call: the input
    and residual signatures, the conv's layout attributes, the epilogue, and what backend
    resolution read (the backend asked for, the environment's default, the measured-choice
    switch, torch's TF32 switch that the Triton kernels follow)."""

    __slots__ = ("key", "backend", "weight", "in_channels", "run")

    def __init__(self, key, backend, weight, in_channels, run):
        self.key, self.backend, self.weight, self.in_channels, self.run = key, backend, weight, in_channels, run

    @staticmethod
    def key_of(x, residual, conv, relu, backend) -> tuple:
        env = os.environ
        return (x.shape, x.dtype, x.device, x.stride(), backend,
                None if residual is None else (residual.shape, residual.dtype, residual.device, residual.stride()),
                conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode, relu,
                env.get(backends.ENV_VAR), env.get(measured.ENV_VAR), torch.backends.cudnn.allow_tf32)


def fused_max_pool(pool: nn.Module, x: torch.Tensor, backend=None) -> torch.Tensor:
    """``pool(x)`` for an nn.MaxPool2d after a fused stem: the values-only NHWC pool of the op
    contract (ops.max_pool2d) where it applies (an NHWC input, no autograd recording, no hooks,
    no indices asked, nothing global watching module calls), else the module itself."""
    if (pool_refusal(pool) is not None or global_hooks() or torch.jit.is_tracing()
            or not ops.is_nhwc(x) or (torch.is_grad_enabled() and x.requires_grad)):
        return pool(x)
    return ops.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                          pool.ceil_mode, backend=backend)


def _check_input(x: torch.Tensor, conv: nn.Conv2d) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input (N, C, H, W), got a {x.dim()}-D tensor of shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {x.dtype}")
    # under autocast the conv runs in autocast's dtype whatever x's, as torch's conv does
    if x.dtype != conv.weight.dtype and not training.autocasting(x):
        raise TypeError(f"input dtype {x.dtype} does not match the module's {conv.weight.dtype}; "
                        f"cast one of them (e.g. model.to({x.dtype}))")
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported by the fused conv")


class ConvBNAct(nn.Module):
    """conv → [BatchNorm] → [+ residual] → [ReLU], one fused op in eval().

    Owns its ``conv`` and ``bn`` (state_dict keys ``conv.*``, ``bn.*``); the optional
    ``pre_bn`` is a BatchNorm applied with a ReLU *before* the conv (pre-activation), fused
    into the kernel's input prologue. ``forward(x, residual=None)``.
    """

    def __init__(self, conv: nn.Conv2d, bn: Optional[_BN] = None, relu: bool = True,
                 pre_bn: Optional[_BN] = None, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"ConvBNAct wraps an nn.Conv2d, got {type(conv).__name__}")
        why = conv_refusal(conv)
        if why:
            raise ValueError(f"ConvBNAct cannot fuse this conv: {why}")
        self.conv = conv
        self.bn = bn
        self.pre_bn = pre_bn
        self.relu = relu
        self.backend = backends.validate_name(backend)
        self._unit = UnitState()

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = fused_conv(x, self.conv, self.bn, self._unit, relu=self.relu, residual=residual,
                       pre_bn=self.pre_bn, backend=self.backend)
        return like_input(y, x)

    def extra_repr(self) -> str:
        return f"relu={self.relu}, backend={self.backend or 'default'}"

    def fused_units(self) -> list[FusedUnit]:
        """The unit this module runs (see resnet_fast.plan)."""
        return [unit_of("conv", self.conv, "bn" if self.bn is not None else None, relu=self.relu,
                        pre_bn="pre_bn" if self.pre_bn is not None else None)]


def like_input(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y in x's memory format (the fused path computes NHWC; an NCHW caller gets NCHW back)."""
    if y.dim() == 4 and x.dim() == 4 and not ops.is_nhwc(x) and ops.is_nhwc(y) and y.shape[1] > 1:
        return y.contiguous()
    return y


# --------------------------------------------------------------------------------------
# The blocks (torchvision.models.resnet semantics and names)
# --------------------------------------------------------------------------------------
def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class FusedBlock(nn.Module):
    """What BasicBlock and Bottleneck share: unit states, backend choice, layout at entry."""

    #: the (conv, bn) attribute pairs of the main path, in order; the last takes the residual
    _units: tuple[tuple[str, str], ...] = ()

    def _init_fused(self):
        self.backend: Optional[str] = None
        self._unit_states = {name: UnitState() for name, _ in self._units + (("downsample", None),)}

    def _reference_forward(self, x):
        raise NotImplementedError

    def _skipped_modules(self) -> list:
        """Every module the fused forward runs without calling it (its hooks would not fire)."""
        mods = self._modules
        out = [mods[n] for pair in self._units for n in pair]
        out.append(mods["relu"])
        ds = mods.get("downsample")
        if fusable_downsample(ds) is not None:
            out += [ds, ds[0], ds[1]]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skipped = self._skipped_modules()
        if reference_reason((x,), skipped, self.backend) is not None:
            return self._reference_forward(x)
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D input (N, C, H, W), got a {x.dim()}-D tensor of "
                             f"shape {tuple(x.shape)}")
        if training.reason((x,), skipped) is not None:
            _check_input(x, getattr(self, self._units[0][0]))
            out = training.block_forward(self, x, fusable_downsample(self.downsample))
            return like_input(out, x)
        entry = x
        mods = self._modules
        if not ops.is_nhwc(x):  # a converted model's blocks get NHWC from its entry
            first = mods[self._units[0][0]]
            if backends.resolve(self.backend, x, weight=first.weight, groups=first.groups).requires_nhwc:
                x = to_nhwc(x)
        # every module the units call was checked above (skipped): each unit skips the checks
        out = x
        for cname, bname in self._units[:-1]:
            out = fused_conv(out, mods[cname], mods[bname], self._unit_states[cname],
                             relu=True, backend=self.backend, inference=True)
        ds = fusable_downsample(mods.get("downsample"))
        if ds is not None:
            identity = fused_conv(x, ds[0], ds[1], self._unit_states["downsample"], relu=False,
                                  backend=self.backend, inference=True)
        elif self.downsample is not None:
            identity = self.downsample(x)
        else:
            identity = x
        cname, bname = self._units[-1]
        # the identity of a downsample module of the user's own was not checked: the unit does
        inference = ds is not None or self.downsample is None
        out = fused_conv(out, mods[cname], mods[bname], self._unit_states[cname],
                         relu=True, residual=identity, backend=self.backend, inference=inference)
        return like_input(out, entry)

    def fused_units(self) -> list[FusedUnit]:
        """The units this block runs (see resnet_fast.plan): its main-path convs, the last with
        the residual, and a fusable downsample."""
        mods = self._modules
        last = len(self._units) - 1
        out = [unit_of(c, mods[c], b, relu=True, residual=i == last,
                       train_apply="tail" if i == last else "prologue", train_pre=i > 0)
               for i, (c, b) in enumerate(self._units)]
        ds = fusable_downsample(mods.get("downsample"))
        if ds is not None:
            out.append(unit_of("downsample.0", ds[0], "downsample.1", train_apply="tail"))
        return out

    @classmethod
    def from_torchvision(cls, block: nn.Module, backend: Optional[str] = None):
        """A block of this class sharing (not copying) every submodule and tensor of ``block``."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.downsample = None  # torchvision keeps a missing downsample as a plain None attribute
        for name, child in block.named_children():
            setattr(new, name, child)
        for name, buf in block.named_buffers(recurse=False):
            new.register_buffer(name, buf)
        for name, p in block.named_parameters(recurse=False):
            new.register_parameter(name, p)
        for attr in ("stride",):
            setattr(new, attr, getattr(block, attr))
        new.training = block.training
        new._init_fused()
        new.backend = backends.validate_name(backend)
        return new


class BasicBlock(FusedBlock):
    """torchvision's BasicBlock (same arguments, names and results), fused in eval()."""

    expansion: int = 1
    _units = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self._init_fused()

    def _reference_forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(FusedBlock):
    """torchvision's Bottleneck (ResNet V1.5: stride on the 3×3), fused in eval()."""

    expansion: int = 4
    _units = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._init_fused()

    def _reference_forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)
