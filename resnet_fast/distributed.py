"""BatchNorm synchronized across ranks: what a converted ``nn.SyncBatchNorm`` does in train().

Under ``torch.distributed`` each rank's fused conv epilogue reduces the statistics of its own
shard of the batch (``conv_stats``: count, mean, biased variance per channel). A SyncBatchNorm
normalizes with the statistics of the *global* batch, so between the epilogue and the finalize
the ranks exchange those small per-channel partials, one collective per BatchNorm:

    forward   all_gather of [count, mean(C), var(C)] from every rank of the BN's process group
              (world x (2C + 1) fp32 values), then the merge of (count, mean, M2) in fp64, in rank
              order, on every rank: the same bits everywhere, the same math as the single-GPU
              merge of tile partials (kernels/batch_norm.py), never raw sums of y and y^2;
    backward  all_reduce (sum) of the gradients of the global mean and variance (2C values):
              linear in the BatchNorm backward's sums S1 = sum dy and S2 = sum dy * xhat, so it
              is the all-reduce of S1/S2 that ``nn.SyncBatchNorm``'s backward does.

The local statistics stay differentiable (``conv_stats``/``batch_stats`` have their gradients),
so autograd carries each rank's share of the global BatchNorm backward into its conv's dgrad and
wgrad: dy + B*y + C per channel (train_ops._stats_grad), one elementwise pass more than the
single-GPU path, whose BatchNorm backward is fused into one op because its statistics are local.

Which BatchNorms synchronize is torch's rule (``nn.SyncBatchNorm.forward``): a SyncBatchNorm
normalizing with batch statistics, in train(), with torch.distributed initialized and more than
one rank in its ``process_group`` (WORLD when None). So ``nn.SyncBatchNorm.convert_sync_batchnorm``
before or after :func:`resnet_fast.convert` keeps the fused path, a ``process_group`` of k ranks
(apex's ``bn_group``; :func:`bn_process_group` makes them) is honoured, and unlike
``nn.SyncBatchNorm`` itself this runs on CPU tensors too (gloo), where torch refuses.

Collectives run on the current stream (NCCL) and need no host synchronization: the global count
stays on the device (ranks may hold different batch sizes), so a synchronized training step can
be captured into a CUDA graph. Every rank must run the same BatchNorms in the same order, as with
``nn.SyncBatchNorm``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["bn_process_group", "merge_statistics", "sync_group"]


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def sync_group(bn: nn.Module):
    """The process group whose ranks ``bn`` normalizes over, or None when it normalizes with
    this rank's statistics alone (torch's rule, see the module doc)."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return None
    dist = _dist()
    if dist is None:
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def bn_process_group(group_size: int):
    """This rank's process group of ``group_size`` consecutive ranks (ranks 0..k-1, k..2k-1, ...),
    for ``nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=...)``: BatchNorm
    statistics shared within a group only (apex's ``bn_group``: e.g. the GPUs of one node).
    Every rank must call it (``new_group`` is collective), with the same ``group_size``."""
    dist = _dist()
    if dist is None:
        raise RuntimeError("bn_process_group needs torch.distributed initialized "
                           "(torch.distributed.init_process_group)")
    world = dist.get_world_size()
    if group_size < 1 or world % group_size:
        raise ValueError(f"group_size must divide the world size {world}, got {group_size}")
    mine = None
    for start in range(0, world, group_size):
        g = dist.new_group(list(range(start, start + group_size)))
        if start <= dist.get_rank() < start + group_size:
            mine = g
    return mine


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    dist = _dist()
    # all_gather_single is torch 2.14's name; all_gather_into_tensor is older torch's (2.11)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


class _MergeStatistics(torch.autograd.Function):
    """(mean, var) of this rank's shard -> (mean, var, unbiased var) of the group's batch."""

    @staticmethod
    def forward(ctx, mean, var, count: int, group):
        dist = _dist()
        world = dist.get_world_size(group)
        c = mean.shape[0]
        local = torch.empty(2 * c + 1, dtype=mean.dtype, device=mean.device)
        local[0] = count
        if count > 0:
            local[1:c + 1] = mean
            local[c + 1:] = var
        else:  # an empty shard: it adds nothing (its statistics are 0/0)
            local[1:] = 0
        gathered = torch.empty(world * (2 * c + 1), dtype=mean.dtype, device=mean.device)
        _all_gather(gathered, local, group)
        g = gathered.view(world, 2 * c + 1).to(torch.float64)
        n = g[:, :1]                       # [world, 1] counts
        means, variances = g[:, 1:c + 1], g[:, c + 1:]
        total = n.sum(0)                   # on the device: ranks may hold different batch sizes
        g_mean = (n * means).sum(0) / total
        m2 = (n * variances + n * (means - g_mean).square()).sum(0)
        g_var = m2 / total
        unbiased = m2 / (total - 1)
        rank = dist.get_rank(group)  # this rank's index within the group
        ctx.group = group
        ctx.save_for_backward(means[rank].to(mean.dtype), g_mean.to(mean.dtype),
                              (n[rank] / total).to(mean.dtype))
        out = g_mean.to(mean.dtype), g_var.to(mean.dtype), unbiased.to(mean.dtype)
        ctx.mark_non_differentiable(out[2])
        return out

    @staticmethod
    def backward(ctx, g_mean, g_var, _g_unbiased):
        local_mean, global_mean, share = ctx.saved_tensors
        zeros = torch.zeros_like(local_mean)
        g_mean = zeros if g_mean is None else g_mean
        g_var = zeros if g_var is None else g_var
        # every rank's loss depends on the global statistics: their gradients, summed over ranks
        total = torch.cat([g_mean, g_var]).contiguous()
        _dist().all_reduce(total, group=ctx.group)
        c = local_mean.shape[0]
        gm, gv = total[:c], total[c:]
        # mean = sum n_r mean_r / N;  var = sum n_r (var_r + (mean_r - mean)^2) / N
        d_mean = share * (gm + 2 * (local_mean - global_mean) * gv)
        d_var = share * gv
        return d_mean, d_var, None, None


def merge_statistics(mean: torch.Tensor, var: torch.Tensor, count: int, group):
    """(mean, biased var, unbiased var) per channel of the batch spread over ``group``'s ranks,
    from this rank's (mean, biased var) over ``count`` values: one all_gather; differentiable in
    mean and var (its backward is one all_reduce). See the module doc."""
    return _MergeStatistics.apply(mean, var, int(count), group)
