"""The distinct convolutions of a model, as the converted model runs them.

The model is built with random weights on the meta device (no memory, no compute), converted
with :func:`resnet_fast.convert`, and run once in train() mode (the reference path calls every
nn.Conv2d) with forward pre-hooks recording each conv's input shape. Which convs run fused and
with which epilogue (BN, ReLU, residual, pre-activation) comes from the converted model's fusion
plan (:func:`resnet_fast.plan.units`); the other convs are returned separately with the reason
:func:`resnet_fast.fusion_summary` gives.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch
from torch import nn

from ..ops import pair

def build_model(name: str) -> nn.Module:
    """``resnet50`` (any torchvision classification model), ``timm:NAME``, or
    ``package.module:callable``; random weights, on the meta device."""
    with torch.device("meta"):
        if name.startswith("timm:"):
            import timm
            return timm.create_model(name[5:], pretrained=False)
        if ":" in name:
            mod, attr = name.split(":", 1)
            return getattr(importlib.import_module(mod), attr)()
        import torchvision
        return torchvision.models.get_model(name, weights=None)


def layer_label(layer: dict) -> str:
    kh, kw = layer["kernel"]
    g = f" g{layer['groups']}" if layer.get("groups", 1) != 1 else ""
    return (f"{layer['cin']}->{layer['cout']} {kh}x{kw}/s{layer['stride'][0]}{g} "
            f"{layer['h']}x{layer['w']} {layer['epilogue']}")


def normalize_layer(layer: dict, batch: Optional[int] = None) -> dict:
    """A layer dict with every key the report uses, from this module's layers or from
    benchmarks/ rows (``in_hw``/``out_hw``, ``kernel`` as an int or pair)."""
    d = dict(layer)
    if batch is not None and "batch" not in d:
        d["batch"] = int(batch)
    if "batch" not in d:
        raise ValueError("the layer dict has no batch; pass batch=")
    d["kernel"] = pair(d["kernel"], "kernel")
    for k, default in (("stride", 1), ("padding", 0), ("dilation", 1)):
        d[k] = pair(d.get(k, default), k)
    d.setdefault("groups", 1)
    if "h" not in d:
        d["h"], d["w"] = pair(d["in_hw"], "in_hw")
    if "ho" not in d:
        if "out_hw" in d:
            d["ho"], d["wo"] = pair(d["out_hw"], "out_hw")
        else:
            from ..ops import conv_output_hw
            d["ho"], d["wo"] = conv_output_hw(d["h"], d["w"], *d["kernel"], d["stride"], d["padding"], d["dilation"])
    d.setdefault("epilogue", "relu")
    return d


def _key(layer: dict) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in layer.items()
                 if k not in ("names", "count"))


def unit_layers(model: nn.Module | str, batch: int = 256, resolution: int = 224,
                in_channels: int = 3) -> tuple[list[tuple], list[dict]]:
    """(units, unfused): (FusedUnit, layer dict) for every unit of the converted model's fusion
    plan, shapes at this batch and resolution, in forward order; and {"name", "reason"} for the
    convs left unfused. ``model`` (an instance) is moved to the meta device and converted in place."""
    from .. import convert, fusion_summary, plan

    if isinstance(model, str):
        model = build_model(model)
    model = model.to("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert(model)
    units = {u.conv: u for u in plan.units(model)}
    shapes: dict[str, tuple] = {}

    def record(name):
        def hook(module, args):
            shapes.setdefault(name, tuple(args[0].shape))  # returns None: the input is unchanged
        return hook

    hooks = [mod.register_forward_pre_hook(record(name))
             for name, mod in model.named_modules() if isinstance(mod, nn.Conv2d)]
    try:
        model.train()  # the reference path: every nn.Conv2d's own forward runs (and its hook)
        with torch.no_grad():
            model(torch.empty(batch, in_channels, resolution, resolution, device="meta"))
    finally:
        for h in hooks:
            h.remove()

    found, unfused = [], []
    reasons = {r["name"]: r["reason"] for r in fusion_summary(model)}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Conv2d):
            continue
        unit = units.get(name)
        if unit is None:
            unfused.append({"name": name, "reason": reasons[name]})
            continue
        if name not in shapes:
            unfused.append({"name": name, "reason": "not reached by the forward pass"})
            continue
        n, c, h, w = shapes[name]
        found.append((unit, normalize_layer({
            "cin": c, "cout": mod.out_channels, "kernel": list(mod.kernel_size),
            "stride": list(mod.stride), "padding": list(mod.padding), "dilation": list(mod.dilation),
            "groups": mod.groups, "h": h, "w": w, "batch": n,
            "epilogue": unit.kernel_epilogue})))
    return found, unfused


def distinct_layers(model: nn.Module | str, batch: int = 256, resolution: int = 224,
                    in_channels: int = 3, training: bool = False) -> tuple[list[dict], list[dict]]:
    """(layers, unfused): one dict per distinct conv (shape + epilogue), in forward order, with
    the names of every conv of that kind; and {"name", "reason"} for convs left unfused.
    ``training``: also every distinct conv of a train() forward (epilogue "stats" or
    "pre+stats": plan.FusedUnit.train_kernel_epilogue)."""
    units, unfused = unit_layers(model, batch, resolution, in_channels)
    if training:
        units = units + [(u, dict(layer, epilogue=u.train_kernel_epilogue)) for u, layer in units]
    layers: dict[tuple, dict] = {}
    for unit, layer in units:
        k = _key(layer)
        if k in layers:
            layers[k]["names"].append(unit.conv)
            layers[k]["count"] += 1
        else:
            layers[k] = dict(layer, names=[unit.conv], count=1)
    return list(layers.values()), unfused
