"""A real training run on real data: scikit-learn's UCI handwritten digits (1,797 8x8 images,
shipped inside the package), a small ResNet of resnet_fast's own modules against the same
network of torchvision's, from the same init on the same batches.

~200 SGD-momentum steps in fp32 on the CPU (the torch backend: the training dataflow of the
fused ops), and a shorter run through the Triton kernels under the interpreter.
"""

import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv

import resnet_fast as rf

datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn is a test dependency (pip install '.[test]')")


def _digits():
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    x, y = x[order], y[order]
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def _downsample(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))


def torchvision_net(width=16):
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        tv.BasicBlock(width, width),
        tv.BasicBlock(width, 2 * width, 2, _downsample(width, 2 * width)),
        tv.Bottleneck(2 * width, width // 2),  # 2 * width in and out
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))


def library_net(twin: nn.Sequential, backend: str):
    """The same network built of resnet_fast's modules (its own blocks and its conv unit),
    holding copies of the twin's tensors."""
    t = copy.deepcopy(twin)
    stem = rf.ConvBNAct(t[0], t[1], relu=True, backend=backend)
    blocks = []
    for b in (t[3], t[4], t[5]):
        cls = rf.Bottleneck if isinstance(b, tv.Bottleneck) else rf.BasicBlock
        ours = cls.__new__(cls)
        nn.Module.__init__(ours)
        ours.downsample = None
        for name, child in b.named_children():
            setattr(ours, name, child)
        ours.stride = b.stride
        ours._init_fused()
        ours.backend = backend
        blocks.append(ours)
    return nn.Sequential(stem, *blocks, t[6], t[7], t[8])


def _train(model, data, steps, batch=32):
    (x, y), (xt, yt) = data
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    losses = []
    g = torch.Generator().manual_seed(1)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    return losses, acc


def _run(backend, steps, batch=32):
    """(torchvision's losses and accuracy, a torchvision twin's whose weights moved by 1e-7 (one
    fp32 ulp: its own run-to-run spread), ours)."""
    torch.manual_seed(0)
    ref = torchvision_net()
    twin = copy.deepcopy(ref)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1 + 1e-7 * torch.randn_like(p))
    ours = library_net(ref, backend)
    data = _digits()
    return [_train(m, data, steps, batch) for m in (ref, twin, ours)]


def _smooth(losses, window=20):
    return [sum(losses[i:i + window]) / window for i in range(0, len(losses) - window + 1)]


def test_digits_training_run_matches_torchvision():
    """SGD at lr 0.05 is chaotic from step ~20 on: one ulp of difference grows to 1e-3 in the
    loss within 15 steps, for torchvision against itself as for us. So the curves must agree
    exactly before that, and after it as closely as torchvision's run against its own
    ulp-perturbed twin (smoothed over 20 steps), with the same test accuracy."""
    (ref, ref_acc), (twin, twin_acc), (ours, our_acc) = _run("torch", 200)
    early = [abs(a - b) for a, b in zip(ours[:15], ref[:15])]
    assert max(early) < 1e-5, early
    spread = max(abs(a - b) for a, b in zip(_smooth(twin), _smooth(ref)))
    ours_off = max(abs(a - b) for a, b in zip(_smooth(ours), _smooth(ref)))
    assert ours_off <= max(2 * spread, 0.02), (ours_off, spread)
    assert ours[-1] < 0.3 * ours[0] and ref[-1] < 0.3 * ref[0]  # it learned
    assert ref_acc > 0.9 and our_acc > 0.9  # chance is 0.1
    assert abs(our_acc - ref_acc) <= max(0.02, 2 * abs(twin_acc - ref_acc)), (our_acc, ref_acc, twin_acc)


def test_digits_training_on_the_triton_kernels(monkeypatch):
    """The first steps (before chaos) through the Triton kernels, under the interpreter; one
    large tile config, so that the interpreter runs a few programs per conv, not hundreds."""
    if not rf.backends.available("triton", torch.device("cpu"), torch.float32)[0]:
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 on a CPU-only machine")
    from resnet_fast.kernels import conv_bn_act as conv_kernels
    monkeypatch.setenv(conv_kernels.CONFIG_ENV_VAR, "m128n64k32w4s4")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    (ref, _), _, (ours, _) = _run("triton", 6, batch=16)
    diffs = [abs(a - b) for a, b in zip(ours, ref)]
    assert max(diffs) < 1e-5, diffs
