"""The Triton NHWC max pool (kernels/max_pool.py) against F.max_pool2d in float64 on the same values.

The kernel runs under Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 when
there is no GPU), in fp32, fp16 and bf16 (a max has no rounding, so every dtype is compared
exactly), at channel counts and image sizes off the block multiples, with every geometry
F.max_pool2d takes: kernel, stride, padding, dilation, ceil_mode. Outputs are poisoned with NaN
first where the test owns them, so a value the kernel never wrote fails. The ahead-of-time part
compiles the launcher's kernel for the ResNet-50 stem pool for sm_90a and sm_80 without a GPU
and reads the SASS (128-bit global loads and stores, no spills).
"""

from __future__ import annotations

import re
import subprocess

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed")

from resnet_fast.kernels import max_pool as mp  # noqa: E402  (after conftest set TRITON_INTERPRET)

CL = torch.channels_last

interpreted = pytest.mark.skipif(
    not mp.INTERPRET,
    reason="the kernels were imported without TRITON_INTERPRET=1 (a GPU is present: tests/gpu covers them)")

# name: ((N, C, H, W), kernel_size, stride, padding, dilation, ceil_mode)
CASES = {
    "stem_3x3_s2_p1": ((2, 24, 13, 11), 3, 2, 1, 1, False),
    "c3": ((2, 3, 13, 11), 3, 2, 1, 1, False),
    "c70": ((2, 70, 9, 7), 3, 2, 1, 1, False),
    "3x3_s1_p1": ((1, 24, 9, 7), 3, 1, 1, 1, False),
    "2x2_s2_p0": ((2, 24, 13, 11), 2, 2, 0, 1, False),
    "2x2_s1_p1": ((1, 24, 7, 9), 2, 1, 1, 1, False),
    "3x3_s2_p0_ceil": ((2, 24, 12, 10), 3, 2, 0, 1, True),
    # ceil mode where torch drops the last window (it would start in the right padding)
    "3x3_s3_p1_ceil_trimmed": ((1, 8, 5, 7), 3, 3, 1, 1, True),
    "3x3_s2_p1_dil2": ((2, 24, 13, 11), 3, 2, 1, 2, False),
    "2x2_s1_p1_dil2_ceil": ((1, 24, 12, 9), 2, 1, 1, 2, True),
    "asymmetric": ((2, 24, 11, 13), (3, 2), (2, 1), (1, 0), (1, 2), False),
    "1x1_image": ((2, 24, 1, 1), 3, 2, 1, 1, False),
}
# 16-bit dtypes on the cases that exercise the load/store paths differently (masked channels,
# the stem geometry, dilation); fp32 on all
HALF_CASES = ["stem_3x3_s2_p1", "c3", "c70", "3x3_s2_p1_dil2"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def nhwc(shape, dtype, kind="randn"):
    x = torch.randn(*shape)
    if kind == "negative":  # all < 0: a padding read as 0 (not -inf) would win the max
        x = -(x.abs() + 0.1)
    return x.to(dtype).contiguous(memory_format=CL)


def reference(x, kernel_size, stride, padding, dilation, ceil_mode):
    return F.max_pool2d(x.double(), kernel_size, stride, padding, dilation, ceil_mode)


def check(y, x, args):
    ref = reference(x, *args)
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=0, equal_nan=True)


@pytest.fixture
def gpu_blocks(monkeypatch):
    """Launch with the block sizes a GPU gets (the interpreter's are smaller)."""
    monkeypatch.setattr(mp, "INTERPRET", False)


# ---- values ------------------------------------------------------------------------------------
@interpreted
@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_torch(name):
    shape, *args = CASES[name]
    x = nhwc(shape, torch.float32)
    check(mp.max_pool2d_nhwc(x, *args), x, args)


@interpreted
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("name", HALF_CASES)
def test_16bit_matches_torch(name, dtype):
    shape, *args = CASES[name]
    x = nhwc(shape, DTYPES[dtype])
    check(mp.max_pool2d_nhwc(x, *args), x, args)


@interpreted
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["stem_3x3_s2_p1", "3x3_s2_p0_ceil", "asymmetric"])
def test_all_negative_input_sees_padding_as_minus_inf(name, dtype):
    shape, *args = CASES[name]
    x = nhwc(shape, DTYPES[dtype], kind="negative")
    y = mp.max_pool2d_nhwc(x, *args)
    check(y, x, args)
    assert (y < 0).all()


