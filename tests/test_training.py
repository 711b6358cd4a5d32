"""Fused training (issue 17): converted modules in train(), with autograd and under autocast,
against torchvision's modules from the same weights.

Two ways each: the ``torch`` backend in float64 (the training dataflow and every autograd
formula of resnet_fast.train_ops, exact to rounding), and the ``triton`` backend under Triton's
interpreter in fp32 (the kernels), held to the float64 reference by the rule of DEVELOPERS.md:
relative error under 1e-5 and at most twice PyTorch's own fp32 error. Channel counts and sizes
are small and off the interpreter's block multiples.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv

import resnet_fast as rf
from resnet_fast import training

from . import any_resnets as ar
from .reference import randomize_bn, rel_err

CL = torch.channels_last


def _triton_ok():
    return rf.backends.available("triton", torch.device("cpu"), torch.float32)[0]


needs_triton = pytest.mark.skipif(not _triton_ok(), reason="the Triton backend cannot run on this machine's CPU "
                                  "(TRITON_INTERPRET=1 was not set before import)")

BACKENDS = [pytest.param("torch", id="torch-fp64"), pytest.param("triton", id="triton-fp32", marks=needs_triton)]


@pytest.fixture(autouse=True)
def _exact_fp32(exact_fp32):
    """Every test here in exact fp32 (see conftest.exact_fp32)."""


def _downsample(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


BLOCKS = {
    # name: (factory, input channels)
    "tv_basic": (lambda: tv.BasicBlock(8, 8), 8),
    "tv_basic_down": (lambda: tv.BasicBlock(6, 10, 2, _downsample(6, 10, 2)), 6),
    "tv_bottleneck_down": (lambda: tv.Bottleneck(8, 4, 2, _downsample(8, 16, 2)), 8),
    "rf_bottleneck": (lambda: rf.Bottleneck(16, 4), 16),
    # (in a Sequential: the torchvision fast path, whose training forward chains its convs)
    # grouped 3x3 (ResNeXt): the Triton kernel takes no groups, so that conv alone falls back
    "tv_resnext_down": (lambda: nn.Sequential(tv.Bottleneck(8, 8, 2, _downsample(8, 32, 2), groups=4,
                                                            base_width=8)), 8),
    "tv_dilated": (lambda: nn.Sequential(tv.Bottleneck(16, 4, dilation=2)), 16),
}


def _twins(ref: nn.Module, backend: str, dtype):
    """(torchvision in dtype, converted copy in dtype, torchvision in float64)."""
    ref = randomize_bn(ref)
    ours = copy.deepcopy(ref)
    if not isinstance(ours, (rf.BasicBlock, rf.Bottleneck)):
        ours = rf.convert(ours, backend=backend)
    else:
        ours.backend = backend
        ref = _as_torchvision(ref)
    return ref.to(dtype), ours.to(dtype), copy.deepcopy(ref).double()


def _as_torchvision(block):
    """A torchvision block holding the same modules as one of resnet_fast's own."""
    cls = tv.Bottleneck if isinstance(block, rf.Bottleneck) else tv.BasicBlock
    twin = cls.__new__(cls)
    nn.Module.__init__(twin)
    for name, child in copy.deepcopy(block).named_children():
        setattr(twin, name, child)
    if not hasattr(twin, "downsample"):
        twin.downsample = None
    twin.stride = block.stride
    return twin


def _step(model, x, opt, target):
    x = x.clone().requires_grad_()
    out = model(x)
    loss = (out.double() - target).square().mean()
    opt.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return out.detach(), x.grad, grads, {n: b.clone() for n, b in model.named_buffers()}


def _err(out, ref):
    # relative, but against a norm of at least 1e-6: a gradient that is zero in exact math (a
    # conv bias followed by a training BN) is rounding noise on both sides
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-6)).item()


def _check(ours, ref, torch_own, tol, what):
    """ours within tol of the float64 reference, or within twice PyTorch's own error."""
    if ref.double().norm() < 1e-10:
        # zero in exact math (the bias of a conv that a training BN follows): rounding noise
        # on every side, which only has to stay small
        assert ours.double().norm() < (1e-10 if ours.dtype == torch.float64 else 1e-4), what
        return
    err = _err(ours, ref)
    own = _err(torch_own, ref) if torch_own is not None else 0.0
    assert err <= max(tol, 2 * own), f"{what}: relative error {err:.3g} (PyTorch's own {own:.3g})"


