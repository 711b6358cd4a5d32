"""Drop-in blocks against torchvision's: eval, train, state_dict, never-stale folding, bad input."""

import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv

import resnet_fast as rf

from .reference import randomize_bn, rel_err

# (block, inplanes, planes, stride, downsample, groups, base_width, dilation)
CASES = [
    ("basic", 16, 16, 1, False, 1, 64, 1),
    ("basic", 8, 16, 2, True, 1, 64, 1),
    ("bottleneck", 64, 16, 1, False, 1, 64, 1),
    ("bottleneck", 32, 16, 2, True, 1, 64, 1),
    ("bottleneck", 32, 16, 1, True, 4, 16, 1),   # ResNeXt: groups and base_width
    ("bottleneck", 32, 16, 1, True, 1, 128, 1),  # wide ResNet
    ("bottleneck", 64, 16, 1, False, 1, 64, 2),  # dilation
]
IDS = [f"{c[0]}-s{c[3]}-ds{int(c[4])}-g{c[5]}-w{c[6]}-d{c[7]}" for c in CASES]


def make_pair(kind, inplanes, planes, stride, ds, groups, base_width, dilation, dtype=torch.float64):
    """A torchvision block with random BN statistics and our block constructed with the same
    arguments and loaded from its state_dict."""
    tv_cls, rf_cls = (tv.BasicBlock, rf.BasicBlock) if kind == "basic" else (tv.Bottleneck, rf.Bottleneck)
    exp = tv_cls.expansion

    def downsample():
        if not ds:
            return None
        return nn.Sequential(tv.conv1x1(inplanes, planes * exp, stride), nn.BatchNorm2d(planes * exp))

    ref = tv_cls(inplanes, planes, stride, downsample(), groups, base_width, dilation)
    randomize_bn(ref)
    ours = rf_cls(inplanes, planes, stride, downsample(), groups, base_width, dilation)
    ours.load_state_dict(ref.state_dict())
    return ref.to(dtype), ours.to(dtype)


