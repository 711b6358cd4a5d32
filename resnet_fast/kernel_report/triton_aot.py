"""Ahead-of-time compilation of the Triton kernels for a GPU that is not here.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32), options=...)`` runs the whole
Triton -> PTX -> ptxas pipeline on the CPU and returns the cubin. The conv's signature,
constexprs and attributes come from ``kernels.conv_bn_act.conv_compile_spec`` (the launcher's own
argument derivation), so what is compiled here is what the JIT would build for that layer.

Kernels decorated while TRITON_INTERPRET=1 (the CPU test suite) are interpreter objects that
cannot be compiled; their module is then loaded a second time, privately, with the interpreter
off (:func:`jit_function`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
    key = aliases.get(str(name).replace("torch.", ""), str(name).replace("torch.", ""))
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {list(_DTYPES)}")
    return _DTYPES[key]


# --------------------------------------------------------------------------------------------
# Getting compilable (non-interpreted) kernels
# --------------------------------------------------------------------------------------------
def conv_module():
    """The module of the Triton conv kernel (installed as resnet_fast.kernels, or the repo's
    top-level kernels/ package)."""
    try:
        return importlib.import_module("resnet_fast.kernels.conv_bn_act")
    except ImportError:
        return importlib.import_module("kernels.conv_bn_act")


def _is_jit(fn) -> bool:
    from triton.runtime.jit import JITFunction
    return isinstance(fn, JITFunction)


def _private_module(mod):
    """mod loaded again under a private name with TRITON_INTERPRET unset, so that its @triton.jit
    functions are compilable JITFunctions."""
    name = "_resnet_fast_aot_." + mod.__name__
    if name in sys.modules:
        return sys.modules[name]
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        try:
            from triton import knobs
            knob_ctx = knobs.runtime.scope() if hasattr(knobs.runtime, "scope") else None
        except ImportError:  # pragma: no cover - older triton
            knobs, knob_ctx = None, None
        if knob_ctx is not None:
            with knob_ctx:
                knobs.runtime.interpret = False
                m = _exec_module(name, mod.__file__)
        else:
            m = _exec_module(name, mod.__file__)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    # @jit helpers this module imported from other kernel modules (batch_norm.tile_stats in the
    # conv) were bound to their interpreted versions: rebind them to private compilable ones
    for attr, v in list(vars(m).items()):
        if type(v).__name__ == "InterpretedFunction":
            setattr(m, attr, jit_function(v))
    return m


def _exec_module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec)
    sys.modules[name] = m
    try:
        spec.loader.exec_module(m)
    except BaseException:
        del sys.modules[name]
        raise
    return m


def jit_module(mod):
    """mod itself when its kernels are JITFunctions, else its private non-interpreted copy."""
    for v in vars(mod).values():
        if type(v).__name__ == "InterpretedFunction":
            return _private_module(mod)
    return mod


def jit_function(fn):
    """A compilable JITFunction for fn (a JITFunction, or an InterpretedFunction made while
    TRITON_INTERPRET=1: reloaded from its module, or rewrapped when it is not a module global)."""
    if _is_jit(fn):
        return fn
    inner = getattr(fn, "fn", None)
    if inner is None:
        raise TypeError(f"{fn!r} is not a triton.jit function")
    mod = sys.modules.get(inner.__module__)
    if mod is not None and getattr(mod, "__file__", None) and getattr(mod, inner.__name__, None) is fn:
        return getattr(_private_module(mod), inner.__name__)
    from triton.runtime.jit import JITFunction
    return JITFunction(inner)  # a kernel calling no other @jit function compiles like this


# --------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------
def _ast_source(fn, signature: dict, constexprs: dict, attrs: dict):
    from triton.compiler import ASTSource
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:  # triton >= 3.3: constexprs by name, "constexpr" in the signature
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    # older releases: constants keyed by argument index, constexprs absent from the signature
    consts = {(fn.arg_names.index(k),) if isinstance(k, str) else k: v for k, v in constexprs.items()}
    sig = {k: v for k, v in signature.items() if v != "constexpr"}
    return ASTSource(fn=fn, signature=sig, constants=consts, attrs=attrs)


def compile_kernel(fn, signature: dict, constexprs: dict, attrs: Optional[dict], options: dict,
                   capability: int, out_path: Optional[str | os.PathLike] = None) -> dict:
    """Compile one kernel for sm_<capability> (90 -> sm_90a) and write its cubin to out_path.

    Returns {"name", "shared_dynamic", "num_warps", "num_stages", "cubin", "target"}.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    fn = jit_function(fn)
    src = _ast_source(fn, signature, constexprs, attrs or {})
    compiled = triton.compile(src, target=GPUTarget("cuda", int(capability), 32), options=dict(options))
    md = compiled.metadata
    cubin = compiled.asm["cubin"]
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(out_path.suffix + f".{os.getpid()}.tmp")
        tmp.write_bytes(cubin)
        os.replace(tmp, out_path)
    return {"name": md.name, "shared_dynamic": int(md.shared), "num_warps": int(md.num_warps),
            "num_stages": int(getattr(md, "num_stages", options.get("num_stages", 0))),
            "target": f"sm_{capability}{'a' if capability == 90 else ''}",
            "cubin": str(out_path) if out_path is not None else None}


