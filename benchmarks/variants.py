"""The end-to-end section: the whole forward, images/s, on every variant, the same input ring.

    eager_nchw            the model in dtype, NCHW
    eager_cl              the same, channels_last: the baseline of every speed-up
    eager_folded          BN folded by torch.fx.experimental.optimization.fuse (in fp32, then cast)
    eager_cl_graph        eager_cl captured in a CUDA graph (what graphs alone buy)
    compile               torch.compile, inductor freezing on, under no_grad
    compile_max_autotune  the same with mode="max-autotune" (inductor also uses CUDA graphs)
    rf_<backend>          resnet_fast.convert(model), set to that backend
    rf_<backend>_graph    the same through resnet_fast.CudaGraphRunner (warm-up, capture, and its
                          check for changed parameters on every call)
    rf_<backend>_fp8[_graph]  the converted model quantized by resnet_fast.quantize_fp8 (calibrated
                          on the ring's first batch: the speed figure; accuracy is the digits test's
                          and the ImageNet script's), GPU only; judged by SQNR against the
                          reference, not by the 16-bit tolerance (8 bits cannot meet it)

Each variant builds its own model copy inside its measurement, so its peak memory (over the
memory held before it started: inputs and the fp32 model) covers weights, activations,
workspaces and graph pools. setup_s is everything before the timed calls (build, compile,
autotune, capture); it is never inside a timed figure. A graph variant's timed call includes
copying the input into the graph's static input.
"""

from __future__ import annotations

import copy
import gc
import math
import time

import torch

from . import metrics, progress
from .config import Config
from .models import cast, tf32_off
from .timing import bench, ring_size, sync

# Rough wall time of a variant's setup (compile, autotune) on an H100 with 16 cores; under
# --budget-s a variant starts only when this much time is left.
SETUP_S = {"compile": 60.0, "compile_max_autotune": 240.0}


def names(cfg: Config) -> list[str]:
    # max-autotune last: its compile is the longest step, and a run cut short by --budget-s
    # then still has every other figure
    out = ["eager_nchw", "eager_cl", "eager_folded", "eager_cl_graph", "compile"]
    for b in cfg.backends:
        out += [f"rf_{b}", f"rf_{b}_graph"]
    for b in cfg.backends:
        if b in ("triton", "cuda") and cfg.on_gpu and cfg.dtype == torch.bfloat16:
            out += [f"rf_{b}_fp8", f"rf_{b}_fp8_graph"]
    return out + ["compile_max_autotune"]


def _cuda_graph(fn, example: torch.Tensor):
    """Capture fn(static_in) after warm-up on a side stream; return run(x) that copies x in
    and replays (the copy is part of the measured call, as it is of real use)."""
    static_in = example.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = fn(static_in)

    def run(x):
        static_in.copy_(x)
        g.replay()
        return static_out
    run.graph = g  # keep the graph (and its pool) alive as long as run is
    return run


def _build(cfg: Config, name: str, model32: torch.nn.Module, example: torch.Tensor):
    """The callable of one variant (compile/autotune happens on its first call, later)."""
    dt, fmt = cfg.dtype, cfg.memory_format
    graph = name.endswith("_graph")
    base = name[: -len("_graph")] if graph else name
    if base == "eager_nchw":
        fn = cast(model32, dt)
    elif base == "eager_cl":
        fn = cast(model32, dt, torch.channels_last)
    elif base == "eager_folded":
        from torch.fx.experimental.optimization import fuse
        # fold in fp32, then cast: folding bf16 parameters would round twice
        fn = fuse(copy.deepcopy(model32)).to(dtype=dt).to(memory_format=torch.channels_last)
    elif base in ("compile", "compile_max_autotune"):
        torch._dynamo.reset()
        mode = "max-autotune" if base == "compile_max_autotune" else None
        fn = torch.compile(cast(model32, dt, fmt), mode=mode)
    elif base.startswith("rf_") and base.endswith("_fp8"):
        import resnet_fast
        fn = resnet_fast.convert(cast(model32, dt, fmt), backend=base[3:-4]).eval()
        resnet_fast.quantize_fp8(fn, [example])
    elif base.startswith("rf_"):
        import resnet_fast
        fn = resnet_fast.convert(cast(model32, dt, fmt), backend=base[3:])
    else:
        raise ValueError(f"unknown variant {name!r}")
    return fn, graph


def _input_format(name: str, cfg: Config):
    if name == "eager_nchw":
        return torch.contiguous_format
    if name.startswith(("eager_cl", "eager_folded")):
        return torch.channels_last
    return cfg.memory_format


