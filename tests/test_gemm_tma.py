"""The persistent TMA GEMM for 1x1 stride-1 convs (kernels/gemm_tma.py).

Numerics run under Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 without
a GPU), against float64 (F.conv2d + bias + residual, ReLU), at sizes off every block multiple of
the interpreter's config (32 x 16 x 16, 3 persistent programs): odd M, Cin and Cout not
multiples of the block but 16-byte aligned, as TMA requires. bf16 is left out there (the
interpreter's bf16 tl.dot is garbage, see test_triton_interpreter.py).

The ahead-of-time test compiles ResNet-50 layers for sm_90a and reads the SASS: TMA loads
(UTMALDG), warpgroup MMA (HGMMA), no spills; and for sm_80, where Triton lowers the
descriptors to plain loads.
"""

from __future__ import annotations

import contextvars

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed")

from resnet_fast.kernels import gemm_tma  # noqa: E402

from .reference import rel_err  # noqa: E402

CL = torch.channels_last
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}

interpreted = pytest.mark.skipif(
    not gemm_tma.INTERPRET,
    reason="the kernels were imported without TRITON_INTERPRET=1 (a GPU is present: tests/gpu covers them)")


@pytest.fixture(autouse=True)
def _exact_fp32(exact_fp32):
    """fp32 as "ieee" (torch's TF32 switch off), so that the 1e-5 bound states what is checked."""


def make(n, cin, h, w, cout, dtype, residual=False):
    x = torch.randn(n, cin, h, w).to(dtype).contiguous(memory_format=CL)
    wt = (torch.randn(cout, cin, 1, 1) / cin ** 0.5).to(dtype).contiguous(memory_format=CL)
    bias = torch.randn(cout) * 0.5
    res = torch.randn(n, cout, h, w).to(dtype).contiguous(memory_format=CL) if residual else None
    return x, wt, bias, res


def reference(x, wt, bias, res, relu):
    y = F.conv2d(x.double(), wt.double(), bias.double())
    if res is not None:
        y = y + res.double()
    return torch.relu(y) if relu else y


# (N, H, W, Cin, Cout): M = 70 (2 row tiles and a partial one), Cin and Cout off the 16-blocks
# but 16-byte aligned for the dtype (fp32: multiples of 4, fp16: of 8)
SHAPES = {torch.float32: (2, 5, 7, 36, 44), torch.float16: (2, 5, 7, 24, 40)}


