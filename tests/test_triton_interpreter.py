"""The Triton kernels on CPU tensors, run by Triton's interpreter (conftest sets TRITON_INTERPRET=1
when there is no GPU). Small shapes whose sizes are not multiples of the interpreter's blocks
(32 x 16 x 16), so every masked edge is crossed; tests/gpu covers the compiled kernels.

bf16 convs are left out: tl.dot on bf16 in the interpreter (triton 3.8) gives garbage.
"""

import copy

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from resnet_fast import backends, ops  # noqa: E402
from resnet_fast.kernels import add_relu as add_relu_kernels  # noqa: E402
from resnet_fast.kernels import conv_bn_act as conv_kernels  # noqa: E402
from resnet_fast.kernels import indexing as index_width  # noqa: E402

from . import conv_cases  # noqa: E402
from .conv_cases import launch, reference  # noqa: E402
from .reference import rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(
    not conv_kernels.INTERPRET,
    reason="the kernels were imported without TRITON_INTERPRET=1 (a GPU is present: tests/gpu covers them)")

CL = torch.channels_last

# name: (Cin, Cout, k, stride, padding, dilation, (N, H, W))
CONVS = {
    "1x1": (20, 18, 1, 1, 0, 1, (2, 7, 9)),
    "1x1_s2": (17, 12, 1, 2, 0, 1, (3, 9, 8)),
    "3x3": (16, 20, 3, 1, 1, 1, (2, 11, 13)),
    "3x3_s2": (18, 9, 3, 2, 1, 1, (1, 13, 10)),
    "3x3_dil2": (19, 7, 3, 1, 2, 2, (2, 9, 9)),
    "7x7_s2_stem": (3, 20, 7, 2, 3, 1, (2, 13, 12)),  # the flat-K path (Cin < 16)
    "3x3_small_cin": (5, 11, 3, 1, 1, 1, (2, 8, 7)),  # the flat-K path with padding
    # the dense-row path (an input padded to 4 or 8 channels): edges on both sides of each row
    "7x7_s2_dense4": (4, 20, 7, 2, 3, 1, (2, 13, 11)),
    "3x3_dense8": (8, 11, 3, 1, 1, 1, (2, 7, 9)),
    "5x5_s2_dense4_nopad": (4, 9, 5, 2, 0, 1, (1, 12, 9)),
}


@pytest.fixture(autouse=True)
def _exact_fp32(exact_fp32):
    # fp32 in the kernel follows cuDNN's TF32 switch; the interpreter is exact either way, but
    # the tests ask for "ieee" so that the 1e-5 bound states what is checked.
    pass