@torch.no_grad()
def measure(cfg: Config, name: str, model32, xs: list, ref: torch.Tensor, flops: float,
            nbytes: float, peaks: dict) -> dict:
    dev = cfg.device
    res: dict = {}
    ring = [(x.contiguous(memory_format=_input_format(name, cfg)),) for x in xs]
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    fn = None
    try:
        sync(dev)
        t0 = time.perf_counter()
        fn, graph = _build(cfg, name, model32, ring[0][0])
        long = name.startswith("compile") or (name.startswith("rf_") and name != "rf_torch")
        label = f"{name}: first call" + (" (compile/autotune)" if long else "")
        with _freezing() if name.startswith("compile") else _null():
            with progress.step(label) if long else _null():
                first = fn(*ring[0])
                first_err = metrics.rel_err(first, ref)
                del first
                if graph and name.startswith("rf_"):
                    # what a user of the library gets: its capture helper, the change check on
                    # every call included (the output is the graph's own, as _cuda_graph's)
                    import resnet_fast
                    fn = resnet_fast.CudaGraphRunner(fn, clone_output=False)
                    fn(ring[0][0])  # captures
                elif graph:
                    fn = _cuda_graph(fn, ring[0][0])
        sync(dev)
        res["setup_s"] = time.perf_counter() - t0
        t = bench(fn, ring, device=dev, warmup=cfg.warmup, target_ms=cfg.e2e_target_ms,
                  max_reps=cfg.max_e2e_reps)
        res.update(t.as_dict())
        # error in the steady state too (graph replays, cudagraph trees), on the same input
        out = fn(*ring[0])
        err = metrics.rel_err(out, ref)
        del out
        res["rel_err"] = max(first_err, err) if first_err == first_err and err == err else float("nan")
        res["images_s"] = cfg.batch / (t.median_ms / 1e3)
        if dev.type == "cuda":
            res["peak_mem_gb"] = (torch.cuda.max_memory_allocated() - before) / 2**30
        if name.startswith("rf_") and not name.endswith("_graph"):
            import resnet_fast
            summ = resnet_fast.fusion_summary(fn)
            res["convs_unfused"] = [r["name"] for r in summ if not r.get("runs_fused", r["fused"])]
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    finally:
        del fn
        if name.startswith("compile"):
            torch._dynamo.reset()   # frozen constants and compiled graphs hold memory
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    return res


def _freezing():
    import torch._inductor.config as inductor_config
    return inductor_config.patch(freezing=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def run(cfg: Config, model32: torch.nn.Module, peaks: dict, flops_per_image: float,
        bytes_per_image: float, checkpoint=None) -> dict:
    """Measure every variant; ``checkpoint(section)`` (if given) gets the section so far after
    each one, so a run cut short keeps what it finished."""
    t_start = time.perf_counter()
    dev, dt, B = cfg.device, cfg.dtype, cfg.batch
    todo = []
    for n in names(cfg):
        if n.endswith("_graph") and not cfg.on_gpu:
            cfg.skipped[n] = "needs CUDA (CUDA graphs)"
            continue
        if cfg.wants(n, cpu_default=not n.startswith("compile")):
            todo.append(n)
    itemsize = torch.empty((), dtype=dt).element_size()
    k = ring_size(B * 3 * cfg.resolution ** 2 * itemsize, dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1000 + 999)
    xs = [torch.randn(B, 3, cfg.resolution, cfg.resolution, device=dev, dtype=dt, generator=gen)
          for _ in range(k)]
    ref_model = model32 if cfg.ref_dtype == torch.float32 else copy.deepcopy(model32).to(cfg.ref_dtype)
    with tf32_off():
        ref = ref_model(xs[0].to(cfg.ref_dtype))
    del ref_model
    flops, nbytes = flops_per_image * B, bytes_per_image * B
    rows = []

    def section(partial: bool) -> dict:
        base = next((r for r in rows if r["variant"] == "eager_cl"), {})
        for r in rows:
            if "median_ms" in r:
                r.update(metrics.derived(r["median_ms"], flops, nbytes, peaks, base.get("median_ms")))
            if "rel_err" in r and "_fp8" in r["variant"]:
                e = r["rel_err"]
                r["sqnr_db"] = -20 * math.log10(e) if e == e and e > 0 else (math.inf if e == 0 else float("nan"))
                r["status"] = "fp8" if e == e else "NaN"
            elif "rel_err" in r:
                r["status"] = metrics.verdict(r["rel_err"], dt, base.get("rel_err"))
        out = {"variants": todo, "rows": rows, "ring": k, "flops_per_image": flops_per_image,
               "bytes_per_image": bytes_per_image, "section_s": time.perf_counter() - t_start}
        if partial:
            out["partial"] = True
        return out

    for n in todo:
        if cfg.out_of_time(n, SETUP_S.get(n, 0.0)):
            continue
        progress.log(f"  e2e {n} ...")
        res = measure(cfg, n, model32, xs, ref, flops, nbytes, peaks)
        res["variant"] = n
        rows.append(res)
        if "median_ms" in res:
            progress.log(f"  e2e {n}: {res['median_ms']:.2f} ms, {res['images_s']:.0f} img/s, "
                         f"err {res.get('rel_err', float('nan')):.2e}, setup {res['setup_s']:.1f} s")
        else:
            progress.log(f"  e2e {n}: {res.get('error')}")
        if checkpoint is not None:
            checkpoint(section(partial=True))
    return section(partial=False)
