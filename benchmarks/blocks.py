"""The per-block section: the stem (conv1 + bn1 + relu + maxpool) and each stage
(layer1..layer4) of the converted model, per backend, against the eager model's same submodule
in channels_last. Every block gets the activations the eager model actually produces at its
entry (from a ring of random images), and its error is taken against the reference-dtype
block on the same activations."""

from __future__ import annotations

import copy
import gc
import time

import torch

from . import metrics, progress
from .config import Config
from .models import cast, tf32_off
from .timing import bench, ring_size, sync, timed_call

BLOCKS = ("stem", "layer1", "layer2", "layer3", "layer4")


def _eager_block(model, name):
    if name == "stem":
        return torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    return getattr(model, name)


def _converted_block(model, name, backend):
    import resnet_fast

    if name == "stem":
        # The converted ResNet runs its stem inline in forward(); ConvBNAct is the same fused
        # unit (conv1 + bn1 + relu, folded) as a module of its own.
        return torch.nn.Sequential(
            resnet_fast.ConvBNAct(model.conv1, model.bn1, relu=True, backend=backend), model.maxpool)
    resnet_fast.set_backend(getattr(model, name), backend)
    return getattr(model, name)


def _prefixes(name):
    return ("conv1",) if name == "stem" else (name + ".",)


@torch.no_grad()
def run(cfg: Config, model32: torch.nn.Module, peaks: dict, flops_per_module: dict) -> dict:
    import resnet_fast

    t_start = time.perf_counter()
    dev, dt, B = cfg.device, cfg.dtype, cfg.batch
    cl = torch.channels_last
    variants = [v for v in ["eager_cl"] + [f"rf_{b}" for b in cfg.backends] if cfg.wants(v)]
    eager = cast(model32, dt, cl)
    conv = resnet_fast.convert(cast(model32, dt, cl), backend="torch")
    ref_model = model32 if cfg.ref_dtype == torch.float32 else copy.deepcopy(model32).to(cfg.ref_dtype)
    itemsize = torch.empty((), dtype=dt).element_size()

    # Block-entry activations of a ring of images, from the eager model in dtype.
    img_bytes = B * 3 * cfg.resolution ** 2 * itemsize
    k = ring_size(img_bytes, dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1000 + 777)
    acts = {n: [] for n in BLOCKS}
    for _ in range(k):
        x = torch.randn(B, 3, cfg.resolution, cfg.resolution, device=dev, dtype=dt,
                        generator=gen).contiguous(memory_format=cl)
        for n in BLOCKS:
            acts[n].append(x)
            x = _eager_block(eager, n)(x)
        del x

    rows = []
    for n in BLOCKS:
        if cfg.out_of_time(f"block {n}"):
            continue
        ring = [(a,) for a in acts[n]]
        with tf32_off():
            ref = _eager_block(ref_model, n)(acts[n][0].to(cfg.ref_dtype))
        flops = B * sum(f for m, f in flops_per_module.items() if m.startswith(_prefixes(n)))
        out_shape = ref.shape
        params = sum(p.numel() for p in _eager_block(eager, n).parameters())
        nbytes = itemsize * (acts[n][0].numel() + out_shape.numel() + params)
        row = {"block": n, "in_shape": list(acts[n][0].shape), "out_shape": list(out_shape),
               "flops": flops, "bytes": nbytes, "ring": len(ring), "results": {}}
        for v in variants:
            res: dict = {}
            try:
                fn = _eager_block(eager, n) if v == "eager_cl" else _converted_block(conv, n, v[3:])
                out, res["setup_s"] = timed_call(fn, *ring[0], device=dev)
                res["rel_err"] = metrics.rel_err(out, ref)
                del out
                t = bench(fn, ring, device=dev, warmup=cfg.warmup, target_ms=cfg.block_target_ms,
                          max_reps=cfg.max_e2e_reps)
                res.update(t.as_dict())
            except Exception as e:
                res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            row["results"][v] = res
        base = row["results"].get("eager_cl", {})
        for v, res in row["results"].items():
            if "median_ms" in res:
                res.update(metrics.derived(res["median_ms"], flops, nbytes, peaks, base.get("median_ms")))
            if "rel_err" in res:
                res["status"] = metrics.verdict(res["rel_err"], dt, base.get("rel_err"))
        rows.append(row)
        del ref
        progress.log(f"  block {n}: " + ", ".join(
            f"{v} {r['median_ms']:.3f}ms" if "median_ms" in r else f"{v} ERR"
            for v, r in row["results"].items()))
    del acts, eager, conv
    gc.collect()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"variants": variants, "rows": rows, "section_s": time.perf_counter() - t_start}
