"""resnet_fast.graphs.CudaGraphRunner on a CUDA device: real captures of converted ResNets.

Replays run the very kernels the eager converted model runs (the warm-ups autotune and pick
them), on the same inputs, so the outputs must be bitwise equal; after a change to the model
the runner recaptures and equals the new eager result. Latencies (eager vs replay, one
synchronized call each) are printed, not asserted: run with ``-s`` to see them.
"""

import copy
import statistics
import time

import pytest
import torch
from torchvision import models

import resnet_fast as rf
from resnet_fast.graphs import CudaGraphRunner, StaleGraphError

from ..conftest import needs_cuda
from ..reference import randomize_bn, rel_err

pytestmark = needs_cuda

MODELS = {"resnet18": models.resnet18, "resnet50": models.resnet50}
DTYPES = [torch.bfloat16, torch.float32]
BATCHES = [1, 8]
RES = 224
CL = torch.channels_last


@pytest.fixture(scope="module")
def converted():
    """(name, dtype) -> a converted model on the GPU (default backend), made once per module."""
    made = {}

    def get(name, dtype):
        if (name, dtype) not in made:
            torch.manual_seed(0)
            m = randomize_bn(MODELS[name]()).eval().to("cuda", dtype)
            made[name, dtype] = rf.convert(m)
        return made[name, dtype]
    yield get
    made.clear()


def _x(batch, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, 3, RES, RES, device="cuda", dtype=dtype, generator=g)
    return x.contiguous(memory_format=CL)


def _eager(model, x):
    with torch.no_grad():
        return model(x)


def _assert_same(y, ref, what):
    assert torch.equal(y, ref), f"{what}: replay differs from eager (rel_err {rel_err(y, ref):.3g})"


def _latency_ms(fn, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_replay_equals_eager_and_recaptures_after_a_bn_edit(converted, name, dtype, batch):
    model = converted(name, dtype)
    x, x2 = _x(batch, dtype, 1), _x(batch, dtype, 2)
    eager = _eager(model, x)  # first: the eager call autotunes; the runner's warm-ups reuse it
    runner = CudaGraphRunner(model)
    _assert_same(runner(x), eager, "first call")
    _assert_same(runner(x2), _eager(model, x2), "second input")
    assert runner.captures == 1 and runner.num_graphs == 1

    bn = model.layer1[0].bn1
    saved = bn.running_mean.clone(), bn.running_var.clone()
    try:
        with torch.no_grad():  # a BN buffer edit: the folded weights the graph reads are stale
            bn.running_var.mul_(1.7)
            bn.running_mean.add_(0.3)
        new = _eager(model, x2)
        assert not torch.equal(new, eager)
        _assert_same(runner(x2), new, "after the BN edit")
        assert runner.captures == 2 and "running_" in runner.last_change

        graph_ms = _latency_ms(lambda: runner(x2))
        eager_ms = _latency_ms(lambda: _eager(model, x2))
        check_us = runner.check_seconds() * 1e6
        print(f"\n{name} {str(dtype).split('.')[-1]} batch {batch} at {RES}px: eager {eager_ms:.3f} ms, "
              f"graph replay {graph_ms:.3f} ms ({eager_ms / graph_ms:.2f}x), state check {check_us:.0f} us")
    finally:
        with torch.no_grad():
            bn.running_mean.copy_(saved[0])
            bn.running_var.copy_(saved[1])
        runner.reset()


def test_real_graphs_see_changes_in_one_pool(converted):
    model = copy.deepcopy(converted("resnet18", torch.bfloat16))
    x1, x8 = _x(1, torch.bfloat16, 3), _x(8, torch.bfloat16, 4)
    runner = CudaGraphRunner(model, warmup=2)
    strict = CudaGraphRunner(model, on_change="error")
    for x in (x1, x8):
        _assert_same(runner(x), _eager(model, x), "signature")
        strict(x)
    assert runner.num_graphs == 2

    def conv_in_place(m):
        with torch.no_grad():
            m.layer2[0].conv1.weight.mul_(0.5)

    def data_assignment(m):
        w = m.layer3[1].bn2.weight
        w.data = torch.rand_like(w) + 0.5

    def load_state_dict(m):
        other = randomize_bn(models.resnet18()).to("cuda", torch.bfloat16)
        m.load_state_dict(other.state_dict())

    def hook(m):
        m.layer4[0].register_forward_hook(lambda mod, i, o: o * 0.5)

    def backend(m):
        rf.set_backend(m, "torch")

    for change in (conv_in_place, data_assignment, load_state_dict, hook, backend):
        before = runner(x1)
        change(model)
        ref = _eager(model, x1)
        assert not torch.equal(ref, before) or change is backend, change.__name__
        with pytest.raises(StaleGraphError):
            strict(x1)
        strict.reset()
        strict(x1)
        _assert_same(runner(x1), ref, change.__name__)
        _assert_same(runner(x8), _eager(model, x8), change.__name__ + " (batch 8)")
    assert runner.captures == 2 + 2 * 5 and len(runner._pools) == 1  # every graph in one pool


def test_zero_copy_input_and_output(converted):
    model = converted("resnet18", torch.bfloat16)
    runner = CudaGraphRunner(model, clone_output=False)
    xa, xb = _x(8, torch.bfloat16, 5), _x(8, torch.bfloat16, 6)
    ya = runner(xa)
    ref_b = _eager(model, xb)
    yb = runner(xb)
    assert yb is ya  # the static output, overwritten by the next call of the signature
    _assert_same(yb, ref_b, "static output")
    buf = runner.static_input(xa)
    buf.copy_(xa)
    v = buf._version
    _assert_same(runner(buf), _eager(model, xa), "static input")
    assert buf._version == v  # no copy into it
    runner.reset()


def test_refusals_on_a_cuda_machine(converted):
    model = converted("resnet18", torch.bfloat16)
    runner = CudaGraphRunner(model)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        runner(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
    model.train()
    try:
        with pytest.raises(RuntimeError, match=r"train\(\) mode"):
            CudaGraphRunner(model)
    finally:
        model.eval()
