"""Fused training on a GPU (issue 17): the compiled Triton training kernels, bf16 included (the
interpreter cannot check bf16 tl.dot), against float64 with the 2x-PyTorch rule, and a whole
training step captured in a CUDA graph."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

import resnet_fast as rf
from resnet_fast import backends

from ..conftest import needs_cuda
from ..reference import rel_err

pytestmark = needs_cuda
CL = torch.channels_last


def _bn_nontrivial(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
    return model


def _err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item() if torch.isfinite(a).all() else float("inf")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_resnet50_training_step_matches_float64(backend, dtype):
    ok, why = backends.ready(backend, torch.device("cuda"), dtype)
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    ref = _bn_nontrivial(torchvision.models.resnet50(num_classes=100)).cuda().train()
    ours = rf.convert(copy.deepcopy(ref), backend=backend)
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(16, 3, 96, 96, device="cuda").contiguous(memory_format=CL)
    y = torch.randint(0, 100, (16,), device="cuda")
    res = []
    for m, cast in ((ref64, None), (ref, dtype), (ours, dtype)):
        xx = x.double() if cast is None else x
        with torch.autocast("cuda", dtype=cast or torch.bfloat16, enabled=cast in (torch.bfloat16, torch.float16)):
            out = m(xx)
        loss = F.cross_entropy(out.double(), y)
        loss.backward()
        res.append((out.detach(), {n: p.grad for n, p in m.named_parameters()},
                    {n: b.clone() for n, b in m.named_buffers()}))
    (o64, g64, b64), (o_tv, g_tv, b_tv), (o, g, b) = res
    tol = 1e-2 if dtype != torch.float32 else 3e-4  # fp32 convs run TF32 (tf32x3 in Triton)
    assert _err(o, o64) <= max(tol, 2 * _err(o_tv, o64))
    for n in g64:
        assert _err(g[n], g64[n]) <= max(tol, 2 * _err(g_tv[n], g64[n])), n
    for n in b64:
        if n.endswith("num_batches_tracked"):
            assert torch.equal(b[n], b64[n]), n
        else:
            assert _err(b[n], b64[n]) <= max(tol, 2 * _err(b_tv[n], b64[n])), n


def test_training_step_replays_from_a_cuda_graph():
    """Forward, loss, backward and SGD captured once and replayed: the same losses as the eager
    steps, and the running statistics move on every replay (updated in place, on the device)."""
    ok, why = backends.ready("triton", torch.device("cuda"), torch.bfloat16)
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    base = _bn_nontrivial(torchvision.models.resnet18(num_classes=10)).cuda().train()
    models = [rf.convert(copy.deepcopy(base), backend="triton") for _ in range(2)]
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=CL)
    y = torch.randint(0, 10, (8,), device="cuda")
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]

    def step(m, opt):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        return loss

    eager = [step(models[0], opts[0]).item() for _ in range(6)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        warm = [step(models[1], opts[1]).item() for _ in range(3)]
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static = step(models[1], opts[1])
    replayed = []
    rm = models[1].layer1[0].bn1.running_mean
    before = rm.clone()
    for _ in range(3):
        g.replay()
        replayed.append(static.item())
    assert not torch.equal(rm, before)
    # the capture itself ran no step; replay i is the eager step 3 + i
    for a, b in zip(warm + replayed, eager):
        assert abs(a - b) <= 2e-2 * abs(b), (warm + replayed, eager)
