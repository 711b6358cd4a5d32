"""convert() on ResNets that are not torchvision's: user-written blocks (with and without BN,
plain, pre-activation), timm models, and what must be left alone. Same state, same results,
a truthful summary, and the converted models still compile and export."""

import copy
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fast as rf
from resnet_fast.backends.torch_backend import TorchBackend

from . import any_resnets as ar
from .reference import close_or_zero, copies_of, randomize_bn, rel_err


def _timm(name):
    timm = pytest.importorskip("timm")
    return lambda: timm.create_model(name, pretrained=False, num_classes=10)


# name -> (factory, input shape)
MODELS = {
    "cifar_resnet18": (lambda: ar.cifar_resnet18(width=8), (2, 3, 16, 16)),
    "cifar_bottleneck": (lambda: ar.CifarResNet(ar.Bottleneck, (1, 1, 1, 1), width=8), (2, 3, 16, 16)),
    "no_bn_block": (lambda: ar.NoBNBlock(8), (2, 8, 9, 7)),
    "plain_block": (lambda: ar.plain_block(4, 8, stride=2), (2, 4, 9, 10)),
    "residual_function_block": (lambda: ar.ResidualFunctionBlock(8, 16, 2), (2, 8, 9, 9)),
    "preact_block_projection": (lambda: ar.PreActBlock(8, 16, 2), (2, 8, 9, 9)),
    "preact_block_identity": (lambda: ar.PreActBlock(8, 8), (2, 8, 9, 9)),
    "preact_shared_block": (lambda: ar.PreActSharedBlock(8), (2, 8, 9, 9)),
    "preact_resnet18": (lambda: ar.PreActResNet(width=8), (2, 3, 16, 16)),
}
TIMM = {
    "timm_resnet18": ("resnet18", (1, 3, 32, 32)),
    "timm_resnet50": ("resnet50", (1, 3, 64, 64)),
    "timm_resnetv2_50": ("resnetv2_50", (1, 3, 32, 32)),
}
ALL = list(MODELS) + list(TIMM)


def _factory(name):
    if name in TIMM:
        return _timm(TIMM[name][0]), TIMM[name][1]
    return MODELS[name]


