"""Inference round 2 (issue 18) on a CUDA device: the dense-row stem and its padded input, the
values-only NHWC max-pool, the persistent TMA 1x1 GEMM, the direct relaunch, and ``auto`` by
measurement. Correctness is asserted; the timings are printed (``-s``) for the session log, the
committed figures come from ``benchmarks.report``.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from resnet_fast import backends, ops

from ..conftest import needs_cuda
from ..conv_cases import make_conv, reference
from ..reference import rel_err

pytestmark = needs_cuda
pytest.importorskip("triton", reason="triton is not installed")

from resnet_fast.kernels import conv_bn_act as conv_kernels  # noqa: E402
from resnet_fast.kernels import gemm_tma  # noqa: E402
from resnet_fast.kernels import layout as layout_kernels  # noqa: E402
from resnet_fast.kernels import max_pool as pool_kernels  # noqa: E402

CL = torch.channels_last
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _bound(dtype, err, torch_err):
    if dtype == torch.float32:
        return err < 3e-4  # TF32-class operands (tf32x3 in the kernel): the tf32 bound
    return err < 1e-2 and err <= 2 * max(torch_err, 1e-3)


def _time_us(fn, reps=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 224, 224), (3, 37, 29)], ids=["224", "odd"])
def test_dense_row_stem(dtype, shape):
    n, h, w = shape
    args = make_conv(3, 64, 7, 2, 3, h, w, n, dtype, residual=False, device="cuda")
    ref = reference(args, True, torch.float64)
    torch_err = rel_err(reference(args, True, dtype), ref)
    x4 = layout_kernels.to_nhwc_padded(args["x"], 4)
    w4 = torch.zeros(64, 4, 7, 7, device="cuda", dtype=dtype)
    w4[:, :3] = args["weight"]
    w4 = w4.contiguous(memory_format=CL)
    out = torch.full(ref.shape, float("nan"), device="cuda", dtype=dtype).contiguous(memory_format=CL)
    y = conv_kernels.conv_bn_act(x4, w4, args["bias"], [2, 2], [3, 3], [1, 1], relu=True, out=out)
    launch = conv_kernels._launch_for(x4, w4, (2, 2), (3, 3), (1, 1), False, True, False, False, None)
    assert launch.constexprs["DENSE_CIN"] == 4
    assert _bound(dtype, rel_err(y, ref), torch_err), (rel_err(y, ref), torch_err)


def test_stem_timing_dense_vs_flat():
    """The dense-row stem against the flat path it replaces and cuDNN, at batch 64 bf16."""
    dtype = torch.bfloat16
    args = make_conv(3, 64, 7, 2, 3, 224, 224, 64, dtype, residual=False, device="cuda")
    x4 = layout_kernels.to_nhwc_padded(args["x"], 4)
    w4 = torch.zeros(64, 4, 7, 7, device="cuda", dtype=dtype)
    w4[:, :3] = args["weight"]
    w4 = w4.contiguous(memory_format=CL)
    b = args["bias"]
    dense = _time_us(lambda: conv_kernels.conv_bn_act(x4, w4, b, [2, 2], [3, 3], [1, 1]))
    flat = _time_us(lambda: conv_kernels.conv_bn_act(args["x"], args["weight"], b, [2, 2], [3, 3], [1, 1]))
    pad = _time_us(lambda: layout_kernels.to_nhwc_padded(args["x"], 4))
    xn = args["x"].contiguous()
    wn = args["weight"].contiguous()
    cudnn = _time_us(lambda: torch.relu(F.conv2d(xn, wn, b.to(dtype), 2, 3)))
    print(f"\nstem b64 bf16: dense rows {dense:.0f} us, flat {flat:.0f} us, input conversion {pad:.0f} us, "
          f"cuDNN conv+bias+relu (NCHW) {cudnn:.0f} us")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_to_nhwc_padded(dtype):
    x = torch.randn(4, 3, 61, 47, device="cuda").to(dtype)
    y = layout_kernels.to_nhwc_padded(x, 4)
    assert torch.equal(y[:, :3], x) and not y[:, 3].any() and y.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geo", [(64, 112, 112, 3, 2, 1), (70, 13, 11, 3, 2, 1), (24, 9, 9, 2, 1, 0)],
                         ids=["stem", "odd", "k2s1"])
def test_max_pool(dtype, geo):
    c, h, w, k, s, p = geo
    x = torch.randn(8, c, h, w, device="cuda").to(dtype).contiguous(memory_format=CL)
    x[0, 0, 0, 0] = float("nan")
    y = pool_kernels.max_pool2d_nhwc(x, k, s, p)
    assert torch.equal(y.isnan(), F.max_pool2d(x, k, s, p).isnan())
    torch.testing.assert_close(y, F.max_pool2d(x, k, s, p), rtol=0, atol=0, equal_nan=True)


def test_max_pool_timing():
    x = torch.randn(256, 64, 112, 112, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=CL)
    ours = _time_us(lambda: pool_kernels.max_pool2d_nhwc(x, 3, 2, 1))
    eager = _time_us(lambda: F.max_pool2d(x, 3, 2, 1))
    copy_ = _time_us(lambda: x.clone())
    print(f"\nstem max-pool b256 bf16: ours {ours:.0f} us, eager {eager:.0f} us, a copy of its input {copy_:.0f} us")


TMA_LAYERS = [(256, 1024, 14, True), (1024, 256, 14, False), (512, 2048, 7, True), (2048, 512, 7, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", TMA_LAYERS, ids=lambda t: f"{t[0]}-{t[1]}_{t[2]}px{'_res' if t[3] else ''}")
def test_tma_gemm(dtype, layer):
    cin, cout, hw, res = layer
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90")
    args = make_conv(cin, cout, 1, 1, 0, hw, hw, 8, dtype, residual=res, device="cuda")
    ref = reference(args, True, torch.float64)
    torch_err = rel_err(reference(args, True, dtype), ref)
    out = torch.full(ref.shape, float("nan"), device="cuda", dtype=dtype).contiguous(memory_format=CL)
    y = gemm_tma.conv1x1_bn_act(args["x"], args["weight"], args["bias"], args["residual"], True, out=out)
    assert _bound(dtype, rel_err(y, ref), torch_err), (rel_err(y, ref), torch_err)


def test_tma_gemm_timing():
    """TMA GEMM against conv_bn_act on ResNet-50's stage 3-4 1x1 layers at batch 256 bf16."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90")
    for cin, cout, hw, res in TMA_LAYERS:
        args = make_conv(cin, cout, 1, 1, 0, hw, hw, 256, torch.bfloat16, residual=res, device="cuda")
        x, w, b, r = args["x"], args["weight"], args["bias"], args["residual"]
        tma = _time_us(lambda: gemm_tma.conv1x1_bn_act(x, w, b, r, True))
        base = _time_us(lambda: conv_kernels.conv_bn_act(x, w, b, [1, 1], [0, 0], [1, 1], r, True))
        print(f"\n1x1 {cin}->{cout} {hw}x{hw}{' +res' if res else ''}: TMA {tma:.0f} us, conv_bn_act {base:.0f} us")


