"""resnet_fast.train_graphs.TrainingStep on the CPU: its logic, through a fake graph backend.

The fake (:class:`EagerGraphs`) runs the warm-ups and the "recorded" step eagerly, and a replay
runs the step again with the optimizer hyperparameters *as captured* (a real graph bakes Python
numbers in), so a missed learning-rate change would show as a wrong trajectory. What the CPU
cannot show (a replay reading device addresses) the GPU tests check
(tests/gpu/test_train_graphs_gpu.py). Every trajectory is compared with eager training of a
twin model from the same weights.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv

import resnet_fast as rf
from resnet_fast import fold
from resnet_fast.graphs import StaleGraphError
from resnet_fast.train_graphs import TrainingStep, capture_training_step


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class EagerGraphs:
    """A replay as a CUDA graph does it: the recorded step's computation on the live tensors'
    memory, with no version counter bumped and the hyperparameters captured baked in. Here: the
    step run eagerly on a copy of the model and optimizer, written back through the storages."""

    name = "fake"

    def __init__(self):
        self.warmups = 0
        self.replays = 0
        self.released = 0

    def check_available(self):
        pass

    def check_device(self, device):
        pass

    def new_pool(self, device):
        return object()

    def record_use(self, tensors):
        pass

    def release(self, handles):
        self.released += len(handles)

    def capture(self, step, device, *, warmup, pool):
        for _ in range(warmup):
            step(False)
            self.warmups += 1
        loss = step(True)
        model, opt, loss_fn, inputs = _closure(step)
        baked = [{k: v for k, v in g.items() if k != "params" and not isinstance(v, torch.Tensor)}
                 for g in opt.param_groups]

        def replay():
            self.replays += 1
            shadow = copy.deepcopy(model)
            twin = dict(zip(map(id, model.parameters()), shadow.parameters()))
            shadow_opt = type(opt)([{**{k: v for k, v in g.items() if k != "params"},
                                     "params": [twin[id(p)] for p in g["params"]]} for g in opt.param_groups])
            shadow_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            for g, b in zip(shadow_opt.param_groups, baked):
                g.update(b)
            shadow_opt.zero_grad(set_to_none=True)
            out = loss_fn(shadow(inputs[0]), inputs[1])
            out.backward()
            shadow_opt.step()
            with torch.no_grad():
                for real, sh in zip(list(model.parameters()) + list(model.buffers()),
                                    list(shadow.parameters()) + list(shadow.buffers())):
                    real.untyped_storage().copy_(sh.untyped_storage())
                    if real.grad is not None:
                        real.grad.untyped_storage().copy_(sh.grad.untyped_storage())
                for p in opt.state:
                    for k, v in opt.state[p].items():
                        if isinstance(v, torch.Tensor):
                            v.untyped_storage().copy_(shadow_opt.state[twin[id(p)]][k].untyped_storage())
                loss.untyped_storage().copy_(out.detach().untyped_storage())
        return loss, replay, object()


def _closure(fn):
    found = {}
    for cell in fn.__closure__:
        v = cell.cell_contents
        if isinstance(v, torch.optim.Optimizer):
            found["opt"] = v
        elif isinstance(v, nn.Module):
            found["model"] = v
        elif isinstance(v, tuple) and v and isinstance(v[0], torch.Tensor):
            found["inputs"] = v
        elif callable(v) and not isinstance(v, type):
            found["loss_fn"] = v
    return found["model"], found["opt"], found["loss_fn"], found["inputs"]


class LazyMomentum(torch.optim.Optimizer):
    """An optimizer of someone's own, with state created at its first step."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("buf", torch.ones_like(p))
                buf.mul_(0.9).add_(p.grad)
                p.sub_(g["lr"] * buf)


def small_net(seed=0):
    torch.manual_seed(seed)
    net = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=10)
    net.maxpool = nn.Identity()
    return rf.convert(net, backend="torch")


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def eager_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def assert_same_state(a, b, opt_a=None, opt_b=None):
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.allclose(sa[k].double(), sb[k].double(), rtol=1e-6, atol=1e-7), k
    if opt_a is not None:
        for (pa, st_a), (pb, st_b) in zip(opt_a.state.items(), opt_b.state.items()):
            for k in st_a:
                va, vb = st_a[k], st_b[k]
                if isinstance(va, torch.Tensor):
                    assert torch.allclose(va.double(), vb.double(), rtol=1e-6, atol=1e-7), k


def make(opt_factory, **kw):
    eager = small_net()
    graphed = copy.deepcopy(eager)
    opt_e, opt_g = opt_factory(eager), opt_factory(graphed)
    fake = EagerGraphs()
    step = TrainingStep(graphed, opt_g, F.cross_entropy, _backend=fake, **kw)
    return eager, opt_e, graphed, opt_g, step, fake


SGD = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)  # noqa: E731
ADAM = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)  # noqa: E731


@pytest.mark.parametrize("opt_factory", [SGD, ADAM], ids=["sgd-momentum", "adamw-fused"])
def test_graphed_steps_follow_the_eager_trajectory(opt_factory):
    eager, opt_e, graphed, opt_g, step, fake = make(opt_factory)
    for x, y in batches(3):
        le = eager_step(eager, opt_e, x, y)
        lg = step(x, y)
        assert torch.allclose(le, lg, rtol=1e-6), (le, lg)
    assert fake.warmups == 3 and fake.replays == 3 and step.captures == 1
    assert_same_state(eager, graphed, opt_e, opt_g)
    # .grad holds the last step's gradients
    for pe, pg in zip(eager.parameters(), graphed.parameters()):
        assert torch.allclose(pe.grad, pg.grad, rtol=1e-5, atol=1e-7)