def _pair(name, dtype=torch.float64, state=None):
    """(untouched model, converted copy, input shape); convert must not warn on these.
    ``state``: a dict that gets the copy's state_dict(keep_vars=True) from before convert."""
    make, shape = _factory(name)
    ref = randomize_bn(make()).to(dtype)
    ours = copy.deepcopy(ref)
    if state is not None:
        state.update(ours.state_dict(keep_vars=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rf.convert(ours, backend="torch") is ours  # in place
    return ref, ours, shape


class _CountOps(TorchDispatchMode):
    """Counts the calls of ops whose name holds ``part`` that run inside it."""

    def __init__(self, part: str):
        super().__init__()
        self.part = part
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.part in func.__name__:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _CountBatchNorm():
    return _CountOps("batch_norm")


# BatchNorms that must still run in a converted model's eval() forward: the final BN of the
# pre-activation ResNet (no conv after it) and the pre-activation whose output is also the
# shortcut; the one ahead of timm resnetv2's head likewise. Every other BN is folded.
UNFOLDED_BNS = {"preact_resnet18": 1, "preact_shared_block": 1, "timm_resnetv2_50": 1}


@pytest.mark.parametrize("name", ALL)
def test_eval_matches_and_state_is_shared(name):
    before = {}
    ref, ours, shape = _pair(name, state=before)
    after = ours.state_dict(keep_vars=True)
    assert list(after) == list(before) == list(ref.state_dict())  # same keys, same order
    assert all(after[k] is before[k] for k in before)  # the same tensors, not copies
    assert isinstance(ours, type(ref))

    ref.eval(), ours.eval()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        y0 = ref(x)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        with torch.no_grad(), _CountBatchNorm() as bn_ops:
            y = ours(inp)
        assert bn_ops.count == UNFOLDED_BNS.get(name, 0)
        assert rel_err(y, y0) < 1e-9


def test_convert_keeps_every_module_and_its_identity():
    ref, ours, _ = _pair("cifar_resnet18")
    names = [n for n, _ in ours.named_modules()]
    assert names == [n for n, _ in ref.named_modules()]
    before = dict(ours.named_modules())
    rf.convert(ours)  # converting again changes nothing
    assert all(m is before[n] for n, m in ours.named_modules())


# timm's resnet50 runs the code resnet18 does; timm models at 16x16 with a batch of 2 (BN
# needs more than one value per channel in train()).
@pytest.mark.parametrize("name", [n for n in ALL if n != "timm_resnet50"])
def test_train_matches(name):
    ref, ours, shape = _pair(name)
    if name in TIMM:
        # 64x64: at 16x16 with a batch of 2 the last stage's BNs normalize 2 values each, whose
        # variance rounding decides (the twins then differ at 1e-4 in float64)
        shape = (2, 3, 64, 64)
    ref.train(), ours.train()
    for _ in range(2):
        x = torch.randn(shape, dtype=torch.float64)
        y0, y = ref(x), ours(x)
        # train() runs resnet_fast's training ops (issue 17): torch's math to rounding
        assert rel_err(y, y0) < 1e-10
        g = torch.randn_like(y0)
        y0.backward(g), y.backward(g)
    for (n0, p0), (n1, p1) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n0 == n1 and close_or_zero(p1.grad, p0.grad, 1e-8), n0
    for (n0, b0), (n1, b1) in zip(ref.named_buffers(), ours.named_buffers()):
        assert n0 == n1 and close_or_zero(b1, b0, 1e-10), n0


def _kinds(model):
    return {r["name"]: r["fused"] for r in rf.fusion_summary(model)}


def test_fusion_summary_cifar():
    _, m, _ = _pair("cifar_resnet18")
    rows = rf.fusion_summary(m)
    assert [r["name"] for r in rows] == [n for n, c in m.named_modules() if isinstance(c, nn.Conv2d)]
    assert all(r["reason"] is None for r in rows)
    k = _kinds(m)
    assert k["conv1"] == ("bn", "relu")  # the stem in the model's own forward
    assert k["layer1.0.conv1"] == ("bias", "bn", "relu")
    assert k["layer1.0.conv2"] == ("bias", "bn", "relu", "residual")
    assert k["layer2.0.shortcut.0"] == ("bias", "bn")
    assert "layer4.1.conv2" in str(rows) and "bias+bn+relu+residual" in str(rows)


@pytest.mark.parametrize("name,expect", [
    ("cifar_bottleneck", {"layer1.0.conv2": ("bn", "relu"), "layer1.0.conv3": ("bn", "relu", "residual"),
                          "layer1.0.shortcut.0": ("bn",)}),
    ("no_bn_block", {"conv1": ("bias", "relu"), "conv2": ("bias", "relu", "residual")}),
    ("plain_block", {"0": ("bn", "relu"), "3": ("bn", "relu")}),
    ("residual_function_block", {"residual_function.0": ("bn", "relu"),
                                 "residual_function.3": ("bn", "relu", "residual"), "shortcut.0": ("bn",)}),
    # the projection shortcut reads the pre-activated input: both convs take the prologue
    ("preact_block_projection", {"conv1": ("bn", "relu", "pre_bn_relu"), "conv2": ("residual",),
                                 "shortcut.0": ("pre_bn_relu",)}),
    ("preact_block_identity", {"conv1": ("bn", "relu", "pre_bn_relu"), "conv2": ("residual",)}),
    # the pre-activated tensor is also the shortcut: computed once, conv1 reads it
    ("preact_shared_block", {"conv1": ("bn", "relu"), "conv2": ("residual",)}),
    ("preact_resnet18", {"conv1": (), "layer1.0.conv1": ("bn", "relu", "pre_bn_relu"),
                         "layer2.0.shortcut.0": ("pre_bn_relu",), "layer4.1.conv2": ("residual",)}),
    ("timm_resnet18", {"conv1": ("bn", "relu"), "layer1.0.conv2": ("bn", "relu", "residual"),
                       "layer2.0.downsample.0": ("bn",)}),
    ("timm_resnet50", {"layer1.0.conv3": ("bn", "relu", "residual"), "layer4.2.conv2": ("bn", "relu")}),
    ("timm_resnetv2_50", {"stem.conv": (), "stages.0.blocks.0.downsample.conv": ("pre_bn_relu",),
                          "stages.0.blocks.0.conv1": ("bn", "relu", "pre_bn_relu"),
                          "stages.1.blocks.1.conv2": ("bn", "relu"), "stages.3.blocks.2.conv3": ("residual",),
                          "head.fc": ()}),
])
def test_fusion_summary_rows(name, expect):
    _, m, _ = _pair(name)
    rows = {r["name"]: r for r in rf.fusion_summary(m)}
    for conv, kinds in expect.items():
        assert rows[conv]["fused"] == kinds, conv
        assert (rows[conv]["reason"] is None) == bool(kinds), rows[conv]
    unfused = [r for r in rows.values() if not r["fused"]]
    assert all(r["reason"].startswith("nothing to fuse") for r in unfused), unfused
    # every fused conv runs on the op; of the rest only a stem (3 input channels) does
    for r in rows.values():
        stem = m.get_submodule(r["name"]).in_channels < 8 if not r["fused"] else False
        assert r["runs_fused"] == (bool(r["fused"]) or stem), r


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bare_stem_runs_on_the_fused_op(backend, monkeypatch):
    """A stem conv with nothing after it to fuse (pre-activation ResNets) still runs as a unit:
    cuDNN's channels_last path is weak at 3 input channels. Same result, no BN op."""
    ok, why = rf.backends.available(backend, torch.device("cpu"), torch.float32)
    if not ok:
        pytest.skip(f"{backend} backend not available on cpu/float32: {why}")
    ref = randomize_bn(ar.PreActResNet(num_blocks=(1, 1, 1, 1), width=8)).eval()
    ours = rf.convert(copy.deepcopy(ref), backend=backend).eval()
    row = {r["name"]: r for r in rf.fusion_summary(ours)}["conv1"]
    assert row["fused"] == () and row["runs_fused"] and "stem" in row["reason"]
    calls = []
    real = rf.ops.run_checked_conv_bn_act
    monkeypatch.setattr(rf.ops, "run_checked_conv_bn_act", lambda *a: calls.append(a[2].shape[1]) or real(*a))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        y = ours(x)
    # the stem, two convs a block, 3 shortcuts; the Triton stem reads its image padded to 4 channels
    assert len(calls) == 1 + 4 * 2 + 3 and calls[0] == (4 if backend == "triton" else 3)
    with torch.no_grad():
        assert rel_err(y, ref(x)) < (1e-5 if backend == "torch" else 1e-4)


# ---- the fold caches never go stale -----------------------------------------------------
def _edit_weight(m):
    with torch.no_grad():
        m.layer2[0].conv1.weight.mul_(1.5)
        m.layer3[1].conv2.weight.add_(0.05)


def _edit_bn_buffers(m):
    with torch.no_grad():
        m.layer2[0].bn1.running_var.mul_(3.0)  # a prologue BN
        m.layer3[0].bn2.running_mean.add_(0.7)  # an epilogue BN


def _load_state_dict(m):
    m.load_state_dict(randomize_bn(ar.PreActResNet(width=8)).double().state_dict())


@pytest.mark.parametrize("edit", [_edit_weight, _edit_bn_buffers, _load_state_dict], ids=lambda f: f.__name__[1:])
def test_never_stale(edit):
    ref, ours, shape = _pair("preact_resnet18")
    ours.eval(), ref.eval()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        before = ours(x)
        edit(ours)
        ref.load_state_dict(ours.state_dict())
        after = ours(x)
        assert rel_err(after, ref(x)) < 1e-9
        assert rel_err(after, before) > 1e-6


def test_stem_never_stale_and_dtype_change():
    ref, ours, shape = _pair("cifar_resnet18")
    ours.eval(), ref.eval()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        ours(x)
        for m in (ours, ref):
            m.conv1.weight.add_(0.1)
            m.bn1.running_mean.add_(0.2)
        assert rel_err(ours(x), ref(x)) < 1e-9
    ours.float(), ref.float()
    with torch.no_grad():
        assert rel_err(ours(x.float()), ref(x.float())) < 1e-5


@pytest.mark.parametrize("name", ["cifar_resnet18", "preact_block_projection", "timm_resnetv2_50"])
def test_copy_and_pickle_round_trip(name):
    ref, ours, shape = _pair(name)
    ours.eval(), ref.eval()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        y = ours(x)
        for other in copies_of(ours):
            assert type(other) is type(ours)
            assert rf.fusion_summary(other) == rf.fusion_summary(ours)
            assert rel_err(other(x), y) < 1e-14


# ---- what is left alone ---------------------------------------------------------------
def test_unconvertible_modules_are_named_once_and_run_unchanged():
    ref = randomize_bn(ar.MixedNet()).double()
    ours = copy.deepcopy(ref)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rf.convert(ours, backend="torch")
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "data_dependent (its forward could not be traced" in msg
    assert "training_branch (its forward depends on self.training" in msg
    assert "group_norm.conv1 (it is followed by a GroupNorm" in msg
    assert "good" not in msg and "stem" not in msg
    assert type(ours.data_dependent) is ar.DataDependentBlock
    assert type(ours.training_branch) is ar.TrainingBranchBlock
    k = _kinds(ours)
    assert k["stem.0"] == ("bn", "relu") and k["good.conv2"] == ("bias", "bn", "relu", "residual")
    assert k["group_norm.conv2"] == ("bn", "relu", "residual") and k["group_norm.conv1"] == ()
    rows = {r["name"]: r for r in rf.fusion_summary(ours)}
    assert "could not be traced" in rows["data_dependent.conv"]["reason"]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for mode in ("eval", "train"):
        getattr(ref, mode)(), getattr(ours, mode)()
        with torch.no_grad():
            assert rel_err(ours(x), ref(x)) < 1e-9


class _InPlaceAliasing(nn.Module):
    """In-place ops on tensors read elsewhere: the ReLU overwrites what `kept` reads, and
    `x += ...` overwrites the caller's input. Neither may be fused away."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        kept = out
        out = self.relu(out)
        out = self.bn2(self.conv2(out))
        x += out
        return operator.add(x, kept)


def test_inplace_aliasing_is_kept():
    ref = randomize_bn(_InPlaceAliasing()).double().eval()
    ours = rf.convert(copy.deepcopy(ref), backend="torch").eval()
    k = _kinds(ours)
    assert k["conv1"] == ("bn",) and k["conv2"] == ("bn",)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    xr, xo = x.clone(), x.clone()
    with torch.no_grad():
        assert rel_err(ours(xo), ref(xr)) < 1e-9
    assert rel_err(xo, xr) < 1e-9 and rel_err(xo, x) > 1e-3  # the caller's input, overwritten alike


class _Flagged(nn.Module):
    """A flag and an optional tensor argument, like timm's heads: fx cannot trace them as is."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x, features_only: bool = False, mask=None):
        out = F.relu(self.bn(self.conv(x)))
        if mask is not None:
            out = out * mask
        if features_only:
            return out
        return out + x


def test_default_arguments_are_specialised():
    ref = randomize_bn(_Flagged()).double().eval()
    ours = rf.convert(copy.deepcopy(ref), backend="torch").eval()
    assert _kinds(ours)["conv"] == ("bn", "relu")
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    mask = torch.rand(2, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y0 = ref(x)
        with _CountBatchNorm() as bn_ops:
            assert rel_err(ours(x), y0) < 1e-9
            assert rel_err(ours(x, features_only=False), y0) < 1e-9
    assert bn_ops.count == 0  # the fused graph ran
    with torch.no_grad():  # other values: the original forward
        assert rel_err(ours(x, True), ref(x, True)) < 1e-9
        assert rel_err(ours(x, mask=mask), ref(x, mask=mask)) < 1e-9


def test_hooks_still_run():
    ref = randomize_bn(ar.BasicBlock(8, 8)).double().eval()
    seen = []
    ref.conv1.register_forward_hook(lambda m, i, o: seen.append("conv1"))
    ref.register_forward_hook(lambda m, i, o: seen.append("block"))
    with pytest.warns(UserWarning, match=r"conv1 \(it has hooks"):
        ours = rf.convert(ref, backend="torch")
    rows = {r["name"]: r for r in rf.fusion_summary(ours)}
    assert rows["conv1"]["fused"] == () and "hooks" in rows["conv1"]["reason"]
    # bn1 is no longer conv1's epilogue, so it becomes conv2's prologue
    assert rows["conv2"]["fused"] == ("bias", "bn", "relu", "residual", "pre_bn_relu")
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        ours(x)
    assert seen == ["conv1", "block"]
    ours.bn2.register_forward_hook(lambda m, i, o: seen.append("bn2"))  # on a fused BN, later
    with torch.no_grad():
        ours(x)
    assert seen[2:] == ["conv1", "bn2", "block"]


def test_set_backend_reaches_converted_graphs():
    _, m, _ = _pair("cifar_resnet18")
    graphs = [g for g in (rf.fx_fusion.fused_graph_of(x) for x in m.modules()) if g is not None]
    assert len(graphs) == 9 and all(g.backend == "torch" for g in graphs)
    rf.set_backend(m, "auto")
    assert all(g.backend is None for g in graphs)


def test_torchvision_stem_that_does_not_fold():
    from torchvision.models import resnet18
    ref = randomize_bn(resnet18(num_classes=10)).double()
    ref.bn1 = nn.GroupNorm(8, 64).double()
    ours = copy.deepcopy(ref)
    with pytest.warns(UserWarning, match=r"conv1 \(it is followed by a GroupNorm"):
        rf.convert(ours, backend="torch")
    assert _kinds(ours)["conv1"] == () and _kinds(ours)["layer1.0.conv2"] == ("bn", "relu", "residual")
    ref.eval(), ours.eval()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < 1e-9


def test_frozen_batchnorm_folds():
    # detection backbones: torchvision's ResNet with FrozenBatchNorm2d (fast path), and the
    # same BN in a user-written block (graph path)
    from torchvision.models import resnet18
    from torchvision.ops.misc import FrozenBatchNorm2d
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for make in (lambda: resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d),
                 lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), FrozenBatchNorm2d(8), nn.ReLU())):
        ref = randomize_bn(make()).double()
        with torch.no_grad():
            for m in ref.modules():
                if isinstance(m, FrozenBatchNorm2d):
                    m.running_var.uniform_(0.5, 2.0), m.running_mean.normal_(0, 0.5), m.bias.normal_(0, 0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = rf.convert(copy.deepcopy(ref), backend="torch")
        assert all("bn" in r["fused"] for r in rf.fusion_summary(ours)), rf.fusion_summary(ours)
        for mode in ("eval", "train"):
            getattr(ref, mode)(), getattr(ours, mode)()
            with torch.no_grad():
                assert rel_err(ours(x), ref(x)) < 1e-9


# ---- memory format: a fused op's NHWC output never leaks into code that did not expect it
class _ViewNet(nn.Module):
    def __init__(self, c=8, hw=4):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.block = ar.BasicBlock(c, c)
        self.fc = nn.Linear(c * hw * hw, 10)

    def forward(self, x):
        out = self.block(F.relu(self.bn(self.conv(x))))
        return self.fc(out.view(out.size(0), -1))  # .view needs the NCHW layout it was given


def test_nhwc_backend_keeps_callers_memory_format(monkeypatch):
    monkeypatch.setattr(TorchBackend, "requires_nhwc", True)  # behave like the GPU backends
    ref = randomize_bn(_ViewNet()).double().eval()
    ours = rf.convert(copy.deepcopy(ref), backend="torch").eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < 1e-9
        y = ours.block(x.new_empty(2, 8, 4, 4).normal_())
        assert y.is_contiguous()
        y = ours.block(torch.randn(2, 8, 4, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last))
        assert y.is_contiguous(memory_format=torch.channels_last)


# ---- torch.compile / torch.export ------------------------------------------------------
def _compile_models():
    from torchvision import models
    return {"torchvision_resnet18": lambda: rf.convert(randomize_bn(models.resnet18(num_classes=10)), backend="torch"),
                    "cifar_resnet18": lambda: rf.convert(randomize_bn(ar.cifar_resnet18()), backend="torch")}


@pytest.mark.parametrize("name", ["torchvision_resnet18", "cifar_resnet18"])
def test_compile_fullgraph_and_export(name):
    m = _compile_models()[name]().eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        y0 = m(x)  # eager first: backends are imported lazily, outside the compiled graph
        # aot_eager: dynamo's full-graph capture and AOTAutograd, without inductor's C++ build
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        assert rel_err(compiled(x), y0) < 1e-6
        ep = torch.export.export(m, (x,))
    assert not any("batch_norm" in str(n.target) for n in ep.graph.nodes)  # folded, not run
    assert rel_err(ep.module()(x), y0) < 1e-6


# ---- the Triton kernel's prologue, under the interpreter -------------------------------
def test_preact_block_on_triton_backend():
    ok, why = rf.backends.available("triton", torch.device("cpu"), torch.float32)
    if not ok:
        pytest.skip(f"triton backend not available on cpu/float32: {why}")
    ref = randomize_bn(ar.PreActBlock(8, 8)).eval()
    with torch.no_grad():
        # a large BN shift: relu(0 * s + t) != 0, so the padded border is only right when the
        # kernel pads after the prologue transform
        ref.bn1.bias.copy_(torch.linspace(-2.0, 4.0, 8))
    ours = rf.convert(copy.deepcopy(ref), backend="triton").eval()
    assert _kinds(ours)["conv1"] == ("bn", "relu", "pre_bn_relu")
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < 1e-4


# ---- residual joins no conv epilogue takes: the add_relu op ------------------------------
class _SEBlock(nn.Module):
    """A squeeze-and-excitation block: the gate multiplies conv2's output before the residual
    add, so the add cannot go into conv2's epilogue; relu(out + x) is a join of its own."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.fc = nn.Conv2d(c, c, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(out, 1)))
        out += x
        return self.relu(out)


class _JoinReadElsewhere(nn.Module):
    """`out += x` overwrites a tensor that is read again after the ReLU: the add must stay in
    place (an add_relu op would leave `kept` without the sum)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.bn(self.conv(x)) * 2.0
        kept = out
        out += x
        return torch.relu(out) + kept


def _count_add_relu(monkeypatch):
    calls = []
    real = rf.ops.add_relu

    def counting(a, b, **kw):
        calls.append(tuple(a.shape))
        return real(a, b, **kw)

    monkeypatch.setattr(rf.ops, "add_relu", counting)
    return calls


@pytest.mark.parametrize("make,joins", [
    (lambda: _SEBlock(), 1),
    (lambda: nn.Sequential(_SEBlock(), _SEBlock()), 2),
    (lambda: _JoinReadElsewhere(), 0),
    (lambda: pytest.importorskip("timm").create_model("resnet18", pretrained=False, num_classes=10,
                                                      drop_path_rate=0.2), 7),  # DropPath before the add
], ids=["se_block", "se_blocks", "join_read_elsewhere", "timm_resnet18_drop_path"])
def test_residual_joins_run_on_add_relu(make, joins, monkeypatch):
    ref = randomize_bn(make()).double().eval()
    ours = rf.convert(copy.deepcopy(ref), backend="torch").eval()
    calls = _count_add_relu(monkeypatch)
    c = next(m for m in ref.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.randn(2, c, 16, 16, dtype=torch.float64)
    xr, xo = x.clone(), x.clone()
    with torch.no_grad():
        assert rel_err(ours(xo), ref(xr)) < 1e-9
    assert len(calls) == joins
    assert rel_err(xo, xr) == 0  # the caller's input is left as the original leaves it
    ours.train(), ref.train()  # train(): the joins run on add_relu too, with its backward
    calls.clear()
    outs = []
    for m in (ours, ref):
        torch.manual_seed(0)  # DropPath draws the same paths for both
        outs.append(m(x))
    assert rel_err(*outs) < 1e-9 and len(calls) == joins


def test_residual_join_on_the_triton_kernel():
    ok, why = rf.backends.available("triton", torch.device("cpu"), torch.float32)
    if not ok:
        pytest.skip(f"triton backend not available on cpu/float32: {why}")
    ref = randomize_bn(_SEBlock()).eval()
    ours = rf.convert(copy.deepcopy(ref), backend="triton").eval()
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), _CountOps("add_relu") as seen:
        y = ours(x)
    assert seen.count == 1  # resnet_fast::add_relu_triton
    with torch.no_grad():
        assert rel_err(y, ref(x)) < 1e-5


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_timm_stem_pool_runs_on_the_pool_op(layout, monkeypatch):
    """The graph converter takes the nn.MaxPool2d that reads a fused stem alone: it runs on
    ops.max_pool2d (values only), fusion_summary says so, results and output layout as timm's;
    a hook on the pool runs the module itself."""
    ref = randomize_bn(_timm("resnet18")()).eval()
    ours = rf.convert(copy.deepcopy(ref), backend="torch")
    rows = {r["name"]: r for r in rf.fusion_summary(ours)}
    assert rows["conv1"]["pool"] == "maxpool" and all(r["pool"] is None for n, r in rows.items() if n != "conv1")
    calls = []
    real = rf.ops.max_pool2d
    monkeypatch.setattr(rf.ops, "max_pool2d", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x = torch.randn(2, 3, 32, 32)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y, r = ours(x), ref(x)
    # the torch backend computes NCHW for an NCHW caller: the pool op reads NHWC only
    assert calls == ([torch.Size([2, 64, 16, 16])] if layout == "nhwc" else []) and rel_err(y, r) < 1e-5
    fired = []
    ours.maxpool.register_forward_hook(lambda *a: fired.append(1))
    calls.clear()
    with torch.no_grad():
        assert rel_err(ours(x), r) < 1e-5
    assert fired == [1] and calls == []
