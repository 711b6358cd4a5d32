"""The per-layer section: every distinct conv of the model (with its BN, residual and ReLU),
timed on every peer in the same run, on the same inputs:

    eager_nchw      [relu(F.batch_norm)] + F.conv2d [+ F.batch_norm] (+ residual) (+ relu), NCHW
                    (cuDNN), BN params in dtype
    eager_cl        the same, channels_last: the baseline of every speed-up
    folded_compile  BN folded into the conv weight; conv + bias (+ residual) + relu through
                    torch.compile (what inductor makes of it: cuDNN conv + one fused epilogue)
    rf_<backend>    resnet_fast.ops.conv_bn_act on that backend, weights packed beforehand; for
                    a conv with a prologue also timed without it (``without_pre_us``)

Each peer's error is taken against the same layer in the reference dtype (fp32 without TF32 on
a GPU, fp64 on CPU) with the unfolded BatchNorm, on the first input of the ring.
"""

from __future__ import annotations

import copy
import gc
import inspect
import time

import torch
import torch.nn.functional as F

from . import metrics, progress
from .config import Config
from .layers import ConvLayer
from .models import tf32_off
from .timing import bench, ring_size, sync, timed_call

BASE_PEERS = ("eager_nchw", "eager_cl", "folded_compile")


def peer_names(cfg: Config) -> list[str]:
    return list(BASE_PEERS) + [f"rf_{b}" for b in cfg.backends]


def _bn(y, bn, dtype=None):
    """bn(y) in eval(), with bn's tensors cast to ``dtype`` when given (the reference)."""
    rm, rv, w, b = (t if dtype is None else t.to(dtype)
                    for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias))
    return F.batch_norm(y, rm, rv, w, b, False, 0.0, bn.eps)


def _eager(w, bias, bn, stride, padding, dilation, groups, relu, pre_bn=None, dtype=None):
    """The unfused layer as torchvision's eager code runs it; with ``dtype``, BN's tensors are
    cast to it (the reference: w, bias and the inputs are given in that dtype)."""
    def f(x, r=None):
        if pre_bn is not None:
            x = torch.relu_(_bn(x, pre_bn, dtype))
        y = F.conv2d(x, w, bias, stride, padding, dilation, groups)
        if bn is not None:
            y = _bn(y, bn, dtype)
        if r is not None:
            y += r                      # torchvision: out += identity
        return torch.relu_(y) if relu else y   # nn.ReLU(inplace=True)
    return f


def _folded(stride, padding, dilation, groups, relu):
    # cuDNN on BN-folded weights plus the op contract's epilogue, which is the reference math
    # of resnet_fast.ops; built per layer (stride etc. are constants of the graph), compiled
    # after a dynamo reset so no recompile limit can quietly send a layer back to eager.
    from resnet_fast import ops

    def f(x, w, b, r, pre_scale=None, pre_bias=None):
        return ops.conv_bn_act_reference(x, w, b, stride, padding, dilation, groups, r, relu,
                                         pre_scale, pre_bias)
    return f


def _estimator():
    """estimate_layer_us(layer_dict, ...) of resnet_fast's kernel report, when it exists (the
    column stays empty otherwise)."""
    import importlib

    try:
        fn = getattr(importlib.import_module("resnet_fast.kernel_report"), "estimate_layer_us", None)
    except Exception:
        return None
    return fn if callable(fn) else None


def _estimate(est, layer_dict: dict, cfg: Config, peaks: dict, backend: str | None):
    try:
        params = inspect.signature(est).parameters
        offer = {"batch": cfg.batch, "dtype": cfg.dtype, "device": cfg.device, "peaks": peaks,
                 "backend": backend}
        kw = {k: v for k, v in offer.items() if k in params}
        v = est(layer_dict, **kw)
        if isinstance(v, dict):
            v = v.get("estimate_us")
        return float(v) if v is not None else None
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"


