"""The cuda backend on a real GPU: correctness of every kernel configuration against a float64
reference, argument errors, op registration (opcheck), CUDA-graph capture, add_relu.

Self-contained: the first test builds the extension (a few minutes cold); every other test reuses
it. If the sm_90a (Hopper) kernels fail to compile, test_build_report fails with the compiler
error while the remaining tests run on the CUTLASS 2.x kernels.
"""

from __future__ import annotations

import math

import pytest
import torch

from resnet_fast import backends, ops
from resnet_fast.backends import cuda_backend

from ..conv_cases import RESNET50_CONVS as ALL_RESNET50_CONVS
from ..reference import rel_err  # ‖y − ref‖ / ‖ref‖; NaN or inf never passes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none found)")

DTYPES = (torch.bfloat16, torch.float16)
CL = torch.channels_last


@pytest.fixture(scope="module")
def built():
    try:
        info = cuda_backend.ensure_loaded()
    except cuda_backend.ToolchainError as e:
        pytest.skip(f"cannot build the CUDA extension: {e}")
    return info


@pytest.fixture(scope="module")
def cuda_ops(built):
    return ops.define_backend_ops("cuda")


@pytest.fixture(autouse=True)
def _auto_config(request):
    yield
    if "built" in request.fixturenames or "cuda_ops" in request.fixturenames:
        cuda_backend.force_conv_config("")


def test_build_report(built):
    print(f"\ncuda extension: {built}")
    print("configs:", cuda_backend.conv_configs())
    if torch.cuda.get_device_capability() == (9, 0):
        assert built["sm90_error"] is None, f"the sm_90a kernels did not build:\n{built['sm90_error']}"
        assert any(c.startswith("sm90") for c in cuda_backend.conv_configs())


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------
# ResNet-50's distinct convs but the 7x7 stem, whose 3 input channels the CUTLASS kernels do not
# take (it falls back to torch, tested in test_backend_fallbacks).
RESNET50_CONVS = [c for c in ALL_RESNET50_CONVS if c[0] % 8 == 0]

# Odd shapes: channels multiples of 8 but not of any tile, spatial sizes multiples of nothing,
# asymmetric stride/padding/dilation, batch 1 and 3, a 1x1 output.
# (N, Cin, Cout, H, W, kh, kw, stride, padding, dilation)
ODD_CONVS = [
    (3, 24, 40, 13, 11, 3, 3, (1, 1), (1, 1), (1, 1)),
    (1, 8, 8, 1, 1, 1, 1, (1, 1), (0, 0), (1, 1)),
    (2, 72, 136, 17, 17, 1, 1, (2, 2), (0, 0), (1, 1)),
    (2, 64, 64, 15, 15, 3, 3, (1, 1), (2, 2), (2, 2)),
    (1, 16, 24, 9, 23, 3, 3, (1, 2), (1, 0), (2, 1)),
    (2, 32, 48, 20, 20, 5, 5, (2, 2), (2, 2), (1, 1)),
    (5, 120, 264, 7, 7, 3, 3, (1, 1), (1, 1), (1, 1)),
]


def make_problem(n, cin, cout, h, w, kh, kw, stride, padding, dilation, dtype, residual, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    x = torch.randn(n, cin, h, w, device=dev, generator=g).to(dtype).contiguous(memory_format=CL)
    wt = (torch.randn(cout, cin, kh, kw, device=dev, generator=g) / math.sqrt(cin * kh * kw))
    wt = wt.to(dtype).contiguous(memory_format=CL)
    bias = 0.5 * torch.randn(cout, device=dev, generator=g)
    ho, wo = ops.conv_output_hw(h, w, kh, kw, stride, padding, dilation)
    res = None
    if residual:
        res = torch.randn(n, cout, ho, wo, device=dev, generator=g).to(dtype).contiguous(memory_format=CL)
    return x, wt, bias, res


def reference64(x, wt, bias, stride, padding, dilation, res, relu):
    return ops.conv_bn_act_reference(x.double(), wt.double(), bias.double(), stride, padding, dilation, 1,
                                     None if res is None else res.double(), relu)


def poison_allocator(numel, dtype):
    """Leave a NaN-filled block of the output's size at the top of the caching allocator's free
    list, so an output the kernel fails to write shows up as NaN."""
    t = torch.full((numel,), float("nan"), dtype=dtype, device="cuda")
    del t


def check_conv(conv, x, wt, bias, stride, padding, dilation, res, relu):
    n, _, h, w = x.shape
    cout, _, kh, kw = wt.shape
    ho, wo = ops.conv_output_hw(h, w, kh, kw, stride, padding, dilation)
    poison_allocator(n * cout * ho * wo, x.dtype)
    y = conv(x, wt, bias, list(stride), list(padding), list(dilation), 1, res, relu, None, None)
    torch.cuda.synchronize()
    assert y.shape == (n, cout, ho, wo) and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=CL)
    assert torch.isfinite(y).all(), "output has NaN/Inf (unwritten or wrong)"
    ref = reference64(x, wt, bias, stride, padding, dilation, res, relu)
    # torch's own conv + bn in the same dtype, for the error budget
    own = ops.conv_bn_act_reference(x, wt, bias, stride, padding, dilation, 1, res, relu)
    err, err_torch = rel_err(y, ref), rel_err(own, ref)
    floor = 2.0 ** -9 if x.dtype == torch.bfloat16 else 2.0 ** -12  # one output rounding
    assert err < 1e-2, f"error {err:.2e} >= 1e-2"
    assert err <= max(2 * err_torch, floor), f"error {err:.2e} > 2x torch's {err_torch:.2e}"
    return err, err_torch


