"""The fp8 conv of the op contract (resnet_fast.fp8_ops) and its Triton kernel, on the CPU.

The interpreter computes fp8 tl.dot exactly (e4m3 products are exact in fp32), so the kernel's
fp32 output equals the reference's to fp32 summation-order rounding; its e4m3 output may differ
from the reference's by one e4m3 step where the fp32 value sits on a rounding boundary. Inputs
are calibrated like real ones (scales from their amax), odd shapes, every epilogue variant;
saturation (values past ±448 clamp, never inf/NaN) and NaN propagation are checked apart.
"""

import pytest
import torch

from resnet_fast import backends, fp8
from resnet_fast.fp8 import E4M3
from resnet_fast.fp8_ops import conv_bn_act_fp8, conv_bn_act_fp8_reference

CL = torch.channels_last


def _interpreter():
    ok, why = backends.get("triton").fp8_support(torch.device("cpu"))
    if not ok:
        pytest.skip(why)


def _case(n, cin, h, w, cout, k, stride, pad, residual, fp8_residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).relu() * 3
    wt = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
    bias = torch.randn(cout, generator=g) * 0.5
    xs = torch.tensor([x.abs().max().item() / fp8.E4M3_MAX])
    ws = fp8.weight_scales(wt)
    xq = fp8.quantize(x, xs).contiguous(memory_format=CL)
    wq = fp8.quantize_weight(wt, ws).contiguous(memory_format=CL)
    ho = (h + 2 * pad - k) // stride + 1
    wo = (w + 2 * pad - k) // stride + 1
    res = rs = None
    if residual:
        r = torch.randn(n, cout, ho, wo, generator=g)
        if fp8_residual:
            rs = torch.tensor([r.abs().max().item() / fp8.E4M3_MAX])
            res = fp8.quantize(r, rs).contiguous(memory_format=CL)
        else:
            res = r.to(torch.bfloat16).contiguous(memory_format=CL)
    return xq, wq, bias, ws, xs, res, rs