def peer_fn(peer: str, layer: ConvLayer, conv: torch.nn.Conv2d, bn, pre_bn,
            w_fold: torch.Tensor, b_fold: torch.Tensor, pre: tuple, example_cl: torch.Tensor,
            with_pre: bool = True):
    """(fn(x, residual), input layout "nchw"|"cl", note) for one peer of one layer.

    conv/bn/pre_bn are the layer's modules in the run dtype; w_fold/b_fold their fold
    (resnet_fast.fold_conv_bn), ``pre`` the prologue's fp32 (scale, shift) or (None, None);
    note says e.g. that a backend falls back for this shape. ``with_pre=False``: an rf peer
    without its prologue (the same conv on the same input), to read what the prologue costs."""
    from resnet_fast import backends, ops

    cl = torch.channels_last
    s, p, d, g = list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups
    if peer == "eager_nchw":
        return _eager(conv.weight, conv.bias, bn, s, p, d, g, layer.relu, pre_bn), "nchw", None
    if peer == "eager_cl":
        return (_eager(conv.weight.contiguous(memory_format=cl), conv.bias, bn, s, p, d, g,
                       layer.relu, pre_bn), "cl", None)
    if peer == "folded_compile":
        torch._dynamo.reset()
        fn = torch.compile(_folded(s, p, d, g, layer.relu), dynamic=False)
        w = w_fold.contiguous(memory_format=cl)
        return (lambda x, r: fn(x, w, b_fold, r, *pre)), "cl", None
    if not peer.startswith("rf_"):
        raise ValueError(f"unknown peer {peer!r}")
    name = peer[len("rf_"):]
    be = backends.get(name)
    wp = be.pack_weight(w_fold)
    ps, pt = pre if with_pre else (None, None)
    ok, why = be.supports(example_cl, wp, g, pre=ps is not None)
    note = None if ok else f"falls back: {why}"
    return (lambda x, r: ops.conv_bn_act(x, wp, b_fold, s, p, d, g, residual=r, relu=layer.relu,
                                         pre_scale=ps, pre_bias=pt, backend=name)), "cl", note


@torch.no_grad()
def _reference(layer: ConvLayer, x: torch.Tensor, r, ref_dtype: torch.dtype) -> torch.Tensor:
    c = layer.conv
    f = _eager(c.weight.to(ref_dtype), None if c.bias is None else c.bias.to(ref_dtype), layer.bn,
               c.stride, c.padding, c.dilation, c.groups, layer.relu, layer.pre_bn, dtype=ref_dtype)
    with tf32_off():
        return f(x.to(ref_dtype), None if r is None else r.to(ref_dtype))


