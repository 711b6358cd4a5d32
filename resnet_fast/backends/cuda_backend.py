"""The ``cuda`` backend: hand-written CUDA C++ / CUTLASS kernels from ``csrc/``.

Build: on first use, ``torch.utils.cpp_extension.load`` (ninja) compiles ``csrc/`` for the
architecture of the current GPU only (sm_90 -> sm_90a with the Hopper kernels, else e.g. sm_80)
and caches the library in torch's extension folder; later processes only load it. Prebuild with
``python -m resnet_fast.build``. Before compiling, :func:`check_toolchain` names what is missing
(nvcc / CUDA headers / the ``nvidia-cutlass`` wheel, i.e. the ``cuda`` extra) instead of letting
the compiler fail. The build logs (logger ``resnet_fast``, INFO) when it starts compiling, for
which arch, and when it is done, with the seconds and the library's path.

Conventions of torch's own extension builds: ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0a"``, see
:func:`parse_arch_list`) names the architectures to build for, both for ``python -m
resnet_fast.build`` and for the build on first use, which takes the listed arch that runs on the
current GPU (or says that none does); ``CUDA_HOME`` / ``CUDA_PATH`` name the toolkit, and one
that holds no ``bin/nvcc`` is an error, not a reason to look elsewhere. The build sets
``CUDA_HOME`` and ``MAX_JOBS`` for torch's build only and restores the caller's ``os.environ``.

Op registration: the schemas come from :func:`resnet_fast.ops.define_backend_ops` (``"cuda"``
suffix, no Python kernels); the library adds the CUDA kernels with ``TORCH_LIBRARY_IMPL``. The
dispatcher checks each C++ kernel signature against the Python schema, whichever is registered
first, so a mismatch fails loudly at load time.

If the sm_90a build (the CUTLASS 3 Hopper kernels) fails to compile, the backend logs the error
once and builds the Ampere-only variant for plain sm_90 instead, so the backend keeps working.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import sys
import threading
import time
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
        if home:
            if os.path.exists(os.path.join(home, "bin", "nvcc")):
                return home
            # the caller named a toolkit: building against another one would be a surprise
            raise ToolchainError(f"{env}={home} has no bin/nvcc: point {env} at the CUDA toolkit "
                                 f"(the folder holding bin/nvcc), or unset it to use /usr/local/cuda "
                                 f"or the nvcc on PATH")
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
        raise ToolchainError("the CUTLASS headers are missing (the cuda extra): "
                             "pip install 'resnet_fast[cuda]', or pip install nvidia-cutlass") from e
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


def nvcc_version(nvcc: str) -> Optional[str]:
    """e.g. "12.8" from ``nvcc --version``; None when it does not run."""
    import subprocess

    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------
def arch_for_capability(major: int, minor: int) -> str:
    """sm_90 gets the arch-specific sm_90a (wgmma, TMA im2col); others their plain sm_XY."""
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


def _arch_number(arch: str) -> int:
    return int(arch[3:].rstrip("a"))


ARCH_LIST_ENV = "TORCH_CUDA_ARCH_LIST"
#: the named architectures of torch's TORCH_CUDA_ARCH_LIST (the forms torch's own builds accept)
NAMED_ARCHS = {
    "kepler+tesla": "3.7", "kepler": "3.5", "maxwell+tegra": "5.3", "maxwell": "5.0;5.2",
    "pascal": "6.0;6.1", "volta+tegra": "7.2", "volta": "7.0", "turing": "7.5",
    "ampere+tegra": "8.7", "ampere": "8.0;8.6", "ada": "8.9", "hopper": "9.0",
    "blackwell+tegra": "11.0", "blackwell": "10.0;10.3;12.0;12.1", "rubin": "10.7",
}
#: the oldest arch the kernels run on (bf16 mma.sync, cp.async)
MIN_ARCH = 80


def parse_arch_list(value: Optional[str]) -> Optional[list[str]]:
    """TORCH_CUDA_ARCH_LIST in torch's forms -> this project's arch names, in order, once each.

    ``"8.0;9.0a"``, ``"8.0 9.0+PTX"``, ``"8.6,8.9"``, ``"Ampere;Hopper"`` and this project's own
    ``"sm_80 sm_90a"`` are understood. ``9.0`` means ``sm_90a``, as :func:`arch_for_capability`
    does: the Hopper build is the sm_90a one, and its SASS runs on every compute capability 9.0
    GPU (``sm_90`` written out asks for the build without the Hopper kernels). ``+PTX`` is
    accepted and dropped: the library holds SASS for the listed archs only. None (unset, empty
    or ``native``) means "the GPU of this machine". Unknown entries raise ValueError.
    """
    if value is None or not value.strip() or value.strip().lower() == "native":
        return None
    out: list[str] = []
    for item in re.split(r"[;,\s]+", value.strip()):
        if not item:
            continue
        expanded = NAMED_ARCHS.get(item.lower())
        for entry in (expanded.split(";") if expanded else [item]):
            out.append(_arch_name(entry, value))
    return list(dict.fromkeys(out))


def _arch_name(entry: str, whole: str) -> str:
    m = re.fullmatch(r"sm_(\d+)(a?)", entry)
    if m:
        return f"sm_{m.group(1)}{m.group(2)}"
    m = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+ptx)?", entry, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"{ARCH_LIST_ENV}={whole!r}: cannot read {entry!r} (expected e.g. 8.0, 9.0a, "
                         f"8.6+PTX, Ampere or sm_80)")
    major, minor, suffix = int(m.group(1)), int(m.group(2)), m.group(3).lower()
    arch = arch_for_capability(major, minor)
    if suffix and not arch.endswith("a"):
        arch += "a"  # 10.0a -> sm_100a ("f", the family form, builds the arch-specific one too)
    return arch


def arch_runs_on(arch: str, major: int, minor: int) -> bool:
    """Whether a library built for `arch` runs on a GPU of compute capability major.minor: SASS
    runs on the same major with an equal or newer minor; an arch-specific (``a``) build only on
    its own capability."""
    num = _arch_number(arch)
    if arch.endswith("a"):
        return num == 10 * major + minor
    return num // 10 == major and num % 10 <= minor


def jit_arch(major: int, minor: int, value: Optional[str] = None) -> str:
    """The arch the build on first use compiles for a GPU of capability major.minor: its own
    (:func:`arch_for_capability`), or, when TORCH_CUDA_ARCH_LIST is set, the listed arch that
    runs on it (its own if listed, else the newest compatible one); ToolchainError if none."""
    value = os.environ.get(ARCH_LIST_ENV) if value is None else value
    own = arch_for_capability(major, minor)
    try:
        listed = parse_arch_list(value)
    except ValueError as e:
        raise ToolchainError(str(e)) from e
    if listed is None:
        return own
    if own in listed:
        return own
    fits = [a for a in listed if arch_runs_on(a, major, minor)]
    if not fits:
        raise ToolchainError(f"{ARCH_LIST_ENV}={value!r} lists {', '.join(listed)}, none of which runs "
                             f"on this GPU (compute capability {major}.{minor}, built as {own}): add "
                             f"{major}.{minor} to it, or unset it to build for this GPU")
    return max(fits, key=lambda a: (_arch_number(a), a.endswith("a")))


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


def torch_extensions_dir() -> str:
    """The folder torch.utils.cpp_extension builds and caches extensions in (read, not created)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return root
    try:  # what cpp_extension.get_default_build_root() returns, without importing cpp_extension
        # (its import guesses CUDA_HOME and warns when it finds no toolkit)
        from torch._appdirs import user_cache_dir

        base = os.path.realpath(user_cache_dir(appname="torch_extensions"))
    except ImportError:
        from torch.utils.cpp_extension import get_default_build_root

        base = get_default_build_root()
    accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accel}"
    return os.path.join(base, tag)


