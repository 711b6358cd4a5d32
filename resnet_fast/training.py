"""The training forward of converted modules: torch's BatchNorm semantics on the fused ops.

What runs (the ops are :mod:`resnet_fast.train_ops`, on the module's backend):

* a conv followed by a BatchNorm that normalizes with batch statistics (train(), or no running
  statistics): ``conv_stats`` (the conv, its epilogue reducing the statistics of its raw
  output), the running-statistic update in place, ``bn_finalize`` into (scale, shift). Inside a
  block the result stays *pending*, raw output plus (scale, shift): the next conv applies
  relu(y * scale + shift) in its prologue, so the normalized activation is never written; the
  block's last BN, the shortcut (or the projection's BN), the add and the ReLU are one
  ``scale_bias_act`` pass. A lone unit applies its BN(+residual)(+ReLU) in that one pass;
* a conv whose BatchNorm uses running statistics (eval() with autograd on, frozen BN such as
  torchvision's FrozenBatchNorm2d, a BN module left in eval() inside a training model), or no
  BatchNorm: the eval fused op with folded weights and a backward. The fold is recomputed from
  the live parameters whenever one of them needs a gradient (so gradients reach conv.weight,
  gamma and beta), and cached as in inference otherwise;
* a pre-activation BN before a conv: ``batch_stats`` of the conv's input, then the prologue.

Semantics are torch's: running_mean/running_var/num_batches_tracked updated in place exactly
as ``_BatchNorm.forward`` does (``momentum=None`` is the cumulative average, read from
num_batches_tracked on the device: no host sync, CUDA-graph safe), the "more than 1 value per
channel" error, autocast casting the convs' inputs and weights to its dtype (BatchNorm keeps
fp32 statistics and parameters, its output in the conv's dtype), any memory format in and out.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from . import backends, distributed
from .fold import accumulate_dtype, bn_scale_shift, fold_conv_bn, pack_folded
from .ops import check_conv_bn_act_args, conv_bn_act, is_nhwc
from .train_ops import TrainingOps

_BN = nn.modules.batchnorm._BatchNorm

#: RESNET_FAST_FUSED_TRAINING=0 sends train()/autograd/autocast forwards back to the modules'
#: own (torchvision) math, as before fused training existed: an escape hatch, not a mode to test
ENABLED = os.environ.get("RESNET_FAST_FUSED_TRAINING", "1") != "0"


def reason(tensors, modules) -> Optional[str]:
    """Why a forward must take the training path rather than the cached inference one, or None:
    a module in train(), autograd recording, or autocast."""
    for m in modules:
        if m is not None and m.training:
            return "train mode"
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled():
        if any(t.requires_grad for t in tensors):
            return "autograd"
        for m in modules:
            if m is not None and any(p.requires_grad for p in m.parameters(recurse=False)):
                return "autograd"
    if tensors:
        dev = tensors[0].device.type
        # meta (shape inference) has no autocast state to ask; is_autocast_available() would
        # say so for any device, but dynamo (torch 2.11) cannot trace it
        if dev != "meta" and torch.is_autocast_enabled(dev):
            return "autocast"
    return None


def uses_batch_stats(bn) -> bool:
    """Whether BatchNorm ``bn`` normalizes with the batch's statistics (torch's ``bn_training``)."""
    return isinstance(bn, _BN) and (bn.training or (bn.running_mean is None and bn.running_var is None))


def autocasting(x: torch.Tensor) -> bool:
    """Whether autocast casts a conv's input x (an eligible dtype, autocast on for its device)."""
    dev = x.device.type
    return (dev != "meta" and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and torch.is_autocast_enabled(dev))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convs run in: autocast's for its eligible inputs, else x's."""
    return torch.get_autocast_dtype(x.device.type) if autocasting(x) else x.dtype


class Act:
    """A value between the fused training ops: act(y * scale + shift), not yet computed when
    ``scale`` is given (then ``shift`` is too); ``relu`` says whether the ReLU follows.
    ``mean``/``invstd``: the batch statistics of y that scale/shift normalize with (detached:
    the op that applies them owns the whole BatchNorm backward), None for constants."""

    __slots__ = ("y", "scale", "shift", "relu", "mean", "invstd")

    def __init__(self, y: torch.Tensor, scale=None, shift=None, relu: bool = False, mean=None, invstd=None):
        self.y, self.scale, self.shift, self.relu = y, scale, shift, relu
        self.mean, self.invstd = mean, invstd

    @property
    def pending(self) -> bool:
        return self.scale is not None or self.relu


class Runner:
    """What one training forward of a module shares: its backend choice, dtype and the training
    ops of the elementwise steps. Each conv resolves its own backend (a grouped conv the Triton
    kernel does not take falls back for that conv alone, as in eval())."""

    __slots__ = ("backend", "be", "ops", "dtype", "x")

    def __init__(self, backend, x: torch.Tensor, weight: torch.Tensor, groups: int, pre: bool):
        self.backend = backend
        self.dtype = compute_dtype(x)
        #: the forward's input as the kernels read it
        self.x = self.entry(x)
        self.be = backends.resolve(backend, self.x, weight=weight, groups=groups, pre=pre)
        self.ops: TrainingOps = self.be.training_ops(x.device, self.dtype)

    def _conv_backend(self, x: torch.Tensor, conv: nn.Conv2d, pre: bool):
        """(backend, its training ops) for one conv of this forward."""
        be = backends.resolve(self.backend, x, weight=conv.weight, groups=conv.groups, pre=pre)
        if be is self.be:
            return be, self.ops
        return be, be.training_ops(x.device, self.dtype)

    def entry(self, x: torch.Tensor) -> torch.Tensor:
        """x in the dtype and memory format the kernels read."""
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        return x if is_nhwc(x) else x.contiguous(memory_format=torch.channels_last)

    def materialize(self, a: Act) -> torch.Tensor:
        if not a.pending:
            return a.y
        return self.ops.scale_bias_act(a.y, a.scale, a.shift, None, None, None, a.relu, a.mean, a.invstd)

    # ---- BatchNorm ------------------------------------------------------------------------
    def batch_affine(self, bn: _BN, mean: torch.Tensor, var: torch.Tensor, shape) -> tuple:
        """(scale, shift, mean, invstd) of ``bn`` from batch statistics of a tensor of
        ``shape``, updating its running statistics in place when it tracks them
        (``_BatchNorm.forward``'s rules). The statistics are detached: gradients reach gamma and
        beta through bn_finalize, and the tensor through the op that applies scale/shift.

        A SyncBatchNorm synchronized over ranks (resnet_fast.distributed) merges the ranks'
        statistics first; those stay differentiable (the backward of the merge all-reduces their
        gradients), so mean and invstd come back None: the op that applies scale/shift then
        treats them as constants and autograd brings the statistics' share to the conv."""
        count = shape[0] * shape[2] * shape[3]
        group = distributed.sync_group(bn)
        unbiased = None
        if group is not None:
            mean, var, unbiased = distributed.merge_statistics(mean, var, count, group)
        elif count <= 1:  # F.batch_norm's check, word for word (a synchronized BN: torch's does not)
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {shape}")
        else:
            mean, var = mean.detach(), var.detach()
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            nbt = bn.num_batches_tracked
            if nbt is not None:
                nbt.add_(1)
            cumulative = bn.momentum is None and nbt is not None
            momentum = 0.0 if bn.momentum is None else float(bn.momentum)
            self.ops.bn_update_running(bn.running_mean, bn.running_var, nbt if cumulative else None,
                                       mean.detach(), var.detach(), momentum, cumulative, count,
                                       unbiased)
        scale, shift, invstd = self.ops.bn_finalize(mean, var, bn.weight, bn.bias, bn.eps)
        if group is not None:
            return scale, shift, None, None
        return scale, shift, mean, invstd

    def pre_activation(self, x: torch.Tensor, pre_bn) -> Act:
        """relu(pre_bn(x)) as a pending value (the next conv's prologue)."""
        if uses_batch_stats(pre_bn):
            mean, var = self.ops.batch_stats(x)
            scale, shift, mean, invstd = self.batch_affine(pre_bn, mean, var, x.shape)
            return Act(x, scale, shift, True, mean, invstd)
        scale, shift = bn_scale_shift(pre_bn, accumulate_dtype(self.dtype))
        return Act(x, scale, shift, relu=True)

    # ---- one conv unit --------------------------------------------------------------------
    def unit(self, inp: Act, conv: nn.Conv2d, bn, *, relu: bool, residual: Optional[Act] = None,
             state=None) -> Act:
        """act(bn(conv(inp)) [+ residual]): pending (raw output, scale, shift) when ``bn`` uses
        batch statistics and no residual joins, else computed. ``state``: the unit's UnitState,
        whose fold cache serves when no parameter needs a gradient."""
        if inp.pending and not (inp.scale is not None and inp.relu):
            inp = Act(self.materialize(inp))
        x, pre_scale, pre_bias = inp.y, inp.scale, inp.shift
        stride, padding, dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        be, ops = self._conv_backend(x, conv, pre_scale is not None)
        # a prologue with batch statistics needs conv_stats' backward (the whole BN backward of
        # the prologue), so such a conv runs it even when its own BN uses running statistics
        batch_stats = uses_batch_stats(bn)
        if batch_stats or inp.mean is not None:
            w = conv.weight if conv.weight.dtype == self.dtype else conv.weight.to(self.dtype)
            bias = None if conv.bias is None else conv.bias.to(accumulate_dtype(self.dtype))
            check_conv_bn_act_args(x, w, bias, stride, padding, dilation, conv.groups, None, pre_scale,
                                   pre_bias, require_nhwc=be.requires_nhwc, bias_optional=True)
            wide = be.input_channels(x.shape[1], conv.groups)
            if wide != x.shape[1] and pre_scale is None and not x.requires_grad:
                # the stem: the image padded to the kernel's dense-row width in its layout
                # conversion, the weight with zero input channels (F.pad: its gradient is the
                # slice back, so the parameter's gradient is the 3-channel conv's)
                x = be.kernel_input(x, wide)
                w = torch.nn.functional.pad(w, (0, 0, 0, 0, 0, (wide - w.shape[1] * conv.groups) // conv.groups))
            y, mean, var = ops.conv_stats(x, be.pack_weight(w), bias, stride, padding,
                                               dilation, conv.groups, pre_scale, pre_bias,
                                               inp.mean, inp.invstd)
            act = relu and residual is None  # with a residual the ReLU follows the add
            if batch_stats:
                scale, shift, mean, invstd = self.batch_affine(bn, mean, var, y.shape)
                out = Act(y, scale, shift, act, mean, invstd)
            elif bn is not None:
                out = Act(y, *bn_scale_shift(bn, accumulate_dtype(self.dtype)), act)
            else:
                out = Act(y, relu=act)
            if residual is None:
                return out
            return Act(self.tail(out, residual, relu))
        w, b = self._folded(conv, bn, state, be)
        res = None if residual is None or residual.pending else residual.y
        if w.shape[1] * conv.groups != x.shape[1] and (
                pre_scale is not None or (torch.is_grad_enabled() and x.requires_grad)):
            # a stem weight packed wider (fold.pack_folded) meets a prologue of the conv's own
            # width (a BN'd 1-3 channel input), or an input that needs its gradient (the padding
            # kernel has no backward): the zero input channels go again
            w = be.pack_weight(w[:, :x.shape[1] // conv.groups])
        x = be.kernel_input(x, w.shape[1] * conv.groups)  # a packed stem weight is wider
        y = conv_bn_act(x, w, b, stride, padding, dilation, conv.groups, res,
                        relu and (residual is None or res is not None), pre_scale, pre_bias, backend=be)
        if residual is not None and res is None:  # the shortcut's BN is still pending
            y = self.tail(Act(y), residual, relu)
        return Act(y)

    def tail(self, main: Act, shortcut: Act, relu: bool) -> torch.Tensor:
        """act(main + shortcut), both BN-applied as they go: the block tail in one pass."""
        if main.relu:
            main = Act(self.materialize(main))
        if shortcut.relu:
            shortcut = Act(self.materialize(shortcut))
        return self.ops.scale_bias_act(main.y, main.scale, main.shift, shortcut.y, shortcut.scale,
                                       shortcut.shift, relu, main.mean, main.invstd, shortcut.mean,
                                       shortcut.invstd)

    def _folded(self, conv, bn, state, be):
        params = [conv.weight, conv.bias] + ([bn.weight, bn.bias] if bn is not None else [])
        if state is not None and not (torch.is_grad_enabled()
                                      and any(p is not None and p.requires_grad for p in params)):
            w, b, _, _ = state.fold.get(conv, bn, None, self.dtype, be)
            return w, b
        w, b = fold_conv_bn(conv, bn, self.dtype)  # differentiable: gradients reach the parameters
        return pack_folded(be, w, conv.groups), b


# --------------------------------------------------------------------------------------
# What the modules call
# --------------------------------------------------------------------------------------
def unit_forward(x: torch.Tensor, conv: nn.Conv2d, bn, *, relu: bool, residual=None, pre_bn=None,
                 backend=None, state=None, shared: Optional[dict] = None) -> torch.Tensor:
    """fused_conv's training form: act(bn(conv(pre(x))) [+ residual]), NHWC out. ``shared``: a
    dict living for one forward of the caller, where a pre-activation read by several convs is
    kept (its statistics computed, and its running statistics updated, once)."""
    run = Runner(backend, x, conv.weight, conv.groups, pre_bn is not None)
    entry, x = x, run.x
    inp = None
    if pre_bn is not None:
        seen = shared.get(id(pre_bn)) if shared is not None else None
        if seen is not None and seen[0] is entry and seen[1].y.dtype == run.dtype:
            inp = seen[1]
        else:
            inp = run.pre_activation(x, pre_bn)
            if shared is not None:
                shared[id(pre_bn)] = (entry, inp)
    else:
        inp = Act(x)
    res = Act(run.entry(residual)) if residual is not None else None
    return run.unit(inp, conv, bn, relu=relu, residual=res, state=state).y if res is not None \
        else run.materialize(run.unit(inp, conv, bn, relu=relu, state=state))


def block_forward(block, x: torch.Tensor, downsample_units) -> torch.Tensor:
    """A FusedBlock's training forward (see the module doc); ``downsample_units``: the fusable
    (conv, bn) of its shortcut, or None. Returns NHWC."""
    units = block._units
    mods = block._modules
    first = mods[units[0][0]]
    run = Runner(block.backend, x, first.weight, first.groups, False)
    if downsample_units is None and block.downsample is not None:
        shortcut = Act(run.entry(block.downsample(x)))  # a module of its own: called as it is
    else:
        shortcut = None
    x = run.x
    a = Act(x)
    states = block._unit_states
    for cname, bname in units[:-1]:
        a = run.unit(a, mods[cname], mods[bname], relu=True, state=states[cname])
    if downsample_units is not None:
        shortcut = run.unit(Act(x), downsample_units[0], downsample_units[1], relu=False,
                            state=states["downsample"])
    elif shortcut is None:
        shortcut = Act(x)
    cname, bname = units[-1]
    return run.unit(a, mods[cname], mods[bname], relu=True, residual=shortcut, state=states[cname]).y
