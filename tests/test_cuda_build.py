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
    with pytest.raises(cuda_backend.ToolchainError, match="pip install nvidia-cutlass") as e:
        cuda_backend.cutlass_include_dirs()
    assert "pip install 'resnet_fast[cuda]'" in str(e.value)  # the extra that brings it


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


# ----------------------------------------------------------------------------------------------
# Toolchain conventions: TORCH_CUDA_ARCH_LIST, CUDA_HOME, os.environ left alone, build log lines
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,archs", [
    ("8.0;9.0a", ["sm_80", "sm_90a"]),
    ("8.0 9.0+PTX", ["sm_80", "sm_90a"]),  # 9.0 is the Hopper build; +PTX dropped
    ("8.6,8.9", ["sm_86", "sm_89"]),
    (" 8.0 ; 8.0+PTX ", ["sm_80"]),
    ("Ampere;Hopper", ["sm_80", "sm_86", "sm_90a"]),
    ("sm_80 sm_90a", ["sm_80", "sm_90a"]),
    ("sm_90", ["sm_90"]),  # written out: the build without the Hopper kernels
    ("7.5;8.0", ["sm_75", "sm_80"]),
    ("10.0a", ["sm_100a"]),
    ("", None), ("native", None), (None, None),
])
def test_parse_arch_list(value, archs):
    assert cuda_backend.parse_arch_list(value) == archs


@pytest.mark.parametrize("value", ["8", "sm80", "9.0b", "Fermi", "8.0;;x"])
def test_parse_arch_list_rejects(value):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        cuda_backend.parse_arch_list(value)


def test_jit_build_takes_the_listed_arch_of_this_gpu(monkeypatch):
    jit = cuda_backend.jit_arch
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert jit(9, 0) == "sm_90a" and jit(8, 6) == "sm_86"
    assert jit(9, 0, "8.0;9.0") == "sm_90a"
    assert jit(8, 6, "8.0;9.0") == "sm_80"   # sm_80 SASS runs on 8.6
    assert jit(8, 9, "8.0;8.6") == "sm_86"   # the newest that runs
    assert jit(9, 0, "sm_90") == "sm_90"
    for cap, value in (((9, 0), "8.0;8.6"), ((8, 0), "8.6;9.0a"), ((8, 6), "9.0a")):
        with pytest.raises(cuda_backend.ToolchainError, match="none of which runs") as e:
            jit(*cap, value)
        assert f"TORCH_CUDA_ARCH_LIST={value!r}" in str(e.value) and f"{cap[0]}.{cap[1]}" in str(e.value)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")  # read from the environment by default
    assert jit(8, 6) == "sm_80"
    with pytest.raises(cuda_backend.ToolchainError):
        jit(9, 0)