def run_twins(ref, ours, ref64, xs, backend, *, steps=3, tol=None, memory_format=CL):
    """Three SGD-momentum steps of each twin on the same inputs; every output, input gradient,
    parameter gradient and buffer checked after every step, and the parameters at the end."""
    # float64: rounding only (a BN over 3 values, resnet18's layer4 at 32x32, amplifies it to ~1e-9)
    tol = tol or (1e-8 if backend == "torch" else 1e-5)
    if backend == "torch":
        # PyTorch's own float64 error: torchvision again with its weights moved by 1e-14, the
        # rounding error of one of its convs (a sum of ~1e3-1e4 products: sqrt(K) ulp). It
        # matters where BN over a handful of values (resnet18's layer4 at 32x32, M = 3) makes
        # three SGD steps amplify rounding ~1e9-fold
        ref = copy.deepcopy(ref64)
        with torch.no_grad():
            for p in ref.parameters():
                p.mul_(1 + 1e-14 * torch.randn_like(p))
    models = [ref64, ours, ref]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    for m in models:
        m.train()
    for step, x in enumerate(xs[:steps]):
        target = torch.randn(1, dtype=torch.float64)
        res = [_step(m, x.to(next(m.parameters()).dtype).contiguous(memory_format=memory_format), o, target)
               for m, o in zip(models, opts)]
        r64, r_ours, r_own = res
        _check(r_ours[0], r64[0], r_own[0], tol, f"step {step} output")
        _check(r_ours[1], r64[1], r_own[1], tol, f"step {step} input grad")
        assert r_ours[2].keys() == r64[2].keys()
        for n in r64[2]:
            _check(r_ours[2][n], r64[2][n], r_own[2].get(n), tol, f"step {step} grad of {n}")
        for n in r64[3]:
            if n.endswith("num_batches_tracked"):
                assert torch.equal(r_ours[3][n], r64[3][n]), n
            else:
                _check(r_ours[3][n], r64[3][n], r_own[3].get(n), tol, f"step {step} buffer {n}")
    for (n, p), (_, p64), (_, p_own) in zip(ours.named_parameters(), ref64.named_parameters(),
                                            ref.named_parameters()):
        _check(p.detach(), p64.detach(), p_own.detach(), tol, f"parameter {n} after the steps")


def _inputs(cin, n=3, hw=(9, 11), steps=3):
    return [torch.randn(n, cin, *hw, dtype=torch.float64) * 1.5 + 0.3 for _ in range(steps)]


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_trains_like_torchvision(name, backend):
    factory, cin = BLOCKS[name]
    dtype = torch.float64 if backend == "torch" else torch.float32
    ref, ours, ref64 = _twins(factory(), backend, dtype)
    run_twins(ref, ours, ref64, _inputs(cin), backend)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
def test_resnet18_trains_like_torchvision(memory_format):
    """torchvision's resnet18 at 32x32, batch 3 (its layer4 runs at 1x1: M = 3 per BN)."""
    ref = torchvision.models.resnet18(num_classes=10)
    ref, ours, ref64 = _twins(ref, "torch", torch.float64)
    assert isinstance(ours, rf.convert.__globals__["FusedResNet"])
    xs = [torch.randn(3, 3, 32, 32, dtype=torch.float64) for _ in range(3)]
    run_twins(ref, ours, ref64, xs, "torch", memory_format=memory_format)


def test_preact_resnet18_trains_like_the_original():
    ref = ar.PreActResNet((2, 2, 2, 2), width=8)
    ref, ours, ref64 = _twins(ref, "torch", torch.float64)
    run_twins(ref, ours, ref64, [torch.randn(3, 3, 16, 16, dtype=torch.float64) for _ in range(3)], "torch")


@needs_triton
def test_small_resnets_train_on_the_triton_kernels():
    """A CIFAR-style ResNet and a pre-activation one, converted, on the Triton kernels: the graph
    converter's units (stem inline in the model's forward, pre-activation prologues)."""
    for ref in (ar.CifarResNet(ar.BasicBlock, (1, 1, 1, 1), width=4),
                ar.PreActResNet((1, 1, 1, 1), width=4)):
        ref, ours, ref64 = _twins(ref, "triton", torch.float32)
        run_twins(ref, ours, ref64, [torch.randn(2, 3, 12, 12, dtype=torch.float64) for _ in range(2)],
                  "triton", steps=2)


