"""``python -m resnet_fast.kernel_report``: the command line, the table, the JSON file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from .archs import ARCHS, DEFAULT_ARCHS, get_arch
from .report import BACKENDS, ReportOptions, build_report, check_failures
from .triton_aot import dtype_from_name

EPILOG = """
Ceilings used for the estimate (override with --peak-tflops / --bandwidth-tbs, either one number
for every arch or ARCH=VALUE,...):
""" + "\n".join(f"  {a.name:7s} {a.gpu}, {a.sms} SMs: {a.peak_tflops:g} TFLOP/s bf16/fp16 dense, "
                 f"{a.bandwidth_tbs:g} TB/s -- {a.peak_source}" for a in ARCHS.values()) + """

fp32 rows use half the bf16 ceiling (TF32 tensor cores); mma.sync (HMMA) kernels on sm_90a are
charged 60% of it (an assumption: the Hopper peak needs wgmma/HGMMA). estimate_us =
max(FLOPs / peak, bytes / bandwidth) / (wave efficiency x tile efficiency). The predicted pick per
layer (*) is the lowest estimate; near-ties go to the native MMA, then the larger tile.
Triton keeps compiled kernels in its own cache (TRITON_CACHE_DIR); the CUDA cubins are cached
under ~/.cache/resnet_fast/kernel_report (RESNET_FAST_CACHE).
"""


def _per_arch(value: Optional[str], what: str) -> dict:
    if not value:
        return {}
    out = {}
    for part in value.split(","):
        if "=" in part:
            a, v = part.split("=", 1)
            out[get_arch(a).name] = float(v)
        else:
            out["*"] = float(part)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m resnet_fast.kernel_report",
        description="Compile every conv kernel of a model for sm_80 and sm_90a without a GPU and "
                    "report registers, spills, shared memory, tensor-core instructions, occupancy, "
                    "waves and a roofline estimate per layer.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50",
                   help="torchvision model name, timm:NAME or module:callable (random weights); default resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--resolution", type=int, default=224, help="input H = W (default 224)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--arch", action="append", default=None,
                   help="sm_80 and/or sm_90a (repeat or comma-separate; default both)")
    p.add_argument("--backend", action="append", default=None, choices=list(BACKENDS),
                   help="triton and/or cuda (repeat; default both)")
    p.add_argument("--json", metavar="PATH", help="write {rows, env} here")
    p.add_argument("--cubin-dir", default="build/kernel_report", metavar="DIR",
                   help="where the cubins the rows describe are written (default build/kernel_report)")
    p.add_argument("--peak-tflops", metavar="T", help="dense bf16/fp16 tensor-core TFLOP/s (N or ARCH=N,...)")
    p.add_argument("--bandwidth-tbs", metavar="B", help="DRAM TB/s, read + written (N or ARCH=N,...)")
    p.add_argument("--layers", metavar="REGEX",
                   help="only layers whose label (e.g. '256->256 3x3/s1 14x14 relu') or a conv name "
                        "(e.g. layer3.1.conv2) matches")
    p.add_argument("--triton-configs", metavar="NAMES", help="only these Triton configs (comma-separated)")
    p.add_argument("--jobs", type=int, default=0, help="compile processes (default: CPUs, at most 4)")
    p.add_argument("--no-cache", action="store_true", help="recompile the CUDA sources even if cached (Triton: clear TRITON_CACHE_DIR)")
    p.add_argument("--all", action="store_true", help="print every candidate row, not only the predicted picks")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 when any kernel spills, does not fit, or misses its tensor-core path")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--no-training", action="store_true",
                   help="inference kernels only (default: also the train() conv variants and the other "
                        "training kernels)")
    p.add_argument("--no-other-kernels", action="store_true",
                   help="convs only: leave out the stem's input conversion, the max-pool and the TMA 1x1 GEMM")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _layer_filter(regex: Optional[str]):
    if not regex:
        return None
    import re
    from .layers import layer_label
    pat = re.compile(regex)
    return lambda layer: bool(pat.search(layer_label(layer)) or any(pat.search(n) for n in layer.get("names", [])))


def options_from_args(a: argparse.Namespace) -> ReportOptions:
    archs = []
    for item in a.arch or list(DEFAULT_ARCHS):
        archs += [get_arch(x).name for x in item.split(",") if x.strip()]
    return ReportOptions(
        model=a.model, batch=a.batch, resolution=a.resolution, dtype=dtype_from_name(a.dtype),
        archs=tuple(dict.fromkeys(archs)), backends=tuple(dict.fromkeys(a.backend or BACKENDS)),
        cubin_dir=Path(a.cubin_dir), peak_tflops=_per_arch(a.peak_tflops, "peak"),
        bandwidth_tbs=_per_arch(a.bandwidth_tbs, "bandwidth"), jobs=a.jobs,
        triton_configs=tuple(a.triton_configs.split(",")) if a.triton_configs else None,
        layer_filter=_layer_filter(a.layers), use_cache=not a.no_cache, progress=not a.quiet,
        training=not a.no_training, other_kernels=not a.no_other_kernels)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
_COLS = [("layer", 38), ("x", 2), ("config", 20), ("regs", 4), ("spill", 5), ("smem KB", 7),
         ("TC", 5), ("loads", 9), ("CTAs", 6), ("/SM", 3), ("waves", 6), ("tile%", 5), ("bound", 7),
         ("est us", 8), ("", 1), ("check", 0)]


def _fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def row_cells(r: dict) -> list[str]:
    if r.get("error"):
        return [r["label"], str(r["layer"].get("count", "")), r["config"]["name"]] + ["-"] * 12 + [r["error"][:60]]
    check = "ok" if r["ok"] else "; ".join(r["problems"])
    if r["ok"] and r.get("path_reason"):
        check = "ok (" + r["path_reason"].split(":")[0][:48] + ")"
    return [r["label"], str(r["layer"].get("count", "")), r["config"]["name"], str(r["registers"]),
            str(r["spill_bytes"]), _fmt(None if r["shared_bytes"] is None else r["shared_bytes"] / 1024, 0),
            r["tensor_core"] or "none", r.get("loads", "-"), str(r["ctas"]), _fmt(r.get("ctas_per_sm")), _fmt(r.get("waves"), 2),
            _fmt(None if r.get("tile_efficiency") is None else 100 * r["tile_efficiency"], 0),
            r.get("bound") or "-", _fmt(r.get("estimate_us"), 1), "*" if r.get("predicted_pick") else "",
            check]


def format_table(rows: list[dict], title: str, markdown: bool = False) -> str:
    lines = [title]
    if markdown:
        lines += ["", "| " + " | ".join(n or "pick" for n, _ in _COLS) + " |",
                  "|" + "|".join("---" for _ in _COLS) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row_cells(r)) + " |" for r in rows]
        return "\n".join(lines)
    head = "  ".join(f"{n:<{w}}" if w else n for n, w in _COLS)
    lines += [head, "-" * len(head)]
    for r in rows:
        cells = row_cells(r)
        lines.append("  ".join(f"{c:<{w}}" if w else c for c, (_, w) in zip(cells, _COLS)))
    return "\n".join(lines)


def format_report(report: dict, *, all_rows: bool = False, markdown: bool = False) -> str:
    rows = report["rows"]
    env = report["env"]
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backend"], r["arch"]), []).append(r)
    for (backend, arch), rs in groups.items():
        spec = env["archs"][arch]
        shown = rs if all_rows else [r for r in rs if r.get("predicted_pick") or r.get("error")
                                     or not any(x.get("predicted_pick") for x in rs if x["label"] == r["label"])]
        total = sum(r["estimate_us"] * r["layer"].get("count", 1) for r in rs
                    if r.get("predicted_pick") and r.get("estimate_us"))
        n_ok = sum(1 for r in rs if r.get("ok"))
        n_bin = len({(r.get("cubin"), r.get("kernel")) for r in rs if r.get("cubin")})
        title = (f"\n{backend} on {arch} ({spec['gpu']}, {spec['sms']} SMs, {spec['peak_tflops']:g} TFLOP/s, "
                 f"{spec['bandwidth_tbs']:g} TB/s), {env['dtype']}, batch {env['batch']}: "
                 f"{len(rs)} (layer, config) rows from {n_bin} compiled kernels, {n_ok} pass the checks; "
                 + ("every candidate" if all_rows else "the candidate with the lowest estimate per layer (*)")
                 + f"; sum of picks x count = {total / 1000:.2f} ms")
        out.append(format_table(shown, title, markdown))
    ik = report.get("inference_kernels") or []
    if ik:
        out.append(f"\nInference kernels other than the conv ({env['dtype']}, batch {env['batch']}; "
                   f"registers / spills / shared bytes / TMA loads / roofline estimate):")
        for r in ik:
            if "fallback" in r:
                out.append(f"  {r['arch']:<7} {r['label']:<52} falls back: {r['fallback']}")
                continue
            cells = ("ERROR " + r["error"][:80]) if "registers" not in r else \
                (f"{r['registers']:>3} regs, {r['spill_bytes']} B spills, {r['shared_bytes']} B smem, "
                 f"{r['num_warps']} warps, {r.get('tma_loads') or 0} UTMALDG, est {r.get('estimate_us')} us "
                 f"({r.get('bound')})")
            out.append(f"  {r['arch']:<7} {r['label']:<52} {cells}")
    tk = report.get("training_kernels") or []
    if tk:
        out.append(f"\nTraining kernels other than the conv ({env['dtype']}; registers / spills / shared bytes):")
        for r in tk:
            cells = ("ERROR " + r["error"][:80]) if "registers" not in r else \
                f"{r['registers']:>3} regs, {r['spill_bytes']} B spills, {r['shared_bytes']} B smem, {r['num_warps']} warps"
            out.append(f"  {r['arch']:<7} {r['label']:<48} {cells}")
    notes = env.get("notes", {})
    for key, labels in notes.get("layers_without_rows", {}).items():
        out.append(f"\n{key}: no kernel compiled for {', '.join(labels)}")
    for arch, why in notes.get("cuda_missing", {}).items():
        out.append(f"\ncuda rows missing for {arch}: {why}")
    for label, why in notes.get("triton_skipped_layers", {}).items():
        out.append(f"triton: no kernel for {label}: {why}")
    for arch, d in notes.get("cuda_skipped_layers", {}).items():
        for label, why in d.items():
            out.append(f"cuda {arch}: no kernel for {label}: {why}")
    for n in notes.get("cuda_notes", []):
        out.append(f"cuda: {n}")
    ptx = {}
    for r in rows:
        for n in r.get("ptxas_notes") or []:
            ptx.setdefault(n, set()).add(f"{r['arch']} {r['config']['name']}")
    for n, where in ptx.items():
        out.append(f"ptxas on {', '.join(sorted(where))}: {n}")
    if env.get("unfused_convs"):
        out.append(f"convs not fused (not reported): {env['unfused_convs']}")
    t = env.get("timings", {})
    out.append(f"\ncompiled in {t.get('total_s')} s (triton {t.get('triton_s')} s, cuda {t.get('cuda_compile_s')} s, "
               f"{env['host']['compile_jobs']} compile processes); cubins under {env['cubin_dir']}")
    return "\n".join(out)


def main(argv=None) -> int:
    a = parse_args(argv)
    opts = options_from_args(a)
    report = build_report(opts)
    print(format_report(report, all_rows=a.all, markdown=a.markdown))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {a.json}")
    fails = check_failures(report)
    if fails:
        print(f"\n{len(fails)} kernel(s) fail the checks:", file=sys.stderr)
        for line in fails[:50]:
            print("  " + line, file=sys.stderr)
    return 1 if (a.check and fails) else 0