# ----------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", RESNET50_CONVS, ids=lambda s: f"{s[0]}to{s[1]}k{s[2]}s{s[3]}h{s[5]}{s[6]}")
def test_resnet50_convs(cuda_ops, spec, dtype):
    conv = cuda_ops[0]
    cin, cout, k, s, p, h, role = spec
    st, pd, dl = (s, s), (p, p), (1, 1)
    # (residual, relu) pairs: the model's epilogue and its neighbours
    variants = {"relu": [(False, True), (False, False)], "res": [(True, True), (True, False), (False, True)],
                "none": [(False, False), (False, True)]}[role]
    for res_on, relu in variants:
        x, wt, bias, res = make_problem(8, cin, cout, h, h, k, k, st, pd, dl, dtype, res_on)
        check_conv(conv, x, wt, bias, st, pd, dl, res, relu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", ODD_CONVS, ids=lambda s: "x".join(map(str, s[:7])))
def test_odd_shapes(cuda_ops, spec, dtype):
    n, cin, cout, h, w, kh, kw, st, pd, dl = spec
    for res_on, relu in ((True, True), (False, False)):
        x, wt, bias, res = make_problem(n, cin, cout, h, w, kh, kw, st, pd, dl, dtype, res_on)
        check_conv(cuda_ops[0], x, wt, bias, st, pd, dl, res, relu)


# A few shapes per kernel configuration, so that every compiled kernel (Hopper and Ampere) is
# checked whatever the measured choice prefers.
CONFIG_SHAPES = [
    (4, 64, 64, 56, 56, 1, 1, (1, 1), (0, 0), (1, 1)),
    (4, 256, 512, 28, 28, 1, 1, (2, 2), (0, 0), (1, 1)),
    (4, 128, 128, 28, 28, 3, 3, (1, 1), (1, 1), (1, 1)),
    (4, 128, 128, 28, 28, 3, 3, (2, 2), (1, 1), (1, 1)),
    (2, 64, 64, 15, 15, 3, 3, (1, 1), (2, 2), (2, 2)),
    (3, 24, 40, 13, 11, 3, 3, (1, 1), (1, 1), (1, 1)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_config(cuda_ops, dtype):
    report = {}
    for cfg in cuda_backend.conv_configs():
        cuda_backend.force_conv_config(cfg)
        ran = []
        for spec in CONFIG_SHAPES:
            n, cin, cout, h, w, kh, kw, st, pd, dl = spec
            for res_on, relu in ((True, True), (False, False)):
                x, wt, bias, res = make_problem(n, cin, cout, h, w, kh, kw, st, pd, dl, dtype, res_on)
                try:
                    check_conv(cuda_ops[0], x, wt, bias, st, pd, dl, res, relu)
                except RuntimeError as e:
                    if "cannot take this shape" in str(e):
                        continue
                    raise
                ran.append(spec[:7])
        report[cfg] = len(ran)
        # the plain 1x1 and 3x3 stride-1 ResNet shapes must be taken by every kernel
        assert CONFIG_SHAPES[0][:7] in ran and CONFIG_SHAPES[2][:7] in ran, f"{cfg} ran only {ran}"
    print(f"\nconv problems checked per config ({dtype}): {report}")


def test_per_shape_choice_is_remembered(cuda_ops):
    x, wt, bias, _ = make_problem(2, 64, 128, 20, 20, 3, 3, (1, 1), (1, 1), (1, 1), torch.bfloat16, False)
    cuda_ops[0](x, wt, bias, [1, 1], [1, 1], [1, 1], 1, None, True, None, None)
    choices = cuda_backend.conv_choices()
    print("\n" + "\n".join(choices))
    assert any("c64 k128 r3 s3" in c for c in choices)


# ----------------------------------------------------------------------------------------------
# Errors: Python exceptions, never a CUDA fault
# ----------------------------------------------------------------------------------------------
def test_bad_inputs_raise(cuda_ops):
    conv, add_relu, add_relu_ = cuda_ops
    x, wt, bias, res = make_problem(2, 64, 64, 8, 8, 3, 3, (1, 1), (1, 1), (1, 1), torch.float16, True)
    good = dict(x=x, weight=wt, bias=bias, stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1,
                residual=res, relu=True, pre_scale=None, pre_bias=None)

    def call(**over):
        a = dict(good, **over)
        return conv(a["x"], a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"],
                    a["groups"], a["residual"], a["relu"], a["pre_scale"], a["pre_bias"])

    x3, w3, b3, _ = make_problem(1, 3, 64, 16, 16, 7, 7, (2, 2), (3, 3), (1, 1), torch.float16, False)
    unaligned = torch.empty(2 * 64 * 8 * 8 + 1, dtype=x.dtype, device="cuda")[1:].view(2, 8, 8, 64).permute(0, 3, 1, 2)
    bad = {
        "NCHW input": dict(x=x.contiguous()),
        "NCHW weight": dict(weight=wt.contiguous()),
        "fp32 input": dict(x=x.float(), weight=wt.float()),
        "weight dtype": dict(weight=wt.bfloat16()),
        "fp16 bias": dict(bias=bias.half()),
        "bias shape": dict(bias=bias[:32]),
        "cpu weight": dict(weight=wt.cpu()),
        "cpu input": dict(x=x.cpu()),
        "residual shape": dict(residual=res[:, :, :4]),
        "residual dtype": dict(residual=res.bfloat16()),
        "groups": dict(groups=2),
        "pre-activation": dict(pre_scale=torch.ones(64, device="cuda"), pre_bias=torch.zeros(64, device="cuda")),
        "Cin=3 (stem)": dict(x=x3, weight=w3, bias=b3, padding=[3, 3], stride=[2, 2], residual=None),
        "unaligned input": dict(x=unaligned),
        "too small": dict(x=x[:, :, :1, :1].contiguous(memory_format=CL), padding=[0, 0], residual=None),
        "2 strides": dict(stride=[1]),
    }
    for name, over in bad.items():
        with pytest.raises(RuntimeError) as ei:
            call(**over)
        print(f"{name}: {str(ei.value).splitlines()[0][:160]}")
    with pytest.raises(RuntimeError):
        add_relu(x, res.contiguous())          # different strides
    with pytest.raises(RuntimeError):
        add_relu(x, x.float())
    with pytest.raises(RuntimeError):
        add_relu_(x[:, :, :, :4], x[:, :, :, :4])  # not dense
    torch.cuda.synchronize()  # no sticky CUDA error left behind
    call()  # and the op still works
    torch.cuda.synchronize()


def test_backend_fallbacks(built):
    """Through the public API: the prologue and the 3-channel stem, which the CUTLASS kernels do
    not take, run on the next backend of AUTO_ORDER that does (triton here, else torch)."""
    x, wt, bias, _ = make_problem(2, 64, 64, 8, 8, 3, 3, (1, 1), (1, 1), (1, 1), torch.bfloat16, False)
    ps, pb = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")
    assert backends.resolve("cuda", x, weight=wt, pre=True).name != "cuda"
    y = ops.conv_bn_act(x, wt, bias, 1, 1, 1, 1, pre_scale=ps, pre_bias=pb, backend="cuda")
    up = [t.double() for t in (x, wt, bias, ps, pb)]
    ref = ops.conv_bn_act_reference(up[0], up[1], up[2], [1, 1], [1, 1], [1, 1], 1, None, True, up[3], up[4])
    assert rel_err(y, ref) < 1e-2
    x3, w3, b3, _ = make_problem(2, 3, 64, 32, 32, 7, 7, (2, 2), (3, 3), (1, 1), torch.bfloat16, False)
    assert backends.resolve("cuda", x3, weight=w3).name != "cuda"
    y = ops.conv_bn_act(x3, w3, b3, 2, 3, 1, 1, backend="cuda")
    assert rel_err(y, reference64(x3, w3, b3, (2, 2), (3, 3), (1, 1), None, True)) < 1e-2
    y = ops.conv_bn_act(x, wt, bias, 1, 1, 1, 1, backend="cuda")
    assert rel_err(y, reference64(x, wt, bias, (1, 1), (1, 1), (1, 1), None, True)) < 1e-2


# ----------------------------------------------------------------------------------------------
# Registration and graphs
# ----------------------------------------------------------------------------------------------
def test_opcheck(cuda_ops):
    conv, add_relu, add_relu_ = cuda_ops
    x, wt, bias, res = make_problem(2, 32, 64, 10, 10, 3, 3, (1, 1), (1, 1), (1, 1), torch.bfloat16, True)
    torch.library.opcheck(conv, (x, wt, bias, [1, 1], [1, 1], [1, 1], 1, res, True, None, None))
    torch.library.opcheck(conv, (x, wt, bias, [1, 1], [1, 1], [1, 1], 1, None, False, None, None))
    a, b = torch.randn(2, 64, 10, 10, device="cuda").to(memory_format=CL), torch.randn(2, 64, 10, 10, device="cuda").to(memory_format=CL)
    torch.library.opcheck(add_relu, (a, b))
    torch.library.opcheck(add_relu_, (a.clone(), b))


def test_cuda_graph_capture(cuda_ops):
    conv, add_relu, add_relu_ = cuda_ops
    x, wt, bias, res = make_problem(4, 64, 64, 28, 28, 3, 3, (1, 1), (1, 1), (1, 1), torch.bfloat16, True)
    # a shape never seen eagerly: chosen without measurement during capture
    x2, wt2, bias2, _ = make_problem(2, 48, 80, 9, 9, 1, 1, (1, 1), (0, 0), (1, 1), torch.bfloat16, False)
    conv(x, wt, bias, [1, 1], [1, 1], [1, 1], 1, res, True, None, None)  # warm-up: measures
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = conv(x, wt, bias, [1, 1], [1, 1], [1, 1], 1, res, True, None, None)
        y2 = conv(x2, wt2, bias2, [1, 1], [0, 0], [1, 1], 1, None, False, None, None)
        z = add_relu(y, res)
        add_relu_(z, res)
    x.copy_(torch.randn_like(x))  # the replay must see the new input
    g.replay()
    torch.cuda.synchronize()
    ref = reference64(x, wt, bias, (1, 1), (1, 1), (1, 1), res, True)
    assert rel_err(y, ref) < 1e-2
    assert rel_err(y2, reference64(x2, wt2, bias2, (1, 1), (0, 0), (1, 1), None, False)) < 1e-2
    zr = torch.relu(torch.relu(y.double() + res.double()) + res.double())
    assert rel_err(z, zr) < 1e-2


# ----------------------------------------------------------------------------------------------
# add_relu
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("shape", [(8, 256, 56, 56), (3, 13, 7, 5), (1, 1, 1, 1), (2, 1000)], ids=str)
def test_add_relu(cuda_ops, dtype, shape):
    _, add_relu, add_relu_ = cuda_ops
    a = torch.randn(shape, device="cuda").to(dtype)
    b = torch.randn(shape, device="cuda").to(dtype)
    if a.dim() == 4:
        a, b = a.contiguous(memory_format=CL), b.contiguous(memory_format=CL)
    a[(0,) * a.dim()] = float("nan")  # NaN must survive the ReLU
    want = torch.relu(a.float() + b.float()).to(dtype)
    poison_allocator(a.numel(), dtype)
    y = add_relu(a, b)
    assert y.stride() == a.stride()
    torch.testing.assert_close(y, want, equal_nan=True, rtol=0, atol=0)
    a2 = a.clone()
    add_relu_(a2, b)
    torch.testing.assert_close(a2, want, equal_nan=True, rtol=0, atol=0)


def test_add_relu_unaligned_views(cuda_ops):
    _, add_relu, add_relu_ = cuda_ops
    base_a = torch.randn(10_007, device="cuda", dtype=torch.float16)
    base_b = torch.randn(10_007, device="cuda", dtype=torch.float16)
    a, b = base_a[3:10_003], base_b[5:10_005]  # 2-byte offsets: the scalar path
    want = torch.relu(a + b)
    torch.testing.assert_close(add_relu(a, b), want, rtol=0, atol=0)
    add_relu_(a, b)
    torch.testing.assert_close(a, want, rtol=0, atol=0)


def test_add_relu_64bit_index(cuda_ops):
    """More than 2^31 elements: the last ones must be right (32-bit indexing would wrap)."""
    _, add_relu, _ = cuda_ops
    numel = 2 ** 31 + 24 + 3
    if torch.cuda.mem_get_info()[0] < 3.5 * numel * 2:
        pytest.skip("not enough free GPU memory")
    a = torch.ones(numel, device="cuda", dtype=torch.bfloat16)
    b = torch.full((numel,), 2.0, device="cuda", dtype=torch.bfloat16)
    a[-5:] = -7.0
    y = add_relu(a, b)
    assert (y[-5:] == 0).all() and (y[-30:-5] == 3).all() and (y[:1000] == 3).all()
    del a, b, y
    torch.cuda.empty_cache()