@torch.no_grad()
def measure_layer(cfg: Config, layer: ConvLayer, idx: int, peers: list[str], peaks: dict) -> dict:
    import resnet_fast
    from resnet_fast.fold import bn_scale_shift

    dev, dt, B = cfg.device, cfg.dtype, cfg.batch
    cl = torch.channels_last
    conv = copy.deepcopy(layer.conv).to(dt)      # the layer as the eager bf16 model holds it
    bn = copy.deepcopy(layer.bn).to(dt) if layer.bn is not None else None
    pre_bn = copy.deepcopy(layer.pre_bn).to(dt) if layer.pre_bn is not None else None
    itemsize = torch.empty((), dtype=dt).element_size()
    x_shape = (B, *layer.in_shape)
    r_shape = (B, *layer.out_shape) if layer.residual else None
    per_item = itemsize * (torch.Size(x_shape).numel() + (torch.Size(r_shape).numel() if r_shape else 0))
    k = ring_size(per_item, dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1000 + idx)
    xs = [torch.randn(x_shape, device=dev, dtype=dt, generator=gen) for _ in range(k)]
    rs = [torch.randn(r_shape, device=dev, dtype=dt, generator=gen) if r_shape else None for _ in range(k)]
    xs_cl = [x.contiguous(memory_format=cl) for x in xs]
    rs_cl = [r.contiguous(memory_format=cl) if r is not None else None for r in rs]
    ring_nchw = list(zip(xs, rs))
    ring_cl = list(zip(xs_cl, rs_cl))
    ref = _reference(layer, xs[0], rs[0], cfg.ref_dtype)

    w_fold, b_fold = resnet_fast.fold_conv_bn(conv, bn)   # as the converted model folds it
    # the prologue as the fold cache makes it: fp32 scale/shift of the fp32 model's BN
    pre = tuple(bn_scale_shift(pre_bn)) if pre_bn is not None else (None, None)
    row = layer.describe(B, itemsize)
    row.update(ring=k, results={})

    for peer in peers:
        res: dict = {}
        try:
            fn, layout, note = peer_fn(peer, layer, conv, bn, pre_bn, w_fold, b_fold, pre, xs_cl[0])
            ring = ring_nchw if layout == "nchw" else ring_cl
            if note:
                res["note"] = note
            out, res["setup_s"] = timed_call(fn, *ring[0], device=dev)
            res["rel_err"] = metrics.rel_err(out, ref)
            del out
            t = bench(fn, ring, device=dev, warmup=cfg.warmup, target_ms=cfg.layer_target_ms,
                      max_reps=cfg.max_layer_reps, hide_launch=True)
            res.update(t.as_dict())
            res["median_us"] = t.median_ms * 1e3
            if layer.pre and peer.startswith("rf_"):
                # the same kernel without the prologue, on the same ring: the prologue's cost
                bare, _, _ = peer_fn(peer, layer, conv, bn, pre_bn, w_fold, b_fold, pre, xs_cl[0],
                                     with_pre=False)
                bare(*ring[0])
                tb = bench(bare, ring, device=dev, warmup=cfg.warmup, target_ms=cfg.layer_target_ms,
                           max_reps=cfg.max_layer_reps, hide_launch=True)
                res["without_pre_us"] = tb.median_ms * 1e3
        except Exception as e:   # one broken peer must not lose the whole run
            res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        row["results"][peer] = res
        if peer == "folded_compile":
            torch._dynamo.reset()

    base = row["results"].get("eager_cl", {})
    for peer, res in row["results"].items():
        if "median_ms" in res:
            res.update(metrics.derived(res["median_ms"], row["flops"], row["bytes"], peaks,
                                       base.get("median_ms")))
        if "rel_err" in res:
            res["status"] = metrics.verdict(res["rel_err"], dt, base.get("rel_err"))
    return row


def run(cfg: Config, layers: list[ConvLayer], peaks: dict, checkpoint=None) -> dict:
    """Measure every layer; ``checkpoint(rows)`` (if given) is called after each one, so a run
    cut short still leaves the layers it finished on disk."""
    peers = [p for p in peer_names(cfg)
             if cfg.wants(p, cpu_default=(p != "folded_compile"))]
    est = _estimator()
    rows = []
    t0 = time.perf_counter()
    for i, layer in enumerate(layers):
        if cfg.out_of_time(f"layer {layer.name}"):
            continue
        row = measure_layer(cfg, layer, i, peers, peaks)
        if est is not None:
            row["estimate_us"] = {b: _estimate(est, row, cfg, peaks, b) for b in cfg.backends}
        rows.append(row)
        gc.collect()
        sync(cfg.device)
        if cfg.on_gpu:
            torch.cuda.empty_cache()
        bits = []
        for p in peers:
            r = row["results"].get(p, {})
            bits.append(f"{p} {r['median_us']:.0f}us" if "median_us" in r else f"{p} ERR")
            if "without_pre_us" in r:
                bits[-1] += f" (without prologue {r['without_pre_us']:.0f}us)"
        progress.log(f"  layer {i + 1}/{len(layers)} {row['name']} ({row['label']}, {row['epilogue']}, "
                     f"x{row['multiplicity']}): " + ", ".join(bits))
        if checkpoint is not None:
            checkpoint(rows)
    totals = {}
    for p in peers:
        ts = [r["results"].get(p, {}).get("median_ms") for r in rows]
        if all(t is not None for t in ts):
            totals[p] = sum(t * r["multiplicity"] for t, r in zip(ts, rows))
    base = totals.get("eager_cl")
    return {
        "peers": peers,
        "rows": rows,
        "weighted_total_ms": totals,   # sum over the model's convs of (median x multiplicity)
        "weighted_speedup_vs_eager_cl": {p: base / t for p, t in totals.items() if base and t},
        "estimator": f"{est.__module__}.{est.__name__}" if est else None,
        "section_s": time.perf_counter() - t0,
        "timing": "median of per-call CUDA events, launch hidden behind a queued GPU sleep"
                  if cfg.on_gpu else "median of per-call perf_counter",
    }