def test_relaunch_equals_first_launch():
    """The direct relaunch (kernels/launch.py) computes what the first launch did."""
    args = make_conv(64, 64, 3, 1, 1, 28, 28, 4, torch.bfloat16, residual=True, device="cuda")
    be = backends.get("triton")
    call = (args["x"], args["weight"], args["bias"], [1, 1], [1, 1], [1, 1], 1, args["residual"], True, None, None)
    first = be.conv_bn_act(*call)
    run = be.prepare_conv(*call)
    again = run(args["x"], args["weight"], args["bias"], args["residual"], None, None)
    third = run(args["x"], args["weight"], args["bias"], args["residual"], None, None)  # the direct path
    torch.cuda.synchronize()
    assert torch.equal(first, again) and torch.equal(first, third)


def test_converted_model_host_path_and_result():
    """A converted resnet50 at batch 1 bf16: the second forward (prepared calls, direct
    relaunches) equals the first, and matches torchvision; plain forward latency printed."""
    import torchvision

    import resnet_fast

    m32 = torchvision.models.resnet50().eval().cuda()
    ref = copy.deepcopy(m32).to(torch.bfloat16)
    m = resnet_fast.convert(copy.deepcopy(m32).to(torch.bfloat16))
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        a, b = m(x), m(x)
        r32 = m32(x.float())
        assert torch.equal(a, b)
        eager_err = rel_err(ref(x), r32)
        assert rel_err(a, r32) <= 2 * eager_err + 1e-3, (rel_err(a, r32), eager_err)
        ours = _time_us(lambda: m(x))
        eager = _time_us(lambda: ref(x))
    print(f"\nresnet50 b1 plain forward bf16: resnet_fast {ours:.0f} us, eager {eager:.0f} us")


def test_auto_measures_and_remembers(tmp_path, monkeypatch):
    from resnet_fast.backends import measured

    ok, why = backends.available("cuda", torch.device("cuda"), torch.bfloat16)
    if not ok:
        pytest.skip(f"one kernel backend only ({why})")
    monkeypatch.setenv(measured.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(measured, "_choices", {})
    monkeypatch.setattr(measured, "_disk", None)
    args = make_conv(256, 256, 3, 1, 1, 14, 14, 64, torch.bfloat16, residual=False, device="cuda")
    be = backends.resolve(None, args["x"], weight=args["weight"], groups=1,
                          call=([1, 1], [1, 1], [1, 1], False, True))
    assert be.name in ("triton", "cuda")
    assert (tmp_path / "choices.json").exists()
    print(f"\nauto for 256->256 3x3 14px b64 bf16: {measured.choices()}")
    assert os.path.getsize(tmp_path / "choices.json") > 0
