"""``python -m resnet_fast.env``: the environment report for bug reports (versions, GPUs,
backends per device and dtype, caches), as text and as JSON, without building anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, **env):
    e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    e.update(env)
    proc = subprocess.run([sys.executable, "-m", "resnet_fast.env", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=e)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_env_json_keys(tmp_path):
    ext = tmp_path / "ext"  # an empty extension folder: a build there would show up
    proc = _run("--json", TORCH_EXTENSIONS_DIR=str(ext))
    env = json.loads(proc.stdout)
    for k in ("python", "platform", "resnet_fast", "torch", "triton", "torchvision", "timm", "cutlass",
              "cuda", "cudnn", "toolchain", "gpus", "backends", "caches", "env_vars"):
        assert k in env, k
    import torch

    assert env["torch"] == torch.__version__ and env["cuda"] == torch.version.cuda
    assert set(env["toolchain"]) >= {"cuda_home", "nvcc", "nvcc_version", "ok", "error"}
    assert isinstance(env["gpus"], list) and len(env["gpus"]) == torch.cuda.device_count()
    assert set(env["backends"]) == {"cpu", "cuda"}
    for device, rows in env["backends"].items():
        assert set(rows) == {"fp32", "fp16", "bf16"}
        for row in rows.values():
            assert set(row) == {"triton", "cuda", "torch", "auto"}
            for name in ("triton", "cuda", "torch"):
                assert isinstance(row[name]["available"], bool)
                assert row[name]["available"] or row[name]["reason"], (device, name, row)
    assert env["backends"]["cpu"]["fp32"]["torch"]["available"] is True
    assert env["backends"]["cpu"]["bf16"]["cuda"]["available"] is False
    assert set(env["caches"]) >= {"torch_extensions", "triton", "kernel_report", "cuda_extension_builds"}
    assert env["caches"]["torch_extensions"] == str(ext) and env["env_vars"]["TORCH_EXTENSIONS_DIR"] == str(ext)
    assert not ext.exists(), "the env report must not build (or create) the CUDA extension"


def test_env_text():
    out = _run().stdout
    assert out.startswith("resnet_fast ") and "torch " in out and "backends cpu/fp32: auto -> " in out
    import torch

    if not torch.cuda.is_available():
        assert "\nno GPU\n" in out


def test_benchmark_env_shares_the_fields(tmp_path):
    import torch

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from benchmarks import env as bench_env

    from resnet_fast import env as rf_env

    got = bench_env.collect(torch.device("cpu"), ROOT, [])
    mine = rf_env.versions()
    for k in ("python", "platform", "torch", "torchvision", "triton", "timm", "cutlass", "cuda", "cudnn"):
        assert got[k] == mine[k], k
    for k in ("commit", "dirty", "command", "timestamp_utc", "hostname", "cpu_count", "gpu"):
        assert k in got, k
