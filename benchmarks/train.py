"""The training section: one whole training step (forward, cross-entropy, backward, SGD with
momentum) of the model, per variant, on the same inputs from the same weights.

Variants: ``train_eager`` (torchvision, channels_last, under autocast in the report's dtype:
the way people train), ``train_compile`` / ``train_compile_max_autotune`` (torch.compile of the
model; the optimizer eager), ``train_rf_<backend>`` (the converted model: resnet_fast's
training ops) and ``train_rf_<backend>_graph`` (that whole step captured once in a CUDA graph and
replayed, through :class:`resnet_fast.TrainingStep`). Per variant: median step time (CUDA events on a GPU), images/s, peak memory per image
(the step's peak above what the model, optimizer state and inputs hold, over the batch), the
activations autograd saves per image (any device), the
first step's loss and fc-weight gradient against train_eager's from the same weights, and on a
GPU the step's kernel time by owner (resnet_fast's kernels, cuDNN's, the rest) from the profiler.

Without a GPU it runs at the CPU batch, fp32 without autocast, eager and resnet_fast only
(compiling a training step on two CPU cores takes minutes: ask with --variants).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

from . import progress
from .config import Config

LR, MOMENTUM = 0.01, 0.9
#: substrings of kernel names by owner, for the profiler's per-step split
RF_KERNELS = ("conv_bn_act_kernel", "scale_bias_act", "_merge_kernel", "_finalize_kernel",
              "_running_update_kernel", "_tile_stats_kernel", "add_relu_kernel", "resnet_fast")
CUDNN_KERNELS = ("cudnn", "xmma", "implicit_gemm", "dgrad", "wgrad", "conv2d", "fprop", "sm90", "sm80")


def names(cfg: Config) -> list[str]:
    out = ["train_eager", "train_compile", "train_compile_max_autotune"]
    for b in cfg.backends:
        out += [f"train_rf_{b}", f"train_rf_{b}_graph"]
    return out


def _autocast(cfg: Config):
    on = cfg.dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(cfg.device.type, dtype=cfg.dtype if on else torch.bfloat16, enabled=on)


def _model(cfg: Config, name: str, model32: torch.nn.Module):
    m = copy.deepcopy(model32).to(memory_format=torch.channels_last).train()
    base = name[: -len("_graph")] if name.endswith("_graph") else name
    if base.startswith("train_rf_"):
        import resnet_fast
        return resnet_fast.convert(m, backend=base[len("train_rf_"):]), m
    if base.startswith("train_compile"):
        torch._dynamo.reset()
        mode = "max-autotune" if base == "train_compile_max_autotune" else None
        return torch.compile(m, mode=mode), m
    return m, m


def _step_fn(cfg: Config, model, params_of, x, target):
    opt = torch.optim.SGD(params_of.parameters(), lr=LR, momentum=MOMENTUM)

    def step():
        with _autocast(cfg):
            out = model(x)
        loss = F.cross_entropy(out.float(), target)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        return loss
    return step, opt


def _graphed(cfg: Config, model, opt, x, target):
    """The step through resnet_fast.TrainingStep (the library's captured training step: warm-ups
    on a side stream, their effects undone, a staleness check and the batch copy per call)."""
    import resnet_fast
    on = cfg.dtype in (torch.bfloat16, torch.float16)
    tstep = resnet_fast.capture_training_step(
        model, opt, lambda out, t: F.cross_entropy(out.float(), t), x, target,
        autocast_dtype=cfg.dtype if on else None)

    def replay():
        return tstep(x, target)
    replay.step = tstep
    return replay


def _time(fn, cfg: Config, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        if cfg.on_gpu:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def saved_activation_mb(cfg: Config, model, x) -> float:
    """MB of activations autograd saves in one forward: distinct storages of saved tensors whose
    leading dimension is the batch (weights, their autocast copies and per-channel vectors left
    out; a weight with as many output channels as the batch has images would count, a few MB at
    most): the activation memory a step holds, device-independent."""
    seen = {}

    def pack(t):
        if t.dim() >= 2 and t.shape[0] == x.shape[0]:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(cfg):
        model(x)
    return sum(seen.values()) / 2**20


def _kernel_split(fn) -> dict:
    """GPU time of one step by kernel owner, from the profiler (ms)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    split = {"resnet_fast": 0.0, "cudnn": 0.0, "other": 0.0}
    top = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if not t or e.key.startswith(("ProfilerStep", "cudaGraph")):
            continue
        name = e.key
        owner = ("resnet_fast" if any(k in name for k in RF_KERNELS)
                 else "cudnn" if any(k in name.lower() for k in CUDNN_KERNELS) else "other")
        split[owner] += t / 1e3
        top[name[:80]] = top.get(name[:80], 0.0) + t / 1e3
    split["top_kernels_ms"] = dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])
    return split