def library_path(arch: str, with_sm90: Optional[bool] = None) -> Path:
    """Where the build for `arch` puts (or has put) its library. (torch releases before the
    py<ver>_cu<ver> subfolder of the extensions folder build in the folder itself: a library
    found there counts too.)"""
    if with_sm90 is None:
        with_sm90 = arch == "sm_90a"
    name = extension_name(arch, with_sm90)
    root = Path(torch_extensions_dir())
    here = root / name / f"{name}.so"
    older = root.parent / name / f"{name}.so"
    return older if not here.exists() and not os.environ.get("TORCH_EXTENSIONS_DIR") and older.exists() else here


def _needs_compile(lib: Path, sources: list[str]) -> bool:
    """A guess of what ninja will decide (logged, nothing depends on it): no library yet, or a
    source or header of csrc/ newer than it."""
    if not lib.exists():
        return True
    built = lib.stat().st_mtime
    deps = [Path(p) for p in sources] + [p for p in CSRC.iterdir() if p.suffix in (".h", ".cuh")]
    return any(p.exists() and p.stat().st_mtime > built for p in deps)


@contextlib.contextmanager
def build_environment(tc: Toolchain, n_sources: int):
    """CUDA_HOME (the toolkit check_toolchain found) and MAX_JOBS for torch.utils.cpp_extension,
    set for the duration of the build only: the caller's os.environ (and cpp_extension.CUDA_HOME)
    are restored exactly afterwards, whatever happens inside."""
    want = {"CUDA_HOME": tc.cuda_home}
    if not os.environ.get("MAX_JOBS"):
        # ninja runs one compiler per source; more jobs than sources buys nothing, and each
        # CUTLASS compile takes ~1-2 GB of memory.
        want["MAX_JOBS"] = str(max(1, min(n_sources, os.cpu_count() or 1)))
    saved = {k: os.environ.get(k) for k in want}
    os.environ.update(want)
    # cpp_extension decides CUDA_HOME when it is first imported (guessing from the nvcc on PATH,
    # which may be a wrapper script); make it use the toolkit found above either way.
    import torch.utils.cpp_extension as cpp_extension

    saved_home = cpp_extension.CUDA_HOME
    cpp_extension.CUDA_HOME = tc.cuda_home
    try:
        yield cpp_extension
    finally:
        cpp_extension.CUDA_HOME = saved_home
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build(arch: str, with_sm90: Optional[bool] = None, verbose: bool = False) -> str:
    """Compile (or reuse the cached build of) the extension for `arch` and load it into this
    process; returns the library path. with_sm90 defaults to arch == "sm_90a"."""
    if with_sm90 is None:
        with_sm90 = arch == "sm_90a"
    if with_sm90 and arch != "sm_90a":
        raise ValueError("the Hopper kernels need arch sm_90a")
    tc = check_toolchain()
    sources = [str(CSRC / s) for s in COMMON_SOURCES + (SM90_SOURCES if with_sm90 else ())]
    cflags, cuda_cflags = build_flags(arch, with_sm90)
    name = extension_name(arch, with_sm90)
    lib = library_path(arch, with_sm90)
    compiling = _needs_compile(lib, sources)
    if compiling:
        log.info("resnet_fast: compiling the CUDA kernels for %s%s with %s (once per machine; this "
                 "takes a few minutes, `python -m resnet_fast.build` does it ahead of time)",
                 arch, " (with the Hopper kernels)" if with_sm90 else "", tc.nvcc)
    start = time.perf_counter()
    with build_environment(tc, len(sources)) as cpp_extension:
        # Schemas first (the single source of truth), then the library adds its CUDA kernels.
        ops.define_backend_ops("cuda")
        path = cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_cflags,
            extra_include_paths=[str(CSRC)] + tc.include_dirs,
            with_cuda=True,
            is_python_module=False,
            verbose=verbose,
        )
    seconds = time.perf_counter() - start
    if compiling or seconds > 10:
        log.info("resnet_fast: CUDA kernels for %s built in %.0f s: %s", arch, seconds, path)
    else:
        log.debug("resnet_fast: loaded the cached CUDA kernels for %s: %s", arch, path)
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
        arch = jit_arch(*torch.cuda.get_device_capability(dev))  # TORCH_CUDA_ARCH_LIST if set
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
        self._prepare_error: Optional[str] = None  # a failed build is not retried every call

    def prepare(self, device) -> tuple[bool, str]:
        """Build (minutes, once per machine) or load the extension for this GPU, once per process."""
        if self._ops is not None:
            return True, ""
        if self._prepare_error is None:
            try:
                self._load()
                return True, ""
            except Exception as e:  # a failed build makes the backend unavailable, with the reason
                self._prepare_error = f"{type(e).__name__}: {e}"
        return False, self._prepare_error

    def _load(self):
        if self._ops is None:
            ensure_loaded()
            self._ops = ops.define_backend_ops("cuda")
        return self._ops

    def max_pool2d(self, x, kernel_size, stride, padding, dilation, ceil_mode):
        """The Triton NHWC pool where Triton runs (no CUTLASS pool), else torch's."""
        from . import available, get
        if available("triton", x.device, x.dtype)[0]:
            return get("triton").max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
        return super().max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)

    def fp8_support(self, device):
        """No CUTLASS fp8 conv yet: fp8 inference on this backend runs the Triton fp8 kernel."""
        from . import get
        return get("triton").fp8_support(device)

    def conv_bn_act_fp8(self, *args):
        from . import get
        return get("triton").conv_bn_act_fp8(*args)

    def training_ops(self, device, dtype):
        """No CUTLASS training kernels yet (a statistics epilogue is issue-17 follow-up work):
        training on this backend runs the Triton training kernels where Triton can run, else the
        reference ops; inference keeps the CUTLASS convs."""
        from . import available, get, say_once
        ok, why = available("triton", device, dtype)
        if ok:
            say_once("resnet_fast: backend 'cuda' trains on the Triton training kernels "
                     "(no CUTLASS statistics epilogue yet)")
            return get("triton").training_ops(device, dtype)
        say_once(f"resnet_fast: backend 'cuda' trains on the reference ops (Triton: {why})")
        return super().training_ops(device, dtype)

    def _device_check(self, device, dtype) -> tuple[bool, str]:
        device = torch.device(device)
        if device.type != "cuda":
            return False, f"runs on CUDA devices only, not {device.type}"
        if dtype not in SUPPORTED_DTYPES:
            return False, f"compiled for float16/bfloat16 only, not {dtype}"
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return False, f"needs sm_80 or newer (tensor-core mma.sync for bf16), got sm_{major}x"
        return True, ""

    def available(self, device, dtype) -> tuple[bool, str]:
        """Whether the backend can run here, without building or loading anything: the device
        and dtype checks, the toolchain, and whether a build for this GPU is cached. (True, note):
        the note says whether the first use compiles (minutes) or loads the cached library.
        :meth:`prepare` does the build."""
        ok, why = self._device_check(device, dtype)
        if not ok:
            return ok, why
        if _loaded:
            return True, f"loaded ({_loaded['arch']}: {_loaded['path']})"
        try:
            arch = jit_arch(*torch.cuda.get_device_capability(torch.device(device)))
            check_toolchain()
        except ToolchainError as e:
            return False, f"ToolchainError: {e}"
        lib = library_path(arch)
        if lib.exists():
            return True, f"built for {arch}: {lib}"
        return True, f"not built yet for {arch}: the first use compiles it (minutes)"

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
