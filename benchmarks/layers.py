"""The distinct convolutions of a ResNet: shape + epilogue, and how often each occurs.

Which conv runs with which BN, residual and prologue, and its shapes, are read off the
converter's fusion plan (:mod:`resnet_fast.plan`) through the kernel report's unit list, for
torchvision, timm and user-written models alike: one extraction, two views of it. A conv's epilogue is what follows its (optional) BatchNorm:

    relu            stem conv1, a bottleneck's conv1/conv2, a basic block's conv1
    residual+relu   the block's last conv (the identity or downsample output added, then ReLU)
    residual        a pre-activation block's last conv (the add, no ReLU after it)
    none            the downsample conv (its output is the residual of the block's last conv)

and ``pre_bn`` the BN (+ ReLU) a pre-activation conv applies to its input as it loads it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # resnet_fast is imported where used: see models.py (TRITON_INTERPRET)
    from resnet_fast.plan import FusedUnit


@dataclass
class ConvLayer:
    name: str                       # first occurrence, e.g. "layer2.0.conv2"
    conv: torch.nn.Conv2d           # of that occurrence (the fp32 model's)
    bn: Optional[torch.nn.BatchNorm2d]
    unit: FusedUnit                 # the fusion plan's unit of that occurrence
    in_shape: tuple                 # (C, H, W) of the input, per image
    out_shape: tuple                # (C, H, W) of the output, per image
    names: list = field(default_factory=list)   # every occurrence
    pre_bn: Optional[torch.nn.BatchNorm2d] = None  # relu(pre_bn(x)) applied on load

    @property
    def multiplicity(self) -> int:
        return len(self.names)

    @property
    def epilogue(self) -> str:
        """"relu" | "residual+relu" | "residual" | "none" (see FusedUnit.epilogue)."""
        return self.unit.epilogue

    @property
    def residual(self) -> bool:
        return self.unit.residual

    @property
    def relu(self) -> bool:
        return self.unit.relu

    @property
    def pre(self) -> bool:
        return self.pre_bn is not None

    def full_epilogue(self) -> str:
        """The epilogue with the prologue named too (the kernel report's strings)."""
        return self.unit.kernel_epilogue

    def key(self) -> tuple:
        c = self.conv
        return (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                c.groups, self.in_shape[1:], self.epilogue, self.pre, c.bias is not None,
                self.bn is not None)

    def flops(self, batch: int) -> float:
        c = self.conv
        co, ho, wo = self.out_shape
        kh, kw = c.kernel_size
        return 2.0 * batch * co * ho * wo * (c.in_channels // c.groups) * kh * kw

    def bytes(self, batch: int, itemsize: int) -> float:
        """Compulsory traffic of the fused op (input read, weight, output, residual, fp32 bias):
        the kernel report's definition, so the "% bw" column and its estimates agree."""
        from resnet_fast.kernel_report.model import conv_bytes

        c = self.conv
        return conv_bytes({"batch": batch, "cin": c.in_channels, "cout": c.out_channels,
                           "kernel": c.kernel_size, "groups": c.groups, "epilogue": self.full_epilogue(),
                           "h": self.in_shape[1], "w": self.in_shape[2],
                           "ho": self.out_shape[1], "wo": self.out_shape[2]}, itemsize)

    def label(self) -> str:
        c = self.conv
        kh, kw = c.kernel_size
        return (f"{c.in_channels}->{c.out_channels} {kh}x{kw}/s{c.stride[0]} "
                f"{self.in_shape[1]}x{self.in_shape[2]}" + (" pre" if self.pre else ""))

    def describe(self, batch: int, itemsize: int) -> dict:
        c = self.conv
        return {"name": self.name, "names": list(self.names), "multiplicity": self.multiplicity,
                "cin": c.in_channels, "cout": c.out_channels, "kernel": list(c.kernel_size),
                "stride": list(c.stride), "padding": list(c.padding), "dilation": list(c.dilation),
                "groups": c.groups, "in_hw": list(self.in_shape[1:]), "out_hw": list(self.out_shape[1:]),
                "batch": batch, "h": self.in_shape[1], "w": self.in_shape[2],   # the keys
                "ho": self.out_shape[1], "wo": self.out_shape[2],            # kernel_report reads
                "epilogue": self.epilogue, "pre": self.pre, "bn": self.bn is not None,
                "bias": c.bias is not None, "label": self.label(), "flops": self.flops(batch),
                "bytes": self.bytes(batch, itemsize)}


def distinct_convs(model: torch.nn.Module, resolution: int) -> list[ConvLayer]:
    """The model's distinct convs (same shape and epilogue counted once), in forward order, as
    the converter's fusion plan describes them (the kernel report's unit list, read on a meta
    copy: :func:`resnet_fast.kernel_report.layers.unit_layers`), with ``model``'s own modules."""
    from resnet_fast.kernel_report.layers import unit_layers

    # batch 2: the trace runs in train() (every conv called), where BN needs two values a channel
    units, _ = unit_layers(copy.deepcopy(model), batch=2, resolution=resolution)
    get = (lambda n: model.get_submodule(n) if n else None)
    seen: dict[tuple, ConvLayer] = {}
    for unit, d in units:
        layer = ConvLayer(name=unit.conv, conv=get(unit.conv), bn=get(unit.bn), unit=unit,
                          in_shape=(d["cin"], d["h"], d["w"]), out_shape=(d["cout"], d["ho"], d["wo"]),
                          pre_bn=get(unit.pre_bn))
        k = layer.key()
        if k in seen:
            seen[k].names.append(unit.conv)
        else:
            layer.names.append(unit.conv)
            seen[k] = layer
    return list(seen.values())