@interpreted
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_stem_geometry_with_gpu_blocks(dtype, gpu_blocks):
    # C = 64 as after the ResNet stem: one channel block of 64, 64 (bf16) or 32 (fp32) pixels a
    # program, so the last pixel block is partial
    x = nhwc((2, 64, 17, 15), DTYPES[dtype])
    args = (3, 2, 1, 1, False)
    assert mp._pool_args(tuple(x.shape), x.dtype, (3, 3), (2, 2), (1, 1), (1, 1), False, False)[3]["BLOCK_C"] == 64
    check(mp.max_pool2d_nhwc(x, *args), x, args)


@interpreted
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_nan_and_inf_propagate_like_torch(dtype):
    shape, *args = CASES["stem_3x3_s2_p1"]
    x = nhwc(shape, DTYPES[dtype])
    flat = x.permute(0, 2, 3, 1).view(-1)  # a flat view of the NHWC memory
    idx = torch.randperm(flat.numel())
    flat[idx[:40]] = float("nan")
    flat[idx[40:50]] = float("inf")
    flat[idx[50:60]] = float("-inf")
    y = mp.max_pool2d_nhwc(x, *args)
    check(y, x, args)
    # every window holding a NaN is NaN (tl.maximum's default would drop it), and only those
    has_nan = F.max_pool2d(x.isnan().double(), *args) > 0
    assert has_nan.any() and (~has_nan).any()
    assert torch.equal(y.isnan(), has_nan)


@interpreted
@pytest.mark.parametrize("name", ["c70", "3x3_s2_p1_dil2"])
def test_out_is_written_everywhere(name):
    shape, *args = CASES[name]
    x = nhwc(shape, torch.float32)
    ref = reference(x, *args)
    out = torch.full(ref.shape, float("nan")).contiguous(memory_format=CL)
    y = mp.max_pool2d_nhwc(x, *args, out=out)
    assert y is out and not out.isnan().any()
    check(out, x, args)


@interpreted
def test_int64_offsets_path(monkeypatch):
    """The 64-bit index variant (taken near 2**31 elements), forced on a small tensor."""
    monkeypatch.setattr(mp, "needs_int64_index", lambda largest: True)
    mp._pool_args.cache_clear()
    try:
        shape, *args = CASES["3x3_s2_p1_dil2"]
        x = nhwc(shape, torch.float32)
        _, _, _, ce = mp._pool_args(tuple(x.shape), x.dtype, (3, 3), (2, 2), (1, 1), (2, 2), False, True)
        assert ce["INT64_OFFSETS"]
        check(mp.max_pool2d_nhwc(x, *args), x, args)
    finally:
        mp._pool_args.cache_clear()  # the cached launches above hold the forced flag