@needs_triton
def test_training_runs_the_triton_training_kernels(monkeypatch):
    """Every conv of a converted block's training step goes through the Triton training kernels
    (none through torch's conv2d / batch_norm in the forward)."""
    from resnet_fast.kernels import batch_norm as bn_kernels
    from resnet_fast.kernels import conv_bn_act as conv_kernels
    from resnet_fast.kernels import scale_bias_act as sba_kernels
    calls = []
    for mod, fn in ((conv_kernels, "conv_stats"), (sba_kernels, "scale_bias_act"),
                    (sba_kernels, "scale_bias_act_backward"), (bn_kernels, "finalize"),
                    (bn_kernels, "update_running")):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _real=real, _fn=fn, **k: calls.append(_fn) or _real(*a, **k))
    block = rf.convert(nn.Sequential(randomize_bn(tv.Bottleneck(8, 4, 2, _downsample(8, 16, 2)))),
                       backend="triton").train()
    assert isinstance(block[0], rf.convert.__globals__["FusedBottleneck"])  # the block fast path
    x = torch.randn(2, 8, 7, 9)
    with monkeypatch.context() as m:
        for fn in ("conv2d", "batch_norm"):
            m.setattr(torch.nn.functional, fn, _forbidden(fn))
        y = block(x)
    assert calls.count("conv_stats") == 4  # conv1..3 and the downsample
    assert calls.count("update_running") == 4 and calls.count("finalize") == 4
    assert calls.count("scale_bias_act") == 1  # the block tail; conv2 and conv3 read prologues
    y.sum().backward()
    # backward: the tail's, and conv2's and conv3's prologue (recompute + its gradient)
    assert calls.count("scale_bias_act_backward") == 3


def test_cpu_weight_gradient_of_a_strided_1x1_conv_is_right():
    """oneDNN's channels_last backward gets this weight gradient wrong on the CPU (see
    ops.conv_backward); the ops' backward must not inherit it."""
    x = torch.randn(2, 4, 12, 12).contiguous(memory_format=CL)
    w = torch.randn(8, 4, 1, 1).contiguous(memory_format=CL)
    g = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL)
    _, gw = rf.ops.conv_backward(g, x, w, [2, 2], [0, 0], [1, 1], 1, (False, True))
    _, gw64 = rf.ops.conv_backward(g.double(), x.double(), w.double(), [2, 2], [0, 0], [1, 1], 1, (False, True))
    assert rel_err(gw, gw64) < 1e-5


def _forbidden(name):
    def f(*a, **k):
        raise AssertionError(f"torch.nn.functional.{name} ran in a fused training step")
    return f


# ---- BatchNorm semantics ---------------------------------------------------------------------
def _bn_variant(kind):
    block = randomize_bn(tv.BasicBlock(6, 8, 2, _downsample(6, 8, 2)))
    if kind == "momentum_none":
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
    elif kind == "no_affine":
        block.bn1 = nn.BatchNorm2d(8, affine=False)
    elif kind == "no_running_stats":
        block.bn2 = nn.BatchNorm2d(8, track_running_stats=False)
    elif kind == "frozen_params":
        for p in block.bn1.parameters():
            p.requires_grad_(False)
    elif kind == "frozen_bn":
        frozen = torchvision.ops.misc.FrozenBatchNorm2d(8)
        frozen.load_state_dict({k: v for k, v in block.bn1.state_dict().items() if k != "num_batches_tracked"})
        block.bn1 = frozen
    elif kind == "eval_bn_in_train":
        block.bn2.eval()  # a BN left in eval() inside a training model: running statistics
    return block


