"""FP8 inference on a CUDA device (sm_89+): the e4m3 conv kernel against the reference op, and a
quantized converted ResNet-50 (eager and CUDA-graphed) against its bf16 self.

The kernel and the reference compute the same fp32 sums in different orders: fp32 outputs agree
to ~1e-5, e4m3 outputs to one e4m3 step where a value sits on a rounding boundary. Timings
(bf16 vs fp8 forward, batch 64) are printed, not asserted: run with ``-s``.
"""

import statistics

import pytest
import torch
from torchvision import models

import resnet_fast as rf
from resnet_fast import backends, fp8
from resnet_fast.fp8_ops import conv_bn_act_fp8, conv_bn_act_fp8_reference

from ..conftest import needs_cuda
from ..reference import randomize_bn

pytestmark = needs_cuda
CL = torch.channels_last


def _fp8_gpu():
    ok, why = backends.get("triton").fp8_support(torch.device("cuda"))
    if not ok:
        pytest.skip(why)


def _case(n, cin, h, cout, k, residual, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, cin, h, h, device="cuda", generator=g).relu() * 3
    w = torch.randn(cout, cin, k, k, device="cuda", generator=g) / (cin * k * k) ** 0.5
    b = torch.randn(cout, device="cuda", generator=g) * 0.5
    xs = torch.tensor([x.abs().max().item() / fp8.E4M3_MAX], device="cuda")
    ws = fp8.weight_scales(w)
    xq = fp8.quantize(x, xs).contiguous(memory_format=CL)
    wq = fp8.quantize_weight(w, ws).contiguous(memory_format=CL)
    r = rs = None
    if residual:
        rr = torch.randn(n, cout, h, h, device="cuda", generator=g)
        rs = torch.tensor([rr.abs().max().item() / fp8.E4M3_MAX], device="cuda")
        r = fp8.quantize(rr, rs).contiguous(memory_format=CL)
    return xq, wq, b, ws, xs, r, rs


@pytest.mark.parametrize("shape", [(8, 64, 56, 64, 3, False), (8, 256, 14, 1024, 1, True),
                                   (4, 512, 7, 2048, 1, True), (3, 96, 13, 40, 3, True)],
                         ids=["l1-3x3", "l3-1x1-res", "l4-1x1-res", "odd"])
def test_kernel_matches_reference(shape):
    _fp8_gpu()
    n, cin, h, cout, k, res = shape
    xq, wq, b, ws, xs, r, rs = _case(n, cin, h, cout, k, res)
    pad = k // 2
    args = (xq, wq, b, ws, xs, [1, 1], [pad, pad], [1, 1], 1, r, rs, True, None, torch.float32)
    ref = conv_bn_act_fp8_reference(*args)
    out = conv_bn_act_fp8(*args[:9], residual=r, res_scale=rs, relu=True, out_dtype=torch.float32, backend="triton")
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    os_ = torch.tensor([ref.abs().max().item() / 448], device="cuda")
    q = conv_bn_act_fp8(*args[:9], residual=r, res_scale=rs, relu=True, out_scale=os_, backend="triton").float()
    qr = conv_bn_act_fp8_reference(*args[:12], os_, torch.bfloat16).float()
    close = (q == qr) | ((q - qr).abs() <= 0.125 * torch.maximum(q.abs(), qr.abs()) + 2.0 ** -9)
    assert close.all() and (q == qr).float().mean() > 0.97


def test_saturation_and_nan():
    _fp8_gpu()
    xq, wq, b, ws, xs, _, _ = _case(2, 64, 9, 64, 1, False)
    out = conv_bn_act_fp8(xq, wq, b, ws, xs, relu=False, out_scale=torch.tensor([1e-4], device="cuda"),
                          backend="triton").float()
    assert not torch.isnan(out).any() and out.abs().max() == 448
    x_nan = xq.clone()
    x_nan[0, 5, 4, 4] = float("nan")
    out = conv_bn_act_fp8(x_nan, wq, b, ws, xs, relu=True, out_scale=torch.tensor([0.05], device="cuda"),
                          backend="triton").float()
    assert torch.isnan(out[0, :, 4, 4]).all() and not torch.isnan(out[0, :, 0, 0]).any()


@pytest.fixture(scope="module")
def resnet50_pair():
    torch.manual_seed(0)
    m = randomize_bn(models.resnet50()).eval().to("cuda", torch.bfloat16)
    bf16 = rf.convert(m)
    q = rf.convert(randomize_bn(models.resnet50()).eval().to("cuda", torch.bfloat16))
    q.load_state_dict(bf16.state_dict())
    g = torch.Generator(device="cuda").manual_seed(1)
    calib = [torch.randn(32, 3, 224, 224, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2)]
    rf.quantize_fp8(q, calib)
    return bf16, q


def test_quantized_resnet50_tracks_bf16(resnet50_pair):
    _fp8_gpu()
    bf16, q = resnet50_pair
    x = torch.randn(16, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref, out = bf16(x).float(), q(x).float()
    assert torch.isfinite(out).all()
    sqnr = fp8.sqnr_db(out, ref)
    rows = rf.quantize.layer_sqnr(q, x[:8])
    print(f"\nresnet50 fp8 logits vs bf16: {sqnr:.1f} dB; per layer min {min(r['sqnr_db'] for r in rows):.1f} dB, "
          f"median {statistics.median(r['sqnr_db'] for r in rows):.1f} dB")
    assert sqnr > 10  # random weights, random data: a sanity bound; the contract is digits + ImageNet
    assert all(r["sqnr_db"] > 15 for r in rows), rows


def test_graphed_fp8_equals_eager_and_time(resnet50_pair):
    _fp8_gpu()
    bf16, q = resnet50_pair
    x = torch.randn(64, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = q(x)
    runner = rf.CudaGraphRunner(q)
    assert torch.equal(runner(x), eager)

    def timed(fn, n=20):
        with torch.no_grad():
            for _ in range(3):
                fn(x)
            torch.cuda.synchronize()
            ts = []
            for _ in range(n):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn(x)
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
        return statistics.median(ts)
    t16 = timed(rf.CudaGraphRunner(bf16))
    t8 = timed(runner)
    print(f"\nresnet50 b64 graphed forward: bf16 {t16:.2f} ms, fp8 {t8:.2f} ms ({t16 / t8:.2f}x)")
