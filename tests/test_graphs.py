"""resnet_fast.graphs.CudaGraphRunner on the CPU: the signature logic, through a fake graph backend.

The fake (:class:`FrozenGraphs`) does what a real CUDA graph does to the model's state: at
capture it freezes a deep copy of the model, and a replay computes with that copy into the
static output. So a replay after a change the runner failed to notice answers with the old
model, exactly as a stale CUDA graph would, and the tests compare every answer with the eager
converted model's. Models: torchvision's resnet18 converted with the torch backend at 32x32.
"""

import copy
import gc
import os
import weakref

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn
from torch.nn.modules import module as nn_module
from torchvision import models

import resnet_fast as rf
from resnet_fast import backends, fold
from resnet_fast.graphs import CudaGraphRunner, StaleGraphError, capture

from .reference import randomize_bn

X_SHAPE = (1, 3, 32, 32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these models are tiny: threads only add contention (and this module's run time)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class FrozenGraphs:
    """The runner's graph backend, on the CPU: see the module doc."""

    name = "fake"

    def __init__(self, model):
        self.model = model
        self.pools = []         # the pool of each capture
        self.warmups = 0
        self.replays = 0
        self.released = 0
        self.fold_calls_while_capturing = 0

    def check_available(self):
        pass

    def check_input(self, x):
        pass

    def new_pool(self, device):
        return object()

    def capture(self, fn, static_input, *, warmup, pool):
        assert not torch.is_grad_enabled()  # inference capture
        for _ in range(warmup):
            fn(static_input, False)
            self.warmups += 1
        calls = _FoldCounter.calls
        out = fn(static_input, True)
        self.fold_calls_while_capturing += _FoldCounter.calls - calls
        frozen = copy.deepcopy(self.model)  # what the graph baked in
        self.pools.append(pool)

        def replay():
            self.replays += 1
            with torch.no_grad():
                _copy_tree(out, frozen(static_input))
        return out, replay, frozen

    def record_use(self, tensors):
        self.recorded = {id(t) for t in tensors}  # ids: holding them would keep them alive

    def release(self, handles):
        self.released += len(handles)


def _copy_tree(dst, src):
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for k in dst:
            _copy_tree(dst[k], src[k])
    else:
        for a, b in zip(dst, src):
            _copy_tree(a, b)


class _FoldCounter:
    calls = 0


@pytest.fixture(autouse=True)
def _count_folds(monkeypatch):
    real = fold._fold

    def counted(*a, **k):
        _FoldCounter.calls += 1
        return real(*a, **k)
    monkeypatch.setattr(fold, "_fold", counted)


def _model():
    return rf.convert(randomize_bn(models.resnet18(num_classes=10)).eval(), backend="torch")


def _runner(model, **kw):
    kw.setdefault("warmup", 1)
    return CudaGraphRunner(model, _backend=FrozenGraphs(model), **kw)


def _eager(model, x):
    with torch.no_grad():
        return model(x)


def _x(*shape):
    return torch.randn(*(shape or X_SHAPE))


# ---------------------------------------------------------------------------------------
# Signatures: one graph each, replayed while nothing changes
# ---------------------------------------------------------------------------------------
def test_same_signature_replays_without_recapture():
    model = _model()
    runner = _runner(model)
    for _ in range(3):
        x = _x()
        assert torch.equal(runner(x), _eager(model, x))
    assert runner.captures == 1 and runner.num_graphs == 1
    assert runner._backend.replays == 3 and runner._backend.warmups == 1
    assert runner.last_change is None


def test_each_new_signature_captures_a_graph_all_in_one_pool():
    model = _model()
    runner = _runner(model)
    xs = [_x(), _x(2, 3, 32, 32), _x().contiguous(memory_format=torch.channels_last)]
    for i, x in enumerate(xs):
        assert torch.equal(runner(x), _eager(model, x))
        assert runner.captures == runner.num_graphs == i + 1
    for x in xs:  # all held: calling them again replays
        assert torch.equal(runner(x), _eager(model, x))
    assert runner.captures == 3
    pools = runner._backend.pools
    assert len(pools) == 3 and all(p is pools[0] for p in pools)
    # the static input keeps the caller's layout
    assert runner.static_input(xs[2]).is_contiguous(memory_format=torch.channels_last)
    assert runner.static_input(xs[0]).is_contiguous()


def test_a_given_pool_is_used_for_every_graph():
    model = _model()
    pool = object()
    runner = _runner(model, pool=pool)
    runner(_x())
    runner(_x(2, 3, 32, 32))
    assert runner._backend.pools == [pool, pool]


def test_capture_helper_captures_the_examples_now():
    model = _model()
    x1, x2 = _x(), _x(2, 3, 32, 32)
    runner = capture(model, x1, x2, warmup=2, _backend=FrozenGraphs(model))
    assert runner.captures == 2 and runner._backend.warmups == 4
    assert torch.equal(runner(x2), _eager(model, x2))
    assert runner.captures == 2


def test_warmups_fill_the_fold_caches_so_nothing_folds_while_capturing():
    model = _model()
    rf.verify_folds(True)
    try:
        runner = _runner(model, warmup=2)
        runner(_x())
        be = runner._backend
        assert be.fold_calls_while_capturing == 0
        # the folded weights (made by the warm-ups) are handed over to the caller's stream
        folded = {id(s.fold._value[0]) for s in rf.graphs._unit_states(model.modules())
                  if s.fold._value is not None}
        assert len(folded) == 20 and folded <= be.recorded
        assert fold._verify  # restored after the capture
    finally:
        rf.verify_folds(False)


def test_verify_folds_is_paused_only_for_the_recorded_forward():
    model = _model()
    seen = []

    class Probe(FrozenGraphs):
        def capture(self, fn, static_input, *, warmup, pool):
            orig = model.forward

            def spy(x):
                seen.append(fold._verify)
                return orig(x)
            model.forward = spy
            try:
                return super().capture(fn, static_input, warmup=warmup, pool=pool)
            finally:
                del model.forward
    rf.verify_folds(True)
    try:
        runner = CudaGraphRunner(model, warmup=2, _backend=Probe(model))
        runner(_x())
    finally:
        rf.verify_folds(False)
    assert seen[:3] == [True, True, False]  # two warm-ups, then the capture (then the replay)


# ---------------------------------------------------------------------------------------
# Input and output semantics
# ---------------------------------------------------------------------------------------
def test_the_input_is_copied_never_aliased():
    model = _model()
    runner = _runner(model)
    x = _x()
    y = runner(x)
    static = runner.static_input(x)
    assert static is not x and static.data_ptr() != x.data_ptr()
    expected = _eager(model, x)
    x.add_(100)  # the caller's tensor is theirs: nothing the runner holds changes
    assert torch.equal(y, expected)
    assert not torch.equal(static, x)
    z = _x()
    v = static._version
    assert torch.equal(runner(z), _eager(model, z))
    assert static._version == v + 1  # one copy into the static input per call
    assert torch.equal(y, expected)  # a cloned output is the caller's for good


def test_the_static_input_itself_skips_the_copy():
    model = _model()
    runner = _runner(model)
    buf = runner.static_input(_x())
    z = _x()
    buf.copy_(z)
    v = buf._version
    assert torch.equal(runner(buf), _eager(model, z))
    assert buf._version == v


def test_clone_output_false_returns_the_static_output():
    model = _model()
    runner = _runner(model, clone_output=False)
    x1, x2 = _x(), _x()
    y1 = runner(x1)
    y2 = runner(x2)
    assert y1 is y2 and torch.equal(y2, _eager(model, x2))  # overwritten by the next call
    other = runner(_x(2, 3, 32, 32))
    assert other is not y1 and torch.equal(y1, _eager(model, x2))  # other signatures leave it
    safe = _runner(model)
    a, b = safe(x1), safe(x2)
    assert a is not b and torch.equal(a, _eager(model, x1))


def test_structured_outputs_are_cloned_alike():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def forward(self, x):
            y = self.net(x)
            return {"logits": y, "pair": (y * 2, y.sum())}

    model = Two().eval()
    runner = _runner(model)
    x = _x()
    out = runner(x)
    ref = _eager(model, x)
    assert torch.equal(out["logits"], ref["logits"]) and torch.equal(out["pair"][0], ref["pair"][0])
    again = runner(x)
    assert again["logits"] is not out["logits"] and isinstance(again["pair"], tuple)


def test_a_caller_under_inference_mode_and_autograd():
    model = _model()
    runner = _runner(model)
    x = _x()
    with torch.inference_mode():
        y = runner(x)
    assert torch.equal(runner(x), y)  # the static input is a normal tensor: writable outside
    xg = x.clone().requires_grad_()
    yg = runner(xg)
    assert not yg.requires_grad and torch.equal(yg, y)
    assert runner.captures == 1


def test_autocast_state_is_part_of_the_signature():
    model = _model()
    runner = _runner(model)
    x = _x()
    runner(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = runner(x)
        ref = _eager(model, x)
    assert runner.captures == 2 and torch.equal(y, ref)


# ---------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------
def test_train_mode_is_refused():
    model = _model().train()
    with pytest.raises(RuntimeError, match=r"<root>.*train\(\) mode.*model.eval\(\)"):
        _runner(model)
    model.eval()
    model.layer1[0].bn1.train()
    with pytest.raises(RuntimeError, match=r"layer1.0.bn1 is in train\(\) mode"):
        _runner(model)


def test_a_flip_to_train_after_capture_is_refused_and_a_flip_back_replays():
    model = _model()
    runner = _runner(model)
    strict = _runner(model, on_change="error")
    x = _x()
    runner(x), strict(x)
    model.train()
    with pytest.raises(RuntimeError, match=r"train\(\) mode"):
        runner(x)
    with pytest.raises(StaleGraphError, match=r"switched to train\(\)"):
        strict(x)
    model.eval()  # nothing ran in train(): the graphs are still right
    assert torch.equal(runner(x), _eager(model, x)) and torch.equal(strict(x), _eager(model, x))
    assert runner.captures == strict.captures == 1
    model.train()
    with torch.no_grad():
        model(_x(2, 3, 64, 64) * 2 + 1)  # BN statistics move (num_batches_tracked shows it)
    model.eval()
    assert torch.equal(runner(x), _eager(model, x)) and runner.captures == 2


def test_cpu_input_is_refused_by_the_real_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    runner = CudaGraphRunner(_model())
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device: the input is on cpu"):
        runner(_x())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_no_cuda_is_refused_at_construction():
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device.*is_available"):
        CudaGraphRunner(_model())


def test_arguments_are_checked():
    model = _model()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="warmup"):
            _runner(model, warmup=bad)
    with pytest.raises(ValueError, match="on_change"):
        _runner(model, on_change="ignore")
    with pytest.raises(TypeError, match="nn.Module"):
        CudaGraphRunner(lambda x: x, _backend=FrozenGraphs(None))
    with pytest.raises(TypeError, match="one tensor"):
        _runner(model)([_x()])


def test_an_input_on_another_device_than_the_model_is_named():
    model = _model()
    runner = _runner(model)
    with pytest.raises(ValueError, match="is on meta but 'conv1.weight' is on cpu"):
        runner(torch.empty(X_SHAPE, device="meta"))


# ---------------------------------------------------------------------------------------
# Never stale: every change is seen before a replay
# ---------------------------------------------------------------------------------------
def _bn(model):
    return model.layer1[0].bn1


def _no_grad(f):
    def run(model):
        with torch.no_grad():
            f(model)
    return run


def _load_state_dict(model):
    other = randomize_bn(models.resnet18(num_classes=10))
    model.load_state_dict(other.state_dict())


def _load_state_dict_assign(model):
    other = randomize_bn(models.resnet18(num_classes=10))
    model.load_state_dict(other.state_dict(), assign=True)


def _sgd_step(model):
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 0.1
    torch.optim.SGD(model.parameters(), lr=0.5).step()


def _fused_adam_step(model):
    # fused optimizers write without bumping version counters: the fold generation shows it
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    try:
        torch.optim.Adam(model.parameters(), lr=0.1, fused=True).step()
    except RuntimeError as e:  # pragma: no cover - a torch without the fused CPU kernel
        pytest.skip(f"no fused Adam on this CPU: {e}")


def _round_trip_dtype(model):
    model.double().float()  # the same values in new storages


def _round_trip_dtype_swap(model):
    saved = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.double().float()  # swap_tensors: same Parameter objects, new storages
    finally:
        torch.__future__.set_swap_module_params_on_conversion(saved)


def _data_assignment(model):
    w = model.layer2[0].conv1.weight
    w.data = torch.randn_like(w)


def _replace_fc(model):
    model.fc = nn.Linear(512, 10).eval()


def _replace_block(model):
    model.layer1[1] = randomize_bn(copy.deepcopy(model.layer1[1]))  # a fused block, new values


def _train_forward(model):
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64) * 2 + 1)  # more than one value per channel everywhere
    model.eval()