def _input(inplanes, dtype, channels_last, n=2, hw=9):
    x = torch.randn(n, inplanes, hw, hw + 2, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_eval_matches_torchvision(case, dtype, channels_last):
    ref, ours = make_pair(*case, dtype=dtype)
    ref.eval(), ours.eval()
    x = _input(case[1], dtype, channels_last)
    with torch.no_grad():
        y, y0 = ours(x), ref(x)
    assert y.shape == y0.shape
    assert rel_err(y, y0) < TOL[dtype]
    # output in the input's memory format
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_train_matches_torchvision(case, channels_last):
    ref, ours = make_pair(*case)
    for m in (ref, ours):
        m.train()
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = None  # cumulative average: exercises num_batches_tracked
    for step in range(2):
        x = _input(case[1], torch.float64, channels_last)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        y0, y = ref(xr), ours(xo)
        assert rel_err(y, y0) < 1e-12
        g = torch.randn_like(y0)
        y0.backward(g), y.backward(g)
        assert rel_err(xo.grad, xr.grad) < 1e-12
    for (n0, p0), (n1, p1) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n0 == n1 and rel_err(p1.grad, p0.grad) < 1e-12, n0
    for (n0, b0), (n1, b1) in zip(ref.named_buffers(), ours.named_buffers()):
        assert n0 == n1 and torch.allclose(b0.double(), b1.double(), rtol=1e-12, atol=0), n0


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_state_dict_names_both_ways(kind):
    ref, ours = make_pair(kind, 16, 16, 2, True, 1, 64, 1)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    back = type(ref)(16, 16, 2, copy.deepcopy(ref.downsample))
    back.load_state_dict(ours.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.to(back.state_dict()[k].dtype))


def test_from_torchvision_shares_tensors():
    ref = randomize_bn(tv.Bottleneck(32, 16, 2, nn.Sequential(tv.conv1x1(32, 64, 2), nn.BatchNorm2d(64))))
    ours = rf.Bottleneck.from_torchvision(ref)
    for (k, a), (k2, b) in zip(ref.state_dict(keep_vars=True).items(), ours.state_dict(keep_vars=True).items()):
        assert k == k2 and a is b
    ref.eval(), ours.eval()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < 1e-5


# ---- the fold cache can never go stale -----------------------------------------------
def _edit_weight(m, opt):
    with torch.no_grad():
        m.conv2.weight.mul_(1.5)


def _optimizer_step(m, opt):
    m.train()
    m(torch.randn(2, 16, 8, 8, dtype=torch.float64)).square().mean().backward()
    opt.step()
    m.eval()


def _bn_buffers(m, opt):
    with torch.no_grad():
        m.bn1.running_var.mul_(3.0)
        m.bn2.running_mean.add_(0.7)


def _bn_eps(m, opt):
    m.bn2.eps = 0.5


def _load_state_dict(m, opt):
    other = randomize_bn(tv.BasicBlock(16, 16)).double()
    m.load_state_dict(other.state_dict())


def _new_parameter(m, opt):
    m.conv1.weight = nn.Parameter(torch.randn_like(m.conv1.weight))


def _data_swap(m, opt):
    m.conv1.weight.data = torch.randn_like(m.conv1.weight)


def _dtype_round_trip(m, opt):
    m.float()
    with torch.no_grad():
        m(torch.randn(1, 16, 8, 8))  # fills the cache in float32
        m.conv1.weight.add_(0.25)
    m.double()


@pytest.mark.parametrize("edit", [_edit_weight, _optimizer_step, _bn_buffers, _bn_eps, _load_state_dict,
                                  _new_parameter, _data_swap, _dtype_round_trip],
                         ids=lambda f: f.__name__.strip("_"))
def test_fold_cache_never_stale(edit):
    ref, ours = make_pair("basic", 16, 16, 1, False, 1, 64, 1)
    ours.eval()
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        before = ours(x)
    edit(ours, opt)
    ours.eval()
    ref.load_state_dict(ours.state_dict())
    for a, b in zip(ref.modules(), ours.modules()):
        if isinstance(a, nn.BatchNorm2d):
            a.eps = b.eps  # not part of the state_dict
    ref.eval()
    with torch.no_grad():
        after, expect = ours(x), ref(x)
    assert rel_err(after, expect) < 1e-12
    assert rel_err(after, before) > 1e-6  # the edit really changed the function


def test_eval_with_autograd_runs_exact_math():
    ref, ours = make_pair("bottleneck", 32, 16, 2, True, 1, 64, 1)
    ref.eval(), ours.eval()
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    ours(x).sum().backward(), ref(x).sum().backward()
    assert rel_err(ours.conv1.weight.grad, ref.conv1.weight.grad) < 1e-12


# ---- bad input ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", ["rank", "channels", "int", "device"])
def test_bad_input_raises_like_torchvision(mode, case):
    ref, ours = make_pair("basic", 16, 16, 1, False, 1, 64, 1, dtype=torch.float32)
    x = torch.randn(2, 16, 8, 8)
    if case == "rank":
        x = x[0]
    elif case == "channels":
        x = torch.randn(2, 15, 8, 8)
    elif case == "int":
        x = x.to(torch.int64)
    elif case == "device":
        x = x.to("meta")
    for m in (ref, ours):
        getattr(m, mode)()
    with pytest.raises(Exception) as e_ref, torch.no_grad():
        ref(x)
    # the same error type, or a clearer ValueError/TypeError naming the problem
    with pytest.raises((type(e_ref.value), ValueError, TypeError)) as e_ours, torch.no_grad():
        ours(x)
    assert {"rank": "4-D", "channels": "channels", "int": "floating", "device": "meta"}[case] in str(e_ours.value) \
        or type(e_ours.value) is type(e_ref.value)


def test_empty_batch():
    ref, ours = make_pair("bottleneck", 32, 16, 2, True, 1, 64, 1)
    ref.eval(), ours.eval()
    x = torch.randn(0, 32, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert ours(x).shape == ref(x).shape == (0, 64, 4, 4)


def test_conv_bn_act_unit():
    conv, bn = nn.Conv2d(8, 12, 3, padding=1, bias=True), randomize_bn(nn.BatchNorm2d(12))
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).double().eval()
    unit = rf.ConvBNAct(conv, bn, relu=True).double().eval()
    assert [k.split(".", 1)[1] for k in unit.state_dict()] == [k.split(".", 1)[1] for k in ref.state_dict()]
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(unit(x), ref(x)) < 1e-12
    res = torch.randn(2, 12, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(unit(x, res), torch.relu(ref[1](ref[0](x)) + res)) < 1e-12
