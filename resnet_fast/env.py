"""``python -m resnet_fast.env``: the environment, to paste into a bug report.

Versions (python, torch and the CUDA runtime it was built with, triton, torchvision, timm, the
CUTLASS wheel, nvcc), the GPUs, which backend can run on each device and dtype (and why not),
and where the caches live. ``--json`` prints the same as JSON; :func:`collect` returns it as a
dict (benchmarks/env.py records its version fields with every benchmark result).

Nothing here builds or loads the CUDA extension: the cuda backend is asked
:meth:`~resnet_fast.backends.cuda_backend.CudaBackend.status`, which checks the toolchain and
whether a build is cached, where ``available()`` would compile on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Optional

import torch

#: what is reported (name in the report -> (module whose __version__ counts, or None, and the
#: distributions to ask otherwise); timm is not imported (slow), triton may be a pytorch-triton
PACKAGES = {"torch": ("torch", ("torch",)), "triton": ("triton", ("triton", "pytorch-triton")),
            "torchvision": ("torchvision", ("torchvision",)), "timm": (None, ("timm",)),
            "cutlass": (None, ("nvidia-cutlass",)), "ninja": (None, ("ninja",))}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ENV_VARS = ("RESNET_FAST_BACKEND", "RESNET_FAST_CACHE", "RESNET_FAST_AUTO", "RESNET_FAST_CACHE_DIR",
            "RESNET_FAST_TRITON_TMA", "RESNET_FAST_TRITON_CONV_CONFIG", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH",
            "CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR",
            "MAX_JOBS")


def _version(module: Optional[str], dists: tuple[str, ...]) -> Optional[str]:
    from importlib import metadata

    if module is not None:
        try:
            return str(__import__(module).__version__)
        except Exception:
            pass
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    """Flat version fields: python, platform, resnet_fast, each of PACKAGES (None when not
    installed), cuda (the CUDA runtime torch was built with), cudnn."""
    import resnet_fast

    out = {"python": platform.python_version(), "python_executable": sys.executable,
           "platform": platform.platform(), "resnet_fast": resnet_fast.__version__,
           "resnet_fast_path": os.path.dirname(os.path.abspath(resnet_fast.__file__))}
    for key, (module, dists) in PACKAGES.items():
        out[key] = _version(module, dists)
    out["cuda"] = torch.version.cuda
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return out


def toolchain() -> dict:
    """The CUDA toolkit the cuda backend's build would use: nvcc, its version, and whether the
    whole toolchain check passes (else why not)."""
    from .backends import cuda_backend

    out = {"cuda_home": None, "nvcc": None, "nvcc_version": None, "ok": False, "error": None}
    try:
        home = cuda_backend._find_cuda_home()
    except cuda_backend.ToolchainError as e:
        out["error"] = str(e)
        return out
    if home is not None:
        out["cuda_home"] = home
        out["nvcc"] = os.path.join(home, "bin", "nvcc")
        out["nvcc_version"] = cuda_backend.nvcc_version(out["nvcc"])
    try:
        cuda_backend.check_toolchain()
        out["ok"] = True
    except cuda_backend.ToolchainError as e:
        out["error"] = str(e)
    return out


def gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                    "sm_count": p.multi_processor_count, "memory_gb": round(p.total_memory / 2**30, 1)})
    return out


def backend_table() -> dict:
    """{device: {dtype: {"auto": name or None, backend: {"available", "reason"}}}} for cpu and
    cuda; the reason is why not, or for an available cuda backend whether it is built yet."""
    from . import backends

    table: dict = {}
    for device in ("cpu", "cuda"):
        dev = torch.device(device)
        table[device] = {}
        for dname, dtype in DTYPES.items():
            row: dict = {}
            for name in backends.AUTO_ORDER:
                ok, why = backends.available(name, dev, dtype)  # builds nothing
                row[name] = {"available": bool(ok), "reason": why}
            row["auto"] = next((n for n in backends.AUTO_ORDER if row[n]["available"]), None)
            table[device][dname] = row
    return table


def caches() -> dict:
    """Where compiled things are kept (the CUDA extension, Triton's kernels, the kernel report's
    cubins) and the CUDA extension builds found there."""
    from .backends import cuda_backend

    ext = cuda_backend.torch_extensions_dir()
    try:
        from triton import knobs

        triton_dir = knobs.cache.dir
    except Exception:
        triton_dir = os.environ.get("TRITON_CACHE_DIR") or os.path.join(
            os.environ.get("TRITON_HOME") or os.path.expanduser("~"), ".triton", "cache")
    from .kernel_report.cuda_aot import default_cache_dir
    built = []
    if os.path.isdir(ext):
        for d in sorted(os.listdir(ext)):
            lib = os.path.join(ext, d, d + ".so")
            if d.startswith("resnet_fast_cuda") and os.path.exists(lib):
                built.append(lib)
    from .backends import measured
    return {"torch_extensions": ext, "cuda_extension_builds": built, "triton": triton_dir,
            "kernel_report": str(default_cache_dir()),
            "backend_choices": str(measured.cache_dir() / "choices.json")}


def collect(with_backends: bool = True) -> dict:
    """Everything ``python -m resnet_fast.env`` reports, as a dict."""
    out = versions()
    out["toolchain"] = toolchain()
    out["gpus"] = gpus()
    if with_backends:
        out["backends"] = backend_table()
    out["caches"] = caches()
    out["env_vars"] = {k: os.environ[k] for k in ENV_VARS if k in os.environ}
    return out


def format_text(env: dict) -> str:
    lines = [f"resnet_fast {env['resnet_fast']} ({env['resnet_fast_path']})",
             f"python {env['python']} ({env['python_executable']}) on {env['platform']}"]
    lines.append("  ".join(f"{k} {env.get(k) or 'not installed'}" for k in PACKAGES))
    lines.append(f"torch CUDA runtime {env['cuda'] or 'none (CPU build)'}, cuDNN {env['cudnn']}")
    tc = env["toolchain"]
    nvcc = f"nvcc {tc['nvcc_version'] or '?'} at {tc['nvcc']}" if tc["nvcc"] else "nvcc not found"
    lines.append(f"{nvcc}; cuda backend build: {'ok' if tc['ok'] else tc['error']}")
    if env["gpus"]:
        for g in env["gpus"]:
            lines.append(f"GPU {g['index']}: {g['name']} (sm_{g['capability'].replace('.', '')}, "
                         f"{g['sm_count']} SMs, {g['memory_gb']} GB)")
    else:
        lines.append("no GPU")
    for device, rows in env.get("backends", {}).items():
        for dname, row in rows.items():
            parts = [f"{n} " + ("ok" if r["available"] else "no") + (f" ({r['reason']})" if r["reason"] else "")
                     for n, r in row.items() if n != "auto"]
            lines.append(f"backends {device}/{dname}: auto -> {row['auto']}; " + "; ".join(parts))
    c = env["caches"]
    lines.append(f"caches: torch extensions {c['torch_extensions']}; triton {c['triton']}; "
                 f"kernel report {c['kernel_report']}; auto's measured choices {c['backend_choices']}")
    for lib in c["cuda_extension_builds"]:
        lines.append(f"  cuda extension built: {lib}")
    if env["env_vars"]:
        lines.append("environment: " + " ".join(f"{k}={v}" for k, v in env["env_vars"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resnet_fast.env", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print JSON")
    a = p.parse_args(argv)
    env = collect()
    print(json.dumps(env, indent=1, default=str) if a.json else format_text(env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