def _set_backend(model):
    rf.set_backend(model, None)  # RESNET_FAST_BACKEND=torch (set by the test): same math


def _output_hook(model):
    model.layer1[0].register_forward_hook(lambda m, i, o: o * 2)


def _eps(model):
    _bn(model).eps = 0.5


class _Scale(nn.Module):
    def forward(self, w):
        return w * 1.5


def _parametrize(model):
    parametrize.register_parametrization(model.layer1[0].conv1, "weight", _Scale())
    model.eval()  # the new parametrization modules start in train(), which the runner refuses


def _refresh_after_data_write(model):
    _bn(model).weight.data.mul_(3)  # unrecorded: only resnet_fast.refresh() tells
    rf.refresh(model)


def _tf32(model):
    torch.backends.cudnn.allow_tf32 = not torch.backends.cudnn.allow_tf32


MUTATIONS = {
    "no_grad_mul_": _no_grad(lambda m: _bn(m).weight.mul_(2)),
    "copy_": _no_grad(lambda m: m.layer3[1].conv2.weight.copy_(torch.randn_like(m.layer3[1].conv2.weight))),
    "detach_mul_": lambda m: m.layer2[1].bn2.bias.detach().add_(1),  # shares the version counter
    "state_dict_tensor_edit": lambda m: m.state_dict()["layer3.0.bn1.weight"].mul_(-1),  # detached
    "bn_buffer_edit": _no_grad(lambda m: _bn(m).running_var.mul_(3)),
    "fc_edit": _no_grad(lambda m: m.fc.weight.mul_(-1)),  # read live, not folded
    "load_state_dict": _load_state_dict,
    "load_state_dict_assign": _load_state_dict_assign,
    "sgd_step": _sgd_step,
    "fused_adam_step": _fused_adam_step,
    "data_assignment": _data_assignment,
    "to_dtype_and_back": _round_trip_dtype,
    "to_dtype_and_back_swap_tensors": _round_trip_dtype_swap,
    "replace_fc": _replace_fc,
    "replace_block": _replace_block,
    "train_forward": _train_forward,
    "set_backend": _set_backend,
    "output_hook": _output_hook,
    "eps": _eps,
    "parametrize": _parametrize,
    "refresh_after_data_write": _refresh_after_data_write,
    "tf32_switch": _tf32,
}
# changes that leave the eager output as it was (the rest must move it, or the test proves nothing)
SAME_OUTPUT = {"to_dtype_and_back", "to_dtype_and_back_swap_tensors", "set_backend", "tf32_switch"}