def make_conv(name, dtype, residual, pre):
    cin, cout, k, s, p, d, (n, h, w) = CONVS[name]
    return conv_cases.make_conv(cin, cout, k, s, p, h, w, n, dtype, residual, pre=pre, dilation=d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("pre", [False, True], ids=["", "pre"])
@pytest.mark.parametrize("relu", [False, True], ids=["", "relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_matches_float64_reference(name, residual, relu, pre, dtype):
    args = make_conv(name, dtype, residual, pre)
    ref = reference(args, relu, torch.float64)
    x = args["x"]
    poisoned = torch.full(ref.shape, float("nan"), dtype=dtype).contiguous(memory_format=CL)
    y = launch(args, relu, out=poisoned)
    assert y is poisoned and y.dtype == dtype and y.is_contiguous(memory_format=CL)
    err = rel_err(y, ref)
    if dtype == torch.float32:
        assert err < 1e-5, err
    else:
        # torch's own computation from the same fp16 tensors (fp16 conv on CPU, fp32 epilogue)
        torch_err = rel_err(reference(args, relu, x.dtype), ref)
        assert err < 1e-2 and err <= 2 * torch_err, (err, torch_err)


def test_conv_64bit_offsets(monkeypatch):
    # The 64-bit index path, on a small tensor: force the switch the launcher sets for huge ones.
    monkeypatch.setattr(index_width, "INT32_INDEX_LIMIT", 0)
    monkeypatch.setattr(conv_kernels, "_launches", {})  # launch records hold the index width
    for name in ("3x3_s2", "7x7_s2_stem", "7x7_s2_dense4"):
        args = make_conv(name, torch.float32, residual=True, pre=True)
        assert rel_err(launch(args, True), reference(args, True, torch.float64)) < 1e-5


def test_conv_explicit_config_by_name():
    args = make_conv("3x3", torch.float32, residual=False, pre=False)
    ref = reference(args, True, torch.float64)
    name = next(iter(conv_kernels.conv_configs()))
    assert rel_err(launch(args, True, config=name), ref) < 1e-5
    with pytest.raises(ValueError, match="unknown conv config"):
        launch(args, True, config="m1n1k1w1s1")


def test_prune_configs():
    # Called as triton's autotuner calls it: positional launch arguments (the launcher's
    # tensors) in named_args, the rest as keywords.
    configs = list(conv_kernels.conv_configs().values())
    narrow = conv_kernels.prune_configs(configs, {}, Cout=64, HAS_RESIDUAL=False, res_ptr=None)
    assert narrow and all(c.kwargs["BLOCK_N"] <= 64 for c in narrow)
    res = torch.empty(1, dtype=torch.float32)
    fp32_res = conv_kernels.prune_configs(configs, {}, Cout=2048, HAS_RESIDUAL=True, res_ptr=res)
    assert fp32_res and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 32 * c.num_warps for c in fp32_res)
    assert conv_kernels.prune_configs(configs, {"Cout": 2048}) == configs


def test_launch_record_keeps_the_autotuned_config(monkeypatch):
    """A layer's first launch goes through the autotuner; later ones go straight to the kernel
    with its pick (on a GPU host the autotuner's per-call work costs ~25 us of a ~190 us call)."""
    picked = conv_kernels.INTERPRETER_CONFIG

    class Tuner:  # stands in for triton's Autotuner, which the interpreter does not use
        best_config, calls = None, 0

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                self.calls += 1
                self.best_config = picked
                conv_kernels.conv_bn_act_kernel[grid(picked.kwargs)](*args, **kwargs, **picked.all_kwargs())
            return run

    tuner = Tuner()
    monkeypatch.setattr(conv_kernels, "_tuned_kernels", {False: tuner, True: tuner})
    monkeypatch.setattr(conv_kernels, "_resolve_config", lambda config: config)  # tune, as on a GPU
    monkeypatch.setattr(conv_kernels, "_launches", {})
    for _ in range(3):  # fresh inputs every call: the launch record holds no tensor
        args = make_conv("3x3_s2", torch.float32, residual=True, pre=True)
        ref = reference(args, True, torch.float64)
        out = torch.full(ref.shape, float("nan")).contiguous(memory_format=torch.channels_last)
        assert rel_err(launch(args, True, out=out), ref) < 1e-5
    assert tuner.calls == 1 and len(conv_kernels._launches) == 1
    args = make_conv("3x3_s2", torch.float32, residual=False, pre=True)  # another layer call
    launch(args, True)
    assert tuner.calls == 2 and len(conv_kernels._launches) == 2
    picks = conv_kernels.chosen_configs()
    assert [p["config"] for p in picks] == [conv_kernels.config_name(picked)] * 2
    assert picks[0]["x"] == [1, 18, 13, 10] and picks[0]["residual"] and not picks[1]["residual"]


def test_conv_launcher_rejects_nchw():
    args = make_conv("1x1", torch.float32, residual=False, pre=False)
    args["x"] = args["x"].contiguous()
    with pytest.raises(ValueError, match="channels_last"):
        launch(args, True)


def test_conv_empty_batch():
    args = make_conv("3x3", torch.float32, residual=False, pre=False)
    args["x"] = args["x"][:0]
    assert launch(args, True).shape == (0, 20, 11, 13)


def test_public_op_runs_triton_and_falls_back_for_groups():
    args = make_conv("3x3_s2", torch.float32, residual=True, pre=False)
    a = dict(args)
    y = ops.conv_bn_act(a.pop("x"), a.pop("weight"), a.pop("bias"), a.pop("stride"), a.pop("padding"),
                        a.pop("dilation"), 1, relu=True, backend="triton", **a)
    assert rel_err(y, reference(args, True, torch.float64)) < 1e-5

    be = backends.get("triton")
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=CL)
    w = torch.randn(4, 2, 3, 3)
    assert be.supports(x, w, 2) == (False, "grouped convolution (groups=2) is not implemented in the Triton kernel")
    assert backends.resolve("triton", x, weight=w, groups=2).name == "torch"
    y = ops.conv_bn_act(x, w, torch.randn(4), 1, 1, 1, 2, backend="triton")
    assert y.shape == (1, 4, 5, 5)


def _small_block():
    import resnet_fast as rf
    from torchvision.models import resnet

    from .reference import randomize_bn
    ref = randomize_bn(resnet.BasicBlock(16, 16)).eval()
    return ref, rf.convert(copy.deepcopy(ref), backend="triton").eval()


def test_eager_calls_skip_the_op_unless_something_watches(monkeypatch):
    """Plain eager calls run the kernel directly; under a TorchDispatchMode (and the profiler,
    tracing, compile) the registered op runs, so such tools still see it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from resnet_fast.backends import triton_backend

    calls = []
    real = triton_backend._conv_op
    monkeypatch.setattr(triton_backend, "_conv_op", lambda *a: calls.append(1) or real(*a))
    ref, ours = _small_block()
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=CL)
    with torch.no_grad():
        expect = ref.double()(x.double())
        assert rel_err(ours(x), expect) < 1e-5 and calls == []

        class Seen(TorchDispatchMode):
            ops_seen: list = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops_seen.append(str(func))
                return func(*args, **(kwargs or {}))

        with Seen() as mode:
            y = ours(x)
        assert rel_err(y, expect) < 1e-5 and len(calls) == 2
        assert sum("conv_bn_act_triton" in f for f in mode.ops_seen) == 2


def test_compile_fullgraph_and_export_on_triton():
    """The direct-call switch and the launch records stay out of compiled graphs."""
    ref, ours = _small_block()
    x = torch.randn(1, 16, 5, 5).contiguous(memory_format=CL)
    with torch.no_grad():
        y0 = ours(x)
        compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
        assert rel_err(compiled(x), y0) < 1e-6
        ep = torch.export.export(ours, (x,))
    assert any("conv_bn_act_triton" in str(n.target) for n in ep.graph.nodes)
    assert rel_err(ep.module()(x), y0) < 1e-6


def test_available():
    be = backends.get("triton")
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert be.available(cpu, dtype) == (True, "")
    ok, why = be.available(cpu, torch.float64)
    assert not ok and "float64" in why
    assert be.requires_nhwc and be.name == "triton"


# --------------------------------------------------------------------------------------
# add_relu
# --------------------------------------------------------------------------------------
ADD_RELU_SHAPES = {"nchw": ((2, 5, 7, 3), None), "nhwc": ((3, 6, 5, 7), CL), "flat_tail": ((5001,), None)}


def _operands(shape, fmt, dtype):
    a, b = (torch.randn(shape).to(dtype) for _ in range(2))
    a.view(-1)[3] = float("nan")  # relu(NaN) is NaN in torch; the kernel must not turn it into 0
    if fmt is not None:
        a, b = a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)
    return a, b


def _assert_matches(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.stride() == ref.stride()
    assert torch.equal(out.isnan(), ref.isnan())
    # The interpreter rounds fp32 -> bf16 by truncation, so bf16 may differ by one unit in the last place.
    tol = 2.0 ** -7 if out.dtype == torch.bfloat16 else 0.0
    o, r = out[~out.isnan()].float(), ref[~ref.isnan()].float()
    assert ((o - r).abs() <= tol * r.abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", list(ADD_RELU_SHAPES))
def test_add_relu(layout, dtype):
    a, b = _operands(*ADD_RELU_SHAPES[layout], dtype)
    ref = ops.add_relu_reference(a, b)
    _assert_matches(add_relu_kernels.add_relu(a, b), ref)
    a_ptr = a.data_ptr()
    assert add_relu_kernels.add_relu_(a, b) is a and a.data_ptr() == a_ptr
    _assert_matches(a, ref)


def test_add_relu_64bit_offsets(monkeypatch):
    monkeypatch.setattr(index_width, "INT32_INDEX_LIMIT", 0)
    a, b = _operands((5001,), None, torch.float32)
    _assert_matches(add_relu_kernels.add_relu(a, b), ops.add_relu_reference(a, b))


def test_add_relu_rejects_mixed_layouts_and_backend_falls_back():
    a = torch.randn(2, 3, 4, 5).contiguous(memory_format=CL)
    b = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="both contiguous or both channels_last"):
        add_relu_kernels.add_relu(a, b)
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        add_relu_kernels.add_relu(a, b[:1])
    ref = ops.add_relu_reference(a, b)
    assert torch.equal(ops.add_relu(a, b, backend="triton"), ref)
    assert torch.equal(ops.add_relu_(a, b, backend="triton"), ref)


# --------------------------------------------------------------------------------------
# The registered custom ops
# --------------------------------------------------------------------------------------
def test_opcheck_conv():
    backends.get("triton")  # registers the ops
    args = make_conv("3x3_s2", torch.float32, residual=True, pre=True)
    torch.library.opcheck(torch.ops.resnet_fast.conv_bn_act_triton.default,
                          (args["x"], args["weight"], args["bias"], args["stride"], args["padding"],
                           args["dilation"], 1, args["residual"], True, args["pre_scale"], args["pre_bias"]))


def test_opcheck_add_relu():
    backends.get("triton")
    a, b = (torch.randn(2, 3, 4, 5).contiguous(memory_format=CL) for _ in range(2))
    torch.library.opcheck(torch.ops.resnet_fast.add_relu_triton.default, (a, b))
    torch.library.opcheck(torch.ops.resnet_fast.add_relu_inplace_triton.default, (a, b))


# ---- the stem's input: NCHW -> NHWC with zero channels, and the dense-row path it feeds ----
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "view"])
def test_to_nhwc_padded(layout, dtype):
    from resnet_fast.kernels import layout as layout_kernels

    x = torch.randn(2, 3, 17, 23).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=CL)
    elif layout == "view":  # a strided crop of a bigger image
        x = torch.randn(2, 5, 20, 30).to(dtype)[:, 1:4, 2:19, 3:26]
    out = torch.full((2, 4, 17, 23), float("nan"), dtype=dtype).contiguous(memory_format=CL)
    y = layout_kernels.to_nhwc_padded(x, 4, out=out)
    assert y is out and y.is_contiguous(memory_format=CL)
    assert torch.equal(y[:, :3], x) and torch.equal(y[:, 3], torch.zeros_like(y[:, 3]))
    with pytest.raises(ValueError, match="power of two"):
        layout_kernels.to_nhwc_padded(x, 6)
    with pytest.raises(ValueError, match="at least 3"):
        layout_kernels.to_nhwc_padded(x, 2)
    assert layout_kernels.to_nhwc_padded(x[:0], 4).shape == (0, 4, 17, 23)


def test_stem_runs_dense_rows_with_its_input_padded():
    """A converted stem on the Triton backend: the fold packs a 4-channel weight (zero 4th
    column), fused_conv pads the image in its one layout conversion, the kernel takes the
    dense-row path, and the result is the 3-channel conv's."""
    from torch import nn

    from resnet_fast import ConvBNAct

    conv = nn.Conv2d(3, 20, 7, 2, 3, bias=False)
    bn = nn.BatchNorm2d(20)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    ref = copy.deepcopy(nn.Sequential(conv, bn, nn.ReLU())).eval().double()
    unit = ConvBNAct(conv, bn, relu=True, backend="triton").eval()
    x = torch.randn(2, 3, 13, 11)  # NCHW, as a user passes an image
    with torch.no_grad():
        y = unit(x)
        w = unit._unit.fold.get(conv, bn, None, torch.float32, backends.get("triton"))[0]
    assert w.shape == (20, 4, 7, 7) and torch.equal(w[:, 3], torch.zeros_like(w[:, 3]))
    launch_rec = next(v for k, v in conv_kernels._launches.items() if k[0] == (2, 4, 13, 11))
    assert launch_rec.constexprs["DENSE_CIN"] == 4 and launch_rec.constexprs["ROW_K"] == 32
    assert rel_err(y, ref(x.double())) < 1e-5
    assert not ops.is_nhwc(x)  # the caller's tensor is untouched; the output follows its format


# ---- the stem's max-pool on the op contract (ops.max_pool2d) ---------------------------------
def test_opcheck_max_pool():
    x = torch.randn(2, 6, 9, 11).contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.resnet_fast.max_pool2d_triton.default,
                          (x, [3, 3], [2, 2], [1, 1], [1, 1], False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ops_max_pool_matches_torch(backend):
    x = torch.randn(2, 12, 13, 10).contiguous(memory_format=CL)
    for args in [(3, 2, 1), ((3, 2), (2, 1), (1, 0))]:
        with torch.no_grad():
            y = ops.max_pool2d(x, *args, backend=backend)
        assert torch.equal(y, torch.nn.functional.max_pool2d(x, *args))
    # autograd recording: torch's pool (the kernel has no backward), so gradients flow
    xg = x.clone().requires_grad_()
    ops.max_pool2d(xg, 3, 2, 1, backend=backend).sum().backward()
    assert xg.grad is not None and xg.grad.sum() == 2 * 12 * 7 * 5


def test_converted_resnet_pools_on_the_kernel():
    import torchvision

    import resnet_fast
    from resnet_fast.kernels import max_pool as pool_kernels

    m = torchvision.models.resnet18(num_classes=10).eval()
    ref = copy.deepcopy(m)
    # the blocks on the reference ops (their convs would take minutes in the interpreter); the
    # model's own stem and pool on the Triton kernels
    resnet_fast.convert(m, backend="torch")
    m.backend = "triton"
    rows = {r["name"]: r for r in resnet_fast.fusion_summary(m)}
    assert rows["conv1"]["pool"] == "maxpool" and "maxpool (NHWC pool)" in str(resnet_fast.fusion_summary(m))
    assert rows["layer1.0.conv1"]["pool"] is None
    calls = []
    real = pool_kernels.max_pool2d_nhwc

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    pool_kernels.max_pool2d_nhwc = spy
    try:
        x = torch.randn(1, 3, 20, 20)
        with torch.no_grad():
            y = m(x)
        assert calls == [torch.Size([1, 64, 10, 10])]
        assert rel_err(y, ref.double()(x.double())) < 1e-5
        # a hook on the pool: the module runs (its hook fires), and the summary says so
        fired = []
        m.maxpool.register_forward_hook(lambda *a: fired.append(1))
        calls.clear()
        with torch.no_grad():
            m(x)
        assert fired == [1] and calls == []
        assert {r["name"]: r for r in resnet_fast.fusion_summary(m)}["conv1"]["pool"] is None
    finally:
        pool_kernels.max_pool2d_nhwc = real


def test_tma_1x1_behind_its_switch(monkeypatch):
    """RESNET_FAST_TRITON_TMA=1 sends a 1x1 stride-1 conv without prologue to the TMA GEMM
    (kernels/gemm_tma.py); the result is the same conv's."""
    from resnet_fast.backends import triton_backend
    from resnet_fast.kernels import gemm_tma

    args = conv_cases.make_conv(32, 24, 1, 1, 0, 5, 7, 2, torch.float32, residual=True)
    ref = reference(args, True, torch.float64)
    calls = []
    real = gemm_tma.conv1x1_bn_act
    monkeypatch.setattr(gemm_tma, "conv1x1_bn_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    be = backends.get("triton")
    run = lambda: be.conv_bn_act(args["x"], args["weight"], args["bias"], [1, 1], [0, 0], [1, 1], 1,
                                 args["residual"], True, None, None)  # noqa: E731
    assert rel_err(run(), ref) < 1e-5 and calls == []
    monkeypatch.setenv(triton_backend.TMA_ENV_VAR, "1")
    assert rel_err(run(), ref) < 1e-5 and calls == [1]
