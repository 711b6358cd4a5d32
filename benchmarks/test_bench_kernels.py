"""pytest-benchmark suite: a few ResNet-50 layers and bottleneck blocks on each backend, timed
GPU-synchronized, so regressions show with --benchmark-compare.

    python -m pytest benchmarks/ --benchmark-only                      # run (needs CUDA)
    python -m pytest benchmarks/ --benchmark-only --benchmark-autosave # save a baseline
    python -m pytest benchmarks/ --benchmark-only --benchmark-compare  # compare with the last

One round = CALLS_PER_ROUND calls (inputs rotated through a ring larger than L2) followed by
torch.cuda.synchronize(): the sync's fixed cost is spread over the calls and every round ends
with the GPU idle, so a round's wall time is GPU-bound time. Divide by CALLS_PER_ROUND for a
per-call figure (in extra_info as us_per_call). Batch: RESNET_FAST_BENCH_BATCH (default 256).
Without CUDA everything skips at once, with the reason.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (none found): the kernel benchmarks time GPU kernels",
                allow_module_level=True)

from benchmarks import layers as layers_mod  # noqa: E402
from benchmarks import models  # noqa: E402
from benchmarks.layer_peers import peer_fn  # noqa: E402
from benchmarks.timing import ring_size  # noqa: E402

BATCH = int(os.environ.get("RESNET_FAST_BENCH_BATCH", "256"))
DTYPE = torch.bfloat16
CALLS_PER_ROUND = 10
ROUNDS = 30
DEV = torch.device("cuda")
#: a spread of ResNet-50 convs: stem, 3x3, strided 3x3, 1x1 with residual, deep 1x1s
LAYERS = ("conv1", "layer1.0.conv2", "layer1.0.conv3", "layer2.0.conv2", "layer3.1.conv1",
          "layer4.0.conv3")
BLOCKS = ("layer1.0", "layer2.0", "layer3.1", "layer4.0")
PEERS = ("eager_cl", "rf_torch", "rf_triton", "rf_cuda")


@pytest.fixture(scope="module")
def model32():
    torch.backends.cudnn.benchmark = True
    return models.build("resnet50", device=DEV, resolution=224, seed=0, calib_batch=32)


def _skip_unavailable(peer):
    if peer.startswith("rf_"):
        from resnet_fast import backends
        ok, why = backends.available(peer[3:], DEV, DTYPE)
        if not ok:
            pytest.skip(f"backend {peer[3:]} unavailable: {why}")


def _run(benchmark, fn, ring, info):
    k = len(ring)
    state = {"i": 0}

    def round_():
        i = state["i"]
        for j in range(CALLS_PER_ROUND):
            fn(*ring[(i + j) % k])
        state["i"] = i + CALLS_PER_ROUND
        torch.cuda.synchronize()

    with torch.no_grad():
        benchmark.pedantic(round_, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    benchmark.extra_info.update(info, calls_per_round=CALLS_PER_ROUND, batch=BATCH,
                                dtype=str(DTYPE), gpu=torch.cuda.get_device_name(),
                                us_per_call=benchmark.stats.stats.median * 1e6 / CALLS_PER_ROUND)


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("layer_name", LAYERS)
def test_layer(benchmark, model32, layer_name, peer):
    import resnet_fast

    _skip_unavailable(peer)
    layer = next(L for L in layers_mod.distinct_convs(model32, 224) if layer_name in L.names)
    conv = copy.deepcopy(layer.conv).to(DTYPE)
    bn = copy.deepcopy(layer.bn).to(DTYPE)
    w_fold, b_fold = resnet_fast.fold_conv_bn(conv, bn)
    x_shape, r_shape = (BATCH, *layer.in_shape), (BATCH, *layer.out_shape)
    nbytes = 2 * (torch.Size(x_shape).numel() + (torch.Size(r_shape).numel() if layer.residual else 0))
    ring = []
    for _ in range(ring_size(nbytes, DEV)):
        x = torch.randn(x_shape, device=DEV, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
        r = (torch.randn(r_shape, device=DEV, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
             if layer.residual else None)
        ring.append((x, r))
    fn, layout, note = peer_fn(peer, layer, conv, bn, w_fold, b_fold, ring[0][0])
    assert layout == "cl"
    if note:
        pytest.skip(note)
    _run(benchmark, fn, ring, {"layer": layer.name, "shape": layer.label(), "epilogue": layer.epilogue,
                               "gflop_per_call": layer.flops(BATCH) / 1e9})


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("block_name", BLOCKS)
def test_block(benchmark, model32, block_name, peer):
    import resnet_fast

    _skip_unavailable(peer)
    stage, idx = block_name.split(".")
    m = models.cast(model32, DTYPE, torch.channels_last)
    if peer != "eager_cl":
        resnet_fast.convert(m, backend=peer[3:])
    block = getattr(m, stage)[int(idx)]
    c, h, w = next(L for L in layers_mod.distinct_convs(model32, 224) if f"{block_name}.conv1" in L.names).in_shape
    ring = [(torch.randn(BATCH, c, h, w, device=DEV, dtype=DTYPE).contiguous(memory_format=torch.channels_last),)
            for _ in range(ring_size(2 * BATCH * c * h * w, DEV))]
    _run(benchmark, lambda x: block(x), ring, {"block": block_name, "input": [BATCH, c, h, w]})
