"""The CUDA extension compiles for sm_80 and sm_90a and registers its kernels (no GPU needed).

Each architecture is built and loaded in a child process (``python -m resnet_fast.build --one``,
two builds cannot share a process), which reports what the dispatcher then holds. Builds are
cached in torch's extension folder, so a rerun only loads. Cold, on 2 CPU cores: ~1 min for
sm_80 and ~1.5-2 min for sm_90a.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from resnet_fast import ops
from resnet_fast.backends import cuda_backend

from .reference import run_python


def _toolchain_or_skip():
    try:
        return cuda_backend.check_toolchain()
    except cuda_backend.ToolchainError as e:
        pytest.skip(f"cannot build the CUDA extension here: {e}")


_reports: dict[str, dict] = {}


def _build(arch: str) -> dict:
    if arch not in _reports:
        _toolchain_or_skip()
        proc = subprocess.run([sys.executable, "-m", "resnet_fast.build", "--one", arch],
                              capture_output=True, text=True, timeout=1800,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert proc.returncode == 0, f"build for {arch} failed:\n{proc.stderr[-8000:]}"
        _reports[arch] = json.loads(proc.stdout.strip().splitlines()[-1])
    return _reports[arch]


@pytest.mark.slow
@pytest.mark.parametrize("arch,configs", [
    ("sm_80", {"sm80"}),
    ("sm_90a", {"sm90", "sm80"}),  # Hopper kernels first, the Ampere ones as fallback
])
def test_builds_and_registers(arch, configs):
    rep = _build(arch)
    print(f"{arch}: built/loaded in {rep['seconds']} s")
    for op, info in rep["ops"].items():
        assert info["cuda_kernel"], f"{op} has no CUDA kernel after loading the {arch} build"
    assert {c.split("_")[0] for c in rep["conv_configs"]} == configs
    assert rep["build_info"].startswith(f"arch={arch[:5]}")


def _types(schema: str) -> list[str]:
    """Argument and return types of a schema string, names dropped."""
    args, ret = schema.split("(", 1)[1].rsplit(") -> ", 1)
    out = [a.strip().split(" ")[0] for a in args.split(",") if a.strip()]
    return [re.sub(r"\(a!\)", "", t) for t in out] + ["->", ret.strip().split(" ")[0]]


@pytest.mark.slow
def test_cpp_kernels_match_python_schemas():
    """The schemas are defined once, in Python; the C++ kernels' inferred signatures must agree
    (the dispatcher enforces this at registration; this test states it and survives refactors)."""
    rep = _build("sm_80")
    code = (
        "import torch, json\n"
        f"torch.ops.load_library({rep['library']!r})\n"  # C++ first: the other order also works
        "from resnet_fast import ops\n"
        "ops.define_backend_ops('cuda')\n"
        "print(json.dumps({op: torch._C._dispatch_dump('resnet_fast::' + op) for op in "
        "('conv_bn_act_cuda', 'add_relu_cuda', 'add_relu_inplace_cuda')}))\n"
    )
    dumps = json.loads(run_python(code).strip().splitlines()[-1])
    python_schemas = {"conv_bn_act_cuda": ops.CONV_SCHEMA, "add_relu_cuda": ops.ADD_RELU_SCHEMA,
                      "add_relu_inplace_cuda": ops.ADD_RELU_INPLACE_SCHEMA}
    for op, dump in dumps.items():
        line = next(ln for ln in dump.splitlines() if ln.startswith("CUDA:"))
        inferred = line.split(" :: ", 1)[1].rsplit(" [", 1)[0]
        want = _types(python_schemas[op])
        got = _types(inferred)
        # an in-place op returns () in the schema; the C++ void function infers "()" too
        assert got == want, f"{op}: C++ kernel {inferred} vs Python schema {python_schemas[op]}"


def test_toolchain_errors_are_clear(monkeypatch):
    """A missing CUTLASS wheel is named, not left to a compiler dump."""
    import builtins

    real_import = builtins.__import__

    def no_cutlass(name, *a, **k):
        if name == "cutlass_library":
            raise ImportError("No module named 'cutlass_library'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_cutlass)
    with pytest.raises(cuda_backend.ToolchainError, match="pip install nvidia-cutlass"):
        cuda_backend.cutlass_include_dirs()


def test_arch_mapping():
    assert cuda_backend.arch_for_capability(9, 0) == "sm_90a"
    assert cuda_backend.arch_for_capability(8, 0) == "sm_80"
    assert cuda_backend.arch_for_capability(8, 6) == "sm_86"
    _, nv = cuda_backend.build_flags("sm_90a", True)
    assert "-gencode=arch=compute_90a,code=sm_90a" in nv and "-DRESNET_FAST_WITH_SM90" in nv
    _, nv = cuda_backend.build_flags("sm_80", False)
    assert "-gencode=arch=compute_80,code=sm_80" in nv and "-DRESNET_FAST_WITH_SM90" not in nv


def test_backend_unavailable_without_cuda_device():
    be = cuda_backend.CudaBackend()
    ok, why = be.available(torch.device("cpu"), torch.float16)
    assert not ok and "CUDA" in why
    ok, why = be.supports(torch.empty(1, 3, 8, 8), torch.empty(64, 3, 7, 7), 1)
    assert not ok and "multiple of 8" in why
    ok, why = be.supports(torch.empty(1, 64, 8, 8), torch.empty(64, 8, 3, 3), 8)
    assert not ok and "groups" in why