# ---- numerics ---------------------------------------------------------------------------------
@interpreted
@pytest.mark.parametrize("relu", [False, True], ids=["", "relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_float64(dtype, residual, relu):
    n, h, w, cin, cout = SHAPES[dtype]
    x, wt, bias, res = make(n, cin, h, w, cout, dtype, residual)
    assert gemm_tma.takes(x, wt) == (True, "")
    y = gemm_tma.conv1x1_bn_act(x, wt, bias, res, relu=relu)
    assert y.dtype == dtype and y.shape == (n, cout, h, w) and y.is_contiguous(memory_format=CL)
    assert rel_err(y, reference(x, wt, bias, res, relu)) < TOL[dtype]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_poisoned_out_is_fully_overwritten(dtype):
    # one M row past a tile edge, Cout one 8-channel step past a tile: every edge of the clipped
    # TMA store is crossed; a value never written stays NaN and fails
    n, h, w, cin, cout = 1, 3, 11, 40, 24 if dtype == torch.float16 else 20
    x, wt, bias, res = make(n, cin, h, w, cout, dtype, residual=True)
    out = torch.full((n, cout, h, w), float("nan"), dtype=dtype).contiguous(memory_format=CL)
    y = gemm_tma.conv1x1_bn_act(x, wt, bias, res, relu=True, out=out)
    assert y is out
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(x, wt, bias, res, True)) < TOL[dtype]


@interpreted
def test_relu_propagates_nan():
    n, h, w, cin, cout = 1, 4, 9, 16, 24
    x, wt, bias, res = make(n, cin, h, w, cout, torch.float32, residual=True)
    x[0, 3, 1, 2] = float("nan")          # one input pixel: every channel of that output pixel
    res[0, 5, 2, 7] = float("nan")        # one residual element: that output element only
    bias[:] = -100.0                      # without NaN, ReLU would clamp everything to 0
    y = gemm_tma.conv1x1_bn_act(x, wt, bias, res, relu=True)
    nan = torch.isnan(y)
    expected = torch.zeros_like(nan)
    expected[0, :, 1, 2] = True
    expected[0, 5, 2, 7] = True
    assert torch.equal(nan, expected)
    assert (y[~nan] == 0).all()


@interpreted
def test_empty_batch_and_launch_record_reuse():
    x, wt, bias, _ = make(0, 16, 3, 3, 8, torch.float16)
    assert gemm_tma.conv1x1_bn_act(x, wt, bias).shape == (0, 8, 3, 3)
    x, wt, bias, _ = make(1, 16, 3, 5, 8, torch.float16)
    gemm_tma._launches.clear()
    gemm_tma.conv1x1_bn_act(x, wt, bias)
    (launch,) = gemm_tma._launches.values()
    gemm_tma.conv1x1_bn_act(x, wt, bias)
    assert list(gemm_tma._launches.values()) == [launch]
    assert launch.config is gemm_tma.INTERPRETER_CONFIG and launch.grid == (1,)  # 1 tile: 1 program
    (row,) = gemm_tma.chosen_configs()
    assert row["config"] == "m32n16k16w4s1" and row["residual"] is False


# ---- where it applies -------------------------------------------------------------------------
def _x(cin=32, dtype=torch.float16, n=2, h=3, w=5):
    return torch.randn(n, cin, h, w).to(dtype).contiguous(memory_format=CL)


def _w(cout=64, cin=32, dtype=torch.float16, k=1):
    return torch.randn(cout, cin, k, k).to(dtype).contiguous(memory_format=CL)


@pytest.mark.parametrize("case, args, why", [
    ("3x3", (_x(), _w(k=3), 1, 1, 1, 1), "not a 1x1 conv"),
    ("stride 2", (_x(), _w(), 2, 0, 1, 1), "stride"),
    ("padded", (_x(), _w(), 1, 1, 1, 1), "padding"),
    ("dilated", (_x(), _w(), 1, 0, 2, 1), "dilation"),
    ("grouped", (_x(), _w(cin=16), 1, 0, 1, 2), "groups"),
    ("float64", (_x(dtype=torch.float64), _w(dtype=torch.float64), 1, 0, 1, 1), "float16, bfloat16 or float32"),
    ("mixed dtypes", (_x(), _w(dtype=torch.float32), 1, 0, 1, 1), "weight dtype"),
    ("Cin misaligned", (_x(cin=20), _w(cin=20), 1, 0, 1, 1), "Cin = 20 channels of 2 bytes"),
    ("Cout misaligned", (_x(), _w(cout=12), 1, 0, 1, 1), "Cout = 12 channels of 2 bytes"),
    ("fp32 Cin misaligned", (_x(cin=18, dtype=torch.float32), _w(cin=18, dtype=torch.float32), 1, 0, 1, 1),
     "Cin = 18 channels of 4 bytes"),
    ("NCHW x", (_x().contiguous(), _w(), 1, 0, 1, 1), "not NHWC"),
    ("strided x", (_x(w=10)[:, :, :, ::2], _w(), 1, 0, 1, 1), "not NHWC"),
    ("channel slice", (_x(cin=64)[:, :32], _w(), 1, 0, 1, 1), "not NHWC"),
    ("transposed weight", (_x(), _w(cout=32).transpose(0, 1), 1, 0, 1, 1), "weight is not contiguous"),
    ("misaligned base", (torch.randn(2 * 3 * 5 * 32 + 1).half()[1:].view(2, 3, 5, 32).permute(0, 3, 1, 2), _w(),
                         1, 0, 1, 1), "16-byte aligned"),
    ("channel mismatch", (_x(cin=40), _w(), 1, 0, 1, 1), "input channels"),
])
def test_takes_refuses_with_a_reason(case, args, why):
    ok, reason = gemm_tma.takes(*args)
    assert not ok and why in reason, (case, reason)


def test_takes_accepts_the_plain_gemm_cases():
    # "valid"/"same" padding and pairs are the same conv; 1x1 weights are contiguous either way
    x, w = _x(), _w()
    for args in [(1, 0, 1, 1), ((1, 1), (0, 0), (1, 1), 1), (1, "valid", 1, 1), (1, "same", 1, 1)]:
        ok, why = gemm_tma.takes(x, w.contiguous(), *args)
        if gemm_tma.INTERPRET:
            assert ok, (args, why)
        else:  # CPU tensors need the interpreter
            assert not ok and "needs CUDA" in why, (args, why)


@interpreted
def test_launcher_raises_clear_errors():
    x, wt, bias, res = make(1, 16, 3, 5, 24, torch.float16, residual=True)
    run = gemm_tma.conv1x1_bn_act
    with pytest.raises(ValueError, match="does not apply: Cin = 20"):
        run(_x(cin=20), _w(cin=20), bias)
    with pytest.raises(ValueError, match="bias must be a contiguous float32"):
        run(x, wt, bias.half())
    with pytest.raises(ValueError, match="bias must be"):
        run(x, wt, torch.zeros(23))
    with pytest.raises(ValueError, match="residual must be a torch.float16 tensor of shape"):
        run(x, wt, bias, res[:, :, :2])
    with pytest.raises(ValueError, match="residual must be NHWC"):
        run(x, wt, bias, res.contiguous())
    with pytest.raises(ValueError, match="out must be a torch.float16"):
        run(x, wt, bias, out=torch.empty_like(res, dtype=torch.float32))
    with pytest.raises(ValueError, match="out overlaps residual"):
        run(x, wt, bias, res, out=res)
    with pytest.raises(ValueError, match="unknown GEMM config 'm1n1'"):
        run(x, wt, bias, config="m1n1")
    with pytest.raises(TypeError, match="config must be"):
        run(x, wt, bias, config=3)


# ---- configs, allocator, version switches -----------------------------------------------------
def test_configs_are_named_and_fit_shared_memory():
    cfgs = gemm_tma.gemm_configs()
    assert "m128n256k64w8s3" in cfgs
    for name, c in cfgs.items():
        assert gemm_tma.config_name(c) == name
        assert gemm_tma.shared_memory_bytes(c, 2, residual=False) <= gemm_tma._SMEM_LIMIT, name
    # the pruner drops what cannot fit with a residual, and tiles far wider than Cout
    y = torch.empty(0, dtype=torch.bfloat16, device="meta")
    kept = gemm_tma.prune_configs(list(cfgs.values()), {"Cout": 1024, "y_ptr": y}, HAS_RESIDUAL=True)
    assert "m128n256k64w8s4" not in {gemm_tma.config_name(c) for c in kept}
    assert "m128n256k64w8s3" in {gemm_tma.config_name(c) for c in kept}
    kept = gemm_tma.prune_configs(list(cfgs.values()), {"Cout": 64, "y_ptr": y})
    assert all(c.kwargs["BLOCK_N"] <= 64 for c in kept)


def test_loop_keywords_are_there_in_this_triton():
    # triton 3.6 and 3.8 both have tl.range(flatten=, warp_specialize=)
    assert gemm_tma.HAS_FLATTEN and gemm_tma.HAS_WARP_SPECIALIZE


def test_scratch_allocator_is_scoped_and_keeps_the_callers():
    from triton.runtime import _allocation

    def inside():
        before = _allocation._allocator.get()
        assert isinstance(before, _allocation.NullAllocator)
        with gemm_tma.scratch_allocator():
            assert _allocation._allocator.get() is gemm_tma._torch_scratch
        assert _allocation._allocator.get() is before  # put back as it was

        def mine(size, alignment, stream):
            raise AssertionError("not called here")

        import triton
        triton.set_allocator(mine)
        with gemm_tma.scratch_allocator():
            assert _allocation._allocator.get() is mine  # a caller's allocator is left alone
        assert _allocation._allocator.get() is mine

    contextvars.Context().run(inside)  # a fresh context: this process's own is not touched


# ---- ahead of time ----------------------------------------------------------------------------
def test_aot_sm90a_uses_tma_and_wgmma_without_spills(tmp_path):
    from resnet_fast.kernel_report import cubin, triton_aot

    try:
        cubin.find_tool("cuobjdump")
    except cubin.ToolMissing as e:  # pragma: no cover - triton's wheel ships it
        pytest.skip(str(e))
    mod = triton_aot.jit_module(gemm_tma)  # a non-interpreted copy under TRITON_INTERPRET=1
    layers = [  # (M, Cin, Cout, residual, capability): ResNet-50 layer3 at batch 256, bf16
        (50176, 1024, 256, False, 90),
        (50176, 256, 1024, True, 90),
        (50176, 256, 1024, True, 80),
    ]
    jobs = []
    for m, cin, cout, res, cc in layers:
        spec = mod.gemm_compile_spec(torch.bfloat16, m, cin, cout, residual=res, relu=True, config="m128n256k64w8s3")
        jobs.append({"kind": "fn", "fn": "resnet_fast.kernels.gemm_tma:gemm_bn_act_kernel", "capability": cc,
                     "signature": spec["signature"], "constexprs": spec["constexprs"], "attrs": spec["attrs"],
                     "options": spec["options"], "out_path": str(tmp_path / f"gemm_{cin}_{cout}_{cc}.cubin")})
    results = triton_aot.run_jobs(jobs, workers=2)
    for (m, cin, cout, res, cc), r in zip(layers, results):
        where = f"{cin}->{cout}{' +res' if res else ''} sm_{cc}"
        assert not isinstance(r, Exception), f"{where}: {r}"
        info = r.get("inspect") or cubin.inspect_cubin(r["cubin"])
        fn = info[r["name"]]
        s = fn["sass"]
        assert fn["spill_bytes"] == 0 and s.local_ops == 0, f"{where}: spills ({fn['registers']} registers)"
        if cc == 90:
            assert s.tma_loads > 0, f"{where}: no UTMALDG"
            assert s.tensor_core == "HGMMA", f"{where}: {s.mma}"
            assert r["shared_dynamic"] <= 227 * 1024, where
        else:  # no TMA before Hopper: the descriptors became plain loads; mma.sync
            assert s.tma_loads == 0 and s.tensor_core == "HMMA", f"{where}: {s.mma}"
