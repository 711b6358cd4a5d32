"""The training ops (resnet_fast.train_ops) and their Triton kernels, each against float64.

The kernels run under Triton's interpreter on CPU tensors (fp32 and fp16; bf16 tl.dot is garbage
there), at sizes off every block multiple; outputs and statistics buffers are poisoned with NaN
first, so a value a kernel never wrote fails. ``opcheck`` covers every op on the torch (float64)
and triton (fp32) backends, autograd registration included.
"""

import itertools

import pytest
import torch

import resnet_fast as rf
from resnet_fast import train_ops
from resnet_fast.backends import get

from .reference import rel_err

CL = torch.channels_last

triton_ok = rf.backends.available("triton", torch.device("cpu"), torch.float32)[0]
needs_triton = pytest.mark.skipif(not triton_ok, reason="the Triton kernels need TRITON_INTERPRET=1 on a CPU-only machine")
if triton_ok:
    from resnet_fast.kernels import batch_norm as bn_kernels
    from resnet_fast.kernels import conv_bn_act as conv_kernels
    from resnet_fast.kernels import scale_bias_act as sba_kernels

# (Cin, Cout, k, stride, padding, (N, H, W)): 1x1, strided, 3x3, the flat small-Cin path
CONVS = {
    "1x1": (20, 18, 1, 1, 0, (2, 7, 9)),
    "1x1_s2": (17, 12, 1, 2, 0, (3, 9, 8)),
    "3x3": (16, 20, 3, 1, 1, (2, 11, 13)),
    "3x3_s2": (18, 9, 3, 2, 1, (1, 13, 10)),
    "7x7_s2_stem": (3, 20, 7, 2, 3, (2, 13, 12)),
}


@pytest.fixture(autouse=True)
def _exact_fp32(exact_fp32):
    """Every test here in exact fp32 (see conftest.exact_fp32)."""


def nhwc(*shape, dtype=torch.float32, scale=1.0, offset=0.0):
    return (torch.randn(*shape) * scale + offset).to(dtype).contiguous(memory_format=CL)


def _stats64(y):
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    return mean, var


def _poisoned_partials(monkeypatch):
    _poison_outputs(monkeypatch)


@pytest.fixture
def poisoned(monkeypatch):
    _poison_outputs(monkeypatch)


def _poison_outputs(monkeypatch):
    """Every buffer the training launchers allocate starts as NaN: a value a kernel never wrote
    fails the comparison."""
    real_vectors, real_like = bn_kernels.new_vectors, sba_kernels.new_like
    monkeypatch.setattr(bn_kernels, "new_vectors", lambda shape, device: real_vectors(shape, device).fill_(float("nan")))
    monkeypatch.setattr(sba_kernels, "new_vectors", lambda shape, device: real_vectors(shape, device).fill_(float("nan")))
    monkeypatch.setattr(sba_kernels, "new_like", lambda t: real_like(t).fill_(float("nan")))


# ---- conv + statistics epilogue ----------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("pre", [False, True], ids=["", "pre"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_stats_kernel(name, dtype, pre, monkeypatch):
    _poisoned_partials(monkeypatch)
    cin, cout, k, s, p, (n, h, w) = CONVS[name]
    x = nhwc(n, cin, h, w, dtype=dtype, offset=0.3)
    wt = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype).contiguous(memory_format=CL)
    bias = torch.randn(cout)
    ps, pb = (torch.rand(cin) + 0.5, torch.randn(cin)) if pre else (None, None)
    ho, wo = rf.ops.conv_output_hw(h, w, k, k, [s] * 2, [p] * 2, [1, 1])
    out = torch.full((n, cout, ho, wo), float("nan"), dtype=dtype).contiguous(memory_format=CL)
    y, mean, var = conv_kernels.conv_stats(x, wt, bias, [s] * 2, [p] * 2, [1, 1], ps, pb, out=out)
    assert y is out
    x64 = x.double()
    if pre:
        x64 = torch.relu(x64 * ps.double().view(1, -1, 1, 1) + pb.double().view(1, -1, 1, 1)).to(dtype).double()
    y64 = torch.nn.functional.conv2d(x64, wt.double(), bias.double(), s, p)
    assert rel_err(y, y64) < (1e-5 if dtype == torch.float32 else 1e-2)
    # the statistics are those of y as stored (what the next op normalizes), in fp32
    m64, v64 = _stats64(y)
    assert rel_err(mean, m64) < 1e-5 and rel_err(var, v64) < 1e-5


@needs_triton
def test_statistics_do_not_cancel_at_a_large_mean(monkeypatch):
    """mean 1e3, std 1: raw sums of y and y^2 in fp32 would lose the variance entirely."""
    _poisoned_partials(monkeypatch)
    x = nhwc(3, 16, 9, 11, offset=0.0)
    wt = (torch.randn(12, 16, 3, 3) / 12).contiguous(memory_format=CL)
    bias = torch.full((12,), 1000.0)
    y, mean, var = conv_kernels.conv_stats(x, wt, bias, [1, 1], [1, 1], [1, 1])
    m64, v64 = _stats64(y)
    assert rel_err(mean, m64) < 1e-7 and rel_err(var, v64) < 1e-6
    naive = (y.float().square().mean((0, 2, 3)) - y.float().mean((0, 2, 3)).square())
    assert rel_err(naive, v64) > 1e-3  # what the test guards against is real at this offset
    x = nhwc(4, 10, 13, 7, offset=1000.0)
    m, v = bn_kernels.batch_stats(x)
    m64, v64 = _stats64(x)
    assert rel_err(m, m64) < 1e-7 and rel_err(v, v64) < 1e-6


