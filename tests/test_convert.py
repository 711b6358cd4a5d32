"""convert() on whole torchvision ResNets: same state, same results, a truthful summary."""

import copy

import pytest
import torch
from torch import nn
from torchvision import models

import resnet_fast as rf

from .reference import copies_of, randomize_bn, rel_err, run_python

MODELS = ["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2"]


def _pair(name, dtype=torch.float64):
    ref = randomize_bn(getattr(models, name)(num_classes=10)).to(dtype)
    return ref, rf.convert(copy.deepcopy(ref), backend="torch")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_eval_matches_untouched_model(name, channels_last):
    ref, ours = _pair(name)
    ref.eval(), ours.eval()
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < 1e-12


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_state_dict_unchanged_and_shared(name):
    ref = randomize_bn(getattr(models, name)())
    before = ref.state_dict(keep_vars=True)
    ours = rf.convert(ref)
    assert ours is ref  # in place
    after = ours.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)
    assert isinstance(ours, models.ResNet)
    # and a converted model's state loads into a plain one
    plain = getattr(models, name)()
    plain.load_state_dict(ours.state_dict())


def test_train_matches_untouched_model():
    ref, ours = _pair("resnet18")
    ref.train(), ours.train()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y0, y = ref(x), ours(x)
    assert rel_err(y, y0) < 1e-12
    y0.square().sum().backward(), y.square().sum().backward()
    for (n, p0), (_, p1) in zip(ref.named_parameters(), ours.named_parameters()):
        assert rel_err(p1.grad, p0.grad) < 1e-10, n
    for (n, b0), (_, b1) in zip(ref.named_buffers(), ours.named_buffers()):
        # the fused ops update the running statistics with their own (equal to rounding) math
        assert rel_err(b1, b0) < 1e-12, n


def test_whole_model_never_stale():
    ref, ours = _pair("resnet18")
    ref.eval(), ours.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours(x)
        other = randomize_bn(models.resnet18(num_classes=10)).double().state_dict()
        ours.load_state_dict(other), ref.load_state_dict(other)
        assert rel_err(ours(x), ref(x)) < 1e-12
        ours.layer2[0].bn1.running_var.mul_(2), ref.layer2[0].bn1.running_var.mul_(2)
        ours.conv1.weight.add_(0.1), ref.conv1.weight.add_(0.1)
        assert rel_err(ours(x), ref(x)) < 1e-12
    ours.float(), ref.float()
    with torch.no_grad():
        assert rel_err(ours(x.float()), ref(x.float())) < 1e-5


def test_copy_and_pickle_round_trip():
    ref, ours = _pair("resnet18")
    ours.eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        y = ours(x)
        for other in copies_of(ours):
            assert rel_err(other(x), y) < 1e-14


def test_unconvertible_block_is_named_and_left_alone():
    ref = randomize_bn(models.resnet18(num_classes=10)).double()
    ref.layer3[1].bn1 = nn.GroupNorm(4, 256).double()
    ours = copy.deepcopy(ref)
    with pytest.warns(UserWarning, match=r"layer3\.1 \(bn1 is a GroupNorm"):
        rf.convert(ours, backend="torch")
    assert type(ours.layer3[1]) is models.resnet.BasicBlock
    ref.eval(), ours.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < 1e-12
    rows = {r["name"]: r for r in rf.fusion_summary(ours)}
    assert rows["layer3.1.conv1"]["fused"] == () and rows["layer3.1.conv1"]["reason"]


def test_fusion_summary_rows():
    m = rf.convert(models.resnet50())
    rows = rf.fusion_summary(m)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert [r["name"] for r in rows] == convs
    by = {r["name"]: r for r in rows}
    assert by["conv1"]["fused"] == ("bn", "relu")
    assert by["layer1.0.conv1"]["fused"] == ("bn", "relu")
    assert by["layer1.0.conv3"]["fused"] == ("bn", "relu", "residual")
    assert by["layer1.0.downsample.0"]["fused"] == ("bn",)
    assert all(r["reason"] is None for r in rows)
    text = str(rows)
    assert "layer4.2.conv3" in text and "bn+relu+residual" in text


def test_set_backend_and_env(monkeypatch):
    m = rf.convert(models.resnet18(), backend="torch")
    assert m.layer1[0].backend == "torch"
    rf.set_backend(m, "auto")
    assert m.layer1[0].backend is None and m.backend is None
    with pytest.raises(ValueError, match="unknown backend"):
        rf.set_backend(m, "tpu")


def test_first_call_compiled_fullgraph_in_a_fresh_process():
    # The first forward of a converted model may be the compiled one: nothing on that path
    # may import lazily (dynamo breaks the graph on importlib), so run it in a new interpreter.
    run_python(
        "import torch, torchvision, resnet_fast\n"
        "m = resnet_fast.convert(torchvision.models.resnet18(num_classes=10).eval(), backend='torch')\n"
        "x = torch.randn(1, 3, 32, 32)\n"
        "with torch.no_grad():\n"
        "    y = torch.compile(m, fullgraph=True, backend='aot_eager')(x)\n"
        "    assert torch.allclose(y, m(x), rtol=1e-4, atol=1e-5)\n"
    )
