"""Building the report: every (distinct conv layer x backend x arch x kernel config) as one row
of figures read from the compiled cubins, plus the checks and the roofline estimate.

The public entry points are :func:`build_report` (what the command runs) and
:func:`estimate_layer_us` (one layer, for benchmarks/).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import cubin as cubin_tools
from . import model as perf
from .archs import DEFAULT_ARCHS, ArchSpec, get_arch
from .layers import distinct_layers, layer_label, normalize_layer
from .triton_aot import DTYPE_NAMES, dtype_from_name

BACKENDS = ("triton", "cuda")
#: the tensor-core family each (backend, kernel family, arch) is expected to run
_EXPECTED_TC = {"sm_90a": "HGMMA", "sm_80": "HMMA"}


@dataclass
class ReportOptions:
    model: str = "resnet50"
    batch: int = 256
    resolution: int = 224
    dtype: torch.dtype = torch.bfloat16
    archs: tuple = DEFAULT_ARCHS
    backends: tuple = BACKENDS
    cubin_dir: Path = Path("build/kernel_report")
    peak_tflops: dict = field(default_factory=dict)     # arch -> TFLOP/s override
    bandwidth_tbs: dict = field(default_factory=dict)   # arch -> TB/s override
    jobs: int = 0                                       # compile processes (0: cpu count, <= 4)
    triton_configs: Optional[tuple] = None              # restrict Triton candidates (names)
    triton_config_objects: Optional[dict] = None        # name -> triton.Config instead of the candidates
    layer_filter: Optional[Callable[[dict], bool]] = None
    one_config_per_layer: bool = False                  # tests: the first candidate only
    use_cache: bool = True
    progress: bool = True
    #: the train() forward's conv variants ("stats", "pre+stats") and the other training kernels
    training: bool = True
    #: the inference kernels other than the conv (stem input conversion, max-pool, TMA 1x1 GEMM)
    other_kernels: bool = True


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------
class Progress:
    """tqdm when installed, else one rewritten line on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.n, self.desc, self.enabled = total, 0, desc, enabled
        self._bar = None
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()

    def _start(self):
        if self._bar is None and self.enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=self.total, desc=self.desc, unit="kernel", file=sys.stderr, leave=True)
            except ImportError:
                self._bar = False

    def _print(self):
        el = time.perf_counter() - self._t0
        sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total} ({el:.0f}s)")
        sys.stderr.flush()

    def add_total(self, k: int):
        with self._lock:
            self.total += k
            self._start()
            if self._bar:
                self._bar.total = self.total
                self._bar.refresh()

    def update(self, k: int = 1, note: str = ""):
        with self._lock:
            self.n += k
            if not self.enabled:
                return
            self._start()
            if self._bar:
                if note:
                    self._bar.set_postfix_str(note, refresh=False)
                self._bar.update(k)
            else:
                self._print()

    def close(self):
        if not self.enabled or self._bar is None:
            return
        if self._bar:
            self._bar.close()
        else:
            sys.stderr.write("\n")


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------
def _round_up(x, unit):
    return -(-x // unit) * unit


def _layer_public(layer: dict) -> dict:
    keys = ("cin", "cout", "kernel", "stride", "padding", "dilation", "groups", "h", "w", "ho", "wo",
            "batch", "epilogue", "count", "names")
    return {k: layer[k] for k in keys if k in layer}


def _finish_row(row: dict, layer: dict, spec: ArchSpec, *, block_m: int, block_n: int,
                block_k: int, threads: Optional[int], dtype: torch.dtype, tf32: Optional[bool],
                expected_tc: Optional[str], why_other_tc: Optional[str] = None) -> dict:
    """Occupancy, waves, estimate and checks for a row whose resource fields are filled in. The
    compute ceiling is the arch's for the MMA family the cubin's main loop actually runs."""
    peak = spec.peak_for(dtype, tf32=tf32, tensor_core=row["tensor_core"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    k_per_step = layer["cin"] // layer.get("groups", 1)
    if row.get("path", "").startswith("flat"):
        k_per_step = layer["kernel"][0] * layer["kernel"][1] * k_per_step
    elif row.get("row_k"):  # dense rows: one kernel row of the conv's own channels per ROW_K
        k_per_step, block_k = layer["kernel"][1] * k_per_step, row["row_k"]
    row["k_efficiency"] = round(k_per_step / _round_up(k_per_step, block_k), 4) if block_k else None
    problems = []
    if threads is None or row["shared_bytes"] is None:
        row.update({k: None for k in ("ctas_per_sm", "occupancy_limiter", "waves", "wave_efficiency",
                                      "estimate_us")})
        m, n, _ = perf.conv_gemm(layer)
        row["ctas"] = perf.grid_ctas(m, n, block_m, block_n)
        row["tile_efficiency"] = round(perf.tile_efficiency(m, n, block_m, block_n), 4)
        problems.append("threads or dynamic shared memory unknown: no occupancy or estimate")
    else:
        row.update(perf.estimate(layer, block_m=block_m, block_n=block_n, registers=row["registers"],
                                 shared_bytes=row["shared_bytes"], threads=threads, spec=spec,
                                 peak_tflops=peak, itemsize=itemsize))
    if row["spill_bytes"]:
        problems.append(f"spills: {row['spill_bytes']} bytes of stack/local memory per thread")
    if row["shared_bytes"] is not None and row["shared_bytes"] > spec.smem_per_block_max:
        problems.append(f"shared memory {row['shared_bytes'] / 1024:.0f} KB exceeds the "
                        f"{spec.smem_per_block_max // 1024} KB per-block limit of {spec.name}")
    elif row.get("ctas_per_sm") == 0:
        problems.append(f"does not fit on an SM ({row['occupancy_limiter']})")
    if row["registers"] > spec.max_regs_per_thread:
        problems.append(f"{row['registers']} registers per thread exceed {spec.max_regs_per_thread}")
    if expected_tc is not None and row["tensor_core"] != expected_tc:
        if why_other_tc:
            row["path_reason"] = why_other_tc
        else:
            problems.append(f"tensor cores: expected {expected_tc} in the main loop, found "
                            f"{row['tensor_core'] or 'none'}")
    row["expected_tensor_core"] = expected_tc
    row["expected_native_tensor_core"] = _EXPECTED_TC.get(spec.name)
    sass = row.get("sass") or {}
    row["loads"] = ("TMA" if sass.get("tma_loads") else "cp.async" if sass.get("async_copies")
                    else "ld.global")
    row["problems"] = problems
    row["ok"] = not problems
    return row


def _k_path(constexprs: dict) -> str:
    """How the compiled conv walks K, in words (kernels/conv_bn_act.py's module doc)."""
    if constexprs.get("DENSE_CIN"):
        return (f"dense rows: the input padded to {constexprs['DENSE_CIN']} channels, one kernel row "
                f"(ROW_K = {constexprs['ROW_K']}) per K step, vector loads")
    if constexprs.get("SMALL_CIN"):
        return "flat K gather (Cin < SMALL_CIN): K = kh*kw*Cin walked in BLOCK_K steps"
    return "per-tap: (tap, channel block) loop"


def _resource_fields(fn_info: dict, shared_dynamic: Optional[int]) -> dict:
    s: cubin_tools.SassSummary = fn_info["sass"]
    shared_static = fn_info["shared_static"]
    return {
        "registers": fn_info["registers"], "spill_bytes": fn_info["spill_bytes"],
        "stack_bytes": fn_info["stack_bytes"], "local_bytes": fn_info["local_bytes"],
        "shared_static": shared_static, "shared_dynamic": shared_dynamic,
        "shared_bytes": None if shared_dynamic is None else shared_static + shared_dynamic,
        "tensor_core": s.tensor_core, "mma_instruction": s.tensor_core_instruction,
        "mma_in_main_loop": bool(s.mma_in_loop), "sass": s.as_dict(),
    }


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------
def _triton_rows(layers, opts: ReportOptions, specs: dict, progress: Progress, notes: dict) -> list[dict]:
    from . import triton_aot as ta

    mod = ta.conv_module()
    jit_mod = ta.jit_module(mod)
    dtype = opts.dtype
    dname = DTYPE_NAMES[dtype]
    plans = []      # (layer, arch, config name, cfg, selection, key)
    jobs: dict[str, dict] = {}
    for layer in layers:
        ok, why = _backend_supports("triton", layer, dtype)
        if not ok:
            notes.setdefault("triton_skipped_layers", {})[layer_label(layer)] = why
            continue
        if opts.triton_config_objects:
            cands, selection, pruned = dict(opts.triton_config_objects), "given", []
        else:
            cands, selection, pruned = ta.conv_candidates(layer, mod, dtype)
        if pruned:
            notes.setdefault("triton_pruned", {})[layer_label(layer)] = pruned
        names = [n for n in cands if opts.triton_configs is None or n in opts.triton_configs]
        if opts.one_config_per_layer:
            names = names[:1]
        for arch in opts.archs:
            cc = specs[arch].capability
            for name in names:
                spec = jit_mod.conv_compile_spec(**ta.conv_spec_args(layer, dtype), config=cands[name])
                key = ta.spec_key(spec, cc)
                if key not in jobs:
                    kh, kw = layer["kernel"]
                    fname = (f"conv_bn_act.{dname}.k{kh}x{kw}s{layer['stride'][0]}.{layer['epilogue']}."
                             f"{name}.{key[:10]}.cubin")
                    jobs[key] = {"kind": "conv", "config": ta.config_for_job(name, cands[name], mod),
                                 "capability": cc,
                                 "spec_args": {**ta.conv_spec_args(layer, dtype), "dtype": dname},
                                 "out_path": str(Path(opts.cubin_dir) / "triton" / arch / fname)}
                plans.append((layer, arch, name, cands[name], selection, key, spec))
    keys = list(jobs)
    progress.add_total(len(keys))
    results = ta.run_jobs([jobs[k] for k in keys], workers=opts.jobs,
                          on_done=lambda i, r: progress.update(1, f"triton {jobs[keys[i]]['config']}"))
    compiled = dict(zip(keys, results))
    inspected: dict[str, dict] = {}
    rows = []
    for layer, arch, name, cfg, selection, key, spec in plans:
        spec_a = specs[arch]
        res = compiled[key]
        k = cfg.kwargs
        row = {"layer": _layer_public(layer), "label": layer_label(layer), "backend": "triton",
               "arch": arch, "gpu": spec_a.gpu, "dtype": dname,
               "config": {"name": name, **ta.config_dict(cfg)}, "selection": selection,
               "path": _k_path(spec["constexprs"]),
               "row_k": spec["constexprs"].get("ROW_K") if spec["constexprs"].get("DENSE_CIN") else None,
               "kernel": "conv_bn_act_kernel"}
        if isinstance(res, Exception):
            row.update({"error": f"compile failed: {type(res).__name__}: {str(res)[-800:]}", "ok": False,
                        "problems": ["compile failed"], "cubin": None})
            rows.append(row)
            continue
        if res["cubin"] not in inspected:  # the workers read their cubins already, when they could
            inspected[res["cubin"]] = res.get("inspect") or cubin_tools.inspect_cubin(res["cubin"])
        info = inspected[res["cubin"]]
        fn = res["name"] if res["name"] in info else next(iter(info))
        row["kernel"] = fn
        row["cubin"] = res["cubin"]
        row.update(_resource_fields(info[fn], res["shared_dynamic"]))
        precision = spec["constexprs"].get("INPUT_PRECISION", "ieee")
        fp32_fma = dtype == torch.float32 and precision == "ieee"
        row["input_precision"] = precision if dtype == torch.float32 else None
        _finish_row(row, layer, spec_a, block_m=k["BLOCK_M"], block_n=k["BLOCK_N"], block_k=k["BLOCK_K"],
                    threads=cfg.num_warps * 32, dtype=dtype, tf32=(precision == "tf32"),
                    expected_tc=None if fp32_fma else _EXPECTED_TC.get(arch),
                    why_other_tc=None)
        if fp32_fma:
            row["path_reason"] = "fp32 with TF32 off (input_precision='ieee'): tl.dot runs on CUDA cores"
        if selection == "autotune candidate" and row["shared_bytes"] > spec_a.smem_per_block_max:
            # harmless at run time (the autotuner drops it), so noted rather than failed
            row["problems"] = [p for p in row["problems"] if "per-block limit" not in p]
            row["ok"] = not row["problems"]
            row["path_reason"] = ("needs more shared memory than a block may have: the autotuner skips "
                                  "it (OutOfResources)")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------
def _cuda_compile_all(opts: ReportOptions, progress: Progress) -> dict:
    """{arch: compile_arch result or CudaUnavailable}; every (arch, translation unit) compiled
    concurrently by up to opts.jobs nvcc processes."""
    from . import cuda_aot

    out = cuda_aot.compile_archs(list(opts.archs), use_cache=opts.use_cache, jobs=max(1, opts.jobs),
                                 on_unit_done=lambda arch, unit: progress.update(1, f"nvcc {unit.name} {arch}"))
    for arch, res in out.items():
        if isinstance(res, dict):
            try:
                res["copied"] = _copy_cubins(res, Path(opts.cubin_dir) / "cuda" / arch)
            except OSError as e:
                out[arch] = cuda_aot.CudaUnavailable(f"copying the cubins failed: {e}")
    return out


def _cuda_dtype_ok(dtype, notes: dict) -> bool:
    try:
        from ..backends import cuda_backend as cb
        if dtype in cb.SUPPORTED_DTYPES:
            return True
        why = f"the cuda backend is compiled for {', '.join(str(d).replace('torch.', '') for d in cb.SUPPORTED_DTYPES)} only"
    except Exception as e:
        why = f"the cuda backend cannot be imported: {type(e).__name__}: {e}"
    notes["cuda_missing"] = {"all archs": why}
    return False


def _cuda_unit_count(archs) -> int:
    from . import cuda_aot
    n = 0
    for a in archs:
        try:
            n += len(cuda_aot.conv_units(a)[0])
        except Exception:
            pass
    return n


def _copy_cubins(result: dict, dest: Path) -> dict:
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    mapping = {}
    for u in result["units"]:
        target = dest / Path(u["cubin"]).name
        shutil.copyfile(u["cubin"], target)
        mapping[u["cubin"]] = str(target)
    for k in result["kernels"]:
        k["cubin"] = mapping.get(k["cubin"], k["cubin"])
    return mapping


def _backend_supports(name: str, layer: dict, dtype: torch.dtype) -> tuple[bool, str]:
    """The backend's own check (``supports``, the prologue included) on meta tensors of the
    layer's shapes: what resolve() asks before it hands a call to the next backend."""
    x = torch.empty((layer["batch"], layer["cin"], layer["h"], layer["w"]), device="meta", dtype=dtype)
    w = torch.empty((layer["cout"], layer["cin"] // layer["groups"], *layer["kernel"]), device="meta", dtype=dtype)
    try:
        from .. import backends
        ok, why = backends.get(name).supports(x, w, layer["groups"], pre=layer["epilogue"].startswith("pre"))
    except Exception as e:  # a backend that cannot even import: only the kernels' own limit
        ok = layer["groups"] == 1
        why = "" if ok else f"groups={layer['groups']} ({name} backend unavailable: {type(e).__name__}: {e})"
    return ok, ("" if ok else f"goes to the next backend that takes it: {why}")


def _cuda_supports(layer: dict, dtype: torch.dtype) -> tuple[bool, str]:
    """The cuda backend's dtypes, then its own check on meta tensors."""
    from ..backends import cuda_backend as cb

    if dtype not in cb.SUPPORTED_DTYPES:
        return False, f"the cuda backend is compiled for {[str(d) for d in cb.SUPPORTED_DTYPES]} only"
    return _backend_supports("cuda", layer, dtype)


def _cuda_rows(layers, opts: ReportOptions, specs: dict, built: dict, notes: dict) -> list[dict]:
    dname = DTYPE_NAMES[opts.dtype]
    rows = []
    for arch in opts.archs:
        res = built.get(arch)
        if isinstance(res, Exception) or res is None:
            notes.setdefault("cuda_missing", {})[arch] = str(res)
            continue
        notes.setdefault("cuda_notes", []).extend(res["notes"])
        kernels = [k for k in res["kernels"] if k["dtype"] == dname]
        if not kernels:
            notes.setdefault("cuda_missing", {})[arch] = (f"no {dname} conv kernels in the {arch} cubins "
                                                          f"(dtypes there: {sorted({str(k['dtype']) for k in res['kernels']})})")
            continue
        spec_a = specs[arch]
        for layer in layers:
            ok, why = _cuda_supports(layer, opts.dtype)
            if not ok:
                notes.setdefault("cuda_skipped_layers", {}).setdefault(arch, {})[layer_label(layer)] = why
                continue
            for k in kernels:
                tile = k["tile"] or [0, 0, 0]
                row = {"layer": _layer_public(layer), "label": layer_label(layer), "backend": "cuda",
                       "arch": arch, "gpu": spec_a.gpu, "dtype": dname,
                       "config": {"name": k["config"], "family": k["family"], "tile": k["tile"],
                                  "stages": k["stages"], "threads": k["threads"]},
                       "selection": "candidate: timed at the first call of each shape (bindings.cpp)",
                       "path": ("CUTLASS 3 implicit GEMM: TMA im2col loads + warpgroup MMA, warp-specialized"
                                if k["family"] == "sm90" else
                                "CUTLASS 2.x implicit GEMM: cp.async multistage + mma.sync"),
                       "kernel": k["function"], "kernel_demangled": k["demangled"][:400],
                       "cubin": k["cubin"], "ptxas_notes": k["ptxas_notes"]}
                info = {"registers": k["registers"], "spill_bytes": k["spill_bytes"],
                        "stack_bytes": k["stack_bytes"], "local_bytes": k["local_bytes"],
                        "shared_static": k["shared_static"], "sass": k["sass"]}
                row.update(_resource_fields(info, k["shared_dynamic"]))
                expected = "HGMMA" if k["family"] == "sm90" else "HMMA"
                _finish_row(row, layer, spec_a, block_m=tile[0], block_n=tile[1], block_k=tile[2],
                            threads=k["threads"], dtype=opts.dtype, tf32=None, expected_tc=expected)
                if arch == "sm_90a" and k["family"] != "sm90":
                    row["path_reason"] = ("HMMA fallback family: CUTLASS 2.x (mma.sync) kernels on Hopper, for "
                                          "shapes the sm90 kernels cannot take; timed against them")
                rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
def _tile_area(r: dict) -> int:
    c = r["config"]
    if "BLOCK_M" in c:
        return c["BLOCK_M"] * c["BLOCK_N"]
    return (c.get("tile") or [0, 0])[0] * (c.get("tile") or [0, 0])[1]


def _mark_picks(rows: list[dict]) -> None:
    """predicted_pick: per (backend, arch, layer), the fitting candidate with the lowest
    estimate -- what autotuning or the CUDA backend's timing should settle on, as far as the
    model can tell."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backend"], r["arch"], r["label"]), []).append(r)
    for rs in groups.values():
        fit = [r for r in rs if r.get("estimate_us") is not None and not r.get("error")
               and (r.get("shared_bytes") or 0) <= 10**9 and r.get("ctas_per_sm")]
        best = None
        if fit:
            # ties (within 1%: the roofline cannot tell these apart) go to the arch's native MMA
            # (HGMMA on sm_90a), then the larger tile (more reuse per byte loaded), then to more
            # resident CTAs
            low = min(r["estimate_us"] for r in fit)
            near = [r for r in fit if r["estimate_us"] <= low * 1.01]
            best = max(near, key=lambda r: (-round(r["estimate_us"] / low, 2),
                                            r["tensor_core"] == r.get("expected_native_tensor_core"),
                                            _tile_area(r), r["ctas_per_sm"]))
        for r in rs:
            r["predicted_pick"] = r is best


def _specs(opts: ReportOptions) -> dict[str, ArchSpec]:
    out = {}
    for a in opts.archs:
        s = get_arch(a)
        out[s.name] = s.with_peaks(opts.peak_tflops.get(s.name) or opts.peak_tflops.get("*"),
                                   opts.bandwidth_tbs.get(s.name) or opts.bandwidth_tbs.get("*"))
    return out


def build_report(opts: ReportOptions) -> dict:
    t0 = time.perf_counter()
    opts = dataclasses.replace(opts, archs=tuple(get_arch(a).name for a in opts.archs))
    if opts.jobs <= 0:
        opts = dataclasses.replace(opts, jobs=max(1, min(4, os.cpu_count() or 1)))
    specs = _specs(opts)
    layers, unfused = distinct_layers(opts.model, opts.batch, opts.resolution, training=opts.training)
    if opts.layer_filter is not None:
        layers = [layer for layer in layers if opts.layer_filter(layer)]
    notes: dict = {}
    progress = Progress(0, "compiling kernels", enabled=opts.progress)
    timings = {}
    cuda_built: dict = {}
    cuda_thread = None
    if "cuda" in opts.backends and not _cuda_dtype_ok(opts.dtype, notes):
        pass
    elif "cuda" in opts.backends:
        progress.add_total(_cuda_unit_count(opts.archs))
        tc0 = time.perf_counter()

        def run_cuda():
            cuda_built.update(_cuda_compile_all(opts, progress))
            timings["cuda_compile_s"] = round(time.perf_counter() - tc0, 1)
        # nvcc runs as child processes: a thread is enough to overlap it with the Triton compiles
        cuda_thread = threading.Thread(target=run_cuda, daemon=True)
        cuda_thread.start()
    rows: list[dict] = []
    training_rows: list[dict] = []
    other_rows: list[dict] = []
    try:
        if "triton" in opts.backends:
            tt0 = time.perf_counter()
            rows += _triton_rows(layers, opts, specs, progress, notes)
            if opts.other_kernels:
                other_rows = _other_kernel_rows(opts, specs, progress)
            if opts.training:
                training_rows = _training_kernel_rows(opts, specs, progress)
            timings["triton_s"] = round(time.perf_counter() - tt0, 1)
        if cuda_thread is not None:
            cuda_thread.join()
            rows += _cuda_rows(layers, opts, specs, cuda_built, notes)
    finally:
        progress.close()
    _mark_picks(rows)
    for backend in opts.backends:
        for arch in opts.archs:
            have = {r["label"] for r in rows if r["backend"] == backend and r["arch"] == arch}
            if have:  # a backend/arch with no rows at all is explained by its own note
                lost = [layer_label(layer) for layer in layers if layer_label(layer) not in have]
                skipped = (notes.get("cuda_skipped_layers", {}).get(arch, {}) if backend == "cuda"
                           else notes.get("triton_skipped_layers", {}))
                lost = [x for x in lost if x not in skipped]
                if lost:
                    notes.setdefault("layers_without_rows", {})[f"{backend} {arch}"] = lost
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    env = _env(opts, specs, cuda_built, timings)
    env.update({"unfused_convs": unfused, "notes": notes, "layers": len(layers)})
    return {"rows": rows, "inference_kernels": other_rows, "training_kernels": training_rows, "env": env}


def _training_kernel_rows(opts: ReportOptions, specs: dict, progress: Progress) -> list[dict]:
    """Registers, spills and shared memory of the training kernels other than the conv."""
    from . import triton_aot as ta

    entries = [(label, fn, spec, None, None) for label, fn, spec in ta.training_kernel_specs(opts.dtype)]
    return _kernel_rows(opts, specs, progress, entries, "training")


def _other_kernel_rows(opts: ReportOptions, specs: dict, progress: Progress) -> list[dict]:
    """The inference kernels other than the conv (stem input conversion, max-pool, the TMA 1x1
    GEMM), with a roofline estimate each: bytes / bandwidth or FLOPs / peak, whichever is larger."""
    from . import triton_aot as ta

    entries = ta.inference_kernel_specs(opts.dtype, batch=opts.batch, resolution=opts.resolution)
    rows = _kernel_rows(opts, specs, progress, entries, "inference")
    return rows + _fp8_kernel_rows(opts, specs, progress)


def _fp8_kernel_rows(opts: ReportOptions, specs: dict, progress: Progress) -> list[dict]:
    """The fp8 conv where the arch has e4m3 tensor cores, its SASS checked for them (QGMMA with
    E4M3 operands on sm_90a, e4m3 mma.sync on sm_89); on older archs one row saying why fp8
    falls back (resnet_fast.fp8_ops: the reference there) instead of a failed compile."""
    from . import triton_aot as ta

    entries = ta.fp8_kernel_specs(batch=opts.batch)
    capable = [a for a in opts.archs if specs[a].capability >= ta.FP8_MIN_CAPABILITY]
    rows = []
    if capable:
        rows = _kernel_rows(dataclasses.replace(opts, archs=type(opts.archs)(capable)), specs, progress,
                            entries, "fp8")
        for r in rows:
            r["dtype"] = "fp8e4m3"
            if r.get("flops") and r.get("bytes") is not None:
                # 8-bit MMA runs at twice the 16-bit rate (Ada and Hopper): the estimate's ceiling
                a = specs[r["arch"]]
                mem_us = r["bytes"] / (a.bandwidth_tbs * 1e6) if a.bandwidth_tbs else None
                comp_us = r["flops"] / (2 * a.peak_for(torch.bfloat16) * 1e6)
                if mem_us is not None:
                    r["estimate_us"] = round(max(mem_us, comp_us), 1)
                    r["bound"] = "compute" if comp_us > mem_us else "memory"
            mma = r.get("mma") or {}
            e4m3 = sum(v for k, v in mma.items() if "E4M3" in k)
            r["fp8_mma"] = e4m3
            if "registers" in r and not e4m3:
                r["ok"] = False
                r["error"] = f"no e4m3 tensor-core instruction in the SASS (mma: {mma})"
    for a in opts.archs:
        if a not in capable:
            rows.append({"arch": a, "kernel": "conv_bn_act_kernel", "label": "fp8 conv (all layers)",
                         "dtype": "fp8e4m3", "ok": True,
                         "fallback": (f"{a} has no fp8 tensor cores (e4m3 MMA starts at sm_89): fp8 "
                                      f"models run the reference fp8 op there (dequantize, fp32 conv)")})
    return rows


def _kernel_rows(opts: ReportOptions, specs: dict, progress: Progress, entries, subdir: str) -> list[dict]:
    from . import triton_aot as ta

    jobs, meta = [], []
    for arch in opts.archs:
        cc = specs[arch].capability
        for label, fn, spec, nbytes, flops in entries:
            name = fn.split(":")[1]
            fname = f"{name}.{DTYPE_NAMES[opts.dtype]}.{abs(hash(label)) % 10**8}.cubin"
            jobs.append({"kind": "fn", "fn": fn, "capability": cc, **spec,
                         "out_path": str(Path(opts.cubin_dir) / "triton" / arch / subdir / fname)})
            meta.append((arch, label, name, nbytes, flops))
    progress.add_total(len(jobs))
    results = ta.run_jobs(jobs, workers=opts.jobs, on_done=lambda i, r: progress.update(1, f"{subdir} kernels"))
    rows = []
    for (arch, label, name, nbytes, flops), res in zip(meta, results):
        row = {"arch": arch, "kernel": name, "label": label, "dtype": DTYPE_NAMES[opts.dtype]}
        if nbytes is not None:
            a = specs[arch]
            mem_us = nbytes / (a.bandwidth_tbs * 1e6) if a.bandwidth_tbs else None
            comp_us = flops / (a.peak_for(opts.dtype) * 1e6) if flops and a.peak_for(opts.dtype) else 0.0
            row.update(bytes=nbytes, flops=flops,
                       estimate_us=None if mem_us is None else round(max(mem_us, comp_us), 1),
                       bound="compute" if comp_us > (mem_us or 0) else "memory")
        if isinstance(res, Exception):
            row.update(ok=False, error=f"compile failed: {type(res).__name__}: {str(res)[-600:]}")
        else:
            info = res.get("inspect") or cubin_tools.inspect_cubin(res["cubin"])
            fn = res["name"] if res["name"] in info else next(iter(info))
            f = info[fn]
            sass = f.get("sass")
            sass = sass.as_dict() if hasattr(sass, "as_dict") else (sass or {})
            row.update(registers=f["registers"], spill_bytes=f["spill_bytes"],
                       shared_bytes=f["shared_static"] + res["shared_dynamic"], num_warps=res["num_warps"],
                       tma_loads=sass.get("tma_loads"), mma=sass.get("mma"),
                       cubin=res["cubin"], ok=f["spill_bytes"] == 0)
            if not row["ok"]:
                row["error"] = f"{f['spill_bytes']} bytes of spills"
        rows.append(row)
    return rows


def _env(opts: ReportOptions, specs: dict, cuda_built: dict, timings: dict) -> dict:
    import triton

    try:
        import cutlass_library
        cutlass_v = getattr(cutlass_library, "__version__", None)
    except Exception:
        cutlass_v = None
    if cutlass_v is None:
        try:
            from importlib.metadata import version
            cutlass_v = version("nvidia-cutlass")
        except Exception:
            cutlass_v = None
    nvcc = next((v.get("nvcc") for v in cuda_built.values() if isinstance(v, dict)), None)
    return {
        "model": opts.model, "batch": opts.batch, "resolution": opts.resolution,
        "dtype": DTYPE_NAMES[opts.dtype], "backends": list(opts.backends), "cubin_dir": str(opts.cubin_dir),
        "archs": {k: v.as_dict() for k, v in specs.items()},
        "estimate": "max(FLOPs / peak, bytes / bandwidth) / (wave_efficiency * tile_efficiency)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": triton.__version__, "nvcc": nvcc, "cutlass": cutlass_v},
        "cuda_flags": {a: v.get("flags") for a, v in cuda_built.items() if isinstance(v, dict)},
        "cuda_units": {a: v.get("units") for a, v in cuda_built.items() if isinstance(v, dict)},
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "compile_jobs": opts.jobs},
        "timings": timings, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def check_failures(report: dict) -> list[str]:
    """One line per row whose checks failed (empty: every kernel passed)."""
    out = []
    for r in report["rows"]:
        if not r.get("ok"):
            out.append(f"{r['backend']} {r['arch']} {r['label']} [{r['config']['name']}]: "
                       + "; ".join(r.get("problems") or [r.get("error", "failed")]))
    for r in report.get("inference_kernels", []) + report.get("training_kernels", []):
        if not r.get("ok"):
            out.append(f"triton {r['arch']} {r['label']} ({r['kernel']}): {r.get('error', 'failed')}")
    return out


# --------------------------------------------------------------------------------------------
# One layer (benchmarks/)
# --------------------------------------------------------------------------------------------
_cuda_cache: dict = {}
_cuda_lock = threading.Lock()


def estimate_layer(layer: dict, backend: str = "triton", arch: Optional[str] = None,
                   dtype: torch.dtype | str = torch.bfloat16, *, batch: Optional[int] = None,
                   device=None, peaks: Optional[dict] = None, peak_tflops: Optional[float] = None,
                   bandwidth_tbs: Optional[float] = None, cubin_dir: Optional[str] = None,
                   jobs: int = 1, configs: Optional[dict] = None) -> list[dict]:
    """The report's rows (one per candidate config) for one layer on one backend and arch;
    ``configs`` (name -> triton.Config) replaces the Triton candidates."""
    from . import archs as archs_mod

    dtype = dtype_from_name(dtype)
    layer = normalize_layer(layer, batch)
    if arch is not None:
        spec = get_arch(arch)
    elif device is not None and torch.device(device).type == "cuda":
        spec = archs_mod.arch_from_device(device)
    else:
        spec = get_arch("sm_90a")
    if peaks and (device is None or torch.device(device).type == "cuda"):
        peak_tflops = peak_tflops or peaks.get("matmul_tflops") or peaks.get("peak_tflops")
        bw = peaks.get("copy_gbps")
        bandwidth_tbs = bandwidth_tbs or (bw / 1000 if bw else peaks.get("bandwidth_tbs"))
    spec = spec.with_peaks(peak_tflops, bandwidth_tbs, source="given to estimate_layer_us")
    specs = {spec.name: spec}
    opts = ReportOptions(dtype=dtype, archs=(spec.name,), backends=(backend,), jobs=jobs, progress=False,
                         triton_config_objects=configs,
                         cubin_dir=Path(cubin_dir or Path(os.environ.get("TMPDIR", "/tmp")) / "resnet_fast_kernel_report"))
    layer.setdefault("count", 1)
    notes: dict = {}
    if backend == "triton":
        rows = _triton_rows([layer], opts, specs, Progress(0, "", enabled=False), notes)
    elif backend == "cuda":
        with _cuda_lock:
            if spec.name not in _cuda_cache:
                _cuda_cache.update(_cuda_compile_all(opts, Progress(0, "", enabled=False)))
        rows = _cuda_rows([layer], opts, specs, _cuda_cache, notes)
    else:
        return []
    _mark_picks(rows)
    return rows


def estimate_layer_us(layer: dict, backend: str = "triton", arch: Optional[str] = None,
                      dtype: torch.dtype | str = torch.bfloat16, *, batch: Optional[int] = None,
                      device=None, peaks: Optional[dict] = None, peak_tflops: Optional[float] = None,
                      bandwidth_tbs: Optional[float] = None) -> Optional[float]:
    """Estimated microseconds of one conv layer on backend/arch: the report's estimate for the
    candidate config with the lowest estimate (what autotuning should find), or None when the
    backend has no kernel for it (torch backend, unsupported shape or dtype).

    layer: a dict with cin, cout, kernel, stride, padding, h, w (or in_hw), epilogue
    ("relu", "residual+relu", "none", ...) and batch (or pass batch=). arch: "sm_80"/"sm_90a";
    default: the given CUDA device's, else sm_90a. peaks: measured ceilings as benchmarks/peaks.py
    reports them ({"matmul_tflops", "copy_gbps"}), used only for a CUDA device. A device that is
    not CUDA gets None (a GPU estimate is not comparable with a CPU measurement).

    Compiles the layer's kernels on first use (Triton: seconds, cached by Triton; cuda: the
    backend's conv sources once per arch, minutes, cached under ~/.cache/resnet_fast).
    """
    if device is not None and torch.device(device).type != "cuda" and arch is None:
        return None
    if backend not in BACKENDS:
        return None
    rows = estimate_layer(layer, backend, arch, dtype, batch=batch, device=device, peaks=peaks,
                          peak_tflops=peak_tflops, bandwidth_tbs=bandwidth_tbs)
    picks = [r["estimate_us"] for r in rows if r.get("predicted_pick")]
    return picks[0] if picks else None
