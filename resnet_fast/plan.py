"""The fusion plan of a converted model: one typed description of every conv that runs fused.

The converters decide what fuses (the torchvision fast path in :mod:`resnet_fast.convert`, the
graph converter in :mod:`resnet_fast.fusion_rules`); each module they convert describes the
units it runs as :class:`FusedUnit` values (its ``fused_units()``), and :func:`units` collects
them for a whole model. Everything that needs to know what a converted model fuses reads this:
``fusion_summary``, the benchmark's per-layer section, the kernel report and the tests. Nothing
else re-derives it.

A unit is what one call of :func:`resnet_fast.ops.conv_bn_act` computes::

    [relu(pre_bn(x)) →] conv(+bias) [→ bn] [→ + residual] [→ relu]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

from torch import nn

_BN = nn.modules.batchnorm._BatchNorm

#: what a fused unit can absorb around its conv, in the order fusion_summary lists them
FUSED_KINDS = ("bias", "bn", "relu", "residual", "pre_bn_relu")


@dataclass(frozen=True)
class FusedUnit:
    """One conv that runs on the fused op, and what runs with it. Module names are relative
    to the module that runs the unit, or qualified in the model (:func:`units`)."""

    conv: str
    bn: Optional[str] = None        # the BatchNorm folded into the conv (epilogue)
    pre_bn: Optional[str] = None    # the BatchNorm (+ ReLU) applied to the input as it loads
    relu: bool = False
    residual: bool = False          # a tensor added before the ReLU
    bias: bool = False              # the conv's own bias
    #: in train(), what applies this unit's BatchNorm (batch statistics) to the conv's raw
    #: output: "prologue" (the next conv's input prologue), "tail" (a block tail that adds the
    #: shortcut and ReLUs in the same pass) or "pass" (one BN[+residual][+ReLU] pass)
    train_apply: str = "pass"
    #: in train(), whether the conv's input arrives as a raw conv output plus a BatchNorm the
    #: kernel applies as it loads (the previous conv's, or a pre-activation BN)
    train_pre: bool = False
    #: the nn.MaxPool2d that runs on this unit's output as the op contract's NHWC max-pool
    #: (values only) in eval(): the stem's pool
    pool: Optional[str] = None

    @property
    def kinds(self) -> tuple:
        """The FUSED_KINDS present (fusion_summary's "fused"); empty for a bare stem."""
        present = {"bias": self.bias, "bn": self.bn is not None, "relu": self.relu,
                   "residual": self.residual, "pre_bn_relu": self.pre_bn is not None}
        return tuple(k for k in FUSED_KINDS if present[k])

    @property
    def epilogue(self) -> str:
        """What follows the GEMM and its folded BN: "residual+relu", "relu", "residual" or "none"."""
        return "+".join(p for p, on in (("residual", self.residual), ("relu", self.relu)) if on) or "none"

    @property
    def kernel_epilogue(self) -> str:
        """The epilogue with the prologue named first ("pre+relu", "pre"): the kernel variant's name."""
        if self.pre_bn is None:
            return self.epilogue
        return "pre" if self.epilogue == "none" else f"pre+{self.epilogue}"

    @property
    def train_kernel_epilogue(self) -> str:
        """The kernel variant a train() forward runs for this conv: "stats" (the raw output and
        its batch statistics) or "pre+stats" (with the input prologue)."""
        return "pre+stats" if self.train_pre or self.pre_bn is not None else "stats"

    def modules(self) -> tuple:
        """The names of the unit's modules: conv, then the BNs it folds."""
        return tuple(n for n in (self.conv, self.bn, self.pre_bn) if n)

    def within(self, prefix: str) -> "FusedUnit":
        """The same unit with its names qualified by ``prefix`` (the running module's name)."""
        if not prefix:
            return self
        q = (lambda n: f"{prefix}.{n}" if n else n)
        return dataclasses.replace(self, conv=q(self.conv), bn=q(self.bn), pre_bn=q(self.pre_bn),
                                   pool=q(self.pool))


def unit_of(conv_name: str, conv: nn.Conv2d, bn: Optional[str] = None, *, relu: bool = False,
            residual: bool = False, pre_bn: Optional[str] = None, train_apply: str = "pass",
            train_pre: bool = False, pool: Optional[str] = None) -> FusedUnit:
    """A FusedUnit for ``conv`` (named ``conv_name``), reading its bias from the module."""
    return FusedUnit(conv_name, bn, pre_bn, relu, residual, conv.bias is not None, train_apply, train_pre,
                     pool)


def training_dataflow(unit: FusedUnit, model: nn.Module) -> str:
    """What a train() forward runs for ``unit`` (names qualified in ``model``), in words: the
    dataflow of resnet_fast.training for the unit's modules as they are now."""
    bn = model.get_submodule(unit.bn) if unit.bn else None
    pre = model.get_submodule(unit.pre_bn) if unit.pre_bn else None
    head = ""
    if pre is not None:
        head = "pre-BN stats → prologue; " if isinstance(pre, _BN) else "frozen pre-BN → prologue; "
    if bn is not None and not isinstance(bn, _BN):
        return head + "folded conv + backward (frozen BN)"
    if bn is None:
        return head + "fused conv + backward"
    where = {"prologue": "next conv's prologue", "tail": "block tail"}.get(unit.train_apply)
    if where is None:
        where = "BN" + ("+residual" if unit.residual else "") + ("+ReLU" if unit.relu else "") + " pass"
    stats = "stats"
    if isinstance(bn, nn.SyncBatchNorm):
        # which ranks it merges over is decided per forward (torch's rule: distributed/sync_group)
        stats = "stats synced across ranks" if bn.process_group is None else "stats synced in its process group"
    return head + f"conv+{stats} → {where}"


def units(model: nn.Module) -> list[FusedUnit]:
    """Every unit of a converted model, names qualified in ``model``, in ``named_modules()``
    order of their convs."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    found = [u.within(prefix) for prefix, m in _runners(model) for u in m.fused_units()]
    return sorted(found, key=lambda u: order.get(u.conv, len(order)))


def reasons(model: nn.Module) -> dict[str, str]:
    """Qualified conv name -> why it is not fused, or only partly (what the converters said)."""
    out: dict[str, str] = {}
    for prefix, m in _runners(model):
        for conv, why in getattr(m, "fusion_reasons", dict)().items():
            out[f"{prefix}.{conv}" if prefix else conv] = why
    return out


def _runners(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module of ``model`` that runs fused units itself."""
    for prefix, m in model.named_modules():
        if callable(getattr(type(m), "fused_units", None)):
            yield prefix, m
