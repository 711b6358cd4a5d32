"""One rank of test_distributed.py: 2 processes, gloo, CPU. Importable (spawned processes load
the function by name). Each scenario returns tensors; the rank saves them all (or its traceback)
to ``<out>/rank<r>.pt`` and the tests compare them there.

The models: torchvision's ResNet with one BasicBlock per stage (every kind of fused unit: stem,
blocks, projection shortcuts, no max-pool) on 32x32 images, and, for the Triton kernels under the interpreter,
a stem and one block. Each scenario trains three copies from the same weights on the same data:
float64 (the reference), float32 unconverted (PyTorch's own error, the bound's yardstick) and
float32 converted (ours).
"""

from __future__ import annotations

import copy
import os
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.models import resnet as tv

GLOBAL_BATCH = 8


def small_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=10)
    # without the max-pool (as CIFAR ResNets): layer4's BatchNorms see 2x2 maps, not 1x1, whose
    # 4-value statistics make a trajectory chaotic (float32 rounding alone moves it 1e-3)
    net.maxpool = nn.Identity()
    with torch.no_grad():  # non-trivial BN affine parameters and running statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


def tiny_resnet(seed: int = 0, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        tv.BasicBlock(width, width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def batches(steps: int, size: int = 32, seed: int = 1):
    """The same global batches on every rank: (images, labels) per step."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(GLOBAL_BATCH, 3, size, size, generator=g),
             torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)) for _ in range(steps)]


def shard(t: torch.Tensor, rank: int, world: int, sizes=None) -> torch.Tensor:
    if sizes is None:
        return t.chunk(world)[rank]
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ours(net: nn.Module) -> nn.Module:
    """Converted onto the reference ops: under the Triton interpreter (this suite's CPU mode)
    "auto" would pick Triton, minutes per step for this network; scenario_triton runs those."""
    import resnet_fast as rf
    return rf.convert(net, backend="torch")


def three(net: nn.Module, convert_fn):
    """(float64 reference, float32 unconverted, float32 converted) from the same weights."""
    return copy.deepcopy(net).double(), copy.deepcopy(net), convert_fn(copy.deepcopy(net))


def sgd(model: nn.Module, fused: bool = False):
    return torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4,
                           **({"fused": True} if fused else {}))


# --------------------------------------------------------------------------------------
# DDP: trajectories, no_sync, checkpoints
# --------------------------------------------------------------------------------------
def _ddp_step(ddp, opt, x, y, accumulate: int = 1):
    """One optimizer step over ``accumulate`` micro-batches of x (no_sync for all but the last)."""
    opt.zero_grad()
    losses = []
    for i, (xm, ym) in enumerate(zip(x.chunk(accumulate), y.chunk(accumulate))):
        last = i == accumulate - 1
        ctx = ddp.no_sync() if not last else _null()
        with ctx:
            loss = F.cross_entropy(ddp(xm.to(next(ddp.parameters()).dtype)), ym) / accumulate
            loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in ddp.module.named_parameters()}
    opt.step()
    return torch.stack(losses).sum(), grads


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def scenario_ddp(rank: int, world: int) -> dict:
    import resnet_fast as rf
    data = batches(5)
    models = three(small_resnet(), ours)
    ddps = [DDP(m) for m in models]
    opts = [sgd(models[0]), sgd(models[1]), sgd(models[2], fused=True)]
    out = {"loss": [[], [], []], "grads": [None] * 3}
    # steps: plain, two micro-batches under no_sync then one synchronized backward, plain
    for step, accumulate in ((0, 1), (1, 2), (2, 1)):
        x, y = data[step]
        xs, ys = shard(x, rank, world), shard(y, rank, world)
        for i, (ddp, opt) in enumerate(zip(ddps, opts)):
            loss, grads = _ddp_step(ddp, opt, xs, ys, accumulate)
            out["loss"][i].append(loss)
            if step == 1:
                out["grads"][i] = grads  # after no_sync accumulation and DDP's averaging
    out["state"] = [state(m) for m in models]
    out["keys"] = [list(m.state_dict()) for m in models]
    out["ddp_keys"] = list(ddps[2].state_dict())
    out["loss"] = [torch.stack(v) for v in out["loss"]]

    # checkpoint mid-training: ours (under DDP) -> an unconverted torchvision model, and an
    # unconverted one -> a converted model; both pairs continue two steps side by side
    ckpt = {"model": ddps[2].state_dict(), "opt": opts[2].state_dict()}
    ckpt_ref = {"model": models[1].state_dict(), "opt": opts[1].state_dict()}
    if rank == 0:
        torch.save(ckpt, os.environ["RF_TEST_OUT"] + "/ckpt.pt")
    dist.barrier()
    loaded = torch.load(os.environ["RF_TEST_OUT"] + "/ckpt.pt", weights_only=True)
    plain = small_resnet(seed=7)  # different weights: the load must bring everything
    nn.modules.utils.consume_prefix_in_state_dict_if_present(loaded["model"], "module.")
    plain.load_state_dict(loaded["model"])
    plain_opt = sgd(plain)
    plain_opt.load_state_dict(loaded["opt"])
    back = ours(small_resnet(seed=8))
    back.load_state_dict(copy.deepcopy(ckpt_ref["model"]))
    back_opt = sgd(back, fused=True)
    back_opt.load_state_dict(copy.deepcopy(ckpt_ref["opt"]))
    pairs = [(ddps[2], opts[2]), (DDP(plain), plain_opt), (ddps[1], opts[1]), (DDP(back), back_opt)]
    resumed = [[] for _ in pairs]
    for step in (3, 4):
        x, y = data[step]
        xs, ys = shard(x, rank, world), shard(y, rank, world)
        for i, (ddp, opt) in enumerate(pairs):
            resumed[i].append(_ddp_step(ddp, opt, xs, ys)[0])
    out["resumed_loss"] = [torch.stack(v) for v in resumed]
    out["resumed_state"] = [state(p[0].module) for p in pairs]
    return out


# --------------------------------------------------------------------------------------
# SyncBatchNorm: against one process training plain BatchNorm on the whole global batch
# --------------------------------------------------------------------------------------
def _global_step(model, opt, x, y):
    """The single-process reference: the whole global batch, plain BatchNorm."""
    opt.zero_grad()
    loss = F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _synced_step(model, opt, x, y, rank, world, sizes):
    """One rank's share of the global batch; the loss is its sum over the global count, so the
    sum of the ranks' gradients (all-reduced here: DDP refuses SyncBatchNorm on the CPU) is the
    gradient of the global batch's mean loss, shards of any sizes."""
    xs, ys = shard(x, rank, world, sizes), shard(y, rank, world, sizes)
    opt.zero_grad()
    loss = F.cross_entropy(model(xs), ys, reduction="sum") / x.shape[0]
    loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
    opt.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total


def scenario_syncbn(rank: int, world: int) -> dict:
    import resnet_fast as rf
    sync = nn.SyncBatchNorm.convert_sync_batchnorm
    data = batches(3)
    net = small_resnet()
    ref64, ref32 = copy.deepcopy(net).double(), copy.deepcopy(net)
    before = ours(sync(copy.deepcopy(net)))  # SyncBatchNorm, then convert
    after = sync(ours(copy.deepcopy(net)))   # convert, then SyncBatchNorm
    n_sync = sum(isinstance(m, nn.SyncBatchNorm) for m in after.modules())
    opts = [sgd(m) for m in (ref64, ref32, before, after)]
    out = {"loss": [[] for _ in range(4)], "n_sync": n_sync,
           "fused_before": [r["fused"] for r in rf.fusion_summary(before)],
           "fused_after": [r["fused"] for r in rf.fusion_summary(after)],
           "training_after": [r["training"] for r in rf.fusion_summary(after)]}
    # equal shards, unequal shards (3 + 5: the global count only the collective knows), equal
    for step, sizes in ((0, None), (1, [3, 5]), (2, None)):
        x, y = data[step]
        for i, m in enumerate((ref64, ref32)):
            out["loss"][i].append(_global_step(m, opts[i], x, y))
        for i, m in ((2, before), (3, after)):
            out["loss"][i].append(_synced_step(m, opts[i], x, y, rank, world, sizes))
    out["loss"] = [torch.stack(v) for v in out["loss"]]
    out["state"] = [state(m) for m in (ref64, ref32, before, after)]
    # eval(): running statistics, no synchronization
    x = data[0][0]
    with torch.no_grad():
        out["eval"] = [m.eval()(x.to(next(m.parameters()).dtype)) for m in (ref64, ref32, before, after)]
    return out


def scenario_bn_group(rank: int, world: int) -> dict:
    """process_group of 1 rank (apex's bn_group=1): statistics of this rank's shard only."""
    import resnet_fast as rf
    group = rf.distributed.bn_process_group(1)
    net = small_resnet()
    x, y = batches(1)[0]
    xs, ys = shard(x, rank, world), shard(y, rank, world)
    ref64 = copy.deepcopy(net).double()      # plain BN on the local shard
    grouped = ours(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net), process_group=group))
    world_synced = ours(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net)))
    outs = []
    for m in (ref64, grouped, world_synced):
        logits = m(xs.to(next(m.parameters()).dtype))
        F.cross_entropy(logits, ys).backward()
        outs.append({"logits": logits.detach(), "state": state(m),
                     "grads": {n: p.grad.clone() for n, p in m.named_parameters()}})
    return {"runs": outs}


