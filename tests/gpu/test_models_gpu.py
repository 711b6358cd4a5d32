"""Whole converted ResNets on a GPU, per backend: eval accuracy, torch.compile, CUDA graphs."""

import copy

import pytest
import torch
from torchvision import models

import resnet_fast as rf
from resnet_fast import backends

from ..conftest import needs_cuda
from ..reference import randomize_bn, rel_err

pytestmark = needs_cuda

KERNEL_BACKENDS = ["triton", "cuda"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# relative error bounds against float64 (DEVELOPERS.md): tf32 for float32 since cuDNN's
# default allows it and the kernels follow torch.backends.cudnn.allow_tf32
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 3e-4}


def _skip_unless(backend, dtype):
    ok, why = backends.ready(backend, torch.device("cuda"), dtype)  # builds the extension once
    if not ok:
        pytest.skip(f"{backend} cannot run {dtype}: {why}")


@pytest.fixture(scope="module")
def resnet50_pair():
    torch.manual_seed(0)
    ref = randomize_bn(models.resnet50()).eval()
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        y64 = ref.double().cuda()(x.double().cuda())
    return ref, x, y64


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_resnet50_eval_matches_float64(resnet50_pair, backend, dtype):
    _skip_unless(backend, dtype)
    ref, x, y64 = resnet50_pair
    torch_model = copy.deepcopy(ref).to("cuda", dtype).to(memory_format=torch.channels_last)
    ours = rf.convert(copy.deepcopy(ref).to("cuda", dtype), backend=backend)
    xin = x.to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = ours(xin)
        y_torch = torch_model(xin)
    err, err_torch = rel_err(y, y64), rel_err(y_torch, y64)
    assert err < TOL[dtype], (err, err_torch)
    if dtype != torch.float32:
        # never more than 2x the error of PyTorch's own model in that dtype
        assert err <= 2 * err_torch, (err, err_torch)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_resnet50_compile_fullgraph_and_cuda_graph(resnet50_pair, backend):
    dtype = torch.bfloat16
    _skip_unless(backend, dtype)
    ref, x, y64 = resnet50_pair
    ours = rf.convert(copy.deepcopy(ref).to("cuda", dtype), backend=backend)
    xin = x.to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        eager = ours(xin)
        compiled = torch.compile(ours, fullgraph=True)(xin)
        assert rel_err(compiled, eager) < 1e-2

        static_x = xin.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up: autotuning and lazy builds happen outside capture
                ours(static_x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = ours(static_x)
        static_x.copy_(torch.randn_like(static_x))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(static_y, ours(static_x)) < 1e-6


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_resnet18_export(backend):
    dtype = torch.bfloat16
    _skip_unless(backend, dtype)
    m = rf.convert(randomize_bn(models.resnet18()).eval().to("cuda", dtype), backend=backend)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ep = torch.export.export(m, (x,))
        assert rel_err(ep.module()(x), m(x)) < 1e-2


def _preact_model():
    """timm's resnetv2_50 (pre-activation, BatchNormAct2d) when timm is installed, else the
    tests' own pre-activation ResNet-18; both with randomized BN statistics."""
    try:
        import timm
    except ImportError:
        from .. import any_resnets
        return randomize_bn(any_resnets.PreActResNet(width=64)).eval(), 32
    torch.manual_seed(1)
    return randomize_bn(timm.create_model("resnetv2_50", pretrained=False)).eval(), 128


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_preactivation_model_matches_float64(dtype):
    """The prologue (BN+ReLU on load, in the input dtype's packed math) and the bare stem,
    through a whole pre-activation model: the same error rules as resnet50."""
    _skip_unless("triton", dtype)
    ref, res = _preact_model()
    x = torch.randn(4, 3, res, res)
    with torch.no_grad():
        y64 = copy.deepcopy(ref).double().cuda()(x.double().cuda())
    torch_model = copy.deepcopy(ref).to("cuda", dtype).to(memory_format=torch.channels_last)
    ours = rf.convert(copy.deepcopy(ref).to("cuda", dtype), backend="triton")
    assert any("pre_bn_relu" in r["fused"] for r in rf.fusion_summary(ours))
    xin = x.to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = ours(xin)
        y_torch = torch_model(xin)
    err, err_torch = rel_err(y, y64), rel_err(y_torch, y64)
    assert err < TOL[dtype] and err <= 2 * err_torch, (err, err_torch)