def test_capture_leaves_no_trace():
    """The warm-ups and the capture train nothing: parameters, BatchNorm buffers (and
    num_batches_tracked) and the optimizer state are as before."""
    model = small_net()
    before = copy.deepcopy(model.state_dict())
    opt = SGD(model)
    x, y = batches(1)[0]
    capture_training_step(model, opt, F.cross_entropy, x, y, _backend=EagerGraphs())
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    for s in opt.state.values():
        assert all(not v.any() for v in s.values() if isinstance(v, torch.Tensor))


def test_weight_changed_outside_the_graph_is_refused():
    eager, opt_e, graphed, opt_g, step, fake = make(SGD, on_change="error")
    data = batches(2)
    step(*data[0])
    with torch.no_grad():
        graphed.fc.weight.mul_(0.5)
    with pytest.raises(StaleGraphError, match="fc.weight"):
        step(*data[1])


def test_weight_changed_outside_the_graph_recaptures():
    eager, opt_e, graphed, opt_g, step, fake = make(SGD)
    data = batches(3)
    for i, (x, y) in enumerate(data):
        if i == 1:
            with torch.no_grad():
                for m in (eager, graphed):
                    m.layer1[0].conv1.weight.mul_(0.5)
                    m.fc.weight.copy_(torch.ones_like(m.fc.weight) * 0.01)
        le, lg = eager_step(eager, opt_e, x, y), step(x, y)
        assert torch.allclose(le, lg, rtol=1e-6), (i, le, lg)
    assert step.captures == 2 and "layer1.0.conv1.weight" in step.last_change
    assert_same_state(eager, graphed, opt_e, opt_g)


def test_float_learning_rate_change_recaptures():
    """A scheduler changes a float lr the graph baked in: captured again, not replayed stale."""
    eager, opt_e, graphed, opt_g, step, fake = make(SGD)
    sched_e = torch.optim.lr_scheduler.StepLR(opt_e, 1, gamma=0.1)
    sched_g = torch.optim.lr_scheduler.StepLR(opt_g, 1, gamma=0.1)
    for x, y in batches(3):
        le, lg = eager_step(eager, opt_e, x, y), step(x, y)
        assert torch.allclose(le, lg, rtol=1e-6)
        sched_e.step()
        sched_g.step()
    assert step.captures == 3 and "lr" in step.last_change
    assert_same_state(eager, graphed, opt_e, opt_g)


def test_load_state_dict_and_mode_flips_are_seen():
    eager, opt_e, graphed, opt_g, step, fake = make(SGD, on_change="error")
    data = batches(2)
    step(*data[0])
    graphed.load_state_dict(small_net(seed=3).state_dict())
    with pytest.raises(StaleGraphError, match="modified in place"):
        step(*data[1])
    step.reset()
    step(*data[1])
    graphed.eval()
    with pytest.raises(StaleGraphError, match="eval"):
        step(*data[1])


def test_replays_invalidate_the_fold_caches():
    """A real replay writes the weights without version bumps: eager eval() afterwards must
    refold, so every call bumps the fold generation."""
    *_, step, fake = make(SGD)
    data = batches(2)
    step(*data[0])
    g = fold._generation
    step(*data[1])
    assert fold._generation > g and step.captures == 1


def test_a_new_batch_shape_gets_its_own_graph():
    eager, opt_e, graphed, opt_g, step, fake = make(SGD)
    x, y = batches(1)[0]
    for xb, yb in ((x, y), (x[:2], y[:2]), (x, y)):
        le, lg = eager_step(eager, opt_e, xb, yb), step(xb, yb)
        assert torch.allclose(le, lg, rtol=1e-6)
    assert step.num_graphs == 2 and step.captures == 2
    assert_same_state(eager, graphed, opt_e, opt_g)


def test_optimizers_it_cannot_capture_are_refused():
    model = small_net()
    with pytest.raises(ValueError, match="capturable=True"):
        TrainingStep(model, torch.optim.Adam(model.parameters()), F.cross_entropy, _backend=EagerGraphs())
    with pytest.raises(ValueError, match="dampening"):
        TrainingStep(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1),
                     F.cross_entropy, _backend=EagerGraphs())
    own = LazyMomentum(model.parameters())
    with pytest.raises(ValueError, match="one eager step"):
        TrainingStep(model, own, F.cross_entropy, _backend=EagerGraphs())
    x, y = batches(1)[0]
    eager_step(model, own, x, y)  # its state exists now: accepted
    TrainingStep(model, own, F.cross_entropy, _backend=EagerGraphs())
    with pytest.raises(ValueError, match="none of the model's parameters"):
        TrainingStep(model, torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), F.cross_entropy,
                     _backend=EagerGraphs())


def test_needs_cuda_without_a_fake():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    model = small_net()
    with pytest.raises(RuntimeError, match="CUDA"):
        TrainingStep(model, SGD(model), F.cross_entropy)