def test_build_command_reads_torch_cuda_arch_list(monkeypatch):
    from resnet_fast import build as build_cmd

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5;8.0 9.0+PTX")
    assert build_cmd._archs_from_env(build_cmd.argparse.ArgumentParser()) == ["sm_80", "sm_90a"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0")
    with pytest.raises(SystemExit):
        build_cmd._archs_from_env(build_cmd.argparse.ArgumentParser())
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert build_cmd._archs_from_env(build_cmd.argparse.ArgumentParser()) == []


@pytest.mark.parametrize("var", ["CUDA_HOME", "CUDA_PATH"])
def test_cuda_home_pointing_nowhere_is_an_error(monkeypatch, tmp_path, var):
    if not torch.version.cuda:
        pytest.skip("a CPU build of torch fails the toolchain check before CUDA_HOME")
    nowhere = tmp_path / "no-cuda-here"
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv(var, str(nowhere))
    with pytest.raises(cuda_backend.ToolchainError) as e:
        cuda_backend.check_toolchain()
    assert f"{var}={nowhere}" in str(e.value) and "bin/nvcc" in str(e.value)


def _fake_toolchain(tmp_path):
    return cuda_backend.Toolchain(cuda_home=str(tmp_path / "cuda"), nvcc=str(tmp_path / "cuda/bin/nvcc"))


def test_environ_unchanged_by_the_toolchain_check_and_the_build_environment(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.delenv("MAX_JOBS", raising=False)
    before = dict(os.environ)
    try:
        cuda_backend.check_toolchain()
    except cuda_backend.ToolchainError:
        pass
    assert dict(os.environ) == before
    home_before = cpp_extension.CUDA_HOME
    tc = _fake_toolchain(tmp_path)
    with cuda_backend.build_environment(tc, 3) as ext:
        assert os.environ["CUDA_HOME"] == tc.cuda_home and ext.CUDA_HOME == tc.cuda_home
        assert 1 <= int(os.environ["MAX_JOBS"]) <= 3
    assert dict(os.environ) == before and cpp_extension.CUDA_HOME == home_before
    # restored when the build fails too, and the caller's own MAX_JOBS / CUDA_HOME are kept
    monkeypatch.setenv("MAX_JOBS", "7")
    monkeypatch.setenv("CUDA_HOME", "/somewhere/else")
    before = dict(os.environ)
    with pytest.raises(RuntimeError, match="boom"):
        with cuda_backend.build_environment(tc, 3):
            assert os.environ["MAX_JOBS"] == "7"
            raise RuntimeError("boom")
    assert dict(os.environ) == before and cpp_extension.CUDA_HOME == home_before


def test_build_logs_start_and_end_and_leaves_environ(monkeypatch, tmp_path, caplog):
    """build() with torch's compile step faked: the INFO lines a first use shows, and os.environ
    as it was (no nvcc runs here)."""
    import logging

    import torch.utils.cpp_extension as cpp_extension

    tc = _fake_toolchain(tmp_path)
    monkeypatch.setattr(cuda_backend, "check_toolchain", lambda: tc)
    monkeypatch.setattr(ops, "define_backend_ops", lambda *a, **k: None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("MAX_JOBS", raising=False)
    seen = {}

    def fake_load(name, **kw):
        seen.update(name=name, cuda_home=os.environ.get("CUDA_HOME"), jobs=os.environ.get("MAX_JOBS"),
                    flags=kw["extra_cuda_cflags"])
        lib = tmp_path / "ext" / name / f"{name}.so"
        lib.parent.mkdir(parents=True, exist_ok=True)
        lib.write_bytes(b"")
        return str(lib)

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    before = dict(os.environ)
    with caplog.at_level(logging.INFO, logger="resnet_fast"):
        path = cuda_backend.build("sm_80")
    assert dict(os.environ) == before
    assert seen["cuda_home"] == tc.cuda_home and seen["jobs"] and seen["name"] == "resnet_fast_cuda_sm_80"
    assert path == str(cuda_backend.library_path("sm_80"))
    msgs = [r.getMessage() for r in caplog.records if r.name == "resnet_fast"]
    start = next(m for m in msgs if "compiling the CUDA kernels" in m)
    assert "sm_80" in start and "minutes" in start
    end = next(m for m in msgs if "built in" in m)
    assert "sm_80" in end and path in end and " s" in end
    # cached: the second call logs no compile line at INFO
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="resnet_fast"):
        cuda_backend.build("sm_80")
    assert not any("compiling" in r.getMessage() for r in caplog.records)


def test_available_never_builds(monkeypatch, tmp_path):
    """CudaBackend.available (what resolve() and the env report ask) on a faked sm_90 GPU: the
    toolchain and the arch list are checked, nothing is built or loaded."""
    be = cuda_backend.CudaBackend()
    ok, why = be.available(torch.device("cpu"), torch.float16)
    assert not ok and "CUDA" in why

    def no_build(*a, **k):
        raise AssertionError("available() must not build")

    monkeypatch.setattr(cuda_backend, "ensure_loaded", no_build)
    monkeypatch.setattr(cuda_backend, "build", no_build)
    monkeypatch.setattr(cuda_backend, "_loaded", {})
    monkeypatch.setattr(cuda_backend, "check_toolchain", lambda: _fake_toolchain(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    ok, why = be.available(torch.device("cuda"), torch.bfloat16)
    assert ok and "not built yet for sm_90a" in why
    ok, why = be.available(torch.device("cuda"), torch.float32)
    assert not ok and "float16/bfloat16" in why
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    ok, why = be.available(torch.device("cuda"), torch.bfloat16)
    assert not ok and "TORCH_CUDA_ARCH_LIST" in why


def test_prepare_builds_once_and_remembers_a_failure(monkeypatch):
    """prepare() is the one step that builds; a failed build makes the backend unavailable with
    the reason, and is not retried on every call (a compile takes minutes)."""
    be = cuda_backend.CudaBackend()
    calls = []

    def failing_load():
        calls.append(1)
        raise cuda_backend.ToolchainError("nvcc exploded")

    monkeypatch.setattr(be, "_load", failing_load)
    for _ in range(3):
        ok, why = be.prepare(torch.device("cuda"))
        assert not ok and "nvcc exploded" in why
    assert calls == [1]
    ok_be = cuda_backend.CudaBackend()
    monkeypatch.setattr(ok_be, "_load", lambda: setattr(ok_be, "_ops", ("conv", "add", "add_")))
    assert ok_be.prepare(torch.device("cuda")) == (True, "")


def test_ready_is_available_then_prepare():
    from resnet_fast import backends
    assert backends.ready("torch", torch.device("cpu"), torch.float32) == (True, "")
    ok, why = backends.ready("cuda", torch.device("cpu"), torch.float16)
    assert not ok and "CUDA devices only" in why