# --------------------------------------------------------------------------------------------
# The conv: one job per (layer variant, config, arch)
# --------------------------------------------------------------------------------------------
def conv_spec_args(layer: dict, dtype: torch.dtype) -> dict:
    """conv_compile_spec's arguments for one layer dict."""
    epi = layer["epilogue"]
    cin, groups = layer["cin"], layer.get("groups", 1)
    pad = getattr(conv_module(), "packed_input_channels", None)
    if pad is not None and "pre" not in epi and "stats" not in epi.split("+"):
        cin = pad(cin, groups)  # the inference fold pads the stem's input (fold.pack_folded)
    return dict(dtype=dtype,
                x_shape=(layer["batch"], cin, layer["h"], layer["w"]),
                w_shape=(layer["cout"], cin // groups, *layer["kernel"]),
                stride=tuple(layer["stride"]), padding=tuple(layer["padding"]),
                dilation=tuple(layer["dilation"]),
                residual="residual" in epi, relu="relu" in epi.split("+"), pre="pre" in epi,
                stats="stats" in epi.split("+"))


def _jsonable(v: Any):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return repr(v)


def conv_spec(layer: dict, dtype: torch.dtype, config, module=None) -> dict:
    mod = jit_module(module or conv_module())
    return mod.conv_compile_spec(**conv_spec_args(layer, dtype), config=config)


def spec_key(spec: dict, capability: int) -> str:
    """A hash of everything that decides the binary: two layers with one key share one cubin."""
    blob = json.dumps({"fn": getattr(spec["fn"], "__name__", str(spec["fn"])),
                       "signature": _jsonable(spec["signature"]),
                       "constexprs": _jsonable(sorted(spec["constexprs"].items())),
                       "attrs": _jsonable(sorted((str(k), v) for k, v in spec["attrs"].items())),
                       "options": _jsonable(spec["options"]), "cc": capability}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def compile_job(job: dict) -> dict:
    """Worker entry (picklable arguments): compile one kernel.

    ``{"kind": "conv", "spec_args": conv_spec_args(...) with the dtype by name, "config": name}``
    builds the spec with conv_compile_spec; ``{"kind": "fn", "fn": "module:name", "signature",
    "constexprs", "attrs", "options"}`` compiles any importable @triton.jit function. Both take
    "capability" and "out_path".
    """
    if job["kind"] == "conv":
        spec_args = dict(job["spec_args"])
        spec_args["dtype"] = dtype_from_name(spec_args["dtype"])
        mod = jit_module(conv_module())
        spec = mod.conv_compile_spec(**spec_args, config=config_from_job(job["config"]))
    else:
        modname, attr = job["fn"].split(":")
        spec = dict(fn=getattr(importlib.import_module(modname), attr), signature=job["signature"],
                    constexprs=job.get("constexprs", {}), attrs=job.get("attrs", {}),
                    options=job.get("options", {}))
    res = compile_kernel(spec["fn"], spec["signature"], spec["constexprs"], spec["attrs"],
                         spec["options"], job["capability"], job["out_path"])
    if job.get("inspect", True) and res["cubin"]:
        from .cubin import inspect_cubin
        try:
            res["inspect"] = inspect_cubin(res["cubin"])  # cuobjdump runs here, in parallel
        except Exception:  # the parent retries and reports the error
            pass
    return res


def _interpreting() -> bool:
    """Whether this process's triton.language was set up for the interpreter (then nothing here
    can be compiled in-process: even tl.cdiv is an interpreter object)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)


_POOL = None


def _pool(workers: int):
    """A process pool kept for the life of this process (spawning workers costs seconds: each
    imports torch and triton), rebuilt only when more workers are asked for."""
    global _POOL
    import concurrent.futures as cf
    import multiprocessing as mp

    if _POOL is not None and _POOL[1] >= workers:
        return _POOL[0]
    if _POOL is not None:
        _POOL[0].shutdown(wait=False, cancel_futures=True)
    saved = os.environ.pop("TRITON_INTERPRET", None)  # children copy the environment at spawn
    try:
        ex = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                    initializer=_worker_init)
        # start every worker now, while TRITON_INTERPRET is unset
        list(ex.map(_worker_ping, range(workers)))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    _POOL = (ex, workers)
    return ex


def _worker_ping(i):
    return os.getpid()


def run_jobs(jobs: list[dict], workers: int = 1, on_done=None) -> list:
    """Compile every job; returns one result per job (a dict, or the exception it raised).

    Runs in worker processes (spawned with TRITON_INTERPRET unset) when workers > 1 or when this
    process's triton is in interpreter mode; else in this process. on_done(i, result) is called
    as each finishes.
    """
    results: list = [None] * len(jobs)
    if not jobs:
        return results
    if workers <= 1 and not _interpreting():
        for i, job in enumerate(jobs):
            try:
                results[i] = compile_job(job)
            except Exception as e:  # one kernel failing to compile is a row, not the end of the report
                results[i] = e
            if on_done:
                on_done(i, results[i])
        return results
    import concurrent.futures as cf

    ex = _pool(max(1, workers))
    futs = {ex.submit(compile_job, job): i for i, job in enumerate(jobs)}
    for f in cf.as_completed(futs):
        i = futs[f]
        try:
            results[i] = f.result()
        except Exception as e:
            results[i] = e
        if on_done:
            on_done(i, results[i])
    return results


def _small_cin(mod) -> int:
    return int(getattr(mod, "SMALL_CIN", 16))


def conv_candidates(layer: dict, module=None, dtype: torch.dtype = torch.bfloat16) -> tuple[dict, str, list[str]]:
    """(configs by name, how the backend picks among them, names pruned for this layer).

    The Triton backend autotunes over the kernel module's ``conv_configs`` (per K path when it
    takes ``small_cin``), after the module's early pruning (``prune_configs``, called as the
    autotuner would with this layer's arguments); RESNET_FAST_TRITON_CONV_CONFIG forces one.
    """
    mod = module or conv_module()
    small = layer["cin"] // layer.get("groups", 1) < _small_cin(mod)
    forced = os.environ.get(getattr(mod, "CONFIG_ENV_VAR", "RESNET_FAST_TRITON_CONV_CONFIG"))
    try:
        takes_small = "small_cin" in inspect.signature(mod.conv_configs).parameters
    except (TypeError, ValueError):
        takes_small = False
    configs = mod.conv_configs(small) if takes_small else mod.conv_configs()
    if forced:
        allc = dict(configs)
        if takes_small:
            allc.update(mod.conv_configs(not small))
        if forced not in allc:
            raise ValueError(f"{forced!r} (from the environment) is not one of {list(allc)}")
        return {forced: allc[forced]}, "forced by the environment", []
    prune = getattr(mod, "prune_configs", None) or getattr(mod, "_prune_wide_tiles", None)
    if prune is None:
        return dict(configs), "autotune candidate", []
    epi = layer["epilogue"]
    tensor = torch.empty(0, dtype=dtype, device="meta")  # what the pruner may ask of a pointer: .dtype
    named = dict(x_ptr=tensor, w_ptr=tensor, y_ptr=tensor, res_ptr=tensor if "residual" in epi else None,
                 M=layer["batch"] * layer["ho"] * layer["wo"], H=layer["h"], W=layer["w"],
                 Cin=layer["cin"], Ho=layer["ho"], Wo=layer["wo"], Cout=layer["cout"],
                 KH=layer["kernel"][0], KW=layer["kernel"][1], STRIDE_H=layer["stride"][0],
                 STRIDE_W=layer["stride"][1], HAS_RESIDUAL="residual" in epi,
                 RELU="relu" in epi.split("+"), HAS_PRE="pre" in epi, SMALL_CIN=small,
                 STATS="stats" in epi.split("+"))
    if hasattr(mod, "input_precision"):
        named["INPUT_PRECISION"] = mod.input_precision(dtype)
    kept_list = prune(list(configs.values()), named)
    kept = {mod.config_name(c): c for c in kept_list}
    return kept, "autotune candidate", [n for n in configs if n not in kept]


def config_for_job(name: str, cfg, module=None) -> str | dict:
    """A picklable stand-in for cfg: its name when the kernel module knows it by that name,
    else its fields."""
    mod = module or conv_module()
    known = dict(mod.conv_configs())
    try:
        known.update(mod.conv_configs(True))
    except TypeError:
        pass
    if name in known and known[name].all_kwargs() == cfg.all_kwargs():
        return name
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def config_from_job(c):
    if isinstance(c, dict):
        import triton
        return triton.Config(dict(c["kwargs"]), num_warps=c["num_warps"], num_stages=c["num_stages"])
    return c


def config_dict(cfg) -> dict:
    d = dict(cfg.kwargs)
    d["num_warps"] = cfg.num_warps
    d["num_stages"] = cfg.num_stages
    return d


# --------------------------------------------------------------------------------------------
# The training kernels other than the conv (BN statistics, finalize, running update, the BN
# apply / block tail and its backward): one representative compile each
# --------------------------------------------------------------------------------------------
def _kernel_module(name: str) -> str:
    for pkg in ("resnet_fast.kernels", "kernels"):
        try:
            importlib.import_module(f"{pkg}.{name}")
            return f"{pkg}.{name}"
        except ImportError:
            continue
    raise ImportError(f"no kernel module {name}")


#: the stage 3-4 1x1 convs of ResNet-50 the TMA GEMM is for: (label, H = W, Cin, Cout, residual)
TMA_LAYERS = (("layer3 1x1 256->1024 +residual", 14, 256, 1024, True),
              ("layer3 1x1 1024->256", 14, 1024, 256, False),
              ("layer4 1x1 512->2048 +residual", 7, 512, 2048, True),
              ("layer4 1x1 2048->512", 7, 2048, 512, False))


def inference_kernel_specs(dtype: torch.dtype, batch: int = 256, resolution: int = 224,
                           tma_configs: tuple = ("m128n256k64w8s3", "m128n128k64w8s4")) -> list[tuple]:
    """The inference kernels other than conv_bn_act, as their launchers call them for a ResNet-50
    at ``batch`` x ``resolution``: (label, "module:function", {"signature", "constexprs",
    "attrs", "options"}, bytes moved, FLOPs) for the report's rows and estimates. The stem's
    input conversion (NCHW -> NHWC padded to 4 channels), the max-pool after the stem, and the
    persistent TMA GEMM on the stage 3-4 1x1 layers."""
    el = torch.empty((), dtype=dtype).element_size()
    out = []

    def add(label, modname, spec, nbytes, flops=0.0):
        fn = spec["fn"]
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__")
        out.append((label, f"{_kernel_module(modname)}:{name}",
                    {k: spec[k] for k in ("signature", "constexprs", "attrs", "options")}, nbytes, flops))

    r, s = resolution, resolution // 2
    lay = jit_module(importlib.import_module(_kernel_module("layout")))
    add("stem input: NCHW -> NHWC, 3 -> 4 channels", "layout",
        lay.layout_compile_spec(dtype, (batch, 3, r, r), 4), batch * r * r * (3 + 4) * el)
    pool = jit_module(importlib.import_module(_kernel_module("max_pool")))
    add("stem max-pool 3x3/s2 (values only)", "max_pool",
        pool.max_pool_compile_spec(dtype, (batch, 64, s, s), 3, 2, 1),
        batch * 64 * (s * s + (s // 2) ** 2) * el)
    gemm = jit_module(importlib.import_module(_kernel_module("gemm_tma")))
    for label, hw, cin, cout, res in TMA_LAYERS:
        m = batch * hw * hw
        for cfg in tma_configs:
            spec = gemm.gemm_compile_spec(dtype, m, cin, cout, residual=res, relu=True, config=cfg)
            add(f"TMA GEMM {label} {cfg}", "gemm_tma", spec,
                (m * cin + cin * cout + m * cout * (2 if res else 1)) * el, 2.0 * m * cin * cout)
    return out


#: ResNet-50 layers the report compiles the fp8 conv for: (label, H=W, cin, cout, k, residual, fp8 out)
FP8_LAYERS = (("fp8 layer1 3x3 64->64", 56, 64, 64, 3, False, True),
              ("fp8 layer3 3x3 256->256", 14, 256, 256, 3, False, True),
              ("fp8 layer3 1x1 256->1024 +residual", 14, 256, 1024, 1, True, True),
              ("fp8 layer4 1x1 512->2048 +residual, bf16 out", 7, 512, 2048, 1, True, False))
#: the lowest capability with e4m3 tensor cores (Ada, sm_89; Hopper's are warpgroup QGMMA)
FP8_MIN_CAPABILITY = 89


def fp8_kernel_specs(batch: int = 256, configs: tuple = ("m128n128k64w8s4", "m128n64k64w4s4")) -> list[tuple]:
    """The fp8 conv (conv_bn_act_kernel on e4m3 operands, resnet_fast.fp8_ops) for the layers of
    FP8_LAYERS, as inference_kernel_specs' entries: bytes are 1 per activation and weight element
    (2 for a bf16 output), FLOPs 2 * M * K * N."""
    conv = jit_module(importlib.import_module(_kernel_module("conv_bn_act")))
    out = []
    for label, hw, cin, cout, k, res, fp8_out in FP8_LAYERS:
        m = batch * hw * hw
        for cfg in configs:
            spec = conv.conv_compile_spec(torch.float8_e4m3fn, (batch, cin, hw, hw), (cout, cin, k, k),
                                          (1, 1), (k // 2, k // 2), residual=res, relu=True,
                                          fp8_out=fp8_out, config=cfg)
            nbytes = m * cin + cout * cin * k * k + m * cout * ((1 if fp8_out else 2) + (1 if res else 0))
            out.append((f"{label} {cfg}", f"{_kernel_module('conv_bn_act')}:conv_bn_act_kernel",
                        {key: spec[key] for key in ("signature", "constexprs", "attrs", "options")},
                        nbytes, 2.0 * m * cin * k * k * cout))
    return out


def training_kernel_specs(dtype: torch.dtype, channels: int = 256) -> list[tuple[str, str, dict]]:
    """(label, "module:function", {"signature", "constexprs", "options"}) of each training kernel
    as its launcher calls it on a ResNet-50 stage-1 sized tensor (``channels`` wide), pointers in
    ``dtype`` for activations and fp32 for per-channel vectors."""
    el = "*" + DTYPE_NAMES[dtype]
    f32 = "*fp32"
    sba_mod, bn_mod = _kernel_module("scale_bias_act"), _kernel_module("batch_norm")
    block_c = min(128, channels)
    geo = dict(BLOCK_R=4096 // block_c, BLOCK_C=block_c, INT64_OFFSETS=False)
    out = []

    def sba(label, affine, res, res_affine, relu):
        sig = {"y_ptr": el, "scale_ptr": f32 if affine else "constexpr", "shift_ptr": f32 if affine else "constexpr",
               "res_ptr": el if res else "constexpr", "res_scale_ptr": f32 if res_affine else "constexpr",
               "res_shift_ptr": f32 if res_affine else "constexpr", "out_ptr": el, "R": "i32", "C": "i32",
               "HAS_AFFINE": "constexpr", "HAS_RES": "constexpr", "HAS_RES_AFFINE": "constexpr",
               "RELU": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr", "INT64_OFFSETS": "constexpr"}
        ce = {k: None for k, v in sig.items() if v == "constexpr" and k.endswith("_ptr")}
        ce.update(HAS_AFFINE=affine, HAS_RES=res, HAS_RES_AFFINE=res_affine, RELU=relu, **geo)
        out.append((label, f"{sba_mod}:scale_bias_act_kernel", {"signature": sig, "constexprs": ce,
                                                                 "options": {"num_warps": 8}}))

    sba("BN+ReLU apply", True, False, False, True)
    sba("block tail, identity shortcut", True, True, False, True)
    sba("block tail, projection shortcut (dual BN)", True, True, True, True)

    def sba_bwd(label, res_affine, stats, reduce, apply):
        ptrs = {"g_ptr": el, "y_ptr": el, "scale_ptr": f32, "shift_ptr": f32, "res_ptr": el if res_affine else None,
                "res_scale_ptr": f32 if res_affine else None, "res_shift_ptr": f32 if res_affine else None,
                "y_mean_ptr": f32 if stats else None, "res_mean_ptr": f32 if stats and res_affine else None,
                "k1_ptr": f32 if stats and apply else None, "k2_y_ptr": f32 if stats and apply else None,
                "k2_res_ptr": f32 if stats and apply and res_affine else None,
                "dy_ptr": el, "dres_ptr": el if res_affine else None,
                "sum_g_ptr": f32, "sum_gy_ptr": f32, "sum_gr_ptr": f32 if res_affine else None}
        sig = {k: (v if v is not None else "constexpr") for k, v in ptrs.items()}
        sig.update(R="i32", C="i32")
        flags = dict(HAS_AFFINE=True, HAS_RES=res_affine, HAS_RES_AFFINE=res_affine, RELU=True,
                     WANT_DRES=res_affine, Y_STATS=stats, RES_STATS=stats and res_affine,
                     REDUCE=reduce, APPLY=apply, **geo)
        sig.update({k: "constexpr" for k in flags})
        ce = {k: None for k, v in ptrs.items() if v is None}
        ce.update(flags)
        out.append((label, f"{sba_mod}:scale_bias_act_backward_kernel",
                    {"signature": sig, "constexprs": ce, "options": {"num_warps": 8}}))

    sba_bwd("BN+ReLU backward, batch stats: reduce pass", False, True, True, False)
    sba_bwd("BN+ReLU backward, batch stats: apply pass", False, True, False, True)
    sba_bwd("block tail backward (dual BN): reduce pass", True, True, True, False)
    sba_bwd("block tail backward (dual BN): apply pass", True, True, False, True)
    sba_bwd("BN+ReLU backward, constant BN: one pass", False, False, True, True)

    out.append(("batch statistics of a tensor (tiles)", f"{bn_mod}:_tile_stats_kernel", {
        "signature": {"x_ptr": el, "part_ptr": f32, "T": "i32", "M": "i32", "C": "i32", "BLOCK_R": "constexpr",
                      "BLOCK_C": "constexpr", "INT64_OFFSETS": "constexpr"},
        "constexprs": {"BLOCK_R": 64, "BLOCK_C": 64, "INT64_OFFSETS": False}, "options": {"num_warps": 4}}))
    out.append(("statistics merge (fp64, deterministic)", f"{bn_mod}:_merge_kernel", {
        "signature": {"part_ptr": f32, "mean_ptr": f32, "var_ptr": f32, "T": "i32", "T_STRIDE": "i32", "M": "i32",
                      "C": "i32", "ROWS_PER_TILE": "i32", "BLOCK_T": "constexpr", "BLOCK_C": "constexpr"},
        "constexprs": {"BLOCK_T": 32, "BLOCK_C": 64}, "options": {"num_warps": 4}}))
    out.append(("BN finalize (scale, shift, invstd)", f"{bn_mod}:_finalize_kernel", {
        "signature": {"mean_ptr": f32, "var_ptr": f32, "weight_ptr": f32, "bias_ptr": f32, "scale_ptr": f32,
                      "shift_ptr": f32, "invstd_ptr": f32, "C": "i32", "eps": "fp32", "HAS_WEIGHT": "constexpr",
                      "HAS_BIAS": "constexpr", "BLOCK": "constexpr"},
        "constexprs": {"HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK": 256}, "options": {"num_warps": 4}}))
    out.append(("running statistics update (momentum=None)", f"{bn_mod}:_running_update_kernel", {
        "signature": {"rm_ptr": f32, "rv_ptr": f32, "nbt_ptr": "*i64", "mean_ptr": f32, "var_ptr": f32, "C": "i32",
                      "momentum": "fp32", "unbias": "fp32", "CUMULATIVE": "constexpr", "BLOCK": "constexpr"},
        "constexprs": {"CUMULATIVE": True, "BLOCK": 256}, "options": {"num_warps": 4}}))
    return out