@pytest.mark.parametrize("kind", ["momentum_none", "no_affine", "no_running_stats", "frozen_params",
                                  "frozen_bn", "eval_bn_in_train"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_semantics(kind, backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    ref, ours, ref64 = _twins(_bn_variant(kind), backend, dtype)
    models = [ref, ours, ref64]
    if kind == "eval_bn_in_train":
        for m in models:
            m.train()
            m.bn2.eval()
        run = _run_keep_modes
    else:
        run = run_twins
    run(ref, ours, ref64, _inputs(6), backend)


def _run_keep_modes(ref, ours, ref64, xs, backend):
    # run_twins calls .train(); re-apply the one eval() BN after it
    for m in (ref, ours, ref64):
        orig = m.train

        def train(mode=True, _m=m, _orig=orig):
            _orig(mode)
            _m.bn2.eval()
            return _m
        m.train = train
    run_twins(ref, ours, ref64, xs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_with_autograd_runs_fused_with_exact_gradients(backend):
    """Fine-tuning / feature extraction: eval() with gradients runs the folded fused ops with a
    backward; the fold is recomputed from the live parameters, so gradients reach them."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    ref, ours, ref64 = _twins(tv.Bottleneck(8, 4, 2, _downsample(8, 16, 2)), backend, dtype)
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    outs = []
    for m in (ref64, ours, ref):
        m.eval()
        xx = x.detach().clone().to(next(m.parameters()).dtype).requires_grad_()
        y = m(xx)
        y.square().sum().backward()
        outs.append((y, xx.grad, [p.grad for p in m.parameters()], [b.clone() for b in m.buffers()]))
    tol = 1e-9 if backend == "torch" else 1e-5
    own = outs[2] if backend != "torch" else None
    _check(outs[1][0], outs[0][0], own and own[0], tol, "output")
    _check(outs[1][1], outs[0][1], own and own[1], tol, "input grad")
    for i, g in enumerate(outs[0][2]):
        _check(outs[1][2][i], g, own and own[2][i], tol, f"grad {i}")
    for a, b in zip(outs[1][3], outs[0][3]):  # eval(): no buffer moves
        assert torch.equal(a.double(), b.double())


def test_batch_of_one_value_per_channel_raises_like_torch():
    block = rf.convert(tv.BasicBlock(4, 4), backend="torch").train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        block(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        tv.BasicBlock(4, 4).train()(torch.randn(1, 4, 1, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_matches_torchvision_under_autocast(dtype):
    """The way people train: an fp32 model under autocast. The convs run in autocast's dtype,
    BN keeps fp32 statistics and parameters; outputs, gradients and running statistics within
    the 16-bit tolerance of the float64 model, or twice torchvision's own error under the same
    autocast."""
    ref = randomize_bn(tv.Bottleneck(8, 4, 2, _downsample(8, 16, 2))).train()
    ours = rf.convert(nn.Sequential(copy.deepcopy(ref)), backend="torch")
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(4, 8, 10, 10)
    res = []
    for m in (ref64, ref, ours):
        xx = x.detach().clone().to(next(m.parameters()).dtype).requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=m is not ref64):
            y = m(xx)
        y.double().square().sum().backward()
        res.append((y, xx.grad, [p.grad for p in m.parameters()], [b.clone() for b in m.buffers()]))
    (y64, gx64, g64, b64), (y_tv, gx_tv, g_tv, b_tv), (y, gx, g, b) = res
    assert y.dtype == y_tv.dtype == dtype
    _check(y, y64, y_tv, 1e-2, "output")
    _check(gx, gx64, gx_tv, 1e-2, "input grad")
    for i in range(len(g64)):
        _check(g[i], g64[i], g_tv[i], 1e-2, f"grad {i}")
    for i in range(len(b64)):
        _check(b[i], b64[i], b_tv[i], 1e-2, f"buffer {i}")


@pytest.mark.parametrize("model", ["cifar", "preact", "preact_shared", "nobn", "timm"])
def test_converted_models_train_like_the_originals(model):
    """Every kind of model convert accepts, one training step in float64 on the torch backend."""
    if model == "cifar":
        ref = ar.cifar_resnet18(width=4)
    elif model == "preact":
        ref = nn.Sequential(ar.PreActResNet((1, 1, 1, 1), width=4))
    elif model == "preact_shared":
        ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ar.PreActSharedBlock(4), ar.PreActSharedBlock(4))
    elif model == "nobn":
        ref = nn.Sequential(ar.NoBNBlock(4), ar.plain_block(4, 4), ar.NoBNBlock(4))
    else:
        timm = pytest.importorskip("timm")
        ref = timm.create_model("resnet18", num_classes=5, pretrained=False)
    ref, ours, ref64 = _twins(ref, "torch", torch.float64)
    cin = 4 if model == "nobn" else 3
    if model == "preact_shared":
        ref = ref.train()
    run_twins(ref, ours, ref64, [torch.randn(3, cin, 16, 16, dtype=torch.float64) for _ in range(2)],
              "torch", steps=2)


def test_fusion_summary_says_what_trains_fused():
    m = rf.convert(torchvision.models.resnet18(num_classes=10))
    rows = {r["name"]: r for r in rf.fusion_summary(m)}
    assert rows["layer1.0.conv1"]["training"] == "conv+stats → next conv's prologue"
    assert rows["layer1.0.conv2"]["training"] == "conv+stats → block tail"
    assert rows["layer2.0.downsample.0"]["training"] == "conv+stats → block tail"
    assert rows["conv1"]["training"] == "conv+stats → BN+ReLU pass"
    assert "training" in str(rf.fusion_summary(m))


def test_disabled_fused_training_runs_the_original_math(monkeypatch):
    monkeypatch.setattr(training, "ENABLED", False)
    ref = randomize_bn(tv.BasicBlock(4, 4)).train()
    ours = rf.convert(copy.deepcopy(ref), backend="torch")
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(ours(x), ref(x))


# ---- torch.compile of a whole training step ----------------------------------------------------
def test_compiled_training_step_in_a_fresh_process():
    """forward, loss, backward and an SGD-momentum update in one torch.compile(fullgraph=True)
    region (torch's own optimizers graph-break by design, pytorch#104053, so the update is
    written in torch ops), against torchvision's eager steps; and the converted model itself
    compiled fullgraph under a stock optimizer."""
    from .reference import run_python
    out = run_python(
        "import copy, torch, torchvision, resnet_fast\n"
        "import torch.nn.functional as F\n"
        "if not hasattr(torch._dynamo.config, 'trace_autograd_ops'):\n"
        "    print('skip: this torch cannot trace backward() inside a compiled region'); raise SystemExit\n"
        "torch._dynamo.config.trace_autograd_ops = True\n"
        "torch.manual_seed(0)\n"
        "ref = torchvision.models.resnet18(num_classes=10).double().train()\n"
        "m = resnet_fast.convert(copy.deepcopy(ref), backend='torch').train()\n"
        "def make_step(model):\n"
        "    params = list(model.parameters()); bufs = [torch.zeros_like(p) for p in params]\n"
        "    def step(x, y):\n"
        "        loss = F.cross_entropy(model(x), y)\n"
        "        loss.backward()\n"
        "        with torch.no_grad():\n"
        "            for p, b in zip(params, bufs):\n"
        "                b.mul_(0.9).add_(p.grad)\n"
        "                p.sub_(0.01 * b)\n"
        "                p.grad = None\n"
        "        return loss.detach()\n"
        "    return step\n"
        "compiled, eager = torch.compile(make_step(m), fullgraph=True, backend='aot_eager'), make_step(ref)\n"
        "for i in range(3):\n"
        "    x = torch.randn(4, 3, 32, 32, dtype=torch.float64); y = torch.randint(0, 10, (4,))\n"
        "    a, b = compiled(x, y), eager(x, y)\n"
        "    assert abs(a.item() - b.item()) < 1e-8, (i, a.item(), b.item())\n"
        "for (n, p), q in zip(m.named_parameters(), ref.parameters()):\n"
        "    assert (p - q).norm() <= 1e-6 * q.norm() + 1e-12, n\n"
        "for (n, p), q in zip(m.named_buffers(), ref.buffers()):\n"
        "    assert (p.double() - q.double()).norm() <= 1e-8 * q.double().norm() + 1e-12, n\n"
        "cm = torch.compile(m, fullgraph=True, backend='aot_eager')\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)\n"
        "for i in range(2):\n"
        "    F.cross_entropy(cm(x), y).backward(); opt.step(); opt.zero_grad()\n"
        "print('ok')\n", timeout=900)
    if out.startswith("skip"):
        pytest.skip(out.strip())
    assert out.strip().endswith("ok")


def saved_activation_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters left out: the
    activation memory a training step holds at its peak, device-independent."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def test_training_saves_less_than_eager():
    """Saved for backward: raw conv outputs and per-channel vectors, never a normalized
    activation. A bottleneck then holds 10 channel-planes of its width where eager holds 12 (the
    ReLU outputs of conv1 and conv2 go)."""
    ref = torchvision.models.resnet50().train()
    ours = rf.convert(copy.deepcopy(ref), backend="torch")
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    eager, fused = saved_activation_bytes(ref, x), saved_activation_bytes(ours, x)
    assert fused < 0.9 * eager, (fused, eager)


def test_as_a_user_trains_then_evaluates():
    """The default backend, a fused AdamW, train() -> eval() flips and a hook added after
    convert, against the unconverted twin: nothing stale, nothing silent."""
    torch.manual_seed(0)
    ref = randomize_bn(nn.Sequential(tv.BasicBlock(4, 4), tv.BasicBlock(4, 8, 2, _downsample(4, 8, 2))))
    ours = rf.convert(copy.deepcopy(ref))  # the default backend
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (ref, ours)]
    x = torch.randn(3, 4, 9, 9)
    seen = []
    for step in range(3):
        for m, opt in zip((ref, ours), opts):
            m.train()
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        if step == 1:  # a hook after convert: the hooked block runs its own forward, hooks fire
            for m in (ref, ours):
                m[1].bn1.register_forward_hook(lambda mod, i, o: seen.append(1))
        for m in (ref, ours):
            m.eval()
        with torch.no_grad():
            assert rel_err(ours(x), ref(x)) < 1e-5, step
        for (n, a), (_, b) in zip(ours.named_buffers(), ref.named_buffers()):
            assert rel_err(a.double(), b.double()) < 1e-5 or torch.equal(a, b), n
    assert seen  # the hook fired on both