def test_empty_batch_launches_nothing(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError(f"launched a grid of {grid} for an empty batch")

    monkeypatch.setattr(mp, "max_pool2d_nhwc_kernel", NoLaunch())
    x = torch.empty(0, 24, 13, 11).contiguous(memory_format=CL)
    y = mp.max_pool2d_nhwc(x, 3, 2, 1)
    assert y.shape == (0, 24, 7, 6) and y.is_contiguous(memory_format=CL)
    out = torch.empty(0, 24, 7, 6).contiguous(memory_format=CL)
    assert mp.max_pool2d_nhwc(x, 3, 2, 1, out=out) is out


# ---- arguments (no launch) ------------------------------------------------------------------
def test_output_size_and_argument_rules_are_torchs():
    """Over every small geometry: where F.max_pool2d (on meta tensors) gives a shape we give the
    same, and where it refuses the arguments we raise ValueError."""
    checked = refused = 0
    for size in range(1, 8):
        for k in range(1, 5):
            for p in range(0, 3):
                for s in range(1, 4):
                    for d in (1, 2):
                        for ceil in (False, True):
                            x = torch.empty(1, 1, size, 1, device="meta")
                            geo = ((k, 1), (s, 1), (p, 0), (d, 1), ceil)
                            try:
                                want = tuple(F.max_pool2d(x, *geo).shape)
                            except RuntimeError:
                                want = None
                            if want is None:
                                refused += 1
                                with pytest.raises(ValueError):
                                    mp._pool_args((1, 1, size, 1), torch.float32,
                                                  *mp.normalize_args(*geo), ceil, False)
                            else:
                                checked += 1
                                assert mp._pool_args((1, 1, size, 1), torch.float32,
                                                     *mp.normalize_args(*geo), ceil, False)[0] == want, geo
    assert checked > 500 and refused > 100


def test_bad_arguments_raise():
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=CL)
    with pytest.raises(ValueError, match="channels_last"):
        mp.max_pool2d_nhwc(torch.randn(1, 8, 6, 6), 3, 2, 1)  # NCHW-contiguous
    with pytest.raises(ValueError, match="4-D"):
        mp.max_pool2d_nhwc(torch.randn(8, 6, 6), 3, 2, 1)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        mp.max_pool2d_nhwc(x.double(), 3, 2, 1)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        mp.max_pool2d_nhwc(x.to(torch.int32), 3, 2, 1)
    with pytest.raises(TypeError):
        mp.max_pool2d_nhwc(x.numpy(), 3, 2, 1)
    for kwargs, what in [(dict(kernel_size=3, stride=2, padding=2), "half the kernel"),
                         (dict(kernel_size=3, stride=0, padding=1), "stride"),
                         (dict(kernel_size=3, stride=-1, padding=1), "stride"),
                         (dict(kernel_size=0, stride=1, padding=0), "kernel_size"),
                         (dict(kernel_size=3, stride=1, padding=-1), "padding"),
                         (dict(kernel_size=3, stride=1, padding=1, dilation=0), "dilation"),
                         (dict(kernel_size=7, stride=1, padding=0), "too small")]:
        with pytest.raises(ValueError, match=what):
            mp.max_pool2d_nhwc(x, **kwargs)
        with pytest.raises(RuntimeError):  # torch refuses these too
            F.max_pool2d(x, **kwargs)
    for bad in (3.0, (3, 3, 3), "3", True, (3, 2.0)):
        with pytest.raises(TypeError, match="kernel_size"):
            mp.max_pool2d_nhwc(x, bad, 2, 1)
    with pytest.raises(TypeError, match="ceil_mode"):
        mp.max_pool2d_nhwc(x, 3, 2, 1, ceil_mode=1)
    with pytest.raises(ValueError, match="empty"):
        mp.max_pool2d_nhwc(torch.empty(1, 0, 6, 6).contiguous(memory_format=CL), 3, 2, 1)
    # out: wrong shape, dtype, layout; overlapping x
    with pytest.raises(ValueError, match="shape"):
        mp.max_pool2d_nhwc(x, 3, 2, 1, out=torch.empty(1, 8, 4, 4).contiguous(memory_format=CL))
    with pytest.raises(ValueError, match="shape"):
        mp.max_pool2d_nhwc(x, 3, 2, 1, out=torch.empty(1, 8, 3, 3, dtype=torch.float16).contiguous(memory_format=CL))
    with pytest.raises(ValueError, match="channels_last"):
        mp.max_pool2d_nhwc(x, 3, 2, 1, out=torch.empty(1, 8, 3, 3))
    with pytest.raises(ValueError, match="overlap"):
        big = torch.empty(1, 8, 6, 6).contiguous(memory_format=CL)
        mp.max_pool2d_nhwc(big, 3, 1, 1, out=big)


def test_stride_defaults_to_the_kernel_size():
    assert mp.normalize_args(3, None, 1, 1, False) == ((3, 3), (3, 3), (1, 1), (1, 1))
    assert mp.normalize_args((3, 2), (), 0, (1, 2), False) == ((3, 2), (3, 2), (0, 0), (1, 2))


def test_block_sizes():
    assert mp.block_sizes(64, torch.bfloat16) == (64, 64)  # the stem pool: 8 KB of output a program
    assert mp.block_sizes(64, torch.float32) == (32, 64)
    assert mp.block_sizes(256, torch.bfloat16) == (32, 128)  # 256-byte channel rows at most
    assert mp.block_sizes(70, torch.float16) == (32, 128)
    assert mp.block_sizes(3, torch.float32) == (mp.MAX_BLOCK_P, 4)


# ---- ahead of time: sm_90a and sm_80 without a GPU -------------------------------------------
STEM = ((256, 64, 112, 112), 3, 2, 1)


