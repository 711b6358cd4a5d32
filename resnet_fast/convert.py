"""Converting existing ResNets to fused modules, in place, and saying what was fused.

``convert(model)`` swaps every torchvision BasicBlock/Bottleneck for the fused block of
:mod:`resnet_fast.modules` (sharing, not copying, its submodules and tensors) and gives a
torchvision ResNet a fused stem, so ``state_dict`` keys and tensors stay exactly the same.
Modules it cannot handle are left as they are and named in one warning with the reason.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from . import backends
from .fold import FoldCache
from .modules import BasicBlock, Bottleneck, ConvBNAct, _FusedBlock, fused_conv, fusable_downsample, to_nhwc

try:  # torchvision is the reference, not a runtime dependency
    from torchvision.models import resnet as _tv
except ImportError:  # pragma: no cover - exercised only without torchvision
    _tv = None

FUSED_KINDS = ("bias", "bn", "relu", "residual", "pre_bn_relu")


def _fused_kinds(conv: nn.Conv2d, bn, relu: bool, residual: bool = False, pre_bn=None) -> tuple:
    kinds = []
    if conv.bias is not None:
        kinds.append("bias")
    if bn is not None:
        kinds.append("bn")
    if relu:
        kinds.append("relu")
    if residual:
        kinds.append("residual")
    if pre_bn is not None:
        kinds.append("pre_bn_relu")
    return tuple(k for k in FUSED_KINDS if k in kinds)


# --------------------------------------------------------------------------------------
# torchvision's ResNet with a fused stem
# --------------------------------------------------------------------------------------
if _tv is not None:

    class FusedResNet(_tv.ResNet):
        """torchvision's ResNet whose stem conv1 → bn1 → relu runs as one fused op in eval().

        ``convert`` gives an existing ResNet this class in place (its state is untouched);
        in eval() the input is converted to channels_last once, here, for the whole model.
        """

        def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 4 and not self.training:
                be = backends.resolve(self.backend, x, weight=self.conv1.weight, groups=self.conv1.groups)
                if be.requires_nhwc:
                    x = to_nhwc(x)
            x = fused_conv(x, self.conv1, self.bn1, self._stem_fold, relu=True, backend=self.backend)
            x = self.maxpool(x)
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
            x = self.avgpool(x)
            x = torch.flatten(x, 1)
            return self.fc(x)

        def fusion_rows(self):
            return [("conv1", _fused_kinds(self.conv1, self.bn1, True), None)]

    _TV_BLOCKS = {_tv.BasicBlock: BasicBlock, _tv.Bottleneck: Bottleneck}
else:  # pragma: no cover
    FusedResNet = None
    _TV_BLOCKS = {}


def _block_rows(block: _FusedBlock):
    rows = []
    for i, (c, b) in enumerate(block._units):
        last = i == len(block._units) - 1
        rows.append((c, _fused_kinds(getattr(block, c), getattr(block, b), True, residual=last), None))
    if block.downsample is not None:
        ds = fusable_downsample(block.downsample)
        if ds is not None:
            rows.append(("downsample.0", _fused_kinds(ds[0], ds[1], False), None))
    return rows


_FusedBlock.fusion_rows = _block_rows
ConvBNAct.fusion_rows = lambda self: [("conv", _fused_kinds(self.conv, self.bn, self.relu,
                                                            pre_bn=self.pre_bn), None)]


# --------------------------------------------------------------------------------------
# convert / set_backend / fusion_summary
# --------------------------------------------------------------------------------------
def convert(model: nn.Module, backend: Optional[str] = "auto") -> nn.Module:
    """Fuse ``model``'s stem and blocks in place and return it (see the module doc)."""
    backend = backends.validate_name(backend)
    skipped: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            new_cls = _TV_BLOCKS.get(type(child))
            if new_cls is None:
                continue
            qual = f"{parent_name}.{name}" if parent_name else name
            why = _why_not_block(child)
            if why:
                skipped.append(f"{qual} ({why})")
                continue
            setattr(parent, name, new_cls.from_torchvision(child, backend=backend))
    if _tv is not None and type(model) is _tv.ResNet:
        model.__class__ = FusedResNet
        model._stem_fold = FoldCache()
    set_backend(model, backend)
    if skipped:
        warnings.warn("resnet_fast.convert left these modules unfused: " + "; ".join(skipped),
                      stacklevel=2)
    model._resnet_fast_skipped = skipped
    return model


def _why_not_block(block: nn.Module) -> Optional[str]:
    for name in ("conv1", "conv2", "conv3"):
        conv = getattr(block, name, None)
        if conv is not None and (conv.padding_mode != "zeros" or isinstance(conv.padding, str)):
            return f"{name} uses padding_mode={conv.padding_mode!r}/padding={conv.padding!r}"
    for name in ("bn1", "bn2", "bn3"):
        bn = getattr(block, name, None)
        if bn is not None and not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            return f"{name} is a {type(bn).__name__}, not a BatchNorm"
        if bn is not None and not bn.track_running_stats:
            return f"{name} does not track running statistics, so it cannot be folded"
    return None


def set_backend(model: nn.Module, name: Optional[str]) -> nn.Module:
    """Make every fused module of ``model`` run on backend ``name`` (None: the default)."""
    name = backends.validate_name(name)
    for m in model.modules():
        if isinstance(m, (_FusedBlock, ConvBNAct)) or (FusedResNet is not None and isinstance(m, FusedResNet)):
            m.backend = None if name == "auto" else name
    return model


class FusionSummary(list):
    """fusion_summary's rows (dicts), printing as a table."""

    def __str__(self) -> str:
        w = max([len(r["name"]) for r in self] + [4])
        lines = [f"{'conv':<{w}}  {'fused':<28}  reason", f"{'-' * w}  {'-' * 28}  ------"]
        for r in self:
            lines.append(f"{r['name']:<{w}}  {'+'.join(r['fused']) or '-':<28}  {r['reason'] or ''}")
        return "\n".join(lines)


def fusion_summary(model: nn.Module) -> FusionSummary:
    """One row per nn.Conv2d of ``model``: {"name", "fused", "reason"} (see FUSED_KINDS)."""
    covered = {}
    for prefix, m in model.named_modules():
        rows = getattr(m, "fusion_rows", None)
        if rows is None or not callable(rows):
            continue
        for local, fused, reason in rows():
            covered[f"{prefix}.{local}" if prefix else local] = (fused, reason)
    out = FusionSummary()
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        fused, reason = covered.get(name, ((), "not part of a recognised conv pattern"))
        out.append({"name": name, "fused": fused, "reason": reason})
    return out