@needs_triton
def test_statistics_are_deterministic():
    x = nhwc(3, 16, 9, 11)
    wt = nhwc(12, 16, 3, 3)
    runs = [conv_kernels.conv_stats(x, wt, torch.zeros(12), [1, 1], [1, 1], [1, 1]) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    g = nhwc(3, 16, 9, 11)
    s, t = torch.rand(16) + 0.5, torch.randn(16)
    mean, inv = x.mean((0, 2, 3)), torch.rand(16) + 0.5
    back = [sba_kernels.scale_bias_act_backward(g, x, s, t, None, None, None, True, False, (mean, inv))
            for _ in range(2)]
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(*back))


@needs_triton
def test_one_value_per_channel():
    """M = 1 (batch 1, 1x1 output): variance 0, as torch's var_mean gives (the modules raise
    torch's error before using it for running statistics)."""
    x = nhwc(1, 5, 1, 1)
    m, v = bn_kernels.batch_stats(x)
    assert torch.equal(m, x.flatten()) and torch.equal(v, torch.zeros(5))


# ---- finalize and the running statistics ----------------------------------------------------
@needs_triton
@pytest.mark.parametrize("affine", [True, False])
def test_finalize_kernel(affine, poisoned):
    mean, var = torch.randn(37), torch.rand(37) + 0.1
    gamma, beta = (torch.randn(37), torch.randn(37)) if affine else (None, None)
    s, t, inv = bn_kernels.finalize(mean, var, gamma, beta, 1e-5)
    s64, t64, inv64 = train_ops.bn_finalize_reference(mean.double(), var.double(),
                                                      None if gamma is None else gamma.double(),
                                                      None if beta is None else beta.double(), 1e-5)
    assert rel_err(s, s64) < 1e-6 and rel_err(t, t64) < 1e-6 and rel_err(inv, inv64) < 1e-6


