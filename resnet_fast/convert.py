"""Converting existing ResNets to fused modules, in place, and saying what was fused.

``convert(model)`` fuses what it can of any model, in two ways that run the same fused unit
(:func:`resnet_fast.modules.fused_conv`):

* torchvision's BasicBlock/Bottleneck, and a torchvision ResNet's stem, are given fused
  subclasses of their own classes in place (the same objects: submodules, tensors and hooks
  stay; ``isinstance`` still holds): a fast path for code known in advance, with no tracing;
* everything else goes through the graph-level converter (:mod:`resnet_fast.fx_fusion`):
  user-written blocks, blocks without BN, plain and pre-activation blocks, timm models.

``state_dict`` keys, order and tensors stay exactly the same, and the model is converted in
place (``convert(model) is model``). eval() without autograd runs the fused kernels with folded
weights; train(), autograd and autocast run the training ops (:mod:`resnet_fast.training`:
batch statistics in the conv epilogue, BN+ReLU in the next conv's prologue, one block-tail pass,
torch's BatchNorm semantics and gradients). Modules it cannot convert are left as they are and named,
with the reason, in one warning; ``fusion_summary(model)`` says what happened to every conv.
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch
from torch import nn

from . import backends, fx_fusion, plan
from .fusion_rules import has_hooks, pool_refusal, why_not_torchvision_block, why_not_torchvision_pair
from .modules import BasicBlock, Bottleneck, ConvBNAct, FusedBlock, UnitState, fused_conv, fused_max_pool, to_nhwc
from .plan import FUSED_KINDS, FusedUnit, unit_of

try:  # torchvision is the reference, not a runtime dependency
    from torchvision.models import resnet as _tv
except ImportError:  # pragma: no cover - exercised only without torchvision
    _tv = None

__all__ = ["FUSED_KINDS", "FusedResNet", "convert", "fusion_summary", "set_backend"]


# --------------------------------------------------------------------------------------
# torchvision's ResNet with a fused stem (the fast path)
# --------------------------------------------------------------------------------------
if _tv is not None:

    class FusedResNet(_tv.ResNet):
        """torchvision's ResNet whose stem conv1 → bn1 → relu runs as one fused op in eval().

        ``convert`` gives an existing ResNet this class in place (its state is untouched);
        in eval() the input changes memory format once, in the fused stem's input conversion
        (NHWC, padded to the stem kernel's channel count: Backend.kernel_input), and the whole
        model runs channels_last after it (torchvision's forward is known to be indifferent to
        memory format).
        """

        def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
            if "_resnet_fast_fp8" in self.__dict__:  # quantized (resnet_fast.quantize_fp8)
                from . import quantize
                why = quantize.why_not_fp8(self, x)
                if why is None:
                    return quantize.forward_fp8(self, x)
                backends.say_once(f"resnet_fast: the fp8-quantized {type(self).__name__} runs its "
                                  f"unquantized forward: {why}", logging.WARNING)
            if has_hooks(self.relu):  # the fused stem would skip the ReLU module's hooks
                if x.dim() == 4 and not self.training:
                    be = backends.resolve(self.backend, x, weight=self.conv1.weight, groups=self.conv1.groups)
                    if be.requires_nhwc:
                        x = to_nhwc(x)  # the unfused stem: the rest of the model still runs NHWC
                x = self.relu(self.bn1(self.conv1(x)))
            else:  # fused_conv runs conv1 and bn1 themselves when they have hooks
                x = fused_conv(x, self.conv1, self.bn1, self._stem_unit, relu=True, backend=self.backend)
            x = fused_max_pool(self.maxpool, x, self.backend)
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
            x = self.avgpool(x)
            x = torch.flatten(x, 1)
            return self.fc(x)

        def fused_units(self) -> list[FusedUnit]:
            """The stem unit this module runs (its blocks run their own), with the max-pool
            after it when that runs as the NHWC pool kernel."""
            pool = "maxpool" if pool_refusal(self.maxpool) is None else None
            return [unit_of("conv1", self.conv1, "bn1", relu=True, pool=pool)]

    class FusedBasicBlock(FusedBlock, _tv.BasicBlock):
        """torchvision's BasicBlock, fused in eval(); ``convert`` gives a block this class in place."""

        _units = BasicBlock._units
        _reference_forward = _tv.BasicBlock.forward

    class FusedBottleneck(FusedBlock, _tv.Bottleneck):
        """torchvision's Bottleneck, fused in eval(); ``convert`` gives a block this class in place."""

        _units = Bottleneck._units
        _reference_forward = _tv.Bottleneck.forward

    _TV_BLOCKS = {_tv.BasicBlock: FusedBasicBlock, _tv.Bottleneck: FusedBottleneck}
else:  # pragma: no cover
    FusedResNet = None
    _TV_BLOCKS = {}

#: modules that run fused units themselves, with a `backend` attribute
_FAST_PATH = tuple(t for t in (FusedBlock, ConvBNAct, FusedResNet) if t is not None)


def _convert_torchvision(model: nn.Module, backend: Optional[str], problems: dict) -> set:
    """The fast path, in place; returns the torchvision blocks it had to leave alone."""
    refused = set()
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            new_cls = _TV_BLOCKS.get(type(child))
            if new_cls is None:
                continue
            why = why_not_torchvision_block(child)
            if why:
                problems[f"{parent_name}.{name}" if parent_name else name] = why
                refused.add(child)
                continue
            child.__class__ = new_cls  # in place: the same object, hooks and all
            child._init_fused()
            child.backend = backends.validate_name(backend)
    # a stem the fast path cannot fuse is left to the graph-level converter, which says why
    if _tv is not None and type(model) is _tv.ResNet and why_not_torchvision_pair(model, "conv1", "bn1") is None:
        model.__class__ = FusedResNet
        model._stem_unit = UnitState()
    return refused


# --------------------------------------------------------------------------------------
# convert / set_backend / fusion_summary
# --------------------------------------------------------------------------------------
def convert(model: nn.Module, backend: Optional[str] = "auto") -> nn.Module:
    """Fuse ``model``'s convs with their BatchNorm, ReLU, residual add and pre-activation, in
    place, and return it (see the module doc). ``backend``: see :func:`set_backend`."""
    backend = backends.validate_name(backend)
    problems: dict[str, str] = {}  # qualified name -> why (what the warning says)
    notes: dict[str, str] = {}     # qualified name -> why its convs stay unfused
    refused = _convert_torchvision(model, backend, problems)

    def leave(m: nn.Module) -> Optional[str]:
        if m in refused or isinstance(m, (FusedBlock, ConvBNAct)):
            return "subtree"
        if FusedResNet is not None and isinstance(m, FusedResNet):
            return "self"
        return None

    fx_fusion.convert_graphs(model, leave, notes, problems)
    notes.update({k: v for k, v in problems.items() if k not in notes})
    model.__dict__["_resnet_fast_notes"] = notes
    set_backend(model, backend)
    reported = _costly(model, problems)
    if reported:
        warnings.warn("resnet_fast.convert left these modules unfused: " + "; ".join(
            f"{name or type(model).__name__} ({why})" for name, why in reported.items()), stacklevel=2)
    return model


def _costly(model: nn.Module, problems: dict[str, str]) -> dict[str, str]:
    """The problems that left a conv unfused (an untraceable module holding no conv, or whose
    convs were all converted below it, costs nothing worth a warning)."""
    unfused = [r["name"] for r in fusion_summary(model) if not r["fused"]]
    return {name: why for name, why in problems.items()
            if any(c == name or not name or c.startswith(name + ".") for c in unfused)}


def set_backend(model: nn.Module, name: Optional[str]) -> nn.Module:
    """Make every fused module of ``model`` run on backend ``name`` (None: the default)."""
    name = backends.validate_name(name)
    value = None if name == "auto" else name
    for m in model.modules():
        fg = fx_fusion.fused_graph_of(m)
        if fg is not None:
            fg.backend = value
        elif isinstance(m, _FAST_PATH):
            m.backend = value
    return model


class FusionSummary(list):
    """fusion_summary's rows (dicts), printing as a table."""

    def __str__(self) -> str:
        w = max([len(r["name"]) for r in self] + [4])
        t = max([len(r["training"] or "-") for r in self] + [8])
        lines = [f"{'conv':<{w}}  {'fused':<28}  {'training':<{t}}  reason",
                 f"{'-' * w}  {'-' * 28}  {'-' * t}  ------"]
        for r in self:
            fused = "+".join(r["fused"]) or "-"
            if r.get("pool"):
                fused += f" -> {r['pool']} (NHWC pool)"
            prec = f"  [{r['precision']}]" if r.get("precision") else ""
            lines.append(f"{r['name']:<{w}}  {fused:<28}  "
                         f"{r['training'] or '-':<{t}}  {r['reason'] or ''}{prec}")
        return "\n".join(lines)


def fusion_summary(model: nn.Module) -> FusionSummary:
    """One row per nn.Conv2d of ``model``: {"name", "fused", "reason", "runs_fused", "training",
    "pool", "precision"}.

    "name" is the conv's name in ``model.named_modules()``; "fused" the kinds fused into it
    (see FUSED_KINDS; empty when none); "reason" None, or why it is not (or not fully) fused;
    "pool" the name of the max-pool that runs after the unit on the op contract's values-only
    NHWC pool (``ops.max_pool2d``) in eval(), or None;
    "runs_fused" whether the conv runs on resnet_fast's conv op in eval() (every fused conv,
    and a stem with nothing to fuse: see fusion_rules.BARE_UNIT_MAX_CIN); "training" what a
    train() forward runs for it, in words (:func:`resnet_fast.plan.training_dataflow`; None where
    it runs unfused); "precision" None, or for a model :func:`resnet_fast.quantize_fp8` quantized
    what the conv's eval() forward reads and writes, and why a conv stays in 16 bits. Read off
    the model's fusion plan (:func:`resnet_fast.plan.units`).
    """
    from .quantize import precision_of
    fused = {u.conv: u for u in plan.units(model)}
    reasons = plan.reasons(model)
    precision = precision_of(model)
    notes = model.__dict__.get("_resnet_fast_notes", {})
    out = FusionSummary()
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        unit = fused.get(name)
        kinds = unit.kinds if unit is not None else ()
        reason = reasons.get(name)
        if not kinds and reason is None:
            reason = _nearest_note(notes, name) or "not part of a recognised conv pattern"
        train = plan.training_dataflow(unit, model) if unit is not None else None
        row = {"name": name, "fused": kinds, "reason": reason, "runs_fused": unit is not None,
               "training": train, "pool": unit.pool if unit is not None else None, "precision": None}
        if precision is not None and name in precision:
            kind, detail = precision[name]
            row["precision"] = kind if detail == kind else f"{kind} ({detail})"
        out.append(row)
    return out


def _nearest_note(notes: dict[str, str], name: str) -> Optional[str]:
    while True:
        if name in notes:
            return notes[name]
        if not name:
            return None
        name = name.rpartition(".")[0]
