"""The ``cuda`` backend: hand-written CUDA C++ / CUTLASS kernels from ``csrc/``.

Build: on first use, ``torch.utils.cpp_extension.load`` (ninja) compiles ``csrc/`` for the
architecture of the current GPU only (sm_90 -> sm_90a with the Hopper kernels, else e.g. sm_80)
and caches the library in torch's extension folder; later processes only load it. Prebuild with
``python -m resnet_fast.build``. Before compiling, :func:`check_toolchain` names what is missing
(nvcc / CUDA headers / the ``nvidia-cutlass`` wheel) instead of letting the compiler fail.

Op registration: the schemas come from :func:`resnet_fast.ops.define_backend_ops` (``"cuda"``
suffix, no Python kernels); the library adds the CUDA kernels with ``TORCH_LIBRARY_IMPL``. The
dispatcher checks each C++ kernel signature against the Python schema, whichever is registered
first, so a mismatch fails loudly at load time.

If the sm_90a build (the CUTLASS 3 Hopper kernels) fails to compile, the backend logs the error
once and builds the Ampere-only variant for plain sm_90 instead, so the backend keeps working.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .. import ops
from . import say_once
from .base import Backend

log = logging.getLogger("resnet_fast")

CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
if not (CSRC / "bindings.cpp").exists():  # installed (non-editable): csrc is resnet_fast/csrc
    import resnet_fast.csrc as _csrc_pkg

    CSRC = Path(_csrc_pkg.__file__).resolve().parent

COMMON_SOURCES = ("bindings.cpp", "add_relu.cu", "conv_sm80.cu")
SM90_SOURCES = ("conv_sm90.cu",)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


class ToolchainError(RuntimeError):
    """Something the build needs is missing; the message says what and how to get it."""


# ----------------------------------------------------------------------------------------------
# Toolchain discovery
# ----------------------------------------------------------------------------------------------
@dataclass
class Toolchain:
    cuda_home: str
    nvcc: str
    include_dirs: list[str] = field(default_factory=list)  # CUDA headers outside cuda_home, CUTLASS


def _site_dirs() -> list[str]:
    import site

    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    return list(dict.fromkeys(dirs))


def _find_cuda_home() -> Optional[str]:
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    # nvcc on PATH may be a wrapper script (as in /usr/local/bin/nvcc here), so its parent is not
    # necessarily the toolkit: prefer the conventional location when it has a real nvcc.
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def cutlass_include_dirs() -> list[str]:
    """The include folders of the installed ``nvidia-cutlass`` wheel (never vendored here)."""
    try:
        import cutlass_library
    except ImportError as e:
        raise ToolchainError("the CUTLASS headers are missing: pip install nvidia-cutlass") from e
    root = Path(cutlass_library.__file__).resolve().parent / "source"
    dirs = [root / "include", root / "tools" / "util" / "include"]
    if not (dirs[0] / "cutlass" / "cutlass.h").exists() or not (dirs[0] / "cute" / "tensor.hpp").exists():
        raise ToolchainError(f"the nvidia-cutlass wheel at {root} has no cutlass/cute headers; "
                             f"reinstall it: pip install --force-reinstall nvidia-cutlass")
    return [str(d) for d in dirs]


def check_toolchain() -> Toolchain:
    """Find nvcc, the CUDA headers torch's CUDA headers need, and CUTLASS; raise ToolchainError
    naming whatever is missing."""
    if not torch.version.cuda:
        raise ToolchainError(f"this torch ({torch.__version__}) is built without CUDA; "
                             f"install a CUDA build of torch")
    home = _find_cuda_home()
    if home is None:
        raise ToolchainError("nvcc not found: install the CUDA toolkit and set CUDA_HOME "
                             "(e.g. CUDA_HOME=/usr/local/cuda)")
    nvcc = os.path.join(home, "bin", "nvcc")
    extra: list[str] = []
    # ATen's CUDA headers include cuda_runtime.h, cusparse.h, cublas_v2.h...; a minimal toolkit
    # may lack the library headers, which pip's nvidia-* wheels (installed with torch) provide.
    needed = ("cuda_runtime.h", "cusparse.h", "cublas_v2.h")
    search = [os.path.join(home, "include")]
    search += [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
    search += sorted(p for d in _site_dirs() for p in glob.glob(os.path.join(d, "nvidia", "*", "include")))
    for header in needed:
        where = next((d for d in search if os.path.exists(os.path.join(d, header))), None)
        if where is None:
            raise ToolchainError(f"CUDA header {header} not found in {search}; install the CUDA "
                                 f"toolkit's development headers or the nvidia-*-cu13 wheels, or add "
                                 f"their include folder to CPATH")
        if where != os.path.join(home, "include") and where not in extra:
            extra.append(where)
    return Toolchain(cuda_home=home, nvcc=nvcc, include_dirs=extra + cutlass_include_dirs())


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------
def arch_for_capability(major: int, minor: int) -> str:
    """sm_90 gets the arch-specific sm_90a (wgmma, TMA im2col); others their plain sm_XY."""
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


def _arch_number(arch: str) -> int:
    return int(arch[3:].rstrip("a"))


def build_flags(arch: str, with_sm90: bool) -> tuple[list[str], list[str]]:
    """(host cflags, nvcc cflags) for one architecture."""
    num = _arch_number(arch)
    defines = [f"-DRESNET_FAST_ARCH={num}"] + (["-DRESNET_FAST_WITH_SM90"] if with_sm90 else [])
    # Host side: torch picks the C++ standard its headers need (C++20 in recent releases), so no
    # -std here. The .cu files never include torch headers, so nvcc stays on C++17 (CUTLASS's
    # tested standard).
    cflags = ["-O3"] + defines
    cuda_cflags = [
        "-O3", "-std=c++17", "--expt-relaxed-constexpr",
        f"-gencode=arch=compute_{arch[3:]},code={arch}",
        # CUTLASS wants the real half/bf16 operators; torch's default flags turn them off.
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
        "-DNDEBUG",
    ] + defines
    return cflags, cuda_cflags


def extension_name(arch: str, with_sm90: bool) -> str:
    return f"resnet_fast_cuda_{arch}" + ("" if with_sm90 or not arch.startswith("sm_90") else "_nosm90")


def build(arch: str, with_sm90: Optional[bool] = None, verbose: bool = False) -> str:
    """Compile (or reuse the cached build of) the extension for `arch` and load it into this
    process; returns the library path. with_sm90 defaults to arch == "sm_90a"."""
    if with_sm90 is None:
        with_sm90 = arch == "sm_90a"
    if with_sm90 and arch != "sm_90a":
        raise ValueError("the Hopper kernels need arch sm_90a")
    tc = check_toolchain()
    # cpp_extension decides CUDA_HOME when it is first imported (guessing from the nvcc on PATH,
    # which may be a wrapper script); make it use the toolkit found above either way.
    os.environ.setdefault("CUDA_HOME", tc.cuda_home)
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.CUDA_HOME = tc.cuda_home
    sources = [str(CSRC / s) for s in COMMON_SOURCES + (SM90_SOURCES if with_sm90 else ())]
    cflags, cuda_cflags = build_flags(arch, with_sm90)
    # ninja runs one compiler per source; more jobs than sources buys nothing, and each CUTLASS
    # compile takes ~1-2 GB of memory.
    old_jobs = os.environ.get("MAX_JOBS")
    if old_jobs is None:
        os.environ["MAX_JOBS"] = str(max(1, min(len(sources), os.cpu_count() or 1)))
    try:
        # Schemas first (the single source of truth), then the library adds its CUDA kernels.
        ops.define_backend_ops("cuda")
        path = cpp_extension.load(
            name=extension_name(arch, with_sm90),
            sources=sources,
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_cflags,
            extra_include_paths=[str(CSRC)] + tc.include_dirs,
            with_cuda=True,
            is_python_module=False,
            verbose=verbose,
        )
    finally:
        if old_jobs is None:
            os.environ.pop("MAX_JOBS", None)
    return path


_lock = threading.Lock()
_loaded: dict = {}  # "arch" -> str, "path" -> str, "sm90_error" -> str | None


def ensure_loaded(device: Optional[torch.device] = None) -> dict:
    """Build/load the extension for the current GPU once per process; returns a dict with
    arch, path and sm90_error (the compile error of the Hopper kernels, if they failed)."""
    with _lock:
        if _loaded:
            return _loaded
        if not torch.cuda.is_available():
            raise RuntimeError("the cuda backend needs a CUDA device (none found)")
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        arch = arch_for_capability(*torch.cuda.get_device_capability(dev))
        info = {"arch": arch, "path": None, "sm90_error": None}
        if arch == "sm_90a":
            try:
                info["path"] = build(arch)
            except ToolchainError:
                raise
            except Exception as e:  # the CUTLASS 3 kernels failed: keep the Ampere kernels working
                info["sm90_error"] = f"{type(e).__name__}: {e}"
                say_once("resnet_fast: building the sm_90a (Hopper) CUDA kernels failed; using the "
                         "CUTLASS 2.x kernels on sm_90 instead. Error:\n" + info["sm90_error"][-4000:],
                         logging.WARNING)
                arch = info["arch"] = "sm_90"
                info["path"] = build(arch, with_sm90=False)
        else:
            info["path"] = build(arch)
        _loaded.update(info)
        return _loaded


# ----------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------
class CudaBackend(Backend):
    name = "cuda"
    requires_nhwc = True

    def __init__(self):
        self._ops = None

    def _load(self):
        if self._ops is None:
            ensure_loaded()
            self._ops = ops.define_backend_ops("cuda")
        return self._ops

    def available(self, device, dtype):
        device = torch.device(device)
        if device.type != "cuda":
            return False, f"runs on CUDA devices only, not {device.type}"
        if dtype not in SUPPORTED_DTYPES:
            return False, f"compiled for float16/bfloat16 only, not {dtype}"
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return False, f"needs sm_80 or newer (tensor-core mma.sync for bf16), got sm_{major}x"
        try:
            self._load()
        except Exception as e:  # a failed build makes the backend unavailable, with the reason
            return False, f"{type(e).__name__}: {e}"
        return True, ""

    def supports(self, x, weight, groups, pre=False):
        if groups != 1:
            return False, f"grouped convolution (groups={groups}) is not implemented"
        if pre:
            return False, "the CUTLASS kernels have no pre-activation prologue"
        if x.dim() == 4 and x.shape[1] % 8:
            return False, f"input channels ({x.shape[1]}) must be a multiple of 8 (16-byte vectors)"
        if weight is not None and weight.shape[0] % 8:
            return False, f"output channels ({weight.shape[0]}) must be a multiple of 8"
        return True, ""

    def conv_bn_act(self, x, weight, bias, stride, padding, dilation, groups,
                    residual, relu, pre_scale, pre_bias):
        if pre_scale is not None:
            # resolve() sends these calls elsewhere (supports(pre=True) says no); this is for a
            # caller holding the backend object itself.
            say_once("resnet_fast: the cuda backend has no pre-activation prologue; running the "
                     "reference for convs with pre_scale/pre_bias", logging.WARNING)
            return ops.conv_bn_act_reference(x, weight, bias, stride, padding, dilation, groups,
                                             residual, relu, pre_scale, pre_bias)
        conv, _, _ = self._load()
        return conv(x, weight, bias, list(stride), list(padding), list(dilation), groups,
                    residual, relu, None, None)

    def add_relu(self, a, b):
        _, add_relu, _ = self._load()
        return add_relu(a, b)

    def add_relu_(self, a, b):
        _, _, add_relu_inplace = self._load()
        add_relu_inplace(a, b)


# ----------------------------------------------------------------------------------------------
# Introspection (tests, benchmarks)
# ----------------------------------------------------------------------------------------------
def conv_configs() -> list[str]:
    """Names of the compiled conv tile configurations, preferred family first."""
    ensure_loaded()
    return list(torch.ops.resnet_fast._cuda_conv_configs())


def force_conv_config(name: str = "") -> None:
    """Run every conv with one configuration (a name from conv_configs()); "" = measured choice."""
    ensure_loaded()
    torch.ops.resnet_fast._cuda_force_conv_config(name)


def conv_choices() -> list[str]:
    """The per-shape choices made so far ("shape key -> config")."""
    ensure_loaded()
    return list(torch.ops.resnet_fast._cuda_conv_choices())
