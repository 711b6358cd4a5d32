"""resnet_fast.TrainingStep on a CUDA device: real captures of a converted ResNet's training step.

Each test trains an eager twin from the same weights on the same batches and compares: a replay
runs the kernels the eager step runs, so trajectories agree to rounding (bf16 autocast). What
only a real graph shows: a replay writes the weights without version bumps, so an eager eval()
afterwards must still see the trained weights (the step invalidates the fold caches); a float
learning rate is baked into the graph, so a scheduler's change must recapture; a weight written
outside the graph is refused or recaptured. Step times (eager vs replay) are printed (``-s``).
"""

import copy
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torchvision import models

import resnet_fast as rf
from resnet_fast.graphs import StaleGraphError

from ..conftest import needs_cuda
from ..reference import randomize_bn, rel_err

pytestmark = needs_cuda

BATCH, RES = 16, 64
CL = torch.channels_last


def _net(seed=0):
    torch.manual_seed(seed)
    return rf.convert(randomize_bn(models.resnet18(num_classes=10))).cuda().to(memory_format=CL).train()


def _batches(n, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(BATCH, 3, RES, RES, device="cuda", generator=g).contiguous(memory_format=CL),
             torch.randint(0, 10, (BATCH,), device="cuda", generator=g)) for _ in range(n)]


def _loss(out, t):
    return F.cross_entropy(out.float(), t)


def _eager_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    loss = _loss(out, y)
    loss.backward()
    opt.step()
    return loss.detach()


def _pair(opt_factory, **kw):
    eager = _net()
    graphed = copy.deepcopy(eager)
    opt_e, opt_g = opt_factory(eager), opt_factory(graphed)
    step = rf.TrainingStep(graphed, opt_g, _loss, autocast_dtype=torch.bfloat16, **kw)
    return eager, opt_e, graphed, opt_g, step


def _sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


def _close_models(a, b, rtol=2e-2):
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if va.is_floating_point():
            assert rel_err(vb, va) < rtol, (k, rel_err(vb, va))
        else:
            assert torch.equal(va, vb), k


@pytest.mark.parametrize("opt_factory", [
    _sgd,
    lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, capturable=True),
    lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, fused=True),
], ids=["sgd", "adamw-capturable", "sgd-fused"])
def test_graphed_training_follows_eager(opt_factory):
    eager, opt_e, graphed, opt_g, step = _pair(opt_factory)
    for x, y in _batches(4):
        le, lg = _eager_step(eager, opt_e, x, y), step(x, y)
        assert torch.isfinite(lg) and abs(le.item() - lg.item()) <= 2e-2 * abs(le.item()), (le, lg)
    assert step.captures == 1
    _close_models(eager, graphed)
    # eval() after graphed steps: the replays' weights, not the folds cached before them
    eager.eval(), graphed.eval()
    with torch.no_grad():
        x = _batches(1, seed=5)[0][0].to(torch.bfloat16)
        ye, yg = eager.bfloat16()(x), graphed.bfloat16()(x)
    assert rel_err(yg.float(), ye.float()) < 5e-2


def test_capture_trains_nothing():
    model = _net()
    before = copy.deepcopy(model.state_dict())
    x, y = _batches(1)[0]
    rf.capture_training_step(model, _sgd(model), _loss, x, y, autocast_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_outside_writes_are_refused_or_recaptured():
    eager, opt_e, graphed, opt_g, step = _pair(_sgd, on_change="error")
    data = _batches(3)
    step(*data[0])
    _eager_step(eager, opt_e, *data[0])
    with torch.no_grad():
        for m in (eager, graphed):
            m.fc.weight.mul_(0.5)
    with pytest.raises(StaleGraphError, match="fc.weight"):
        step(*data[1])
    step.on_change = "recapture"
    for x, y in data[1:]:
        le, lg = _eager_step(eager, opt_e, x, y), step(x, y)
        assert abs(le.item() - lg.item()) <= 2e-2 * abs(le.item()), (le, lg)
    assert step.captures == 2
    _close_models(eager, graphed)


def test_schedules_float_lr_recaptures_tensor_lr_does_not():
    for lr, captures in ((0.01, 3), (torch.tensor(0.01, device="cuda"), 1)):
        def opt_factory(m, lr=lr):
            return torch.optim.SGD(m.parameters(), lr=lr.clone() if isinstance(lr, torch.Tensor) else lr,
                                   momentum=0.9, fused=True)
        eager, opt_e, graphed, opt_g, step = _pair(opt_factory)
        scheds = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in (opt_e, opt_g)]
        for x, y in _batches(3):
            le, lg = _eager_step(eager, opt_e, x, y), step(x, y)
            assert abs(le.item() - lg.item()) <= 2e-2 * abs(le.item()), (lr, le, lg)
            for s in scheds:
                s.step()
        assert step.captures == captures, (lr, step.captures, step.last_change)
        _close_models(eager, graphed)


def test_graphed_step_time():
    eager, opt_e, graphed, opt_g, step = _pair(_sgd)
    x, y = _batches(1)[0]

    def timed(fn, n=20):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            out.append((time.perf_counter() - t) * 1e3)
        return statistics.median(out)
    te = timed(lambda: _eager_step(eager, opt_e, x, y))
    tg = timed(lambda: step(x, y))
    print(f"\nresnet18 b{BATCH} {RES}x{RES} bf16 training step: eager {te:.2f} ms, graphed {tg:.2f} ms")