SHAPES = [  # n, cin, h, w, cout, k, stride, pad
    (2, 32, 7, 5, 24, 3, 1, 1),
    (1, 48, 9, 9, 40, 1, 1, 0),
    (3, 32, 8, 6, 16, 3, 2, 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual", ["none", "fp8", "bf16"])
def test_kernel_matches_reference_fp32_out(shape, residual):
    _interpreter()
    n, cin, h, w, cout, k, stride, pad = shape
    xq, wq, bias, ws, xs, res, rs = _case(n, cin, h, w, cout, k, stride, pad, residual != "none", residual == "fp8")
    args = (xq, wq, bias, ws, xs, [stride] * 2, [pad] * 2, [1, 1], 1, res, rs, True, None, torch.float32)
    ref = conv_bn_act_fp8_reference(*args)
    out = conv_bn_act_fp8(*args[:9], residual=res, res_scale=rs, relu=True, out_dtype=torch.float32,
                          backend="triton")
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=CL)
    assert torch.isfinite(out).all()
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-6, err


@pytest.mark.parametrize("out_dtype", [torch.float32, E4M3])
def test_kernel_writes_every_output_element(out_dtype):
    """Outputs poisoned with NaN first: every element the kernel owns is written (odd sizes:
    7x5 pixels, 24 channels, neither a tile multiple)."""
    _interpreter()
    from resnet_fast.kernels import conv_bn_act as kernels
    xq, wq, bias, ws, xs, res, rs = _case(2, 32, 7, 5, 24, 3, 1, 1, True, True, seed=3)
    os_ = torch.tensor([0.05]) if out_dtype == E4M3 else None
    out = torch.full((2, 24, 7, 5), float("nan")).to(out_dtype).contiguous(memory_format=CL)
    y = kernels.conv_bn_act_fp8(xq, wq, bias, ws, xs, [1, 1], [1, 1], [1, 1], res, rs, True, os_,
                                torch.float32, out=out)
    assert y is out and not torch.isnan(y.float()).any()
    ref = conv_bn_act_fp8_reference(xq, wq, bias, ws, xs, [1, 1], [1, 1], [1, 1], 1, res, rs, True, os_,
                                    torch.float32).float()
    if out_dtype == torch.float32:
        assert ((y - ref).norm() / ref.norm()).item() < 1e-6
    else:
        assert (y.float() == ref).float().mean() > 0.97


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_kernel_fp8_out_within_one_step(shape):
    _interpreter()
    n, cin, h, w, cout, k, stride, pad = shape
    xq, wq, bias, ws, xs, res, rs = _case(n, cin, h, w, cout, k, stride, pad, True, True, seed=1)
    os_ = torch.tensor([0.02])
    args = (xq, wq, bias, ws, xs, [stride] * 2, [pad] * 2, [1, 1], 1, res, rs, True, os_, torch.bfloat16)
    ref = conv_bn_act_fp8_reference(*args)
    out = conv_bn_act_fp8(*args[:9], residual=res, res_scale=rs, relu=True, out_scale=os_, backend="triton")
    assert out.dtype == E4M3
    a, b = out.float(), ref.float()
    # same value, or neighbours in e4m3 (a rounding boundary): relative step 2^-3 at most
    close = (a == b) | ((a - b).abs() <= 0.125 * torch.maximum(a.abs(), b.abs()) + 2.0 ** -9)
    assert close.all()
    assert (a == b).float().mean() > 0.97


def test_saturation_and_nan():
    """A result past 448 * out_scale stores as ±448 (no inf in e4m3fn, and never the NaN a plain
    cast of an out-of-range value can give); a NaN input stays NaN in the output."""
    _interpreter()
    xq, wq, bias, ws, xs, _, _ = _case(1, 32, 5, 5, 16, 1, 1, 0, False, False, seed=2)
    tiny = torch.tensor([1e-4])  # everything overflows
    for backend in ("triton", "torch"):
        out = conv_bn_act_fp8(xq, wq, bias, ws, xs, relu=False, out_scale=tiny, backend=backend)
        v = out.float()
        assert not torch.isnan(v).any() and v.abs().max() == 448.0, backend
        assert ((v == 448) | (v == -448) | (v.abs() < 448)).all()
    x_nan = xq.clone()
    x_nan[0, 3, 2, 2] = float("nan")
    for backend in ("triton", "torch"):
        out = conv_bn_act_fp8(x_nan, wq, bias, ws, xs, relu=True, out_scale=torch.tensor([0.05]),
                              backend=backend).float()
        assert torch.isnan(out[0, :, 2, 2]).all(), backend
        assert not torch.isnan(out[0, :, 0, 0]).any(), backend


def test_argument_errors_are_clear():
    xq, wq, bias, ws, xs, _, _ = _case(1, 32, 5, 5, 16, 1, 1, 0, False, False)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        conv_bn_act_fp8(xq.float(), wq, bias, ws, xs)
    with pytest.raises(ValueError, match="w_scale"):
        conv_bn_act_fp8(xq, wq, bias, ws[:3], xs)
    with pytest.raises(ValueError, match="res_scale"):
        conv_bn_act_fp8(xq, wq, bias, ws, xs, residual=torch.zeros(1, 16, 5, 5, dtype=E4M3))


def test_opcheck():
    xq, wq, bias, ws, xs, res, rs = _case(1, 32, 5, 5, 16, 3, 1, 1, True, True)
    args = (xq, wq, bias, ws, xs, [1, 1], [1, 1], [1, 1], 1, res, rs, True, torch.tensor([0.05]), torch.bfloat16)
    ops = [torch.ops.resnet_fast.conv_bn_act_fp8_torch.default]
    if backends.get("triton").fp8_support(torch.device("cpu"))[0]:
        ops.append(torch.ops.resnet_fast.conv_bn_act_fp8_triton.default)
    for op in ops:
        # test_schema's mutation check multiplies the inputs, which torch does not implement for
        # float8 on the CPU (torch 2.14): the op's promise to leave its inputs alone is checked
        # here on their bits instead. No autograd formula: inference only.
        torch.library.opcheck(op, args, test_utils=("test_faketensor",))
        before = [t.view(torch.uint8).clone() if t.dtype == E4M3 else t.clone()
                  for t in args if isinstance(t, torch.Tensor)]
        op(*args)
        after = [t.view(torch.uint8) if t.dtype == E4M3 else t for t in args if isinstance(t, torch.Tensor)]
        assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_fp8_backend_choice():
    be = backends.fp8_backend("torch", torch.device("cpu"))
    assert be.name == "torch"
    assert backends.fp8_backend("auto", torch.device("cpu")).name in ("triton", "torch")


def test_observers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g)
    x[0] = 40.0  # one outlier
    for method in fp8.METHODS:
        o = fp8.Observer(method)
        o.update(x)
        t = o.threshold()
        assert 0 < t <= 40.0
        if method == "max":
            assert t == 40.0
    # MSE and percentile clip the outlier: a smaller error on the bulk
    err = {}
    for method in fp8.METHODS:
        o = fp8.Observer(method)
        o.update(x)
        err[method] = (fp8.fake_quantize(x, o.scale()) - x).square().mean().item()
    assert err["mse"] <= err["max"] * 1.0001
    with pytest.raises(ValueError, match="non-finite"):
        fp8.Observer().update(torch.tensor([1.0, float("inf")]))
    assert fp8.sqnr_db(x, x) == float("inf")
    assert fp8.sqnr_db(torch.full_like(x, float("nan")), x) == float("-inf")
