"""On a GPU, per kernel backend: the ops' backward (registered for every backend's op) against
float64 autograd, the residual join on the add_relu kernel, and never-stale folds after a
fused optimizer step (CUDA fused AdamW)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import resnet_fast as rf
from resnet_fast import backends, ops

from ..conftest import needs_cuda
from ..reference import randomize_bn, rel_err

pytestmark = needs_cuda

KERNEL_BACKENDS = ["triton", "cuda"]
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2}
CL = torch.channels_last


def _skip_unless(backend, dtype):
    ok, why = backends.ready(backend, torch.device("cuda"), dtype)
    if not ok:
        pytest.skip(f"{backend} cannot run {dtype}: {why}")


def _torch_grads(ts, g):
    """PyTorch's own gradients of the same problem from the same low-precision tensors (what
    the 2x rule compares against); the fp32 bias added in the input dtype, as eager code does."""
    x, w, b, r = (t.detach().clone().requires_grad_() for t in ts)
    y = torch.relu(F.conv2d(x, w, None, 1, 1) + b.to(x.dtype).view(1, -1, 1, 1) + r)
    return torch.autograd.grad(y, (x, w, b, r), g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_conv_op_backward_matches_float64(backend, dtype):
    _skip_unless(backend, dtype)
    torch.manual_seed(0)
    x = torch.randn(4, 64, 14, 14, device="cuda").to(dtype).contiguous(memory_format=CL)
    w = (torch.randn(64, 64, 3, 3, device="cuda") / 24).to(dtype).contiguous(memory_format=CL)
    b = torch.randn(64, device="cuda")
    r = torch.randn(4, 64, 14, 14, device="cuda").to(dtype).contiguous(memory_format=CL)
    ts = [t.requires_grad_() for t in (x, w, b, r)]
    y = ops.conv_bn_act(x, w, b, 1, 1, 1, 1, r, True, backend=backend)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, ts, g)
    ref = [t.detach().double().requires_grad_() for t in ts]
    y64 = torch.relu(F.conv2d(ref[0], ref[1], ref[2], 1, 1) + ref[3])
    want = torch.autograd.grad(y64, ref, g.double())
    theirs = _torch_grads(ts, g)
    for name, a, e, t in zip(("x", "weight", "bias", "residual"), got, want, theirs):
        err, torch_err = rel_err(a, e), rel_err(t, e)
        assert err < TOL[dtype] and err <= 2 * torch_err + 1e-6, (name, err, torch_err)


class _SEBlock(torch.nn.Module):
    def __init__(self, c=64):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)
        self.conv2, self.bn2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)
        self.fc = torch.nn.Conv2d(c, c, 1)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(out, 1)))
        return F.relu(out + x)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_residual_join_on_the_add_relu_kernel(backend):
    _skip_unless(backend, torch.bfloat16)
    torch.manual_seed(0)
    ref = randomize_bn(_SEBlock()).eval().cuda()
    ours = rf.convert(copy.deepcopy(ref), backend=backend).bfloat16()
    x = torch.randn(8, 64, 28, 28, device="cuda").contiguous(memory_format=CL)
    with torch.no_grad():
        y = ours(x.bfloat16())
        y64 = ref.double()(x.double())
        torch_err = rel_err(copy.deepcopy(ref).bfloat16()(x.bfloat16()), y64)
    err = rel_err(y, y64)
    assert err < 1e-2 and err <= 2 * torch_err, (err, torch_err)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_adamw_step_refolds(backend):
    _skip_unless(backend, torch.bfloat16)
    torch.manual_seed(0)
    from torchvision import models
    ref = randomize_bn(models.resnet18(num_classes=10)).cuda().bfloat16().eval()
    ours = rf.convert(copy.deepcopy(ref), backend=backend).eval()
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=CL)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (ref, ours)]
    with torch.no_grad():
        ours(x)  # fills the fold caches
    for m, opt in zip((ref, ours), opts):
        m(x).float().square().mean().backward()  # eval() with autograd: the reference math
        opt.step()
    with torch.no_grad():
        y, y0 = ours(x), ref(x)
    assert rel_err(y, y0) < 2e-2  # bf16 fused kernels against bf16 eager, same weights