def test_compile_spec_follows_the_launcher():
    spec = mp.max_pool_compile_spec(torch.bfloat16, *STEM)
    sig, ce = spec["signature"], spec["constexprs"]
    assert sig["x_ptr"] == sig["y_ptr"] == "*bf16"
    assert all(sig[k] == "i32" for k in ("P", "H", "W", "C", "Ho", "Wo"))
    # pointers and the multiples of 16 marked so (C's divisibility is what allows 128-bit access);
    # Ho = Wo = 56 are not multiples of 16
    names = mp.max_pool2d_nhwc_kernel.arg_names
    marked = {names[i] for (i,), a in spec["attrs"].items() if a == [["tt.divisibility", 16]]}
    assert marked == {"x_ptr", "y_ptr", "P", "H", "W", "C"}
    assert ce == dict(KH=3, KW=3, STRIDE_H=2, STRIDE_W=2, PAD_H=1, PAD_W=1, DIL_H=1, DIL_W=1,
                      INT64_OFFSETS=False, BLOCK_P=64, BLOCK_C=64)
    assert spec["options"] == {"num_warps": mp.NUM_WARPS, "num_stages": mp.NUM_STAGES}
    # the launcher's own derivation (on a GPU, i.e. not in the interpreter)
    out_shape, grid, scalars, constexprs = mp._pool_args(STEM[0], torch.bfloat16, (3, 3), (2, 2), (1, 1),
                                                         (1, 1), False, False)
    assert out_shape == (256, 64, 56, 56) and grid == (256 * 56 * 56 // 64, 1) and constexprs == ce
    # ints equal to 1 are constants, as the JIT specializes them; odd ones carry no divisibility
    one = mp.max_pool_compile_spec(torch.float16, (1, 1, 7, 5), 3, 2, 1)
    assert one["signature"]["C"] == "constexpr" and one["constexprs"]["C"] == 1
    assert (names.index("W"),) not in one["attrs"]
    # a batch past 2**31 elements takes 64-bit offsets
    assert mp.max_pool_compile_spec(torch.bfloat16, (4096, 64, 112, 112), 3, 2, 1)["constexprs"]["INT64_OFFSETS"]


_GLOBAL_RE = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)")


def _global_accesses(sass: str) -> dict[str, list[str]]:
    out = {"LDG": [], "STG": []}
    for op, mods in _GLOBAL_RE.findall(sass):
        out[op].append(op + mods)
    return out


def test_stem_pool_compiles_to_128_bit_accesses_without_spills(tmp_path):
    from resnet_fast.kernel_report import cubin, triton_aot

    try:
        cuobjdump = cubin.find_tool("cuobjdump")
    except cubin.ToolMissing as e:  # pragma: no cover - triton's wheel ships it
        pytest.skip(f"no cuobjdump: {e}")
    spec = mp.max_pool_compile_spec(torch.bfloat16, *STEM)
    jobs = [{"kind": "fn", "fn": "resnet_fast.kernels.max_pool:max_pool2d_nhwc_kernel", "capability": cc,
             "signature": spec["signature"], "constexprs": spec["constexprs"], "attrs": spec["attrs"],
             "options": spec["options"], "out_path": str(tmp_path / f"max_pool_sm{cc}.cubin")}
            for cc in (90, 80)]
    # compiled in a spawned worker (this process's triton is in interpreter mode); one worker: spawning
    # a second costs more than the second compile (about 1 s)
    results = triton_aot.run_jobs(jobs, workers=1)
    for job, res in zip(jobs, results):
        assert not isinstance(res, Exception), res
        where = res["target"]
        info = res.get("inspect") or cubin.inspect_cubin(res["cubin"])
        fn = info["max_pool2d_nhwc_kernel"]
        assert fn["spill_bytes"] == 0 and fn["sass"].local_ops == 0, f"{where}: spills {fn}"
        assert fn["registers"] <= 168, f"{where}: {fn['registers']} registers"
        sass = subprocess.run([cuobjdump, "-sass", res["cubin"]], capture_output=True, text=True,
                              check=True).stdout
        acc = _global_accesses(sass)
        # every tap's load and the store are 128-bit vectors (8 bf16 channels a lane)
        assert acc["LDG"] and all(".128" in a for a in acc["LDG"]), f"{where}: {acc['LDG']}"
        assert acc["STG"] and all(".128" in a for a in acc["STG"]), f"{where}: {acc['STG']}"
        if res["target"] == "sm_90a":
            assert any(a.startswith("LDG.E.128") for a in acc["LDG"])
            assert any(a.startswith("STG.E.128") for a in acc["STG"])
        # 64 pixels x 64 channels x 16 bits over 128 threads: 4 vectors a thread, each of 9 taps
        assert len(acc["LDG"]) == 4 * 9 and len(acc["STG"]) == 4, where