def scenario_triton(rank: int, world: int) -> dict:
    """SyncBatchNorm on the Triton kernels (the interpreter), one step, against the global batch."""
    import resnet_fast as rf
    ok, why = rf.backends.available("triton", torch.device("cpu"), torch.float32)
    if not ok:  # a machine with CUDA runs these tests without the interpreter
        return {"skip": f"the Triton kernels cannot run on CPU tensors here: {why}"}
    net = tiny_resnet()
    x, y = batches(1, size=8)[0]
    ref64, ref32 = copy.deepcopy(net).double(), copy.deepcopy(net)
    synced = rf.convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net)), backend="triton")
    opts = [sgd(m) for m in (ref64, ref32, synced)]
    losses = [_global_step(ref64, opts[0], x, y), _global_step(ref32, opts[1], x, y),
              _synced_step(synced, opts[2], x, y, rank, world, None)]
    return {"loss": torch.stack([v.double() for v in losses]),
            "state": [state(m) for m in (ref64, ref32, synced)],
            "fused": [r["fused"] for r in rf.fusion_summary(synced)]}


SCENARIOS = {"ddp": scenario_ddp, "syncbn": scenario_syncbn, "bn_group": scenario_bn_group,
             "triton": scenario_triton}


def main(rank: int, world: int, init_file: str, out: str, names: list) -> None:
    os.environ["RF_TEST_OUT"] = out
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    try:
        for name in names:
            torch.manual_seed(0)
            try:
                results[name] = SCENARIOS[name](rank, world)
            except Exception:  # noqa: BLE001 - reported by the test that reads it
                results[name] = {"error": traceback.format_exc()}
                break  # the other rank may now wait in a collective: stop here
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
