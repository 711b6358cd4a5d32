"""The ResNet benchmark and correctness report: ``python -m benchmarks.report [flags]``.

Sections (``--sections``, default all): the machine's ceilings, every distinct conv on every
peer (``layers``), the stem and each stage (``blocks``), the whole forward on every variant
(``e2e``), and one whole training step (forward, loss, backward, SGD) on every variant (``train``). Prints tables, writes ``<gpu>_<model>_b<batch>_<dtype>.json`` (every figure and the
environment; rewritten after each section so a cut-off run still leaves evidence) and a PNG
into ``--out`` (default ``out/``, which git ignores; results meant for ``benchmarks/results/``
name that folder explicitly). Without a GPU it runs the CPU path (small batch, eager vs the
torch backend, triton only when asked) and says that no GPU figures were taken.

Examples:
    python -m benchmarks.report                         # resnet50, batch 256, bf16, everything
    python -m benchmarks.report --quick                 # shorter timings, no max-autotune
    python -m benchmarks.report --latency               # batch 1
    python -m benchmarks.report --sections e2e --skip compile_max_autotune
    python -m benchmarks.report --model resnet18 --batch 1 --resolution 64 --backends torch  # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

from . import env as env_mod
from . import metrics, progress
from .config import Config
from .models import MODELS
from .table import err_cell, fmt, render

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: where a run writes unless told otherwise: git ignores it, so `make bench` never overwrites the
#: committed results in benchmarks/results/
DEFAULT_OUT = os.path.join(REPO, "out")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
SECTIONS = ("layers", "blocks", "e2e", "train")
ALL_BACKENDS = ("torch", "triton", "cuda")
NO_GPU_NOTE = "NO GPU FIGURES WERE TAKEN: this run had no CUDA device; all times are CPU times."


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                description="ResNet inference benchmark and correctness report for resnet_fast.")
    p.add_argument("--model", default="resnet50", choices=MODELS)
    p.add_argument("--batch", type=int, help="default 256 on a GPU, 8 on CPU (1 with --latency)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on a GPU, fp32 on CPU")
    p.add_argument("--resolution", type=int, default=224, help="input height = width (default 224)")
    p.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last",
                   help="input layout of the compile and resnet_fast variants (eager runs both)")
    p.add_argument("--backends", nargs="+", choices=ALL_BACKENDS,
                   help="resnet_fast backends (default: every available one on a GPU; torch on CPU, "
                        "where triton runs in the slow interpreter only when named here)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help="run only these variants/peers (eager_cl, the baseline, always runs)")
    p.add_argument("--skip", nargs="+", default=[], metavar="NAME", help="variants/peers not to run")
    p.add_argument("--quick", action="store_true", help="short timings, no compile_max_autotune")
    p.add_argument("--budget-s", type=float, metavar="S",
                   help="start no new figure after S seconds of wall time (the JSON then says "
                        "what was left out); for time-limited machines")
    p.add_argument("--list", action="store_true", help="print the variant/peer names and exit")
    p.add_argument("--latency", action="store_true", help="batch 1 preset")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="output folder (default out/ of this checkout, which git ignores; the "
                        "committed results take an explicit --out benchmarks/results/...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-dtype", choices=["fp32", "fp64"],
                   help="dtype of the reference forward (default fp32 without TF32 on a GPU, fp64 on CPU)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave torch.backends.cudnn.benchmark off (on by default: the strongest eager)")
    return p.parse_args(argv)


def known_names() -> dict[str, list[str]]:
    """Every name --variants/--skip accept, by section (backends as rf_<name>)."""
    rf = [f"rf_{b}" for b in ALL_BACKENDS]
    return {"layers": ["eager_nchw", "eager_cl", "folded_compile"] + rf,
            "blocks": ["eager_cl"] + rf,
            "e2e": ["eager_nchw", "eager_cl", "eager_folded", "eager_cl_graph", "compile",
                    "compile_max_autotune"] + [n for b in rf for n in (b, b + "_graph")],
            "train": ["train_eager", "train_compile", "train_compile_max_autotune"]
                     + [n for b in ALL_BACKENDS for n in (f"train_rf_{b}", f"train_rf_{b}_graph")]}


def interpret_triton_on_cpu(a) -> str | None:
    """Set TRITON_INTERPRET=1 for a CPU run that asks for the triton backend (Triton reads it
    when it is first imported, and torchvision imports it), before anything imports triton.
    Returns why it could not be set, or None."""
    gpu = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    if not (a.backends and "triton" in a.backends) or gpu or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if "triton" in sys.modules:
        return "triton was imported before TRITON_INTERPRET=1 could be set; run with TRITON_INTERPRET=1 in the environment"
    os.environ["TRITON_INTERPRET"] = "1"
    return None


def prepare_backends(asked: list, device: torch.device, dtype: torch.dtype, interp_late: str | None = None) -> dict:
    """name -> {available, reason, requested} for every backend; the requested ones that are
    available are prepared here (the CUDA extension builds or loads: slow once per machine), so
    no timed figure pays for it."""
    from resnet_fast import backends as rb

    status = {}
    with progress.step("backend availability and preparation"):
        for name in ALL_BACKENDS:
            ok, why = rb.ready(name, device, dtype) if name in asked else (False, "not requested")
            if name == "triton" and interp_late and ok:
                ok, why = False, interp_late
            status[name] = {"available": bool(ok), "reason": why or "", "requested": name in asked}
    return status


def make_config(a, t0: float | None = None, interp_late: str | None = None) -> tuple[Config, dict]:
    """t0: time.monotonic() when the run began (the --budget-s clock)."""
    known = {n for ns in known_names().values() for n in ns}
    bad = sorted(set(a.variants or []) | set(a.skip) - known)
    bad = [n for n in bad if n not in known]
    if bad:
        raise SystemExit(f"unknown variant name(s) {bad}; see --list")
    if a.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(a.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
    gpu = device.type == "cuda"
    batch = a.batch or (1 if a.latency else (256 if gpu else 8))
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if gpu else torch.float32)
    ref = DTYPES[a.ref_dtype] if a.ref_dtype else (torch.float32 if gpu else torch.float64)
    asked = list(a.backends) if a.backends else (list(ALL_BACKENDS) if gpu else ["torch"])
    status = prepare_backends(asked, device, dtype, interp_late)
    backends = [b for b in asked if status[b]["available"]]
    skip = set(a.skip)
    if a.quick:
        skip.add("compile_max_autotune")
    cfg = Config(model=a.model, batch=batch, dtype=dtype, resolution=a.resolution, device=device,
                 layout=a.layout, backends=backends, sections=list(a.sections),
                 only=set(a.variants) if a.variants else None, skip=skip, ref_dtype=ref,
                 seed=a.seed, quick=a.quick)
    if a.budget_s is not None:
        cfg.budget_s = a.budget_s
        cfg.deadline = (time.monotonic() if t0 is None else t0) + a.budget_s
    for b in asked:
        if not status[b]["available"]:
            cfg.skipped[f"rf_{b}"] = f"backend unavailable: {status[b]['reason']}"
    if not gpu:
        # CPU figures only show the path works; keep them short (2 shared cores)
        if a.quick:
            cfg.layer_target_ms, cfg.e2e_target_ms, cfg.block_target_ms = 5.0, 30.0, 10.0
            cfg.warmup = 1
        else:
            cfg.layer_target_ms, cfg.e2e_target_ms, cfg.block_target_ms = 20.0, 200.0, 50.0
        cfg.max_e2e_reps = 20
    elif a.quick:
        cfg.layer_target_ms, cfg.e2e_target_ms, cfg.block_target_ms = 30.0, 500.0, 100.0
    return cfg, status


def file_tag(report: dict) -> str:
    gpu = report["env"].get("gpu")
    g = re.sub(r"[^A-Za-z0-9]+", "-", gpu.replace("NVIDIA", "")).strip("-") if gpu else "cpu"
    c = report["config"]
    model = c["model"].replace(":", "-")  # "timm:resnet50" -> a portable file name
    tag = f"{g}_{model}_b{c['batch']}_{c['dtype']}"
    if c["resolution"] != 224:
        tag += f"_r{c['resolution']}"
    return tag


# --------------------------------------------------------------------------------------
# console tables
# --------------------------------------------------------------------------------------
def _cell(res: dict, key: str, spec: str) -> str:
    if "error" in res:
        return "ERROR"
    v = res.get(key)
    s = fmt(v, spec) if v is not None else "-"
    sp = res.get("speedup_vs_eager_cl")
    return f"{s} ({sp:.2f}x)" if sp is not None and v is not None else s


def layers_table(sec: dict) -> str:
    peers = sec["peers"]
    rows = []
    has_est = any("estimate_us" in r for r in sec["rows"])
    rf = [p for p in peers if p.startswith("rf_")]
    for r in sec["rows"]:
        timed = [(r["results"][p]["median_us"], p) for p in rf if "median_us" in r["results"].get(p, {})]
        best = r["results"][min(timed)[1]] if timed else {}
        rows.append([r["name"], r["label"], r["epilogue"], r["multiplicity"]]
                    + [_cell(r["results"].get(p, {}), "median_us", ".1f") for p in peers]
                    + [min(timed)[1] if timed else "-", fmt(best.get("tflops"), ".3g"),
                       fmt(best.get("pct_matmul_peak"), ".1f"), fmt(best.get("pct_copy_bw"), ".1f")]
                    + ([fmt(min((v for v in r["estimate_us"].values() if isinstance(v, float)),
                                default=None), ".1f")] if has_est else []))
    tot = sec["weighted_total_ms"]
    sp = sec["weighted_speedup_vs_eager_cl"]
    pad = ["", "", "", ""] + ([""] if has_est else [])
    rows.append(["sum x mult (ms)", "", "", sum(r["multiplicity"] for r in sec["rows"])]
                + [f"{tot[p]:.3f} ({sp[p]:.2f}x)" if p in tot and p in sp else "-" for p in peers] + pad)
    err_row = ["max rel err", "", "", ""]
    for p in peers:
        res = [r["results"].get(p, {}) for r in sec["rows"]]
        errs = [x["rel_err"] for x in res if "rel_err" in x]
        bad = sum(1 for x in res if x.get("status") in ("FAIL", "NaN") or "error" in x)
        cell = fmt(max(errs, key=lambda e: float("inf") if e != e else e), ".1e") if errs else "-"
        err_row.append(cell + (f" {bad} BAD" if bad else ""))
    rows.append(err_row + pad)
    headers = (["layer", "shape (Cin->Cout k/s HxW in)", "epilogue", "x"] + [f"{p} us" for p in peers]
               + ["fastest rf", "TFLOP/s", "% mm", "% bw"])
    if has_est:
        headers.append("est us")
    return render(headers, rows, title=f"Per layer: median time in us (speed-up vs eager_cl); {sec['timing']}")


def blocks_table(sec: dict) -> str:
    vs = sec["variants"]
    rows = [[r["block"], "x".join(map(str, r["in_shape"]))]
            + [_cell(r["results"].get(v, {}), "median_ms", ".3f") for v in vs]
            + [err_cell(r["results"].get(v, {})) for v in vs] for r in sec["rows"]]
    return render(["block", "input"] + [f"{v} ms" for v in vs] + [f"{v} err" for v in vs], rows,
                  title="Per block: median time in ms (speed-up vs eager_cl), rel err vs reference")


def e2e_table(sec: dict) -> str:
    rows = []
    for r in sec["rows"]:
        if "error" in r:
            rows.append([r["variant"], "ERROR: " + r["error"][:60]] + [""] * 9)
            continue
        rows.append([r["variant"], fmt(r.get("median_ms"), ".2f"), fmt(r.get("images_s"), ".0f"),
                     fmt(r.get("tflops"), ".3g"), fmt(r.get("pct_matmul_peak"), ".1f"),
                     fmt(r.get("pct_copy_bw"), ".1f"), fmt(r.get("speedup_vs_eager_cl"), ".2f"),
                     fmt(r.get("peak_mem_gb"), ".2f"), err_cell(r), fmt(r.get("setup_s"), ".1f"),
                     ",".join(r.get("convs_unfused", [])) or ""])
    return render(["variant", "median ms", "images/s", "TFLOP/s", "% mm peak", "% copy bw",
                   "speed-up", "peak mem GB", "rel err", "setup s", "unfused convs"], rows,
                  title="End to end (whole forward)")


def train_table(sec: dict) -> str:
    rows = []
    for r in sec["rows"]:
        if "error" in r:
            rows.append([r["variant"], "ERROR: " + r["error"][:60]] + [""] * 8)
            continue
        k = r.get("kernel_ms") or {}
        rows.append([r["variant"], fmt(r.get("median_ms"), ".2f"), fmt(r.get("images_s"), ".0f"),
                     fmt(r.get("speedup_vs_eager"), ".2f"), fmt(r.get("peak_mem_mb_per_image"), ".1f"),
                     fmt(r.get("saved_mb_per_image"), ".2f"),
                     fmt(r.get("first_loss_rel_diff"), ".1e"), fmt(r.get("first_fc_grad_rel_err"), ".1e"),
                     "/".join(fmt(k.get(o), ".1f") for o in ("resnet_fast", "cudnn", "other")) if k else "",
                     fmt(r.get("setup_s"), ".1f")])
    ac = sec.get("autocast")
    return render(["variant", "ms/step", "images/s", "speed-up", "peak MB/img", "saved MB/img", "loss diff",
                   "fc grad err",
                   "rf/cudnn/other ms", "setup s"], rows,
                  title=f"Training step (batch {sec['batch']}, SGD momentum"
                        f"{', autocast ' + ac if ac else ', fp32'}), vs train_eager")


# --------------------------------------------------------------------------------------
def write_json(report: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, file_tag(report) + ".json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(metrics.json_safe(report), f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.list:
        for sec, ns in known_names().items():
            print(f"{sec}: {' '.join(ns)}")
        return {}
    t_start, t0 = time.perf_counter(), time.monotonic()
    if a.threads:
        torch.set_num_threads(a.threads)
    interp_late = interpret_triton_on_cpu(a)
    cfg, backend_status = make_config(a, t0, interp_late)
    if cfg.on_gpu:
        torch.backends.cudnn.benchmark = not a.no_cudnn_benchmark

    import resnet_fast
    from . import blocks, layer_peers, layers, models, peaks as peaks_mod, variants
    from .plot import plot

    report = {
        "schema": 1,
        "gpu_figures": cfg.on_gpu,
        "note": None if cfg.on_gpu else NO_GPU_NOTE,
        "env": env_mod.collect(cfg.device, REPO, argv),
        "config": {"model": cfg.model, "batch": cfg.batch, "dtype": a.dtype or
                   {v: k for k, v in DTYPES.items()}[cfg.dtype], "resolution": cfg.resolution,
                   "device": str(cfg.device), "layout": cfg.layout, "backends": cfg.backends,
                   "sections": cfg.sections, "variants": sorted(cfg.only) if cfg.only else None,
                   "skip": sorted(cfg.skip), "ref_dtype": str(cfg.ref_dtype).replace("torch.", ""),
                   "seed": cfg.seed, "quick": cfg.quick, "latency": a.latency, "budget_s": a.budget_s,
                   "timing_targets_ms": {"layer": cfg.layer_target_ms, "block": cfg.block_target_ms,
                                         "e2e": cfg.e2e_target_ms}},
        "backends": backend_status,
        "complete": False,
    }
    out_dir = a.out
    if not cfg.on_gpu:
        progress.log("=" * 78 + "\n" + NO_GPU_NOTE + "\n" + "=" * 78)
    e = report["env"]
    progress.log(f"resnet_fast report: {cfg.model} batch {cfg.batch} {report['config']['dtype']} "
                 f"{cfg.resolution}px on {e.get('gpu') or 'CPU'} | torch {e['torch']} triton {e['triton']} "
                 f"cuda {e['cuda']} cudnn {e['cudnn']} | commit {str(e['commit'])[:12]}"
                 f"{' (dirty)' if e['dirty'] else ''}")
    progress.log("backends: " + ", ".join(
        f"{n} {'ok' if s['available'] else 'unavailable (' + s['reason'] + ')'}"
        for n, s in backend_status.items()))

    with progress.step("ceilings (matmul, copy)"):
        report["peaks"] = peaks_mod.measure(cfg.device, cfg.dtype, quick=cfg.quick)
    pk = report["peaks"]
    progress.log(f"matmul {pk['matmul_shape'][0]}^3 {pk['matmul_dtype']}: {pk['matmul_tflops']:.1f} TFLOP/s; "
                 f"copy: {pk['copy_gbps']:.0f} GB/s (read + written)")

    with progress.step("build model"):
        model32 = models.build(cfg.model, device=cfg.device, resolution=cfg.resolution, seed=cfg.seed,
                               calib_batch=32 if cfg.on_gpu else 4)
    flops = models.count_flops(model32, cfg.resolution)
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    if cfg.model.startswith("timm:"):
        # the per-block section cuts a model into torchvision's stem and stages; timm models
        # get the per-layer section (their fused units) and the whole forward
        if "blocks" in cfg.sections:
            cfg.sections.remove("blocks")
            cfg.skipped["blocks"] = "the per-block section covers torchvision ResNets"
    convs = layers.distinct_convs(model32, cfg.resolution)
    bytes_per_image = sum(L.bytes(1, itemsize) * L.multiplicity for L in convs)
    report["model"] = {"flops_per_image": flops["per_image"], "convs": sum(L.multiplicity for L in convs),
                       "distinct_convs": len(convs), "conv_bytes_per_image": bytes_per_image,
                       "flops_note": "2*MACs of every conv and the fc",
                       "bytes_note": "sum over convs of input + weight + output (+ residual) bytes: "
                                     "the traffic of one fused kernel per conv"}
    summ = resnet_fast.fusion_summary(resnet_fast.convert(models.cast(model32, cfg.dtype), backend="torch"))
    report["fusion_summary"] = [{"name": r["name"], "fused": list(r["fused"]), "reason": r["reason"],
                                 "runs_fused": r["runs_fused"], "training": r["training"]} for r in summ]
    n_fused = sum(1 for r in summ if r["fused"])
    progress.log(f"\nFusion summary of the converted {cfg.model}: {n_fused}/{len(summ)} convs fused\n{summ}\n")
    json_path = write_json(report, out_dir)

    def run_layers():
        def checkpoint(rows):
            report["layers"] = {"rows": rows, "partial": True}
            write_json(report, out_dir)

        with progress.step(f"per layer: {len(convs)} distinct convs"):
            report["layers"] = layer_peers.run(cfg, convs, pk, checkpoint=checkpoint)
        progress.log("\n" + layers_table(report["layers"]) + "\n")

    def run_blocks():
        with progress.step("per block"):
            report["blocks"] = blocks.run(cfg, model32, pk, flops["per_module"])
        progress.log("\n" + blocks_table(report["blocks"]) + "\n")

    def run_e2e():
        def checkpoint(sec):
            report["e2e"] = sec
            write_json(report, out_dir)

        with progress.step("end to end"):
            report["e2e"] = variants.run(cfg, model32, pk, flops["per_image"], bytes_per_image,
                                         checkpoint=checkpoint)
        progress.log("\n" + e2e_table(report["e2e"]) + "\n")

    def run_train():
        from . import train

        def checkpoint(sec):
            report["train"] = sec
            write_json(report, out_dir)

        with progress.step("training step"):
            report["train"] = train.run(cfg, model32, flops["per_image"], checkpoint=checkpoint)
        progress.log("\n" + train_table(report["train"]) + "\n")

    # in the order asked for, so a short lease can put the section it needs most first
    for section in cfg.sections:
        {"layers": run_layers, "blocks": run_blocks, "e2e": run_e2e, "train": run_train}[section]()
        write_json(report, out_dir)

    if "triton" in cfg.backends:
        # which tile each Triton layer ran with (the autotuner's picks), to read timings by
        from resnet_fast.kernels import conv_bn_act as triton_conv
        report["triton_configs"] = triton_conv.chosen_configs()
    report["skipped"] = dict(cfg.skipped)
    if cfg.skipped:
        progress.log("not run: " + "; ".join(f"{k}: {v}" for k, v in cfg.skipped.items()))
    bad = _failures(report)
    report["failures"] = bad
    report["wall_s"] = time.perf_counter() - t_start
    report["complete"] = True
    json_path = write_json(report, out_dir)
    png = None if a.no_plot else plot(report, os.path.join(out_dir, file_tag(report) + ".png"))
    report["files"] = {"json": json_path, "png": png}
    progress.log("section times: " + ", ".join(
        f"{k} {report[k]['section_s']:.0f} s" for k in SECTIONS if k in report)
        + f"; total {report['wall_s']:.0f} s")
    if bad:
        progress.log("CORRECTNESS FAILURES: " + "; ".join(bad))
    if not cfg.on_gpu:
        progress.log(NO_GPU_NOTE)
    progress.log(f"wrote {json_path}" + (f" and {png}" if png else " (no plot)")
                 + f" in {report['wall_s']:.1f} s")
    return report


def _failures(report: dict) -> list[str]:
    """Every figure whose error is NaN or above tolerance, and every variant that crashed."""
    out = []
    for r in (report.get("layers") or {}).get("rows", []):
        for p, res in r["results"].items():
            if res.get("status") in ("FAIL", "NaN") or "error" in res:
                out.append(f"layer {r['name']} {p}: {res.get('status') or res.get('error')}")
    for r in (report.get("blocks") or {}).get("rows", []):
        for v, res in r["results"].items():
            if res.get("status") in ("FAIL", "NaN") or "error" in res:
                out.append(f"block {r['block']} {v}: {res.get('status') or res.get('error')}")
    for r in (report.get("e2e") or {}).get("rows", []):
        if r.get("status") in ("FAIL", "NaN") or "error" in r:
            out.append(f"e2e {r['variant']}: {r.get('status') or r.get('error')}")
    for r in (report.get("train") or {}).get("rows", []):
        # the first step from the same weights: a loss off by more than the dtype's tolerance
        # is a wrong training step, not rounding
        tol = 1e-2 if report["config"]["dtype"] in ("bf16", "fp16") else 1e-4
        if "error" in r or not (r.get("first_loss_rel_diff", 0.0) <= tol):
            out.append(f"train {r['variant']}: {r.get('error') or 'first loss off by %.2g' % r['first_loss_rel_diff']}")
    return out


if __name__ == "__main__":
    main()