@needs_triton
@pytest.mark.parametrize("cumulative", [False, True], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("buffers", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_running_update_kernel(cumulative, buffers):
    mean, var = torch.randn(37), torch.rand(37) + 0.1
    rm, rv = torch.randn(37).to(buffers), (torch.rand(37) + 0.5).to(buffers)
    nbt = torch.tensor(7)
    rm64, rv64 = rm.double(), rv.double()
    train_ops.bn_update_running_reference(rm64, rv64, nbt, mean.double(), var.double(), 0.1, cumulative, 50)
    bn_kernels.update_running(rm, rv, nbt, mean, var, 0.1, cumulative, 50)
    tol = 1e-6 if buffers == torch.float32 else 1e-3
    assert rel_err(rm, rm64) < tol and rel_err(rv, rv64) < tol


# ---- the BN apply / block tail, and its backward --------------------------------------------
SBA_CASES = list(itertools.product([False, True], ["none", "identity", "projection"], [False, True]))


def _sba_args(dtype, affine, res, relu, shape=(3, 37, 5, 7)):
    c = shape[1]
    y = nhwc(*shape, dtype=dtype, offset=0.2)
    args = dict(y=y, scale=torch.rand(c) + 0.5 if affine else None, shift=torch.randn(c) if affine else None,
                residual=nhwc(*shape, dtype=dtype) if res != "none" else None,
                res_scale=torch.rand(c) + 0.5 if res == "projection" else None,
                res_shift=torch.randn(c) if res == "projection" else None, relu=relu)
    return args


def _to64(args):
    return {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("affine,res,relu", SBA_CASES)
def test_scale_bias_act_kernel(dtype, affine, res, relu, poisoned):
    args = _sba_args(dtype, affine, res, relu)
    out = sba_kernels.scale_bias_act(**args)
    ref = train_ops.scale_bias_act_reference(**_to64(args))
    assert out.is_contiguous(memory_format=CL) and out.dtype == dtype
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-3)


@needs_triton
@pytest.mark.parametrize("stats", ["none", "y", "res", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("affine,res,relu", [c for c in SBA_CASES if c[0] or c[1] != "projection"])
def test_scale_bias_act_backward_kernel(dtype, affine, res, relu, stats, poisoned):
    if stats in ("y", "both") and not affine or stats in ("res", "both") and res != "projection":
        pytest.skip("batch statistics come with their BN's scale and shift")
    args = _sba_args(dtype, affine, res, relu)
    y, r = args["y"], args["residual"]
    y_stats = (y.float().mean((0, 2, 3)), torch.rand(37) + 0.5) if stats in ("y", "both") else None
    r_stats = (r.float().mean((0, 2, 3)), torch.rand(37) + 0.5) if stats in ("res", "both") else None
    g = nhwc(*y.shape, dtype=dtype)
    got = sba_kernels.scale_bias_act_backward(g, *[args[k] for k in ("y", "scale", "shift", "residual", "res_scale",
                                                                      "res_shift", "relu")],
                                              res != "none", y_stats, r_stats)
    a64 = _to64(args)
    flat = lambda st: (None, None) if st is None else (st[0].double(), st[1].double())  # noqa: E731
    want = train_ops.scale_bias_act_backward_reference(
        g.double(), *[a64[k] for k in ("y", "scale", "shift", "residual", "res_scale", "res_shift", "relu")],
        res != "none", *flat(y_stats), *flat(r_stats))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(("dy", "dres", "sum_g", "sum_gy", "sum_gr"), got, want):
        if a is None:
            assert b.numel() == 0, name
        else:
            assert rel_err(a, b) < tol, name


# ---- every op: opcheck (schema, fake, autograd registration), both backends ------------------
def _op_cases(backend):
    dt = torch.float64 if backend == "torch" else torch.float32
    t = get(backend).training_ops(torch.device("cpu"), dt)

    def x(*shape):
        return torch.randn(*shape, dtype=dt).contiguous(memory_format=CL).requires_grad_()

    def v(c, positive=False):
        return ((torch.rand(c, dtype=dt) + 0.5) if positive else torch.randn(c, dtype=dt)).requires_grad_()

    inp = x(2, 5, 6, 7)
    w = torch.randn(6, 5, 3, 3, dtype=dt).contiguous(memory_format=CL).requires_grad_()
    stats = (inp.detach().mean((0, 2, 3)), torch.rand(5, dtype=dt) + 0.5)
    res = x(2, 5, 6, 7)
    return t, {
        "conv_stats": (t.conv_stats, (inp, w, v(6), [1, 1], [1, 1], [1, 1], 1, v(5, True), v(5))),
        "conv_stats_prologue_stats": (t.conv_stats, (inp, w, None, [2, 2], [1, 1], [1, 1], 1, v(5, True), v(5),
                                                     *stats)),
        "batch_stats": (t.batch_stats, (inp,)),
        "bn_finalize": (t.bn_finalize, (v(5), v(5, True), v(5), v(5), 1e-5)),
        "bn_update_running": (t.bn_update_running, (torch.zeros(5, dtype=dt), torch.ones(5, dtype=dt), torch.tensor(2),
                                                    torch.randn(5, dtype=dt), torch.rand(5, dtype=dt), 0.1, True, 84)),
        "scale_bias_act": (t.scale_bias_act, (inp, v(5, True), v(5), res, v(5, True), v(5), True)),
        "scale_bias_act_stats": (t.scale_bias_act, (inp, v(5, True), v(5), res, v(5, True), v(5), True,
                                                    *stats, *stats)),
        "scale_bias_act_backward": (t.scale_bias_act_backward,
                                    (res.detach(), inp.detach(), v(5).detach(), v(5).detach(), None, None, None,
                                     True, False)),
    }


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_opcheck_every_training_op(backend):
    _, cases = _op_cases(backend)
    for name, (op, args) in cases.items():
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_training_op_gradients_match_batch_norm(backend):
    """bn_finalize + scale_bias_act with the statistics (the dataflow of one BN+ReLU) give
    F.batch_norm's gradients of the input, gamma and beta."""
    dt = torch.float64 if backend == "torch" else torch.float32
    t = get(backend).training_ops(torch.device("cpu"), dt)
    x = torch.randn(3, 6, 5, 7, dtype=dt).contiguous(memory_format=CL) * 2 + 1
    gamma, beta = torch.rand(6, dtype=dt) + 0.5, torch.randn(6, dtype=dt)
    g = torch.randn_like(x)
    grads = []
    for fused in (False, True):
        xx, gg, bb = (a.detach().clone().requires_grad_() for a in (x, gamma, beta))
        if fused:
            mean, var = t.batch_stats(xx)
            mean, var = mean.detach(), var.detach()
            s, sh, inv = t.bn_finalize(mean, var, gg, bb, 1e-5)
            out = t.scale_bias_act(xx, s, sh, None, None, None, True, mean, inv)
        else:
            out = torch.relu(torch.nn.functional.batch_norm(xx.double(), None, None, gg.double(), bb.double(),
                                                            True, 0.1, 1e-5))
        out.backward(g.to(out.dtype))
        grads.append((out, xx.grad, gg.grad, bb.grad))
    tol = 1e-10 if dt == torch.float64 else 1e-5
    for a, b in zip(grads[1], grads[0]):
        assert rel_err(a, b) < tol


def test_triton_backend_imports_where_the_interpreter_is_on():
    """Every Triton test skips when the backend is unavailable; under the interpreter (the CPU
    suite) it must be available, or a broken kernel module would pass the suite as skips."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU run: tests/gpu covers the compiled kernels")
    pytest.importorskip("triton")
    ok, why = rf.backends.available("triton", torch.device("cpu"), torch.float32)
    assert ok, why
