"""The distinct convolutions of a ResNet: shape + epilogue, and how often each occurs.

A torchvision ResNet pairs each conv with its BN by the block's structure (:func:`conv_units`);
any other model (timm's, pre-activation ones) is converted and its units read off the fused
graph (:func:`graph_units`). A conv's epilogue is what follows its (optional) BatchNorm:

    relu            stem conv1, a bottleneck's conv1/conv2, a basic block's conv1
    residual+relu   the block's last conv (the identity or downsample output added, then ReLU)
    residual        a pre-activation block's last conv (the add, no ReLU after it)
    none            the downsample conv (its output is the residual of the block's last conv)

and ``pre_bn`` the BN (+ ReLU) a pre-activation conv applies to its input as it loads it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class ConvLayer:
    name: str                       # first occurrence, e.g. "layer2.0.conv2"
    conv: torch.nn.Conv2d           # of that occurrence (the fp32 model's)
    bn: Optional[torch.nn.BatchNorm2d]
    epilogue: str                   # "relu" | "residual+relu" | "residual" | "none"
    in_shape: tuple                 # (C, H, W) of the input, per image
    out_shape: tuple                # (C, H, W) of the output, per image
    names: list = field(default_factory=list)   # every occurrence
    pre_bn: Optional[torch.nn.BatchNorm2d] = None  # relu(pre_bn(x)) applied on load

    @property
    def multiplicity(self) -> int:
        return len(self.names)

    @property
    def residual(self) -> bool:
        return "residual" in self.epilogue

    @property
    def relu(self) -> bool:
        return "relu" in self.epilogue

    @property
    def pre(self) -> bool:
        return self.pre_bn is not None

    def full_epilogue(self) -> str:
        """The epilogue with the prologue named too (the kernel report's strings)."""
        return f"pre+{self.epilogue}" if self.pre else self.epilogue

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


def conv_units(model: torch.nn.Module) -> list[tuple[str, torch.nn.Conv2d, torch.nn.BatchNorm2d, str]]:
    """(name, conv, bn, epilogue) for every conv of a torchvision ResNet, in forward order."""
    from torchvision.models.resnet import BasicBlock, Bottleneck  # lazy: see models.py

    units = [("conv1", model.conv1, model.bn1, "relu")]
    for lname in ("layer1", "layer2", "layer3", "layer4"):
        for i, blk in enumerate(getattr(model, lname)):
            p = f"{lname}.{i}"
            if isinstance(blk, Bottleneck):
                units += [(f"{p}.conv1", blk.conv1, blk.bn1, "relu"),
                          (f"{p}.conv2", blk.conv2, blk.bn2, "relu"),
                          (f"{p}.conv3", blk.conv3, blk.bn3, "residual+relu")]
            elif isinstance(blk, BasicBlock):
                units += [(f"{p}.conv1", blk.conv1, blk.bn1, "relu"),
                          (f"{p}.conv2", blk.conv2, blk.bn2, "residual+relu")]
            else:
                raise TypeError(f"{p} is a {type(blk).__name__}, not a torchvision BasicBlock/Bottleneck")
            if blk.downsample is not None:
                units.append((f"{p}.downsample.0", blk.downsample[0], blk.downsample[1], "none"))
    return units


@torch.no_grad()
def conv_shapes(model: torch.nn.Module, resolution: int) -> dict[str, tuple[tuple, tuple]]:
    """name -> ((C,H,W) in, (C,H,W) out) per conv, traced on the meta device."""
    meta = copy.deepcopy(model).to("meta")
    shapes, hooks = {}, []
    for name, m in meta.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: shapes.__setitem__(
                    name, (tuple(inp[0].shape[1:]), tuple(out.shape[1:])))))
    meta(torch.empty(1, 3, resolution, resolution, device="meta"))
    for h in hooks:
        h.remove()
    return shapes


def graph_units(model: torch.nn.Module) -> list[tuple]:
    """(name, conv, bn, epilogue, pre_bn) for every fused unit of any model the graph converter
    takes (timm's ResNets, pre-activation ones, user-written blocks), in forward order.

    A copy of the model is converted on the meta device; the names its fused graphs give each
    unit's conv, BN and prologue BN are resolved in ``model`` itself."""
    import warnings

    import resnet_fast
    from resnet_fast.fx_fusion import fused_graph_of
    from resnet_fast.kernel_report.layers import epilogue_name

    meta = copy.deepcopy(model).to("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # units it cannot convert are simply not measured
        conv_model = resnet_fast.convert(meta, backend="torch")
    kinds = {r["name"]: r["fused"] for r in resnet_fast.fusion_summary(conv_model)}
    units = []
    for prefix, m in conv_model.named_modules():
        g = fused_graph_of(m)
        if g is None:
            continue
        for _, *names in g.units:
            conv_name, bn_name, pre_name = (f"{prefix}.{n}" if prefix and n else n for n in names)
            # what follows the GEMM; the prologue is the unit's pre_bn
            epi = epilogue_name([k for k in kinds.get(conv_name, ()) if k != "pre_bn_relu"])
            units.append((conv_name, model.get_submodule(conv_name),
                          model.get_submodule(bn_name) if bn_name else None, epi,
                          model.get_submodule(pre_name) if pre_name else None))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(units, key=lambda u: order[u[0]])


def distinct_convs(model: torch.nn.Module, resolution: int) -> list[ConvLayer]:
    """The model's distinct convs (same shape and epilogue counted once), in forward order:
    torchvision ResNets by their block structure, any other model by its fused graph."""
    from torchvision.models.resnet import ResNet  # lazy: see models.py

    shapes = conv_shapes(model, resolution)
    units = ([u + (None,) for u in conv_units(model)] if isinstance(model, ResNet)
             else graph_units(model))
    seen: dict[tuple, ConvLayer] = {}
    for name, conv, bn, epi, pre_bn in units:
        ins, outs = shapes[name]
        layer = ConvLayer(name=name, conv=conv, bn=bn, epilogue=epi, in_shape=ins, out_shape=outs,
                          pre_bn=pre_bn)
        k = layer.key()
        if k in seen:
            seen[k].names.append(name)
        else:
            layer.names.append(name)
            seen[k] = layer
    return list(seen.values())
