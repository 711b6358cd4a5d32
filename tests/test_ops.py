"""The op contract: reference math, argument checks, the shared fake, backend choice."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from resnet_fast import backends, ops
from resnet_fast.backends.base import Backend

from .reference import rel_err


def _args(n=2, cin=8, cout=12, h=9, w=7, k=3, dtype=torch.float64):
    x = torch.randn(n, cin, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(cout, cin, k, k, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    b = torch.randn(cout, dtype=acc)
    return x, wt, b


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_reference_matches_conv_then_affine(stride, padding, dilation, residual, relu):
    x, w, b = _args()
    y0 = F.conv2d(x, w, None, stride, padding, dilation) + b.view(1, -1, 1, 1)
    res = torch.randn_like(y0) if residual else None
    if residual:
        y0 = y0 + res
    if relu:
        y0 = torch.relu(y0)
    y = ops.conv_bn_act(x, w, b, stride, padding, dilation, 1, res, relu, backend="torch")
    assert rel_err(y, y0) < 1e-12


def test_reference_prologue_pads_after_transform():
    # relu(x*s + t) is not 0 where x is padding: the padded border must still contribute 0.
    x, w, b = _args(cin=4)
    s, t = torch.rand(4, dtype=torch.float64) + 0.5, torch.full((4,), 3.0, dtype=torch.float64)
    y = ops.conv_bn_act(x, w, b, 1, 1, 1, 1, None, False, s, t, backend="torch")
    xp = torch.relu(x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1))
    y0 = F.conv2d(xp, w, b.to(w.dtype), 1, 1)
    assert rel_err(y, y0) < 1e-12


def test_fake_gives_nhwc_output_shape():
    with FakeTensorMode():
        x = torch.empty(3, 16, 15, 17).contiguous(memory_format=torch.channels_last)
        y = ops.conv_bn_act_fake(x, torch.empty(32, 16, 3, 3), torch.empty(32), [2, 2], [1, 1], [1, 1], 1)
    assert tuple(y.shape) == (3, 32, 8, 9) and y.is_contiguous(memory_format=torch.channels_last)


def test_empty_batch_gives_empty_output():
    x, w, b = _args(n=0)
    y = ops.conv_bn_act(x, w, b, 1, 1, backend="torch")
    assert y.shape == (0, 12, 9, 7)


@pytest.mark.parametrize("case,exc,match", [
    ("rank", ValueError, "4-D"),
    ("int", TypeError, "floating-point"),
    ("channels", ValueError, "channels"),
    ("wdtype", TypeError, "weight dtype"),
    ("bias", ValueError, "bias must be"),
    ("residual", ValueError, "residual has shape"),
    ("pre", ValueError, "go together"),
    ("device", RuntimeError, "meta"),
    ("small", ValueError, "too small"),
])
def test_bad_arguments_raise_clearly(case, exc, match):
    x, w, b = _args()
    kw = {}
    if case == "rank":
        x = x[0]
    elif case == "int":
        x = x.to(torch.int32)
    elif case == "channels":
        x = torch.randn(2, 5, 9, 7, dtype=torch.float64)
    elif case == "wdtype":
        w = w.float()
    elif case == "bias":
        b = b[:3]
    elif case == "residual":
        kw["residual"] = torch.randn(2, 12, 3, 3, dtype=torch.float64)
    elif case == "pre":
        kw["pre_scale"] = torch.ones(8, dtype=torch.float64)
    elif case == "device":
        w = w.to("meta")
    elif case == "small":
        x = torch.randn(1, 8, 2, 2, dtype=torch.float64)
        kw["padding"] = 0
    kw.setdefault("padding", 1)
    with pytest.raises(exc, match=match):
        ops.conv_bn_act(x, w, b, backend="torch", **kw)


def test_add_relu_reference_and_inplace():
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    ref = torch.relu(a + b)
    assert torch.equal(ops.add_relu(a, b, backend="torch"), ref)
    a2 = a.clone()
    assert ops.add_relu_(a2, b, backend="torch") is a2 and torch.equal(a2, ref)
    with pytest.raises(ValueError, match="one shape"):
        ops.add_relu(a, b[:1])


def test_registry_choice_and_errors(monkeypatch):
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    assert backends.resolve("torch", x).name == "torch"
    # float64 has no kernel backend: auto lands on torch
    assert backends.resolve("auto", x).name == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve("nope", x)
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.default_name() == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.default_name()


def test_explicit_backend_that_cannot_run_raises():
    class Never(Backend):
        name = "never"

        def available(self, device, dtype):
            return False, "no such device here"

    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(RuntimeError, match="no such device here"):
        backends_resolve_with(Never(), x)


def backends_resolve_with(be, x):
    backends._instances["never"] = be
    backends._REGISTRY["never"] = "unused:Never"
    try:
        return backends.resolve("never", x)
    finally:
        backends._instances.pop("never")
        backends._REGISTRY.pop("never")


def test_explicit_backend_falls_back_to_the_first_that_takes_the_call(monkeypatch):
    """A named backend that cannot take one call (here: the prologue) hands that call to the
    first backend of AUTO_ORDER that can, not straight to the reference."""
    class NoPrologue(Backend):
        name = "noprologue"

        def available(self, device, dtype):
            return True, ""

        def supports(self, x, weight, groups, pre=False):
            return (False, "no prologue stage") if pre else (True, "")

    class Takes(Backend):
        name = "takes"

        def available(self, device, dtype):
            return True, ""

    for be in (NoPrologue(), Takes()):
        monkeypatch.setitem(backends._instances, be.name, be)
        monkeypatch.setitem(backends._REGISTRY, be.name, "unused:" + type(be).__name__)
    monkeypatch.setattr(backends, "AUTO_ORDER", ("noprologue", "takes", "torch"))
    x = torch.randn(1, 4, 5, 5)
    assert backends.resolve("noprologue", x).name == "noprologue"
    assert backends.resolve("noprologue", x, pre=True).name == "takes"
    monkeypatch.setattr(backends, "AUTO_ORDER", ("noprologue", "torch"))
    assert backends.resolve("noprologue", x, pre=True).name == "torch"


def test_public_functions_are_annotated():
    import inspect
    import pathlib

    import resnet_fast as rf
    for fn in (rf.convert, rf.fusion_summary, rf.set_backend, rf.ops.conv_bn_act, rf.ops.add_relu,
               rf.ops.add_relu_, rf.refresh, rf.verify_folds):
        sig = inspect.signature(fn)
        missing = [n for n, p in sig.parameters.items() if p.annotation is inspect.Parameter.empty]
        assert not missing and sig.return_annotation is not inspect.Signature.empty, (fn.__name__, missing)
    assert (pathlib.Path(rf.__file__).parent / "py.typed").exists()