def run(cfg: Config, model32: torch.nn.Module, flops_per_image: float, checkpoint=None) -> dict:
    t_start = time.perf_counter()
    dev, B = cfg.device, cfg.batch
    todo = []
    for n in names(cfg):
        if n.endswith("_graph") and not cfg.on_gpu:
            cfg.skipped[n] = "needs CUDA (CUDA graphs)"
        elif n == "train_compile_max_autotune" and cfg.quick:
            cfg.skipped[n] = "--quick"
        elif cfg.wants(n, cpu_default=not n.startswith("train_compile")):
            todo.append(n)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1000 + 7)
    x = torch.randn(B, 3, cfg.resolution, cfg.resolution, device=dev, generator=gen).contiguous(
        memory_format=torch.channels_last)
    target = torch.randint(0, model32.fc.out_features if hasattr(model32, "fc") else 10, (B,),
                           device=dev, generator=gen)
    reps = 5 if not cfg.on_gpu else (10 if cfg.quick else 20)
    rows, first = [], {}

    def section(partial=False):
        base = next((r for r in rows if r["variant"] == "train_eager" and "median_ms" in r), None)
        for r in rows:
            if base and "median_ms" in r:
                r["speedup_vs_eager"] = base["median_ms"] / r["median_ms"]
                if "peak_mem_mb_per_image" in base and "peak_mem_mb_per_image" in r:
                    r["memory_vs_eager"] = r["peak_mem_mb_per_image"] / base["peak_mem_mb_per_image"]
                if "saved_mb_per_image" in base and "saved_mb_per_image" in r:
                    r["saved_vs_eager"] = r["saved_mb_per_image"] / base["saved_mb_per_image"]
        out = {"variants": todo, "rows": rows, "batch": B, "lr": LR, "momentum": MOMENTUM,
               "autocast": str(cfg.dtype).replace("torch.", "") if cfg.dtype != torch.float32 else None,
               "flops_per_image_forward": flops_per_image, "section_s": time.perf_counter() - t_start}
        if partial:
            out["partial"] = True
        return out

    for name in todo:
        if cfg.out_of_time(name):
            continue
        row = {"variant": name}
        rows.append(row)
        try:
            with progress.step(f"train {name}"):
                t0 = time.perf_counter()
                model, owner = _model(cfg, name, model32)
                step, opt = _step_fn(cfg, model, owner, x, target)
                if not name.startswith("train_compile") and not name.endswith("_graph"):
                    row["saved_mb_per_image"] = saved_activation_mb(cfg, model, x) / B
                # the first step from model32's weights: compared with train_eager's
                loss0 = step()
                fc = dict(owner.named_parameters()).get("fc.weight")
                first[name] = (loss0.detach().float().item(), fc.grad.detach().float().clone() if fc is not None else None)
                fn = _graphed(cfg, model, opt, x, target) if name.endswith("_graph") else step
                for _ in range(cfg.warmup):
                    fn()
                if cfg.on_gpu:
                    torch.cuda.synchronize()
                row["setup_s"] = time.perf_counter() - t0
                if cfg.on_gpu:
                    torch.cuda.reset_peak_memory_stats()
                    held = torch.cuda.memory_allocated()
                times = _time(fn, cfg, reps)
                if cfg.on_gpu:
                    row["peak_mem_mb_per_image"] = (torch.cuda.max_memory_allocated() - held) / B / 2**20
                row["median_ms"] = statistics.median(times)
                row["images_s"] = B / row["median_ms"] * 1e3
                row["times_ms"] = times
                if cfg.on_gpu and not cfg.quick:
                    row["kernel_ms"] = _kernel_split(fn)
                base = first.get("train_eager")
                if base is not None and name != "train_eager":
                    l0, g0 = base
                    l1, g1 = first[name]
                    row["first_loss_rel_diff"] = abs(l1 - l0) / max(abs(l0), 1e-12)
                    if g0 is not None and g1 is not None:
                        row["first_fc_grad_rel_err"] = ((g1 - g0).norm() / g0.norm().clamp_min(1e-30)).item()
            progress.log(f"  {name}: {row['median_ms']:.2f} ms/step, {row['images_s']:.0f} images/s"
                         + (f", {row['peak_mem_mb_per_image']:.1f} MB/image" if "peak_mem_mb_per_image" in row else ""))
        except Exception as e:  # noqa: BLE001 - a variant that fails is reported, the rest run
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            progress.log(f"  {name}: ERROR {row['error']}")
        finally:
            model = owner = step = fn = None  # noqa: F841 - free the variant before the next
            if cfg.on_gpu:
                torch.cuda.empty_cache()
        if checkpoint is not None:
            checkpoint(section(partial=True))
    return section()