@pytest.fixture
def _restore_globals(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    tf32 = torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_every_change_recaptures_or_raises(name, _restore_globals):
    model = _model()
    runner = _runner(model, on_change="error")
    x = _x()
    before = runner(x)
    assert torch.equal(before, _eager(model, x))

    MUTATIONS[name](model)

    expected = _eager(model, x)
    if name not in SAME_OUTPUT:
        assert not torch.equal(expected, before)  # the change matters to the output
    with pytest.raises(StaleGraphError, match="the model changed since its CUDA graphs were captured"):
        runner(x)
    assert runner.captures == 1 and runner._backend.released == 0  # an error drops nothing
    runner.on_change = "recapture"
    assert torch.equal(runner(x), expected)
    assert runner.captures == 2 and runner.num_graphs == 1 and runner.last_change
    assert runner._backend.released == 1
    assert torch.equal(runner(x), expected) and runner.captures == 2  # then replays again


def test_the_check_runs_while_the_replay_runs_and_a_stale_replay_is_discarded():
    model = _model()
    runner = _runner(model)
    x = _x()
    before = runner(x)
    _no_grad(lambda m: _bn(m).weight.mul_(2))(model)
    replays = runner._backend.replays
    y = runner(x)
    assert runner._backend.replays == replays + 2  # the stale one, then the new graph's
    assert torch.equal(y, _eager(model, x)) and not torch.equal(y, before)


def test_a_bn_without_num_batches_tracked_is_folded_inside_the_graph():
    """Such a BN is never fold-cached (a train() forward would change it unseen), so its fold is
    recorded into the graph, which then reads the live running statistics."""
    model = _model()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked = None
    runner = _runner(model)
    x = _x()
    assert torch.equal(runner(x), _eager(model, x))
    assert runner._backend.fold_calls_while_capturing > 0


def test_a_change_recaptures_only_the_signatures_called_again():
    model = _model()
    runner = _runner(model)
    small, big = _x(), _x(2, 3, 32, 32)
    runner(small), runner(big)
    _no_grad(lambda m: _bn(m).weight.mul_(2))(model)
    assert torch.equal(runner(big), _eager(model, big))
    assert runner.num_graphs == 1 and runner.captures == 3
    assert torch.equal(runner(small), _eager(model, small)) and runner.captures == 4


def test_global_module_hooks_recapture():
    model = _model()
    runner = _runner(model)
    x = _x()
    runner(x)
    handle = nn_module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert torch.equal(runner(x), _eager(model, x))
        assert runner.captures == 2 and "global module hooks" in runner.last_change
    finally:
        handle.remove()
    runner(x)
    assert runner.captures == 3  # removing it is a change too


def test_removing_a_hook_recaptures():
    model = _model()
    runner = _runner(model)
    x = _x()
    handle = model.layer1[0].register_forward_hook(lambda m, i, o: o * 2)
    hooked = runner(x)
    handle.remove()
    assert torch.equal(runner(x), _eager(model, x)) and not torch.equal(runner(x), hooked)
    assert runner.captures == 2 and runner.last_change == "module hooks were registered or removed"


def test_change_messages_name_what_changed():
    model = _model()
    cases = [
        (_no_grad(lambda m: _bn(m).weight.mul_(2)), r"'layer1.0.bn1.weight' was modified in place"),
        (_data_assignment, r"'layer2.0.conv1.weight' has new storage"),
        (_replace_fc, r"submodule 'fc' was replaced"),
        (lambda m: setattr(m.layer1[0].bn1, "weight", nn.Parameter(torch.ones(64))),
         r"'layer1.0.bn1.weight' was replaced"),
        (_eps, r"eps changed at 'layer1.0.bn1'"),
        (lambda m: rf.refresh(), r"fold generation"),
        (_output_hook, r"hooks were registered"),
    ]
    x = _x()
    for mutate, message in cases:
        strict = _runner(model, on_change="error")
        strict(x)
        mutate(model)
        with pytest.raises(StaleGraphError, match=message):
            strict(x)


def test_unrecorded_writes_are_not_seen_until_refresh_or_reset():
    """The limit (module doc): writes PyTorch does not record bump no version counter."""
    model = _model()
    runner = _runner(model)
    x = _x()
    before = runner(x)
    bn = _bn(model)
    v = bn.weight._version
    bn.weight.data.mul_(3)            # .data: a fresh version counter
    bn.running_var.detach().numpy()[:] *= 2  # numpy: no counter at all
    assert bn.weight._version == v
    assert torch.equal(runner(x), before) and runner.captures == 1  # stale, as documented
    rf.refresh(model)
    assert torch.equal(runner(x), _eager(model, x)) and not torch.equal(runner(x), before)
    assert runner.captures == 2
    bn.bias.data.add_(1)
    runner.reset()
    assert runner.num_graphs == 0
    rf.refresh(model)  # the eager model's own fold cache needs telling too
    assert torch.equal(runner(x), _eager(model, x)) and runner.captures == 3


def test_unchecked_never_checks_but_keeps_what_the_graphs_read_alive():
    model = _model()
    runner = _runner(model, on_change="unchecked")
    x = _x()
    before = runner(x)
    folded = weakref.ref(model.layer1[0]._unit_states["conv1"].fold._value[0])
    _no_grad(lambda m: m.layer1[0].conv1.weight.mul_(2))(model)
    _eager(model, x)  # refolds: the fold cache lets go of the tensors the graph reads
    gc.collect()
    assert folded() is not None  # ...but the runner holds them: stale, never garbage
    assert torch.equal(runner(x), before) and runner.captures == 1
    runner.reset()
    gc.collect()
    assert folded() is None
    assert torch.equal(runner(x), _eager(model, x)) and runner.captures == 2


def test_storages_are_pinned_so_no_new_tensor_takes_an_old_address():
    model = _model()
    runner = _runner(model)
    x = _x()
    runner(x)
    w = model.layer1[0].conv1.weight
    old = w.data_ptr()
    for _ in range(20):  # without the pin the allocator would hand the freed block back
        w.data = torch.randn_like(w)
        assert w.data_ptr() != old
    assert torch.equal(runner(x), _eager(model, x)) and runner.captures == 2


def test_random_change_sequences_never_replay_stale(_restore_globals):
    gen = torch.Generator().manual_seed(0)
    model = _model()
    runner = _runner(model)
    names = [n for n in MUTATIONS if n not in ("replace_block", "load_state_dict_assign")]
    shapes = [X_SHAPE, (2, 3, 32, 32)]
    for step in range(10):
        if torch.rand((), generator=gen) < 0.6:
            MUTATIONS[names[int(torch.randint(len(names), (), generator=gen))]](model)
        x = _x(*shapes[step % 2])
        assert torch.equal(runner(x), _eager(model, x)), step


def test_the_check_is_cheap():
    runner = _runner(_model())
    runner(_x())
    seconds = min(runner.check_seconds(20) for _ in range(3))
    print(f"\nstate check before a replay (resnet18, this CPU): {seconds * 1e6:.0f} us")
    assert seconds < 0.01


def test_environment_backend_variable_recaptures(monkeypatch):
    model = _model()
    runner = _runner(model)
    x = _x()
    runner(x)
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert torch.equal(runner(x), _eager(model, x))
    assert runner.captures == 2 and backends.ENV_VAR in runner.last_change
    assert os.environ[backends.ENV_VAR] == "torch"
