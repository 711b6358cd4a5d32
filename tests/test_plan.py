"""One fusion plan: the converter's units are what fusion_summary, the benchmark's per-layer
list and the kernel report describe, for torchvision and graph-converted models alike."""

import copy
import warnings

import pytest
import torchvision
from torch import nn

import resnet_fast as rf
from benchmarks import layers as bench_layers
from resnet_fast import plan
from resnet_fast.kernel_report.layers import distinct_layers

from . import any_resnets as ar


def _model(name):
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        return timm.create_model(name[5:], pretrained=False)
    return getattr(torchvision.models, name)()


def _converted(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rf.convert(copy.deepcopy(model).to("meta"))


@pytest.mark.parametrize("name", ["resnet50", "timm:resnet50", "timm:resnetv2_50"])
def test_every_consumer_reads_the_converters_units(name):
    model = _model(name)
    units = plan.units(_converted(model))
    assert units, "the converter found nothing to fuse"
    by_conv = {u.conv: u for u in units}

    # fusion_summary
    rows = rf.fusion_summary(_converted(model))
    assert {r["name"] for r in rows if r["runs_fused"]} == set(by_conv)
    assert all(r["fused"] == by_conv[r["name"]].kinds for r in rows if r["runs_fused"])

    # the benchmark's per-layer list: every unit once, with its epilogue and prologue
    convs = bench_layers.distinct_convs(model, 64)
    listed = [(n, c.epilogue, c.pre) for c in convs for n in c.names]
    assert sorted(listed) == sorted((u.conv, u.epilogue, u.pre_bn is not None) for u in units)

    # the kernel report's layer list: the same units, with the kernel variant's epilogue
    layers, unfused = distinct_layers(name, batch=2, resolution=64)
    listed = [(n, layer["epilogue"]) for layer in layers for n in layer["names"]]
    assert sorted(listed) == sorted((u.conv, u.kernel_epilogue) for u in units)
    convs_in_model = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted([u["name"] for u in unfused] + [n for n, _ in listed]) == sorted(convs_in_model)


def test_units_of_each_converter_path():
    # torchvision fast path: blocks and the stem describe their own units
    m = rf.convert(torchvision.models.resnet18())
    units = {u.conv: u for u in plan.units(m)}
    assert units["conv1"] == plan.FusedUnit("conv1", "bn1", relu=True, pool="maxpool")  # the NHWC pool after it
    assert units["layer2.0.conv2"] == plan.FusedUnit("layer2.0.conv2", "layer2.0.bn2", relu=True, residual=True,
                                                     train_apply="tail", train_pre=True)
    assert units["layer2.0.downsample.0"] == plan.FusedUnit("layer2.0.downsample.0", "layer2.0.downsample.1",
                                                            train_apply="tail")
    assert units["layer2.0.conv1"].train_apply == "prologue"  # the block chains its BNs in train()
    # graph converter: a pre-activation block's prologue, a biased conv
    m = rf.convert(ar.PreActBlock(8, 16, 2))
    by = {u.conv: u for u in plan.units(m)}
    assert by["conv1"].pre_bn == "bn1" and by["conv1"].kernel_epilogue == "pre+relu"
    assert by["shortcut.0"].kernel_epilogue == "pre"
    m = rf.convert(ar.cifar_resnet18(width=8))
    u = next(u for u in plan.units(m) if u.conv == "layer1.0.conv1")
    assert u.bias and u.kinds == ("bias", "bn", "relu")
    # a standalone unit
    unit = rf.ConvBNAct(nn.Conv2d(4, 8, 3, bias=False), None, relu=False)
    assert plan.units(unit) == [plan.FusedUnit("conv")]
    assert rf.fusion_summary(unit)[0]["runs_fused"]


def test_unit_names_qualify_and_order():
    u = plan.FusedUnit("conv2", "bn2", "bn1", relu=True)
    assert u.within("layer1.0") == plan.FusedUnit("layer1.0.conv2", "layer1.0.bn2", "layer1.0.bn1", relu=True)
    assert u.within("") is u
    assert u.modules() == ("conv2", "bn2", "bn1")
    assert [x.epilogue for x in (plan.FusedUnit("c"), plan.FusedUnit("c", residual=True),
                                 plan.FusedUnit("c", relu=True, residual=True))] == ["none", "residual", "residual+relu"]
    m = rf.convert(torchvision.models.resnet18())
    order = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert [x.conv for x in plan.units(m)] == order
